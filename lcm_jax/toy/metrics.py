"""Metrics of the toy domain: an attribute classifier, its FID and a text-alignment score.

The paper reports FID (Inception features) and CLIP score. Neither network knows our 32x32
shapes, so we train our own feature network on the domain:

* `AttributeNet`: a small CNN that reads the four attributes (shape colour, shape, position,
  background colour) of a 32x32 image. It is trained **only on real domain images** drawn by
  `toy.domain` (all nine colours, so it can also read the shifted sub-domain), with mild
  Gaussian pixel noise as augmentation, and never sees a generated image. The same frozen
  network scores every sampler, so no sampler is favoured: it is to this domain what
  Inception is to ImageNet-like photos.
* FID: the Frechet distance between Gaussians fitted to the network's penultimate features
  (128-d, after the ReLU the heads read) of generated images and of real images (the
  library's float64 statistics and Frechet distance, `lcm_jax.eval.fid`).
* Text alignment (our stand-in for the CLIP score): the fraction of generated images whose
  shape colour, shape and position, as the classifier reads them, all equal the caption's.
  Chance level is 1 / (9 x 4 x 5) = 0.56%; real images score the classifier's accuracy.

The trained network is shipped in `lcm_jax/toy/weights/metric/` (1.5 MB) and rebuilt with

    python -m lcm_jax.toy.metrics --output lcm_jax/toy/weights/metric [--seed 0]

(7 minutes on 2 CPU cores). Shipping it keeps the numbers comparable between machines
and JAX versions; retraining gives the same network only on the same software and hardware.

`make_toy_metrics` wraps both scores in the evaluation engine's metric protocol
(`lcm_jax.eval.metric`) for `python -m lcm_jax.toy.evaluate`; `toy_metrics` is the plugin
behind `python -m lcm_jax.evaluate --metrics toy`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcm_jax.errors import LcmJaxError
from lcm_jax.eval.fid import feature_statistics, frechet_distance
from lcm_jax.safetensors_io import SafetensorsFile, write_safetensors
from lcm_jax.toy import METRIC_DIR, display_path, domain
from lcm_jax.weights import flatten_tree, unflatten_tree

# head -> the labels it predicts, in index order.
HEADS = {
    "colour": domain.COLOURS,
    "shape": domain.SHAPES,
    "position": domain.POSITION_NAMES,
    "background": domain.COLOURS,
}
# The attributes a caption must get right for a sample to count as aligned.
ALIGNMENT_ATTRIBUTES = ("colour", "shape", "position")
FEATURES = 128
WEIGHTS_FILE = "attribute_net.safetensors"
INFO_FILE = "attribute_net.json"


class AttributeNet(nn.Module):
  """Four stride-2 conv layers, a 128-d feature layer and one linear head per attribute."""
  features: int = FEATURES

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, 32, 32, 3] in [-1, 1] -> (features [B, 128], {head: logits [B, classes]})."""
    for i, (channels, stride) in enumerate(((32, 1), (64, 2), (64, 2), (128, 2))):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=stride, name=f"conv_{i}")(x))
    # Flatten, not pool: position is one of the attributes.
    f = nn.relu(nn.Dense(self.features, name="features")(x.reshape(x.shape[0], -1)))
    return f, {name: nn.Dense(len(labels), name=f"head_{name}")(f) for name, labels in HEADS.items()}


