"""One-interval solvers Psi(z_t, t, s) of the (guidance-augmented) probability-flow ODE.

Each solver moves z_t at timestep t to an estimate of z_s at an earlier timestep s, calling

    model_fn(z [B, H, W, C], t [B]) -> (x0, eps), both [B, H, W, C]

which hides the network, classifier-free guidance and the prediction-type conversion from the
solver. LCD guides x0 and eps separately (x0 = x0_c + w (x0_c - x0_u), eps likewise), as
diffusers' `train_lcm_distill_sd_wds.py` does; for all three prediction types this equals
converting the guided raw output, since each conversion is affine in the output and guidance
weights (1 + w, -w) sum to one.

t and s are [B] timestep arrays, one interval per sample. Integer timesteps index the
schedule; the second-order solvers also evaluate model_fn at a floating timestep, the point
half-way between t and s in lambda, located with `schedule.inverse_lambda` (log alpha is
interpolated linearly between integer timesteps, as in DPM-Solver's discrete schedule). The
UNet's sinusoidal timestep embedding takes such a timestep as it is. Rounding the midpoint to
an integer timestep would move it off r = 1/2, to r = (lambda_mid - lambda_t) / h varying per
sample, and need the general-r update with its extra term; interpolating keeps r = 1/2 and
the two-term form of the papers.

All functions are pure and jittable, and work in the dtype of the schedule's arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lcm_jax.schedule import (
  Schedule,
  alpha_sigma,
  alpha_sigma_from_lambda,
  broadcast_to,
  inverse_lambda,
  lambda_t,
)

ModelFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def ddim_update(x0: jax.Array, eps: jax.Array, alpha_s: jax.Array, sigma_s: jax.Array) -> jax.Array:
  """z_s = alpha_s x0 + sigma_s eps ([B, H, W, C]; alpha_s, sigma_s [B]): deterministic DDIM."""
  return broadcast_to(alpha_s, x0) * x0 + broadcast_to(sigma_s, eps) * eps


def ddim_step(schedule: Schedule, z_t: jax.Array, t: jax.Array, s: jax.Array,
              model_fn: ModelFn) -> jax.Array:
  """DDIM (the LCM paper's eq. 18), first order: z_s = alpha_s x0(z_t) + sigma_s eps(z_t).

  Eq. 18 writes it as alpha_s / alpha_t z_t - sigma_s (sigma_t alpha_s / (alpha_t sigma_s) - 1)
  eps, the same value when z_t = alpha_t x0 + sigma_t eps. s = -1 steps to the data
  (alpha 1, sigma 0). One model_fn call.

  Args:
    z_t: [B, H, W, C]; t, s: [B] timesteps (s < t). Returns z_s [B, H, W, C].
  """
  x0, eps = model_fn(z_t, t)
  alpha_s, sigma_s = alpha_sigma(schedule, s)
  return ddim_update(x0, eps, alpha_s, sigma_s)


def _midpoint(schedule: Schedule, t: jax.Array, s: jax.Array):
  """lambda_t, h = lambda_s - lambda_t, and the timestep and (alpha, sigma) at lambda_t + h/2."""
  lam_t, lam_s = lambda_t(schedule, t), lambda_t(schedule, s)
  h = lam_s - lam_t
  lam_mid = lam_t + 0.5 * h
  return h, inverse_lambda(schedule, lam_mid), alpha_sigma_from_lambda(lam_mid)


def dpm_solver_2_step(schedule: Schedule, z_t: jax.Array, t: jax.Array, s: jax.Array,
                      model_fn: ModelFn) -> jax.Array:
  """DPM-Solver-2 (Lu et al. 2022a, midpoint r1 = 1/2 in lambda), noise prediction, one step.

  With h = lambda_s - lambda_t and the midpoint m at lambda_t + h/2:
    u   = alpha_m / alpha_t z_t - sigma_m (e^{h/2} - 1) eps(z_t, t)
    z_s = alpha_s / alpha_t z_t - sigma_s (e^h - 1) eps(u, m)
  (the general update's correction -(sigma_s / 2r)(e^h - 1)(eps_m - eps_t) folds into one
  term at r = 1/2). Two model_fn calls, the second at a floating timestep. Needs s >= 0.

  Args:
    z_t: [B, H, W, C]; t, s: [B] timesteps (s < t). Returns z_s [B, H, W, C].
  """
  h, t_mid, (alpha_m, sigma_m) = _midpoint(schedule, t, s)
  alpha_t, _ = alpha_sigma(schedule, t)
  alpha_s, sigma_s = alpha_sigma(schedule, s)
  _, eps_t = model_fn(z_t, t)
  u = (broadcast_to(alpha_m / alpha_t, z_t) * z_t
       - broadcast_to(sigma_m * jnp.expm1(0.5 * h), z_t) * eps_t)
  _, eps_m = model_fn(u, t_mid)
  return (broadcast_to(alpha_s / alpha_t, z_t) * z_t
          - broadcast_to(sigma_s * jnp.expm1(h), z_t) * eps_m)


def dpm_solver_pp_2_step(schedule: Schedule, z_t: jax.Array, t: jax.Array, s: jax.Array,
                         model_fn: ModelFn) -> jax.Array:
  """DPM-Solver++(2S) (Lu et al. 2022b, r = 1/2), data prediction, one step.

  With h = lambda_s - lambda_t and the midpoint m at lambda_t + h/2:
    u   = sigma_m / sigma_t z_t - alpha_m (e^{-h/2} - 1) x0(z_t, t)
    z_s = sigma_s / sigma_t z_t - alpha_s (e^{-h} - 1) x0(u, m)
  (D = (1 - 1/2r) x0_t + (1/2r) x0_m is x0_m at r = 1/2). Two model_fn calls, the second at a
  floating timestep. Needs s >= 0.

  Args:
    z_t: [B, H, W, C]; t, s: [B] timesteps (s < t). Returns z_s [B, H, W, C].
  """
  h, t_mid, (alpha_m, sigma_m) = _midpoint(schedule, t, s)
  _, sigma_t = alpha_sigma(schedule, t)
  alpha_s, sigma_s = alpha_sigma(schedule, s)
  x0_t, _ = model_fn(z_t, t)
  u = (broadcast_to(sigma_m / sigma_t, z_t) * z_t
       - broadcast_to(alpha_m * jnp.expm1(-0.5 * h), z_t) * x0_t)
  x0_m, _ = model_fn(u, t_mid)
  return (broadcast_to(sigma_s / sigma_t, z_t) * z_t
          - broadcast_to(alpha_s * jnp.expm1(-h), z_t) * x0_m)


SOLVERS: dict[str, Callable[..., jax.Array]] = {
    "ddim": ddim_step,
    "dpm_solver": dpm_solver_2_step,
    "dpm_solver_pp": dpm_solver_pp_2_step,
}
