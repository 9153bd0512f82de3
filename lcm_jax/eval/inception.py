"""The FID Inception network (pytorch-fid's `InceptionV3`, pool3 features) in Flax.

This is the TensorFlow 2015-12-05 Inception graph that every published FID uses, as
pytorch-fid ports it: torchvision's Inception-v3 layout with the FID variant's blocks:

* every conv has no bias and is followed by BatchNorm (eps 1e-3) and ReLU (`BasicConv2d`);
* the pool branches of Mixed_5b..5d, 6b..6e and 7b *average without counting the padding*
  (TensorFlow's SAME average pool; torch's `count_include_pad=False`);
* Mixed_7c's pool branch *max*-pools (a quirk of the TF graph that FID keeps);
* the output is the 2048-d global average of Mixed_7c ("pool3").

Input preprocessing, mode "pytorch_fid" (the default, pytorch-fid's numbers): uint8 -> /255,
bilinear resize to 299x299 with half-pixel centres and no antialiasing (torch's
`interpolate(mode="bilinear", align_corners=False)`; `jax.image.resize`'s default
`antialias=True` low-passes a downscale and differs), then 2x - 1. Mode "clean"
(clean-fid): a PIL bicubic resize of each float channel on the host, then (x - 128) / 128.

Parameters follow `lcm_jax.weights`' naming contract, so the torch state dict
(`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`) loads by name. Weights: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, converted once by
`python -m lcm_jax.eval.convert_inception` to safetensors (`load_inception`), or fetched and
converted by `convert_inception.fetch_inception_weights` when online.
"""

from __future__ import annotations

from collections.abc import Sequence
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import weights
from lcm_jax.errors import LcmJaxError

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
MODES = ("pytorch_fid", "clean")

# Pairs (size, stride) and paddings as torchvision writes them; (kh, kw) where not square.
_Size = int | tuple[int, int]


def _pair(v: _Size) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm with torch's running statistics as parameters. [..., C] -> [..., C].

  Only for random-weight networks (`random_params`): when the "calibration" collection is
  mutable, it normalises with the batch's own statistics and records them there.
  """
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    if self.is_mutable_collection("calibration"):
      axes = tuple(range(x.ndim - 1))
      mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
      self.put_variable("calibration", "mean", mean)
      self.put_variable("calibration", "var", var)
    # torch's eval batch_norm: (x - mean) * (weight / sqrt(var + eps)) + bias.
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, named `conv` and `bn`. NHWC -> NHWC."""
  features: int
  kernel: _Size
  stride: _Size = 1
  padding: _Size = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 1, pad: int = 1) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


def _cat(branches: Sequence[jax.Array]) -> jax.Array:
  return jnp.concatenate(branches, axis=-1)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1(pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return _cat([b1, b5, b3, bp])


class InceptionB(nn.Module):
  """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return _cat([b3, bd, _max_pool_3x3(x, stride=2, pad=0)])


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches of width `channels_7x7`, avgpool-1x1."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return _cat([b1, b7, bd, bp])


class InceptionD(nn.Module):
  """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return _cat([b3, b7, _max_pool_3x3(x, stride=2, pad=0)])


class InceptionE(nn.Module):
  """Mixed_7b (`pool="avg"`) and Mixed_7c (`pool="max"`, the FID graph's quirk)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = _cat([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
               BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)])
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = _cat([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
               BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)])
    pooled = _max_pool_3x3(x) if self.pool == "max" else _avg_pool_3x3(x)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return _cat([b1, b3, bd, bp])


class InceptionV3(nn.Module):
  """[B, 299, 299, 3] pixels in the network's range ([-1, 1]) -> pool3 features [B, 2048].

  Submodule names are torchvision's attribute names (`Conv2d_1a_3x3`, `Mixed_5b`, ...).
  Any spatial size >= 75 runs (the graph is fully convolutional); FID uses 299.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))

  def dummy_inputs(self) -> tuple[jax.Array]:
    return (jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),)