def to_net_input(images: np.ndarray) -> jax.Array:
  """uint8 [B, 32, 32, 3] -> float32 [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def labels_of(attrs: Sequence[domain.Attributes]) -> dict[str, np.ndarray]:
  """{head: [N] int32 label indices} of attribute tuples."""
  return {name: np.asarray([labels.index(getattr(a, name)) for a in attrs], np.int32)
          for name, labels in HEADS.items()}


def real_training_images(seed: int, n: int) -> tuple[np.ndarray, list[domain.Attributes]]:
  """The classifier's training set: half teacher colours, half shifted colours (uint8, attrs)."""
  a, attrs_a = domain.batch(seed, 0, n - n // 2)
  b, attrs_b = domain.batch(seed + 1, 0, n // 2, colours=domain.SHIFTED_COLOURS)
  return np.concatenate([a, b]), attrs_a + attrs_b


def train_attribute_net(seed: int = 0, steps: int = 1500, batch: int = 128, num_images: int = 30000,
                        lr: float = 1e-3, max_noise: float = 0.06, log=print) -> dict:
  """Trains the classifier on real images; returns its parameters."""
  images, attrs = real_training_images(seed + 10, num_images)
  labels = labels_of(attrs)
  net = AttributeNet()
  key_init, key_noise = jax.random.split(jax.random.key(seed))
  params = net.init(key_init, jnp.zeros((1, domain.SIZE, domain.SIZE, 3)))["params"]
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y, key):
    k_sigma, k_noise = jax.random.split(key)
    # Mild pixel noise: generated images are never exactly flat, the domain's images are.
    sigma = jax.random.uniform(k_sigma, (x.shape[0], 1, 1, 1), maxval=max_noise)
    _, logits = net.apply({"params": params}, x + sigma * jax.random.normal(k_noise, x.shape))
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean() for k in HEADS)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for i in range(steps):
    idx = rng.integers(0, len(images), batch)
    params, opt_state, loss = step(params, opt_state, to_net_input(images[idx]),
                                   {k: jnp.asarray(v[idx]) for k, v in labels.items()},
                                   jax.random.fold_in(key_noise, i))
    if (i + 1) % 250 == 0 or i + 1 == steps:
      log(f"[attribute net] step {i + 1}/{steps} loss {float(loss):.4f} "
          f"elapsed {time.perf_counter() - start:.0f}s")
  return params


# ----------------------------------------------------------------------------------------
# Saving and loading


