"""PyTorch state dicts (diffusers / transformers layout) <-> Flax parameter trees.

The naming contract every module in `lcm_jax.models` follows:

* A Flax submodule has the attribute name diffusers (or transformers) gives the same
  submodule: `conv_in`, `time_embedding`, `linear_1`, `attn1`, `to_q`, `text_model`, ...
* An element of a PyTorch `ModuleList` / `Sequential` called `X` at index `N` is the Flax
  submodule `X_N` (`down_blocks_0`, `resnets_1`, `to_out_0`, `net_2`, `layers_11`). Only the
  names in `LIST_ATTRIBUTES` are lists; `linear_1` in the time embedding is not.
* Leaves are named as Flax names them (`kernel`, `bias`, `scale`, `embedding`); a torch
  `nn.Parameter` attribute keeps its own name (`class_embedding`, `logit_scale`), and frozen
  BatchNorm statistics are the leaves `mean` / `var` (torch `running_mean` / `running_var`).

Given that contract, a Flax path maps to exactly one PyTorch key, and `LAYOUT_RULES` is the
one table saying how each kind of tensor changes layout. Loading walks the *target* tree
(built by `jax.eval_shape`, so nothing is initialised), so the loaded key set must equal the
module's parameter set exactly; any difference is an error listing the missing, unexpected
and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lcm_jax.errors import WeightsError

# Names of PyTorch ModuleList/Sequential attributes used by SD UNets, VAEs and CLIP.
LIST_ATTRIBUTES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "to_out", "net", "layers",
})


def _identity(a: np.ndarray) -> np.ndarray:
  return a


@dataclasses.dataclass(frozen=True)
class LayoutRule:
  """How one kind of tensor is stored on each side."""
  kind: str
  flax_leaf: str
  flax_ndim: int
  torch_leaf: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


LAYOUT_RULES: tuple[LayoutRule, ...] = (
    # Conv2d weight (O, I, H, W) <-> Flax Conv kernel (H, W, I, O).
    LayoutRule("conv", "kernel", 4, "weight",
               lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    # Linear weight (out, in) <-> Dense kernel (in, out).
    LayoutRule("linear", "kernel", 2, "weight", lambda w: w.T, lambda k: k.T),
    LayoutRule("norm", "scale", 1, "weight", _identity, _identity),
    LayoutRule("embedding", "embedding", 2, "weight", _identity, _identity),
    LayoutRule("bias", "bias", 1, "bias", _identity, _identity),
    # `nn.Parameter` attributes stored under their own name, without `.weight`: CLIP's class
    # token (vision_model.embeddings.class_embedding) and CLIPModel's logit_scale (a scalar).
    LayoutRule("parameter", "class_embedding", 1, "class_embedding", _identity, _identity),
    LayoutRule("parameter", "logit_scale", 0, "logit_scale", _identity, _identity),
    # Inference-only BatchNorm (lcm_jax.eval.inception) keeps torch's running statistics as
    # parameters named `mean` and `var`.
    LayoutRule("running_mean", "mean", 1, "running_mean", _identity, _identity),
    LayoutRule("running_var", "var", 1, "running_var", _identity, _identity),
)

# Old VAE checkpoints (before diffusers 0.14) name the mid-block attention projections
# differently. They are renamed on load (never skipped, unlike diffusers issue 4840).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rule_for(leaf: str, ndim: int) -> LayoutRule:
  for rule in LAYOUT_RULES:
    if rule.flax_leaf == leaf and rule.flax_ndim == ndim:
      return rule
  raise WeightsError(f"no layout rule for a Flax leaf {leaf!r} with {ndim} dimensions")


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *modules, leaf = path
  parts = []
  for name in modules:
    base, sep, index = name.rpartition("_")
    if sep and index.isdigit() and base in LIST_ATTRIBUTES:
      parts += [base, index]
    else:
      parts.append(name)
  torch_leaf = next((r.torch_leaf for r in LAYOUT_RULES if r.flax_leaf == leaf), None)
  if torch_leaf is None:
    raise WeightsError(f"no layout rule for the Flax leaf {leaf!r} at {'/'.join(path)}")
  return ".".join(parts + [torch_leaf])


def rename_legacy_keys(keys) -> dict[str, str]:
  """Maps each stored key to its current diffusers name (identity for current names)."""
  out = {}
  for key in keys:
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
      new = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    else:
      new = key
    out[key] = new
  return out


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """A nested parameter dict -> {path tuple: leaf}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten_tree(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """The inverse of `flatten_tree`."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _format_problems(missing, unexpected, misshaped, what: str) -> str:
  def block(title, items):
    items = sorted(items)
    shown = "\n    ".join(items[:20])
    more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""
  return (f"{what}: the weights do not match the model built from its config."
          + block("missing keys", missing) + block("unexpected keys", unexpected)
          + block("mis-shaped keys", misshaped))


def torch_to_flax(tensors: Mapping[str, np.ndarray], target: Mapping, *, prefix: str = "",
                  what: str = "weights", place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
                  ) -> dict:
  """Converts a PyTorch-layout state dict into a Flax parameter tree shaped like `target`.

  Args:
    tensors: name -> array; may be lazy (a memory-mapped safetensors mapping), so each
      tensor is read, converted and placed one at a time.
    target: the module's parameter tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`);
      each loaded leaf is cast to the target leaf's dtype.
    prefix: prepended to every PyTorch key (e.g. "text_model." is *not* needed when the
      Flax tree itself starts with `text_model`).
    what: names the weights in error messages.
    place: turns a converted NumPy leaf into the stored leaf; default `jax.numpy.asarray`.
      Pass one that calls `jax.device_put(x, sharding)` to put each leaf straight into its
      sharding.

  Raises:
    WeightsError listing missing, unexpected and mis-shaped keys.
  """
  flat_target = flatten_tree(target)
  renamed = rename_legacy_keys(tensors.keys())
  stored_by_new = {new: old for old, new in renamed.items()}
  plan = {}
  for path, leaf in flat_target.items():
    plan[prefix + flax_path_to_torch_key(path)] = (path, leaf)
  missing = [k for k in plan if k not in stored_by_new]
  unexpected = [old for old, new in renamed.items() if new not in plan]
  misshaped = []
  for key, (path, leaf) in plan.items():
    if key not in stored_by_new:
      continue
    rule = _rule_for(path[-1], len(leaf.shape))
    stored = stored_by_new[key]
    shape = tensors.shape(stored) if hasattr(tensors, "shape") else np.shape(tensors[stored])
    expected = tuple(rule.to_torch(np.empty(leaf.shape, dtype=np.bool_)).shape)
    if tuple(shape) != expected and not _is_pointwise_conv(shape, expected):
      misshaped.append(f"{stored}: stored {tuple(shape)}, model needs {expected}")
  if missing or unexpected or misshaped:
    raise WeightsError(_format_problems(missing, unexpected, misshaped, what))
  place = place or (lambda path, a: jax.numpy.asarray(a))
  out = {}
  for key, (path, leaf) in plan.items():
    rule = _rule_for(path[-1], len(leaf.shape))
    array = np.asarray(tensors[stored_by_new[key]])
    if array.ndim == 4 and rule.kind == "linear":  # a 1x1 conv stored for a linear layer
      array = array[:, :, 0, 0]
    # np.asarray(order="C"), not np.ascontiguousarray, which turns a 0-d array (logit_scale) into 1-d.
    converted = np.asarray(rule.to_flax(array), order="C").astype(leaf.dtype, copy=False)
    out[path] = place(path, converted)
    del array, converted
  return unflatten_tree(out)


def _is_pointwise_conv(stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
  return len(stored) == 4 and len(expected) == 2 and tuple(stored) == (*expected, 1, 1)


def flax_to_torch(params: Mapping, *, prefix: str = "", dtype: Any = None) -> dict[str, np.ndarray]:
  """Converts a Flax parameter tree to a PyTorch-layout state dict of NumPy arrays."""
  out = {}
  for path, leaf in flatten_tree(params).items():
    a = np.asarray(jax.device_get(leaf))
    rule = _rule_for(path[-1], a.ndim)
    a = np.asarray(rule.to_torch(a), order="C")
    if dtype is not None:
      a = a.astype(dtype)
    out[prefix + flax_path_to_torch_key(path)] = a
  return out
