"""Samplers: the teacher's DDIM and DPM-Solver with classifier-free guidance, and LCM's
multistep consistency sampling. Each whole loop is one `lax.scan`.

Model interface, NHWC:

    apply_fn(params, z [B, H, W, C], t [B] int32, context [B, L, D],
             timestep_cond [B, Dc] | None) -> model output [B, H, W, C]

e.g. `lambda p, z, t, c, tc: unet.apply({"params": p}, z, t, c, tc)`. `params` is an argument
of every sampler, never closed over, so that under `jax.jit` the weights stay arguments
(closed-over weights become constants that XLA folds, copies and can run out of memory on).

Jitting: the step count and the options after `*` are static, so bind them with `partial`:

    sample = jax.jit(functools.partial(ddim_sample, apply_fn, num_steps=25))
    latents = sample(params, noise, context, uncond_context, schedule, 7.5)

A `Schedule` is a pytree whose options are static, so it may be an argument too. A Python
float guidance_scale bound with `partial` decides statically whether the unconditional branch
runs (it is skipped at exactly 1.0); a traced guidance_scale always runs both branches.
diffusers' pipelines skip guidance for every g <= 1; here any g other than 1 is applied
(g = 0 gives the unconditional model).

Static arguments: `num_steps` for all; `algorithm`, `final_sigmas_type` for
`dpm_solver_sample`; `original_inference_steps`, `timestep_scaling`, `time_cond_proj_dim`
for `lcm_sample`. Everything else (params, latents, contexts, schedule, guidance_scale, rng)
may be traced: a new value of any of them reuses the compiled sampler.

Every sampler takes latents already scaled by its initial noise sigma, which is 1 for all of
them (`INIT_NOISE_SIGMA`), and matches the diffusers scheduler built with
`Scheduler.from_config(<the same scheduler config>)` step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.consistency import consistency_output, guidance_embedding, lcm_timesteps
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError
from lcm_jax.schedule import Schedule, alpha_sigma, broadcast_to, to_x0_eps
from lcm_jax.solvers import ddim_step

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]

# DDIM, DPM-Solver and LCM all start from latents ~ N(0, I): diffusers' init_noise_sigma.
INIT_NOISE_SIGMA = 1.0


def _needs_uncond(guidance_scale) -> bool:
  """False only for a concrete guidance scale of exactly 1 (guidance then changes nothing)."""
  if isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool):
    return guidance_scale != 1
  return True


def guided_output(apply_fn: ApplyFn, params, z: jax.Array, t: jax.Array, context: jax.Array,
                  uncond_context: jax.Array | None, guidance_scale) -> jax.Array:
  """Classifier-free guidance in diffusers' convention: uncond + g (cond - uncond).

  Args:
    z: [B, H, W, C]; t: [B]; context: [B, L, D]; uncond_context: [B or 1, L, D] (the
      empty-prompt embedding), unused when guidance_scale is the Python number 1.
    guidance_scale: g, a scalar or [B]. g = 1 + the paper's w.
  Returns:
    [B, H, W, C] in z's dtype. Both branches run in one apply_fn call on a 2B batch,
    unconditional first as in diffusers' pipelines.
  """
  if not _needs_uncond(guidance_scale):
    return apply_fn(params, z, t, context, None).astype(z.dtype)
  if uncond_context is None:
    raise LcmJaxError("guidance_scale != 1 needs an unconditional context (empty-prompt embedding)")
  uncond_context = jnp.broadcast_to(uncond_context, context.shape)
  out = apply_fn(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                 jnp.concatenate([uncond_context, context]), None).astype(z.dtype)
  out_uncond, out_cond = jnp.split(out, 2)
  g = broadcast_to(jnp.asarray(guidance_scale, z.dtype), z)
  return out_uncond + g * (out_cond - out_uncond)


def _batch_t(t: jax.Array, z: jax.Array) -> jax.Array:
  return jnp.full((z.shape[0],), t, jnp.int32)


def _check_steps(num_steps: int, schedule: Schedule) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise LcmJaxError(f"num_steps must be a positive integer (static), got {num_steps!r}")
  if num_steps > schedule.num_train_timesteps:
    raise LcmJaxError(f"num_steps={num_steps} exceeds num_train_timesteps="
                      f"{schedule.num_train_timesteps}")


# ----------------------------------------------------------------------------------------
# DDIM (diffusers' DDIMScheduler, eta = 0)


def ddim_timesteps(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, targets), each [num_steps] int64: DDIMScheduler's timesteps and the timestep
  each step lands on, t - N // num_steps, with a negative target replaced by its final alpha:
  -1 (the data) if set_alpha_to_one (DDIM's default), else 0."""
  _check_steps(num_steps, schedule)
  n_train = schedule.num_train_timesteps
  spacing = schedule.timestep_spacing or "leading"
  if spacing == "linspace":
    ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ratio = n_train // num_steps
    ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
  else:  # trailing
    ratio = n_train / num_steps
    ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
  # DDIMScheduler steps by N // n whatever the spacing, even where that misses the next one.
  targets = ts - n_train // num_steps
  set_alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
  targets = np.where(targets >= 0, targets, -1 if set_alpha_to_one else 0)
  return ts.copy(), targets.astype(np.int64)


