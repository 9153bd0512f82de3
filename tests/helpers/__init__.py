"""What the tests share: the repository root, perturbing torch weights, comparing outputs.

Modules here:
* `tiny_models`: tiny random diffusers pipelines (sd1 / sd2 flavours) written at test time.
* `tiny_clip`: a tiny CLIP tokenizer and text-encoder config.
* `sharded_lcd_check`, `sharded_step_check`: programs run with 8 fake CPU devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def perturb_(module, seed: int, std: float | Callable[[str, object], float] = 0.05) -> None:
  """Adds Gaussian noise to every parameter of a torch module, in place, so that no tensor
  keeps its initial value (norm scales of one, zero biases) and a transposed or swapped
  tensor cannot hide behind a symmetric initialisation.

  std: the noise's standard deviation, or a function (parameter name, parameter) -> std.
  """
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale = std(name, p) if callable(std) else std
      p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def max_error(ours, reference) -> tuple[float, float]:
  """(max |ours - reference|, the bound's scale max(1, max |reference|)); shapes must match."""
  ours, reference = np.asarray(ours, dtype=np.float32), np.asarray(reference)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.abs(ours - reference).max()), max(1.0, float(np.abs(reference).max()))


def state_dict(torch_model) -> dict[str, np.ndarray]:
  """A torch module's state dict as NumPy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


# Parity bound of the fp32 model tests: max |flax - torch| <= FP32_RTOL * max(1, max |torch|).
FP32_RTOL = 1e-4


def fp32_error(out, ref) -> tuple[float, float]:
  """(max abs error, the fp32 bound for this reference)."""
  err, scale = max_error(out, ref)
  return err, FP32_RTOL * scale


def perturbation_std(name: str, p) -> float:
  """`perturb_`'s std for diffusers models: 0.1 for vectors (norms, biases), 0.02 for
  matrices and kernels (which PyTorch already initialises at random)."""
  del name
  return 0.1 if p.ndim == 1 else 0.02


def torch_layout_shapes(params) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> PyTorch-layout shape for a Flax parameter tree of shapes."""
  import jax

  from lcm_jax.weights import flax_path_to_torch_key
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names, shape = tuple(p.key for p in path), leaf.shape
    if names[-1] == "kernel":  # conv (H, W, I, O) -> (O, I, H, W); dense (I, O) -> (O, I)
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
    out[flax_path_to_torch_key(names)] = tuple(shape)
  return out
