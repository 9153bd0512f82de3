"""Consistency-model pieces of LCM: the guidance embedding, boundary scalings, f_theta, and
the timestep grids of distillation and of multistep sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.errors import LcmJaxError
from lcm_jax.schedule import broadcast_to

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def guidance_embedding(w: jax.Array, dim: int = 256) -> jax.Array:
  """Sinusoidal embedding of the guidance weight w [B] -> [B, dim] float32.

  diffusers' `get_guidance_scale_embedding`: w is scaled by 1000, frequencies are
  exp(-i log(10000) / (half - 1)) for i < half = dim // 2, the output is [sin, cos] (in that
  order, unlike the SD timestep embedding), zero-padded by a column when dim is odd. w here is
  the paper's w, i.e. a diffusers guidance_scale minus one.

  Differs from diffusers' float32 result by up to 8e-4 at large w (256 dims, w = 14) where
  torch's float32 exp is an ulp off at a frequency; see guidance_embedding's comment.
  """
  w = jnp.asarray(w, jnp.float32) * 1000.0
  half = dim // 2
  # The arguments reach 1.5e4 rad, so one ulp of a frequency moves the output by up to 1e-3.
  # The frequencies are a constant: take them correctly rounded from float64 rather than from
  # XLA's float32 exp (wrong in the last bit for an eighth of them). The exponent is the
  # float32 product, as diffusers forms it.
  scale = np.float32(np.log(np.float32(10000.0)) / np.float32(half - 1))
  exponents = np.arange(half, dtype=np.float32) * -scale
  freqs = jnp.asarray(np.exp(exponents.astype(np.float64)).astype(np.float32))
  args = w[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def boundary_scalings(t: jax.Array, timestep_scaling: float = TIMESTEP_SCALING,
                      sigma_data: float = SIGMA_DATA) -> tuple[jax.Array, jax.Array]:
  """(c_skip, c_out) at integer timesteps t [B], each [B] float32.

  With s = timestep_scaling * t: c_skip = sigma_data^2 / (s^2 + sigma_data^2) and
  c_out = s / sqrt(s^2 + sigma_data^2), so f_theta is the identity at t = 0 and is almost
  x0 from t = 1 on (c_skip(1) = 0.0024938).
  """
  s = jnp.asarray(t).astype(jnp.float32) * timestep_scaling
  denom = s * s + sigma_data ** 2
  return sigma_data ** 2 / denom, s / jnp.sqrt(denom)


def consistency_output(z: jax.Array, x0: jax.Array, t: jax.Array,
                       timestep_scaling: float = TIMESTEP_SCALING,
                       sigma_data: float = SIGMA_DATA) -> jax.Array:
  """f_theta = c_skip(t) z + c_out(t) x0: z, x0 [B, H, W, C], t [B] -> [B, H, W, C]."""
  c_skip, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
  return broadcast_to(c_skip, z).astype(z.dtype) * z + broadcast_to(c_out, x0).astype(x0.dtype) * x0


def skipping_step_timesteps(num_train_timesteps: int = 1000, k: int = 20) -> np.ndarray:
  """The distillation solver grid [num_train_timesteps // k] int64: (1..N/k) * k - 1.

  For 1000 and k = 20: [19, 39, ..., 999]. LCD starts at one of these, t, and targets
  t - k clamped at 0 (so [0, 19, ..., 979]), as diffusers' `DDIMSolver` does.
  """
  if k < 1 or k > num_train_timesteps:
    raise LcmJaxError(f"skipping step k={k} must be in [1, {num_train_timesteps}]")
  n = num_train_timesteps // k
  return np.arange(1, n + 1, dtype=np.int64) * k - 1


def lcm_timesteps(num_steps: int, original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000) -> np.ndarray:
  """LCMScheduler's inference timesteps [num_steps] int64, descending.

  The origin grid is (1..o) * k - 1 with o = original_inference_steps and k = N // o (the
  distillation grid), read from the top; the steps are its entries at
  floor(linspace(0, o, num_steps, endpoint=False)). 4 -> [999, 759, 499, 259].
  """
  if num_steps < 1:
    raise LcmJaxError(f"num_steps={num_steps} must be at least 1")
  if original_inference_steps > num_train_timesteps:
    raise LcmJaxError(f"original_inference_steps={original_inference_steps} exceeds "
                      f"num_train_timesteps={num_train_timesteps}")
  if num_steps > original_inference_steps:
    raise LcmJaxError(f"num_steps={num_steps} exceeds original_inference_steps="
                      f"{original_inference_steps}: LCM steps are a subset of that grid")
  # Not skipping_step_timesteps(N, N // o): that grid is longer when o does not divide N.
  k = num_train_timesteps // original_inference_steps
  origin = (np.arange(1, original_inference_steps + 1, dtype=np.int64) * k - 1)[::-1]
  index = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
  return origin[index].copy()

