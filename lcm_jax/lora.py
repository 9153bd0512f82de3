"""LoRA adapters on the Flax UNet: create, apply, merge, and read/write diffusers' LoRA files.

An adapter set is a parameter tree of its own, nested like the UNet's, with one entry per
adapted layer in place of that layer's `kernel`/`bias`:

    Dense kernel [in, out]:         {"lora_A": [in, r],         "lora_B": [r, out]}
    Conv  kernel [kh, kw, in, out]: {"lora_A": [kh, kw, in, r], "lora_B": [r, out]}

and the adapted kernel is W + scale * delta with delta = A @ B (for a conv, the kh x kw
conv A followed by the 1x1 conv B, as PEFT builds conv LoRA). `apply_loras` forms the
adapted kernels from the base tree and the adapters; under `jit` it runs inside the compiled
function, so the stored base weights are never copied, stay frozen and keep their own
sharding. `merge` / `unmerge` are the same sum (and difference) taken once, outside.

Which layers: `targets` are module-name suffixes as diffusers and PEFT match them ("to_q"
adapts every `...to_q`, "downsamplers.0.conv" every downsampler conv); `DEFAULT_TARGETS` is
the layer set of diffusers' LCM-LoRA training script. Initialisation is PEFT's: A
kaiming-uniform (bound 1/sqrt(fan_in)), B zero, so a fresh adapter changes nothing.

Files: `save_diffusers_lora` writes `pytorch_lora_weights.safetensors` with diffusers' PEFT
keys (`unet.<module>.lora_A.weight`, `...lora_B.weight`), the scale alpha/r folded into B
(so the file means alpha = r, which is what every loader assumes when it finds no alpha).
`read_lora` reads that format, diffusers' older `lora.down`/`lora.up` keys, PEFT's
`base_model.model.` prefix and kohya's `lora_unet_*` names with per-layer `.alpha`, and
returns adapters with each layer's own scale folded into B, so one user weight per LoRA is
all `apply_loras` needs. docs/lora.md describes the formats.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.errors import LcmJaxError
from lcm_jax.weights import flatten_tree, flax_path_to_torch_key, unflatten_tree

# diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py: attention
# q/k/v/out, the transformer's proj_in/proj_out, the feed-forward, the resnets' convs and
# time projection, and the down/up-sampler convs. Not conv_in, conv_out, the time embedding's
# MLP or the norms.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
A, B = "lora_A", "lora_B"

Path = tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Layers and targets.

def module_name(path: Path) -> str:
  """A Flax module path -> its diffusers module name: ('ff', 'net_2') -> 'ff.net.2'."""
  return flax_path_to_torch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def adaptable_layers(unet_params: Mapping) -> dict[str, Path]:
  """diffusers module name -> Flax module path, for every Dense / Conv layer (a `kernel`
  leaf of 2 or 4 dimensions) of a UNet parameter tree (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in flatten_tree(unet_params).items():
    if path[-1] == "kernel" and len(leaf.shape) in (2, 4):
      out[module_name(path[:-1])] = path[:-1]
  return out


def _matches(name: str, target: str) -> bool:
  # PEFT's rule for a list of target modules: the whole name, or a suffix after a dot.
  return name == target or name.endswith("." + target)


def target_layers(unet_params: Mapping, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, Path]:
  """The layers `targets` select (module name -> Flax path), in the tree's order.

  Raises:
    LcmJaxError naming every target that selects no layer of this UNet.
  """
  targets = tuple(targets)
  if not targets or any(not isinstance(t, str) or not t for t in targets):
    raise LcmJaxError(f"LoRA targets must be a non-empty list of module names, got {targets!r}")
  layers = adaptable_layers(unet_params)
  unknown = [t for t in targets if not any(_matches(n, t) for n in layers)]
  if unknown:
    raise LcmJaxError(f"LoRA target(s) {', '.join(map(repr, unknown))} match no Dense or Conv layer of the "
                      f"UNet (module names as diffusers names them, e.g. {', '.join(DEFAULT_TARGETS[:4])})")
  return {n: p for n, p in layers.items() if any(_matches(n, t) for t in targets)}


def lora_scale(rank: int, alpha: float) -> float:
  """alpha / r, PEFT's scaling of delta = A @ B; validates both."""
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
    raise LcmJaxError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not isinstance(alpha, (int, float, np.number)) or isinstance(alpha, bool) or not alpha > 0:
    raise LcmJaxError(f"LoRA alpha must be a positive number, got {alpha!r}")
  return float(alpha) / int(rank)


# ---------------------------------------------------------------------------------------
# Creating and applying adapters.

def _shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  *window, fan_in, fan_out = kernel_shape
  return (*window, fan_in, rank), (rank, fan_out)


def abstract_lora(unet_params: Mapping, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                  dtype: Any = jnp.float32) -> dict:
  """The adapter tree's shapes (`jax.ShapeDtypeStruct`), without creating anything."""
  lora_scale(rank, 1.0)
  flat = flatten_tree(unet_params)
  out = {}
  for path in target_layers(unet_params, targets).values():
    a_shape, b_shape = _shapes(flat[path + ("kernel",)].shape, rank)
    out[path + (A,)] = jax.ShapeDtypeStruct(a_shape, dtype)
    out[path + (B,)] = jax.ShapeDtypeStruct(b_shape, dtype)
  return unflatten_tree(out)


def init_lora(rng: jax.Array, unet_params: Mapping, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
              dtype: Any = jnp.float32) -> dict:
  """Fresh adapters as PEFT makes them: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
  kaiming_uniform_ with a = sqrt(5)), fan_in = in x kh x kw; B = 0. Pure (jittable with
  `unet_params` as ShapeDtypeStructs and `rank`, `targets` static)."""
  abstract = flatten_tree(abstract_lora(unet_params, rank, targets, dtype))
  out = {}
  for i, (path, leaf) in enumerate(sorted(abstract.items())):
    if path[-1] == A:
      bound = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
      out[path] = jax.random.uniform(jax.random.fold_in(rng, i), leaf.shape, dtype, -bound, bound)
    else:
      out[path] = jnp.zeros(leaf.shape, dtype)
  return unflatten_tree(out)


def lora_delta(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
  """delta = A @ B in the kernel's layout: [in, r] x [r, out] -> [in, out], or
  [kh, kw, in, r] x [r, out] -> [kh, kw, in, out]; float32."""
  return jnp.einsum("...r,ro->...o", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _adapted_modules(adapters: Mapping) -> dict[Path, tuple[Any, Any]]:
  flat = flatten_tree(adapters)
  modules = {}
  for path in flat:
    if path[-1] not in (A, B):
      raise LcmJaxError(f"not a LoRA adapter tree: leaf {'/'.join(path)} is neither {A} nor {B}")
    modules.setdefault(path[:-1], [None, None])[path[-1] == B] = flat[path]
  for path, (a, b) in modules.items():
    if a is None or b is None:
      raise LcmJaxError(f"LoRA adapter {module_name(path)} lacks {A if a is None else B}")
  return modules


def apply_loras(params: Mapping, loras: Sequence[tuple[Mapping, float | jax.Array]]) -> dict:
  """The UNet parameters with every adapter added: kernel + sum_i scale_i * A_i @ B_i.

  Args:
    params: the base UNet tree (not modified; untouched leaves are shared, not copied).
    loras: (adapters, scale) pairs; scale multiplies that adapter set's delta (alpha / r for
      a trained adapter, a user weight for one from `read_lora`).

  The sum is formed in float32 and cast to the kernel's dtype. Inside `jit` this is part of
  the compiled function (the base stays as stored). Raises LcmJaxError for an adapter on a
  layer the tree lacks, or of the wrong shape.
  """
  flat = dict(flatten_tree(params))
  deltas: dict[Path, jax.Array] = {}
  for adapters, scale in loras:
    for path, (a, b) in _adapted_modules(adapters).items():
      kernel = flat.get(path + ("kernel",))
      if kernel is None:
        raise LcmJaxError(f"LoRA adapter for {module_name(path)}: the UNet has no such layer")
      if tuple(a.shape[:-1]) != tuple(kernel.shape[:-1]) or b.shape[-1] != kernel.shape[-1] or a.shape[-1] != b.shape[0]:
        raise LcmJaxError(f"LoRA adapter for {module_name(path)}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                          f"fit the kernel {tuple(kernel.shape)}")
      delta = scale * lora_delta(a, b)
      deltas[path] = delta if path not in deltas else deltas[path] + delta
  for path, delta in deltas.items():
    kernel = flat[path + ("kernel",)]
    flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return unflatten_tree(flat)


def merge(params: Mapping, adapters: Mapping, scale: float = 1.0) -> dict:
  """Fuses one adapter set into the base weights (diffusers' `fuse_lora`)."""
  return apply_loras(params, [(adapters, scale)])


def unmerge(params: Mapping, adapters: Mapping, scale: float = 1.0) -> dict:
  """Undoes `merge(params, adapters, scale)` (up to float rounding)."""
  return apply_loras(params, [(adapters, -scale)])


def num_params(adapters: Mapping) -> int:
  """How many numbers the adapters hold."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------
# diffusers / PEFT / kohya files.

def to_diffusers_state_dict(adapters: Mapping, scale: float = 1.0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Adapters -> diffusers' LoRA state dict (`unet.<module>.lora_A.weight` [r, in(, kh, kw)],
  `lora_B.weight` [out, r(, 1, 1)]) with `scale` folded into B."""
  out = {}
  for path, (a, b) in _adapted_modules(adapters).items():
    a = np.asarray(jax.device_get(a), np.float32)
    b = np.asarray(jax.device_get(b), np.float32) * np.float32(scale)
    name = "unet." + module_name(path)
    if a.ndim == 4:  # conv: A [kh, kw, in, r] -> [r, in, kh, kw]; B [r, out] -> [out, r, 1, 1]
      a_t, b_t = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    else:
      a_t, b_t = a.T, b.T
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_t).astype(dtype)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_t).astype(dtype)
  return out


def save_diffusers_lora(folder: str, adapters: Mapping, scale: float = 1.0, dtype: Any = np.float32) -> str:
  """Writes `folder/pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights(folder)`
  reads it); returns the file's path."""
  from lcm_jax.safetensors_io import write_safetensors
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, LORA_WEIGHTS_NAME)
  write_safetensors(path, to_diffusers_state_dict(adapters, scale, dtype), metadata={"format": "pt"})
  return path


def lora_file(path: str) -> str:
  """A LoRA given as a file or as a folder holding `pytorch_lora_weights.safetensors` (or a
  single .safetensors file) -> the file's path."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise LcmJaxError(f"LoRA {path!r}: no such file or folder")
  if os.path.isfile(os.path.join(path, LORA_WEIGHTS_NAME)):
    return os.path.join(path, LORA_WEIGHTS_NAME)
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) != 1:
    raise LcmJaxError(f"LoRA folder {path!r} has no {LORA_WEIGHTS_NAME} and "
                      f"{'no' if not found else len(found)} other .safetensors files; give the file itself")
  return os.path.join(path, found[0])


_SUFFIXES = (  # (suffix, which matrix)
    (".lora_A.weight", A), (".lora_B.weight", B),
    (".lora.down.weight", A), (".lora.up.weight", B),
    (".lora_down.weight", A), (".lora_up.weight", B),
)


def _split_key(key: str) -> tuple[str, str] | None:
  """'unet.x.y.lora_A.weight' -> ('unet.x.y', 'lora_A'); '...alpha' -> (..., 'alpha')."""
  for suffix, which in _SUFFIXES:
    if key.endswith(suffix):
      return key[: -len(suffix)], which
  if key.endswith(".alpha"):
    return key[: -len(".alpha")], "alpha"
  return None


def _layer_for(stem: str, layers: Mapping[str, Path], kohya: Mapping[str, Path]) -> Path | None:
  for prefix in ("unet.", "base_model.model.", ""):
    if stem.startswith(prefix) and stem[len(prefix):] in layers:
      return layers[stem[len(prefix):]]
  if stem.startswith("lora_unet_"):
    return kohya.get(stem[len("lora_unet_"):])
  return None


def _metadata_alpha(metadata: Mapping[str, str]) -> float | None:
  """lora_alpha / r from diffusers' `lora_adapter_metadata` (newer diffusers write it), if any."""
  raw = metadata.get("lora_adapter_metadata")
  if not raw:
    return None
  try:
    meta = json.loads(raw)
  except json.JSONDecodeError:
    raise LcmJaxError("the LoRA file's lora_adapter_metadata is not JSON") from None
  meta = {k.removeprefix("unet."): v for k, v in meta.items()}
  if meta.get("alpha_pattern") or meta.get("rank_pattern"):
    raise LcmJaxError("the LoRA file's metadata has per-layer alpha_pattern / rank_pattern, which lcm-jax "
                      "does not read")
  if "lora_alpha" in meta and "r" in meta:
    return lora_scale(int(meta["r"]), float(meta["lora_alpha"]))
  return None


def _listed(keys: Sequence[str], limit: int = 5) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def lora_from_state_dict(tensors: Mapping[str, np.ndarray], unet_params: Mapping,
                         metadata: Mapping[str, str] | None = None, what: str = "LoRA") -> dict:
  """A diffusers / PEFT / kohya LoRA state dict -> adapters for this UNet, each layer's scale
  (alpha / r from its `.alpha` key or the file's metadata; 1 without either) folded into B.

  Raises:
    LcmJaxError in one line naming the keys that match no layer of the UNet (text-encoder
    LoRAs included), layers lacking A or B, and shapes that do not fit.
  """
  layers = adaptable_layers(unet_params)
  kohya = {name.replace(".", "_"): path for name, path in layers.items()}
  flat = flatten_tree(unet_params)
  default_scale = _metadata_alpha(metadata or {})
  parts: dict[Path, dict[str, np.ndarray]] = {}
  unmatched = []
  for key in tensors:
    split = _split_key(key)
    path = _layer_for(split[0], layers, kohya) if split else None
    if path is None:
      unmatched.append(key)
    else:
      parts.setdefault(path, {})[split[1]] = np.asarray(tensors[key])
  if unmatched:
    te = [k for k in unmatched if k.startswith(("text_encoder", "lora_te"))]
    note = f" ({len(te)} of them text-encoder weights, which lcm-jax does not apply)" if te else ""
    raise LcmJaxError(f"{what}: {len(unmatched)} key(s) match no layer of this UNet{note}: {_listed(sorted(unmatched))}")
  out = {}
  for path, got in parts.items():
    name = module_name(path)
    if A not in got or B not in got:
      raise LcmJaxError(f"{what}: layer {name} has {'no A (down)' if A not in got else 'no B (up)'} matrix")
    a, b = got[A].astype(np.float32), got[B].astype(np.float32)
    kernel_shape = tuple(flat[path + ("kernel",)].shape)
    a, b = _to_flax_layout(a, b, kernel_shape, f"{what}: layer {name}")
    rank = a.shape[-1]
    scale = float(got["alpha"]) / rank if "alpha" in got else (default_scale or 1.0)
    out[path + (A,)] = a
    out[path + (B,)] = b * np.float32(scale)
  if not out:
    raise LcmJaxError(f"{what}: no LoRA weights found")
  return unflatten_tree(out)


def _to_flax_layout(a: np.ndarray, b: np.ndarray, kernel_shape: tuple[int, ...], what: str):
  """torch A [r, in(, kh, kw)], B [out, r(, 1, 1)] -> Flax A [(kh, kw,) in, r], B [r, out]."""
  if b.ndim == 4:
    if b.shape[2:] != (1, 1):
      raise LcmJaxError(f"{what}: B {b.shape} is not a 1x1 conv")
    b = b[:, :, 0, 0]
  if len(kernel_shape) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
    a = a[:, :, 0, 0]  # a 1x1 conv LoRA stored for a linear layer
  if a.ndim != len(kernel_shape) or b.ndim != 2:
    raise LcmJaxError(f"{what}: A {a.shape} / B {b.shape} do not fit the kernel {kernel_shape}")
  if a.ndim == 4:
    a = a.transpose(2, 3, 1, 0)
    if len(kernel_shape) == 4 and a.shape[:2] == (1, 1) and kernel_shape[:2] != (1, 1):
      raise LcmJaxError(f"{what}: a 1x1 A for a {kernel_shape[:2]} conv")
  else:
    a = a.T
  b = b.T
  if a.shape[:-1] != kernel_shape[:-1] or b.shape[1] != kernel_shape[-1] or a.shape[-1] != b.shape[0]:
    raise LcmJaxError(f"{what}: A and B do not fit the kernel {kernel_shape} (after conversion A {a.shape}, "
                      f"B {b.shape})")
  return np.ascontiguousarray(a), np.ascontiguousarray(b)


def read_lora(path: str, unet_params: Mapping) -> dict:
  """Reads a LoRA file or folder (diffusers, PEFT or kohya naming) as adapters for `unet_params`."""
  from lcm_jax.safetensors_io import SafetensorsFile
  file = lora_file(path)
  st = SafetensorsFile(file)
  return lora_from_state_dict(st, unet_params, st.metadata, what=f"LoRA {file}")


def parse_lora_arg(arg: str) -> tuple[str, float]:
  """'DIR' -> (DIR, 1.0); 'DIR:0.8' -> (DIR, 0.8) (a Windows-free split on the last colon)."""
  path, sep, scale = arg.rpartition(":")
  if sep and path:
    try:
      return path, float(scale)
    except ValueError:
      pass
  return arg, 1.0


def add_loras(pipe, loras: Sequence[str | tuple[str, float]], fuse: bool = True):
  """Loads LoRA files onto a loaded pipeline's UNet (`lcm_jax.load.load_pipeline(loras=...)`).

  Args:
    pipe: an `lcm_jax.sd_pipeline.Pipeline` with a UNet.
    loras: each a path ("DIR" or "DIR:SCALE", see `parse_lora_arg`) or a (path, scale) pair.
    fuse: add them into `pipe.params["unet"]` now (diffusers' `fuse_lora`); otherwise keep
      them in `pipe.unet_loras` as (adapters, scale) pairs that sampling adds inside its
      compiled function, leaving the base weights as loaded.
  Returns:
    `pipe`, changed in place.
  """
  if pipe.unet is None:
    raise LcmJaxError("LoRAs apply to the UNet, but the pipeline was loaded without one")
  pairs = []
  for item in loras:
    path, scale = parse_lora_arg(item) if isinstance(item, str) else (item[0], float(item[1]))
    adapters = jax.tree.map(jnp.asarray, read_lora(path, pipe.params["unet"]))
    pairs.append((adapters, scale))
  if fuse:
    pipe.params["unet"] = jax.jit(apply_loras)(pipe.params["unet"], pairs)
  else:
    pipe.unet_loras = list(getattr(pipe, "unet_loras", None) or []) + pairs
  return pipe