# ---------------------------------------------------------------------------------------
# Preprocessing


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] float -> [B, size, size, C]: torch's bilinear `interpolate(align_corners=False)`.

  Half-pixel centres, edge samples clamped, no antialiasing in a downscale. `jax.image.resize`
  with `antialias=False` is exactly this (its renormalised edge weights equal torch's clamp).
  """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 rows of torch's align_corners=False bilinear weights.

  The source coordinate is torch's float32 `scale * (i + 0.5) - 0.5` rounded once (its CPU
  kernel fuses the multiply-add): at a few hundred pixels one float32 rounding more moves a
  weight by 1.5e-5, more than the float32 sums of the resize do.
  """
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)  # exact in float64, rounded once
  src = np.maximum(src, np.float32(0.0))  # torch clamps negative coordinates to the first pixel
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), np.float32(1) - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize_bilinear_host(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """One [H, W, C] float image -> [size, size, C] float32 on the host, as `resize_bilinear`.

  For image folders of mixed sizes (a jitted resize would compile once per size).
  """
  image = np.asarray(image, np.float32)
  if image.shape[:2] == (size, size):
    return image
  rows, cols = _bilinear_matrix(image.shape[0], size), _bilinear_matrix(image.shape[1], size)
  return np.einsum("ih,hwc,jw->ijc", rows, image, cols, optimize=True).astype(np.float32)


def clean_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """One [H, W, 3] uint8 image -> [size, size, 3] float32 in [0, 255]: clean-fid's resize.

  Each channel is a float ("F" mode) PIL image resized with PIL's bicubic filter (which
  antialiases a downscale), then clipped to [0, 255]; nothing is quantised.
  """
  from PIL import Image
  image = np.asarray(image)
  channels = []
  for i in range(image.shape[-1]):
    channel = Image.fromarray(image[..., i].astype(np.float32))  # float32 -> PIL mode "F"
    resized = channel.resize((size, size), resample=Image.BICUBIC)
    channels.append(np.asarray(resized).clip(0, 255))
  return np.stack(channels, axis=-1).astype(np.float32)


def to_network_input(images: jax.Array) -> jax.Array:
  """pytorch-fid's preprocessing: [B, H, W, 3] uint8 (any size) -> /255, bilinear 299, 2x - 1."""
  x = images.astype(jnp.float32) / 255.0  # torchvision's ToTensor: float32 division by 255
  return 2.0 * resize_bilinear(x) - 1.0


def clean_network_input(image: np.ndarray) -> np.ndarray:
  """clean-fid's preprocessing of one [H, W, 3] uint8 image -> [299, 299, 3] float32:
  `clean_resize`, then (x - 128) / 128 as clean-fid's wrapper of the TF graph does."""
  return (clean_resize(image) - 128.0) / 128.0


# ---------------------------------------------------------------------------------------
# Weights


def abstract_params(module: InceptionV3 | None = None) -> dict:
  """The parameter tree's shapes (nothing initialised; an eager `init` at 299x299 takes minutes)."""
  module = module or InceptionV3()
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


def torch_state_to_params(tensors) -> dict:
  """pytorch-fid's state dict (name -> array, torch layout) -> Flax params.

  The 1008-way classifier (`fc.*`) and BatchNorm's `num_batches_tracked` counters are not
  part of the pool3 network and are dropped; anything else must match exactly.
  """
  from lcm_jax.sd_pipeline import _Renamed
  names = {k: k for k in tensors if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  # A lazy file stays lazy (tensors read one at a time); a dict is filtered as it is.
  kept = _Renamed(tensors, names) if hasattr(tensors, "shape") else {k: tensors[k] for k in names}
  return weights.torch_to_flax(kept, abstract_params(), what="FID Inception weights")


def load_inception(path: str) -> dict:
  """Flax params from a `.safetensors` file written by `python -m lcm_jax.eval.convert_inception`.

  Raises:
    LcmJaxError for a `.pth` (convert it first), WeightsError for a file that does not match.
  """
  from lcm_jax.safetensors_io import SafetensorsFile
  if path.endswith((".pth", ".pt", ".bin")):
    raise LcmJaxError(
        f"{path} is a PyTorch pickle; lcm-jax reads safetensors. Convert it once with: python -m "
        f"lcm_jax.eval.convert_inception --input {path} --output inception.safetensors")
  return torch_state_to_params(SafetensorsFile(path))


def random_params(seed: int = 0, calibration_images: int = 8) -> dict:
  """Random parameters whose pool3 features depend on the input (for tests and timing; never
  for a reported FID).

  Random convs with unit BatchNorm statistics make pool3 almost constant (activations shrink
  layer by layer until the biases dominate). So the affine BatchNorm parameters are drawn at
  random, and the running statistics are then set, layer by layer in one pass, to the batch
  statistics of `calibration_images` smooth random images (as a torch BatchNorm in training
  mode with momentum 1 would).
  """
  module = InceptionV3()
  rng = np.random.default_rng(seed)
  # Drawn in NumPy from the shapes: `init` through the 299x299 graph takes minutes on a CPU.
  flat = {}
  for path, leaf in weights.flatten_tree(abstract_params(module)).items():
    if path[-1] == "kernel":  # He normal over the fan-in (kh * kw * c_in)
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif path[-1] == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif path[-1] == "bias":
      value = rng.normal(0.0, 0.3, leaf.shape)
    else:  # mean / var: replaced by the calibration below
      value = np.zeros(leaf.shape) if path[-1] == "mean" else np.ones(leaf.shape)
    flat[path] = jnp.asarray(value, jnp.float32)
  # Low-frequency noise: 8x8 random pixels bilinearly enlarged, in the network's range.
  coarse = rng.uniform(-1, 1, (calibration_images, 8, 8, 3)).astype(np.float32)
  images = resize_bilinear(jnp.asarray(coarse))
  stats = jax.jit(lambda p, x: module.apply({"params": p}, x, mutable=["calibration"])[1])(
      weights.unflatten_tree(flat), images)["calibration"]
  for path, value in weights.flatten_tree(stats).items():
    flat[path] = value
  return weights.unflatten_tree(flat)


# ---------------------------------------------------------------------------------------
# Features


@jax.jit
def _features_of_uint8(params: dict, images: jax.Array) -> jax.Array:
  return InceptionV3().apply({"params": params}, to_network_input(images))


@jax.jit
def _features_of_network_input(params: dict, x: jax.Array) -> jax.Array:
  return InceptionV3().apply({"params": params}, x)


class InceptionFeatures:
  """pool3 features of image batches, jitted, in fixed-size batches (one compile per shape).

  `__call__`: [B, H, W, 3] uint8 -> [B, 2048] float32 NumPy. In mode "pytorch_fid" the
  resize runs on the device (one compile per input size); `of_images` takes a list of
  images of any sizes and resizes each on the host (one compile in all). Mode "clean"
  always resizes on the host (PIL).
  """

  def __init__(self, params: dict, *, mode: str = "pytorch_fid", batch_size: int = 50):
    if mode not in MODES:
      raise LcmJaxError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    self.params, self.mode, self.batch_size = params, mode, batch_size

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise LcmJaxError(f"FID features take uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    if self.mode == "clean":
      return self.of_images(list(images))
    return self._batched(images, lambda x: _features_of_uint8(self.params, x))

  def of_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """A list of [H_i, W_i, 3] uint8 images of any sizes -> [N, 2048]; resized on the host."""
    if not len(images):
      return _empty()
    if self.mode == "clean":
      prepared = [clean_network_input(im) for im in images]
    else:
      prepared = [2.0 * resize_bilinear_host(np.asarray(im, np.float32) / 255.0) - 1.0 for im in images]
    return self._batched(np.stack(prepared), lambda x: _features_of_network_input(self.params, x))

  def _batched(self, data: np.ndarray, fn) -> np.ndarray:
    out = []
    for start in range(0, len(data), self.batch_size):
      chunk = data[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # pad the last batch: the jitted function keeps one shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(jnp.asarray(chunk)))[:n])
    return np.concatenate(out) if out else _empty()


def _empty() -> np.ndarray:
  return np.zeros((0, FEATURE_DIM), np.float32)
