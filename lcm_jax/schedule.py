"""The discrete VP noise schedule of Stable Diffusion and the prediction-type conversions.

A `Schedule` holds `alphas_cumprod` (the DDPM cumulative product) as arrays and the scheduler
options the samplers need as static metadata, so a `Schedule` can be a `jax.jit` argument:
its arrays are traced, its options are part of the compiled function's identity.

Conventions used everywhere in lcm-jax:

* Timesteps `t` are integer DDPM indices in [0, num_train_timesteps). alpha_t =
  sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]), lambda_t = log(alpha_t /
  sigma_t), and z_t = alpha_t x0 + sigma_t eps.
* `t = -1` denotes the data itself: alpha = 1, sigma = 0. DDIM uses it as its last target when
  `set_alpha_to_one` is true, and DPM-Solver++ when `final_sigmas_type` is "zero".
* A floating-point `t` is a point between integer timesteps. Its alpha comes from piecewise
  linear interpolation of log(alpha) in t, as DPM-Solver's discrete `NoiseScheduleVP` does (its
  continuous time (t + 1) / N is an affine map of ours). `inverse_lambda` inverts that
  interpolation exactly, so a second-order solver can evaluate the model at the midpoint in
  lambda. At integer-valued floats it agrees with the integer lookup up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lcm_jax.errors import UnsupportedConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class Schedule:
  """The noise schedule plus the scheduler options that change what a sampler does.

  Options left as None were absent from the config: each sampler applies the default of the
  diffusers scheduler it reproduces (DDIM: timestep_spacing "leading", set_alpha_to_one True,
  clip_sample True; DPM-Solver: timestep_spacing "linspace"; LCM: clip_sample False), as
  `Scheduler.from_config` would.

  Attributes:
    betas: [N] float32.
    alphas_cumprod: [N] float32, bit-equal to diffusers' `scheduler.alphas_cumprod`.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  timestep_spacing: str | None = struct.field(pytree_node=False, default=None)
  steps_offset: int = struct.field(pytree_node=False, default=0)
  set_alpha_to_one: bool | None = struct.field(pytree_node=False, default=None)
  clip_sample: bool | None = struct.field(pytree_node=False, default=None)
  clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
  # DPMSolverMultistepScheduler options.
  algorithm_type: str | None = struct.field(pytree_node=False, default=None)
  final_sigmas_type: str | None = struct.field(pytree_node=False, default=None)
  lower_order_final: bool = struct.field(pytree_node=False, default=True)
  euler_at_final: bool = struct.field(pytree_node=False, default=False)
  # LCMScheduler options.
  original_inference_steps: int = struct.field(pytree_node=False, default=50)
  timestep_scaling: float = struct.field(pytree_node=False, default=10.0)


# Options whose listed values are the only ones implemented; any other value raises.
# (Values are compared after `None` is dropped: an explicit null means the default.)
_ONLY_VALUES: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "solver_order": (2,),
    # DPMSolverMultistepScheduler reads the DEIS / UniPC names as "midpoint" / "dpmsolver++".
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
    "algorithm_type": ("dpmsolver", "dpmsolver++", "deis"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "timestep_spacing": TIMESTEP_SPACINGS,
    "prediction_type": PREDICTION_TYPES,
    "beta_schedule": BETA_SCHEDULES,
}


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit.

  PyTorch's CPU kernel works in float32: step = (end - start) / (steps - 1), then
  start + step * i for the first half and end - step * (steps - 1 - i) for the second, each
  with a single rounding (a fused multiply-add). float64 holds the product of a float32 and a
  small integer exactly, so one float64 sum rounded to float32 reproduces it; a float64
  `np.linspace` cast to float32 differs by an ulp in a third of the entries.
  """
  a, b = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([a], np.float32)
  step = np.float64((b - a) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  first = np.float64(a) + step * i
  second = np.float64(b) - step * (steps - 1 - i)
  return np.where(i < steps // 2, first, second).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021), computed in float64."""
  def alpha_bar(x):
    return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def betas_from_config(d: Mapping[str, Any]) -> np.ndarray:
  """[N] float32 betas as diffusers' schedulers build them from a scheduler config."""
  n = int(d.get("num_train_timesteps", 1000))
  if d.get("trained_betas") is not None:
    betas = np.asarray(d["trained_betas"], np.float64).astype(np.float32)
    if betas.shape != (n,):
      raise UnsupportedConfigError(
          f"scheduler config: trained_betas has {betas.size} entries, num_train_timesteps is {n}")
    return betas
  kind = d.get("beta_schedule", "linear")
  start, end = float(d.get("beta_start", 0.0001)), float(d.get("beta_end", 0.02))
  if kind == "linear":
    return _torch_linspace_f32(start, end, n)
  if kind == "scaled_linear":
    root = _torch_linspace_f32(start ** 0.5, end ** 0.5, n)
    return root * root
  return _cosine_betas(n).astype(np.float32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
  """[N] float32 cumulative product of (1 - betas), as `torch.cumprod` gives it.

  1 - beta is rounded to float32 first; PyTorch's CPU cumprod then accumulates float32
  inputs in float64 and rounds each partial product to float32, so we do the same.
  """
  alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float64)
  return np.cumprod(alphas).astype(np.float32)