def ddim_sample(apply_fn: ApplyFn, params, latents: jax.Array, context: jax.Array,
                uncond_context: jax.Array | None, schedule: Schedule, guidance_scale=7.5, *,
                num_steps: int) -> jax.Array:
  """Deterministic DDIM sampling with classifier-free guidance (DDIMScheduler, eta 0).

  Args:
    latents: [B, H, W, C] initial noise. context: [B, L, D]. uncond_context: [B or 1, L, D].
    guidance_scale: diffusers' g (scalar or [B]). num_steps: static.
  Returns:
    [B, H, W, C] final latents. x0 is clipped to +-clip_sample_range if the config's
    clip_sample is true or absent (DDIMScheduler's default).
  """
  timesteps, targets = ddim_timesteps(schedule, num_steps)
  clip = True if schedule.clip_sample is None else schedule.clip_sample

  def model_fn(z, t):
    out = guided_output(apply_fn, params, z, t, context, uncond_context, guidance_scale)
    x0, eps = to_x0_eps(out, z, *alpha_sigma(schedule, t), schedule.prediction_type)
    if clip:
      x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps

  def body(z, ts):
    t, s = ts
    return ddim_step(schedule, z, _batch_t(t, z), _batch_t(s, z), model_fn), None

  z, _ = jax.lax.scan(body, latents, (jnp.asarray(timesteps, jnp.int32),
                                      jnp.asarray(targets, jnp.int32)))
  return z


# ----------------------------------------------------------------------------------------
# DPM-Solver / DPM-Solver++ multistep, second order (diffusers' DPMSolverMultistepScheduler)


def dpm_solver_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """DPMSolverMultistepScheduler's timesteps [num_steps] int64 (default spacing "linspace")."""
  _check_steps(num_steps, schedule)
  n_train = schedule.num_train_timesteps
  spacing = schedule.timestep_spacing or "linspace"
  if spacing == "linspace":
    ts = np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    ratio = n_train // (num_steps + 1)
    ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
    ts = ts + schedule.steps_offset
  else:  # trailing
    ratio = n_train / num_steps
    ts = np.arange(n_train, 0, -ratio).round().astype(np.int64) - 1
  return ts.copy()


def _resolve_dpm_options(schedule: Schedule, algorithm: str | None,
                         final_sigmas_type: str | None) -> tuple[str, str]:
  algorithm = algorithm or schedule.algorithm_type or "dpmsolver++"
  if algorithm not in ("dpmsolver", "dpmsolver++"):
    raise UnsupportedConfigError(f"algorithm={algorithm!r}: use 'dpmsolver' or 'dpmsolver++'")
  # The noise-prediction solver cannot step to sigma = 0 (its update is 0 * inf), and diffusers
  # refuses the pair; absent any setting we take "sigma_min" for it (stop at timestep 0).
  final = final_sigmas_type or schedule.final_sigmas_type
  if final is None:
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
  if final not in ("zero", "sigma_min"):
    raise UnsupportedConfigError(f"final_sigmas_type={final!r}: use 'zero' or 'sigma_min'")
  if final == "zero" and algorithm == "dpmsolver":
    raise UnsupportedConfigError("final_sigmas_type='zero' needs algorithm 'dpmsolver++'")
  return algorithm, final