def save_attribute_net(folder: str, params, info: dict) -> None:
  """Writes the weights (safetensors) and `info` (how it was trained, its accuracy) to folder."""
  os.makedirs(folder, exist_ok=True)
  flat = {".".join(path): np.asarray(leaf) for path, leaf in flatten_tree(params).items()}
  write_safetensors(os.path.join(folder, WEIGHTS_FILE), flat)
  with open(os.path.join(folder, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)


def load_attribute_net(folder: str):
  """The parameters saved by `save_attribute_net`. Raises LcmJaxError if absent."""
  path = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise LcmJaxError(f"{path} is missing: build the metric network with "
                      f"`python -m lcm_jax.toy.metrics --output {folder}`")
  tensors = SafetensorsFile(path)
  return unflatten_tree({tuple(name.split(".")): jnp.asarray(tensors[name]) for name in tensors})


# ----------------------------------------------------------------------------------------
# Scores


@functools.partial(jax.jit, static_argnums=0)
def _apply(net, params, x):
  features, logits = net.apply({"params": params}, x)
  return features, {k: jnp.argmax(v, axis=-1) for k, v in logits.items()}


class DomainMetrics:
  """FID and text alignment with a trained `AttributeNet`."""

  def __init__(self, params):
    self.net, self.params = AttributeNet(), params

  @classmethod
  def load(cls, folder: str) -> "DomainMetrics":
    return cls(load_attribute_net(folder))

  def read(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 images [N, 32, 32, 3] -> (features [N, 128] float64, {head: predicted labels [N]})."""
    if images.ndim != 4 or images.shape[1:] != (domain.SIZE, domain.SIZE, 3):
      raise LcmJaxError(f"the attribute network reads [N, {domain.SIZE}, {domain.SIZE}, 3] images, "
                        f"got {images.shape}")
    feats, preds = [], {k: [] for k in HEADS}
    for i in range(0, len(images), batch):
      f, p = _apply(self.net, self.params, to_net_input(images[i:i + batch]))
      feats.append(np.asarray(f, np.float64))
      for k in HEADS:
        preds[k].append(np.asarray(p[k]))
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}

  def features(self, images: np.ndarray) -> np.ndarray:
    return self.read(images)[0]

  def fid(self, images: np.ndarray, reference: np.ndarray | tuple[np.ndarray, np.ndarray]) -> float:
    """FID of uint8 images against reference images (or reference `feature_statistics`)."""
    ref = reference if isinstance(reference, tuple) else feature_statistics(self.features(reference))
    return frechet_distance(*feature_statistics(self.features(images)), *ref)

  def alignment(self, images: np.ndarray, attrs: Sequence[domain.Attributes]) -> dict[str, float]:
    """Text alignment of images generated for `attrs`: {"alignment": fraction with colour,
    shape and position all read back, plus each head's accuracy}."""
    return alignment_scores(self.read(images)[1], attrs)


def alignment_scores(predictions: dict[str, np.ndarray], attrs: Sequence[domain.Attributes]) -> dict[str, float]:
  """{"alignment", and per head its accuracy} of predicted labels against the captions' attrs."""
  truth = labels_of(attrs)
  correct = {k: predictions[k] == truth[k] for k in HEADS}
  out = {"alignment": float(np.mean(np.all([correct[k] for k in ALIGNMENT_ATTRIBUTES], axis=0)))}
  out.update({k: float(np.mean(v)) for k, v in correct.items()})
  return out


# ----------------------------------------------------------------------------------------
# The toy's metrics in the evaluation engine's metric protocol (`lcm_jax.eval.metric`):
# `python -m lcm_jax.toy.evaluate` uses them, and `python -m lcm_jax.evaluate --metrics toy`
# plugs them in (`toy_metrics`).

REFERENCE_SEED = 777  # the jitter of the real images the toy FID compares against


def toy_columns(prefix: str = ""):
  """The toy's (FID, alignment) table columns; a prefix ("toy_") keeps them apart from
  Inception's FID in the same table."""
  import dataclasses

  from lcm_jax.eval.metric import FID_COLUMN, Column
  label = prefix.replace("_", " ")
  fid = dataclasses.replace(FID_COLUMN, key=f"{prefix}fid", header=f"{label}FID ↓", short=f"{label}FID",
                            plot_title=f"{label}FID, log scale (lower is better)")
  align = Column(f"{prefix}alignment", f"{label}Align ↑", f"{label}align", lower_is_better=False, percent=True,
                 digits=1, plot_title=f"{label}text alignment (higher is better)")
  return fid, align


class _AlignmentAccumulator:
  def __init__(self, metrics: DomainMetrics, prefix: str):
    self.metrics, self.prefix, self.predictions, self.attrs = metrics, prefix, [], []

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    self.predictions.append(self.metrics.read(images)[1])
    self.attrs += [domain.parse_caption(p) for p in prompts]

  def result(self) -> dict[str, float]:
    merged = {k: np.concatenate([p[k] for p in self.predictions]) for k in HEADS}
    return {self.prefix + k: v for k, v in alignment_scores(merged, self.attrs).items()}


class ToyAlignment:
  """Text alignment (and each head's accuracy) of images with their captions, as the
  attribute network reads them."""

  def __init__(self, metrics: DomainMetrics, metric_dir: str, prefix: str = ""):
    self.metrics, self.metric_dir, self.prefix = metrics, metric_dir, prefix
    self.name, self.columns = f"{prefix}alignment", (toy_columns(prefix)[1],)

  def settings(self) -> dict:
    from lcm_jax.eval.metric import fingerprint
    return {"attribute_net": fingerprint(self.metric_dir)}

  def describe(self) -> str:
    what = f"{self.prefix.replace('_', ' ')}text alignment"
    return (f"{what[0].upper() + what[1:]}: the fraction of images whose shape colour, shape and position "
            f"the attribute network ({display_path(self.metric_dir)}) reads back equal to the caption's.")

  def start(self) -> _AlignmentAccumulator:
    return _AlignmentAccumulator(self.metrics, self.prefix)


def make_toy_metrics(attrs: Sequence[domain.Attributes], metric_dir: str = METRIC_DIR, prefix: str = "") -> list:
  """[FID, text alignment] of the toy domain for a prompt set's attributes. The FID's
  reference is a real draw of the same attributes (jitter seed REFERENCE_SEED), in the
  attribute network's features. prefix: of their names and keys."""
  from lcm_jax.eval.metric import FIDMetric, fingerprint
  metrics = DomainMetrics.load(metric_dir)
  reference = feature_statistics(metrics.features(domain.draw_all(attrs, REFERENCE_SEED)))
  settings = {"features": "toy attribute network", "weights": fingerprint(metric_dir),
              "reference": f"real draw (seed {REFERENCE_SEED}) of {len(attrs)} prompts",
              "reference_mu": float(np.sum(reference[0]))}
  description = (f"{prefix.replace('_', ' ')}FID: penultimate 128-d features of the toy attribute network "
                 f"({display_path(metric_dir)}), no resizing (32x32 in, [-1, 1]); reference: real domain images "
                 f"drawn for the same {len(attrs)} prompts (jitter seed {REFERENCE_SEED}), statistics in float64.")
  fid = FIDMetric(metrics.features, reference, settings, description, name=f"{prefix}fid",
                  column=toy_columns(prefix)[0])
  return [fid, ToyAlignment(metrics, metric_dir, prefix)]


def toy_metrics(context) -> list:
  """The plugin of `python -m lcm_jax.evaluate --metrics toy`: toy_fid and toy_alignment
  (prefixed, so they sit beside Inception's fid); the prompts must be toy captions."""
  try:
    attrs = [domain.parse_caption(p) for p in context.prompts]
  except ValueError as e:
    raise LcmJaxError(f"--metrics toy reads toy captions only: {e}") from None
  return make_toy_metrics(attrs, prefix="toy_")


# ----------------------------------------------------------------------------------------
# Building the shipped network


def build_metric_net(output: str, seed: int = 0, steps: int = 1500) -> dict:
  """Trains, checks and saves the attribute network; returns its info dict."""
  start = time.perf_counter()
  params = train_attribute_net(seed, steps)
  seconds = time.perf_counter() - start
  metrics = DomainMetrics(params)
  # Held-out real images of both sub-domains (seeds never used in training).
  test = {"teacher_colours": domain.batch(seed + 1000, 0, 2000),
          "shifted_colours": domain.batch(seed + 1001, 0, 2000, colours=domain.SHIFTED_COLOURS)}
  accuracy = {name: metrics.alignment(images, attrs) for name, (images, attrs) in test.items()}
  info = {"architecture": "AttributeNet: conv 32/64/64/128 (3x3, strides 1/2/2/2), dense 128, 4 heads",
          "heads": {k: list(v) for k, v in HEADS.items()}, "seed": seed, "steps": steps,
          "training": "real domain images only (15k teacher colours + 15k shifted colours), "
                      "Adam 1e-3 cosine, batch 128, Gaussian pixel noise sigma ~ U[0, 0.06]",
          "held_out_accuracy": accuracy, "train_seconds": round(seconds, 1), "jax": jax.__version__}
  save_attribute_net(output, params, info)
  return info


def main(argv) -> None:
  del argv
  from absl import flags
  info = build_metric_net(flags.FLAGS.output, flags.FLAGS.seed, flags.FLAGS.steps)
  print(json.dumps(info["held_out_accuracy"], indent=2))
  print(f"wrote {flags.FLAGS.output} ({info['train_seconds']:.0f}s of training)")


if __name__ == "__main__":
  from absl import flags

  from lcm_jax import cli
  flags.DEFINE_string("output", display_path(METRIC_DIR), "Folder to write the attribute network to.")
  flags.DEFINE_integer("seed", 0, "Seed of its training data and initialisation.")
  flags.DEFINE_integer("steps", 1500, "Training steps (batch 128).")
  cli.run(main)