def schedule_from_config(d: Mapping[str, Any]) -> Schedule:
  """Builds a `Schedule` from a diffusers `scheduler_config.json` dict.

  Accepts the configs Stable Diffusion ships (PNDMScheduler / DDIMScheduler with
  `steps_offset: 1`, `set_alpha_to_one: false`, `skip_prk_steps: true`, `clip_sample: false`)
  and DDIM / DPMSolverMultistep / LCM scheduler configs. Keys that change nothing here
  (`_class_name`, `skip_prk_steps`, ...) are ignored, as diffusers ignores keys a scheduler
  does not take.

  Raises:
    UnsupportedConfigError naming the key, for a value no sampler here implements
    (thresholding, Karras / exponential / beta / Lu / flow sigmas, zero-terminal-SNR
    rescaling, learned variance, solver_order other than 2, the "heun" solver, the SDE
    variants, a finite lambda_min_clipped, an unknown beta schedule or prediction type).
  """
  # An in-memory diffusers config lists the keys that took its class's defaults; from_config
  # treats them as absent (saved JSON files never carry the list).
  defaulted = set(d.get("_use_default_values", ()))
  d = {k: v for k, v in d.items() if k not in defaulted}
  if d.get("solver_type") in ("logrho", "bh1", "bh2"):
    # UniPC's and DEIS's solver types: DPMSolverMultistepScheduler.from_config maps them to
    # "midpoint", so a folder shipping such a scheduler config samples as diffusers does.
    d["solver_type"] = "midpoint"

  def given(key):
    return d.get(key)

  for key, allowed in _ONLY_VALUES.items():
    value = given(key)
    if value is not None and value not in allowed:
      raise UnsupportedConfigError(
          f"scheduler config: {key}={value!r} is not supported (supported: "
          f"{', '.join(repr(a) for a in allowed)})")
  clip = given("lambda_min_clipped")
  if clip is not None and math.isfinite(float(clip)):
    raise UnsupportedConfigError(
        f"scheduler config: lambda_min_clipped={clip!r} is not supported (only -inf)")
  if (given("final_sigmas_type") == "zero" and given("algorithm_type") == "dpmsolver"):
    # diffusers refuses this too: the noise-prediction solver cannot step to sigma = 0.
    raise UnsupportedConfigError(
        "scheduler config: final_sigmas_type='zero' needs algorithm_type 'dpmsolver++'")

  betas = betas_from_config(d)
  alphas_cumprod = alphas_cumprod_from_betas(betas)

  def option(key, default):
    value = given(key)
    return default if value is None else value

  return Schedule(
      betas=jnp.asarray(betas),
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      num_train_timesteps=int(betas.shape[0]),
      prediction_type=option("prediction_type", "epsilon"),
      timestep_spacing=given("timestep_spacing"),
      steps_offset=int(option("steps_offset", 0)),
      set_alpha_to_one=None if given("set_alpha_to_one") is None else bool(d["set_alpha_to_one"]),
      clip_sample=None if given("clip_sample") is None else bool(d["clip_sample"]),
      clip_sample_range=float(option("clip_sample_range", 1.0)),
      algorithm_type="dpmsolver++" if given("algorithm_type") == "deis" else given("algorithm_type"),
      final_sigmas_type=given("final_sigmas_type"),
      lower_order_final=bool(option("lower_order_final", True)),
      euler_at_final=bool(option("euler_at_final", False)),
      original_inference_steps=int(option("original_inference_steps", 50)),
      timestep_scaling=float(option("timestep_scaling", 10.0)),
  )