def dpm_solver_sample(apply_fn: ApplyFn, params, latents: jax.Array, context: jax.Array,
                      uncond_context: jax.Array | None, schedule: Schedule, guidance_scale=7.5,
                      *, num_steps: int, algorithm: str | None = None,
                      final_sigmas_type: str | None = None) -> jax.Array:
  """Multistep DPM-Solver (Lu et al. 2022a) or DPM-Solver++(2M) (2022b), order 2, midpoint.

  Reproduces DPMSolverMultistepScheduler with solver_order 2: first order on the first step
  and (lower_order_final, < 15 steps; euler_at_final; or final_sigmas_type "zero") on the
  last, the second-order multistep update in between,
    D1 = (m0 - m1) / r0,  r0 = h_prev / h,
    dpmsolver++: z' = sigma'/sigma z - alpha' (e^-h - 1) (D0 + D1 / 2), m = x0,
    dpmsolver:   z' = alpha'/alpha z - sigma' (e^h - 1) (D0 + D1 / 2),  m = eps.

  Args:
    latents: [B, H, W, C]; context: [B, L, D]; uncond_context: [B or 1, L, D].
    guidance_scale: diffusers' g. num_steps: static.
    algorithm: "dpmsolver++" or "dpmsolver"; None takes the config's algorithm_type, else
      "dpmsolver++". Static.
    final_sigmas_type: "zero" (end at the data) or "sigma_min" (end at timestep 0); None
      takes the config's, else "zero" for dpmsolver++ and "sigma_min" for dpmsolver. Static.
  Returns:
    [B, H, W, C] final latents.
  """
  algorithm, final = _resolve_dpm_options(schedule, algorithm, final_sigmas_type)
  timesteps = dpm_solver_timesteps(schedule, num_steps)
  n = num_steps
  lower_last = (schedule.euler_at_final or (schedule.lower_order_final and n < 15)
                or final == "zero")
  first_order = np.zeros(n, bool)
  first_order[0] = True
  first_order[n - 1] |= lower_last
  points = np.concatenate([timesteps, [-1 if final == "zero" else 0]])

  # Per-step coefficients from the [n + 1] point table: z' = cz z + c0 m0 + c1 (m0 - m1).
  alpha, sigma = alpha_sigma(schedule, jnp.asarray(points, jnp.int32))
  lam = jnp.log(alpha) - jnp.log(sigma)
  h = lam[1:] - lam[:-1]
  h_prev = jnp.concatenate([h[:1], h[:-1]])  # unused where first_order
  if algorithm == "dpmsolver++":
    cz = sigma[1:] / sigma[:-1]
    c0 = -alpha[1:] * jnp.expm1(-h)
  else:
    cz = alpha[1:] / alpha[:-1]
    c0 = -sigma[1:] * jnp.expm1(h)
  # where, not multiply: at a "zero" final step r0 = 0 and c1 would be inf.
  c1 = jnp.where(jnp.asarray(first_order), 0.0, 0.5 * c0 * h / h_prev)

  def body(carry, xs):
    z, m_prev = carry
    t, cz_i, c0_i, c1_i = xs
    tb = _batch_t(t, z)
    out = guided_output(apply_fn, params, z, tb, context, uncond_context, guidance_scale)
    x0, eps = to_x0_eps(out, z, *alpha_sigma(schedule, tb), schedule.prediction_type)
    m = x0 if algorithm == "dpmsolver++" else eps
    z_next = cz_i * z + c0_i * m + c1_i * (m - m_prev)
    return (z_next, m), None

  (z, _), _ = jax.lax.scan(
      body, (latents, jnp.zeros_like(latents)),
      (jnp.asarray(timesteps, jnp.int32), cz.astype(latents.dtype), c0.astype(latents.dtype),
       c1.astype(latents.dtype)))
  return z


# ----------------------------------------------------------------------------------------
# LCM multistep sampling (the paper's Algorithm 3; diffusers' LCMScheduler)


def lcm_step(schedule: Schedule, model_output: jax.Array, z: jax.Array, t: jax.Array,
             t_next: jax.Array, noise: jax.Array, timestep_scaling: float | None = None,
             ) -> tuple[jax.Array, jax.Array]:
  """One LCMScheduler.step with injected noise.

  denoised = c_skip(t) z + c_out(t) x0(model_output); z_next = alpha(t_next) denoised +
  sigma(t_next) noise. On the last step LCMScheduler returns `denoised` as the sample; the
  caller picks it.

  Args:
    model_output: [B, H, W, C] raw UNet output; z: [B, H, W, C]; t, t_next: [B] int;
    noise: [B, H, W, C]; timestep_scaling: None takes the schedule's (10 by default).
  Returns:
    (z_next, denoised), both [B, H, W, C].
  """
  scaling = schedule.timestep_scaling if timestep_scaling is None else timestep_scaling
  x0, _ = to_x0_eps(model_output, z, *alpha_sigma(schedule, t), schedule.prediction_type)
  if schedule.clip_sample:  # LCMScheduler's default is no clipping
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  denoised = consistency_output(z, x0, t, scaling)
  alpha_n, sigma_n = alpha_sigma(schedule, t_next)
  z_next = broadcast_to(alpha_n, z) * denoised + broadcast_to(sigma_n, z) * noise
  return z_next, denoised


def lcm_sample(apply_fn: ApplyFn, params, latents: jax.Array, context: jax.Array,
               schedule: Schedule, guidance_scale=8.5, rng: jax.Array | None = None, *,
               num_steps: int, original_inference_steps: int | None = None,
               timestep_scaling: float | None = None,
               time_cond_proj_dim: int | None = 256) -> jax.Array:
  """LCM multistep sampling: one apply_fn call per step, no classifier-free guidance.

  The guidance weight w = guidance_scale - 1 reaches the UNet as
  `guidance_embedding(w, time_cond_proj_dim)` (as LatentConsistencyModelPipeline does);
  time_cond_proj_dim None (a UNet without the input) passes timestep_cond None. Each step
  denoises with the boundary scalings and, but for the last, re-noises to the next timestep
  with fresh noise drawn from rng.

  Args:
    latents: [B, H, W, C] initial noise. context: [B, L, D]. guidance_scale: scalar or [B].
    rng: a PRNG key; one split per step. May be None for num_steps = 1.
    num_steps, original_inference_steps, timestep_scaling, time_cond_proj_dim: static;
      None takes the schedule's (50 and 10 unless the LCM scheduler config says otherwise).
  Returns:
    [B, H, W, C] the last step's denoised latents (decode them with the VAE).
  """
  _check_steps(num_steps, schedule)
  original = original_inference_steps or schedule.original_inference_steps
  timesteps = lcm_timesteps(num_steps, original, schedule.num_train_timesteps)
  next_timesteps = np.concatenate([timesteps[1:], timesteps[-1:]])
  is_last = np.arange(num_steps) == num_steps - 1
  b = latents.shape[0]
  w_embedding = None
  if time_cond_proj_dim is not None:
    w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32) - 1.0, (b,))
    w_embedding = guidance_embedding(w, time_cond_proj_dim).astype(latents.dtype)
  if rng is None and num_steps > 1:
    raise LcmJaxError("lcm_sample needs rng for more than one step")
  # A single step returns denoised and never uses its noise.
  keys = None if rng is None else jax.random.split(rng, num_steps)

  def body(z, xs):
    t, t_next, last, key = xs
    tb = _batch_t(t, z)
    out = apply_fn(params, z, tb, context, w_embedding).astype(z.dtype)
    noise = jnp.zeros_like(z) if key is None else jax.random.normal(key, z.shape, z.dtype)
    z_next, denoised = lcm_step(schedule, out, z, tb, _batch_t(t_next, z), noise, timestep_scaling)
    return jnp.where(last, denoised, z_next), None

  z, _ = jax.lax.scan(body, latents, (jnp.asarray(timesteps, jnp.int32),
                                      jnp.asarray(next_timesteps, jnp.int32),
                                      jnp.asarray(is_last), keys))
  return z