def broadcast_to(a: jax.Array, x: jax.Array) -> jax.Array:
  """[B] (or scalar) -> [B, 1, ..., 1] with x's rank, for per-sample coefficients."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _log_alpha_table(schedule: Schedule) -> jax.Array:
  return 0.5 * jnp.log(schedule.alphas_cumprod)


def alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha_t, sigma_t), each shaped like t.

  Integer t: sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), with t = -1 meaning
  the data (1, 0). Floating t: log(alpha) interpolated linearly between integer timesteps
  (see the module docstring), t clamped to [0, N - 1], and sigma = sqrt(1 - alpha^2).
  """
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    ac = schedule.alphas_cumprod[jnp.maximum(t, 0)]
    clean = t < 0
    alpha = jnp.where(clean, 1.0, jnp.sqrt(ac)).astype(ac.dtype)
    sigma = jnp.where(clean, 0.0, jnp.sqrt(1.0 - ac)).astype(ac.dtype)
    return alpha, sigma
  table = _log_alpha_table(schedule)
  # The grid is 0..N-1, so the segment is floor(t): no search (jnp.interp's is slow to compile).
  t = jnp.clip(t.astype(table.dtype), 0, table.shape[0] - 1)
  i = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, table.shape[0] - 2)
  frac = t - i.astype(t.dtype)
  log_alpha = table[i] + frac * (table[i + 1] - table[i])
  return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def lambda_t(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Half log-SNR lambda_t = log(alpha_t) - log(sigma_t), shaped like t (+inf at t = -1)."""
  alpha, sigma = alpha_sigma(schedule, t)
  return jnp.log(alpha) - jnp.log(sigma)


def alpha_sigma_from_lambda(lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha, sigma) of a VP schedule at half log-SNR lam: alpha^2 = sigmoid(2 lam)."""
  return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))


def inverse_lambda(schedule: Schedule, lam: jax.Array) -> jax.Array:
  """The floating timestep t with lambda_t = lam, under `alpha_sigma`'s interpolation.

  log(alpha) = -log(1 + exp(-2 lam)) / 2 exactly, and log(alpha) is piecewise linear and
  decreasing in t, so t is the linear interpolation of that table read backwards. lam
  outside [lambda_{N-1}, lambda_0] is clamped to the ends.
  """
  table = _log_alpha_table(schedule)
  log_alpha = -0.5 * jnp.logaddexp(0.0, -2.0 * jnp.asarray(lam, table.dtype))
  # Segment i has table[i] >= log_alpha > table[i + 1]: count by comparison, O(N) per entry
  # but cheap to compile, unlike a search.
  count = jnp.sum(table >= log_alpha[..., None], axis=-1)
  i = jnp.clip(count - 1, 0, table.shape[0] - 2)
  t = i.astype(table.dtype) + (table[i] - log_alpha) / (table[i] - table[i + 1])
  return jnp.clip(t, 0, table.shape[0] - 1)


def to_x0_eps(output: jax.Array, z: jax.Array, alpha: jax.Array, sigma: jax.Array,
              prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """Model output -> (x0, eps), all [B, H, W, C]; alpha, sigma [B] or scalars.

  epsilon: x0 = (z - sigma out) / alpha, eps = out. sample: x0 = out, eps = (z - alpha out) /
  sigma. v_prediction: x0 = alpha z - sigma out, eps = alpha out + sigma z.
  """
  a, s = broadcast_to(alpha, z), broadcast_to(sigma, z)
  if prediction_type == "epsilon":
    return (z - s * output) / a, output
  if prediction_type == "sample":
    return output, (z - a * output) / s
  if prediction_type == "v_prediction":
    return a * z - s * output, a * output + s * z
  raise UnsupportedConfigError(f"prediction_type={prediction_type!r} is not supported")


def from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array,
                prediction_type: str) -> jax.Array:
  """(x0, eps) -> the model output of the given type; inverse of `to_x0_eps` when
  z = alpha x0 + sigma eps. v = alpha eps - sigma x0."""
  a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
  if prediction_type == "epsilon":
    return eps
  if prediction_type == "sample":
    return x0
  if prediction_type == "v_prediction":
    return a * eps - s * x0
  raise UnsupportedConfigError(f"prediction_type={prediction_type!r} is not supported")
