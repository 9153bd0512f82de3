"""The consistency losses: latent consistency distillation (LCD, the paper's Algorithm 1) and
latent consistency fine-tuning (LCF, Algorithm 4), as pure functions of parameters, a batch
and random draws.

Conventions (docs/conventions.md, sections 4-11):
* omega is the paper's guidance weight, eps_tilde = (1 + omega) eps(c) - omega eps(empty);
  a diffusers guidance_scale g is omega + 1. The student sees omega through
  `guidance_embedding(omega)`, as diffusers' `LatentConsistencyModelPipeline` feeds it
  `guidance_scale - 1` at sampling time.
* Skipping-step schedule: the solver grid t_i = (i + 1) k - 1 (i < N // k); a step starts at
  t_{n+k} = grid[index] and its target is t_n = max(t_{n+k} - k, 0).
* The teacher's output is converted to (x0, eps) by its prediction type before guidance and
  before the solver. (The official LCM repository feeds the raw output to the solver as eps
  even for v-prediction teachers; that is wrong and is what `test_losses.py` guards against.)

`apply_fn(params, z [B, H, W, C], t [B], context [B, L, D], timestep_cond [B, Dc] | None)`
is the UNet as in `lcm_jax.samplers`; the teacher and the student may be different module
instances (the student has the guidance input, and may compute in another dtype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.consistency import (
  SIGMA_DATA,
  TIMESTEP_SCALING,
  consistency_output,
  guidance_embedding,
  skipping_step_timesteps,
)
from lcm_jax.errors import LcmJaxError
from lcm_jax.schedule import Schedule, alpha_sigma, broadcast_to, to_x0_eps
from lcm_jax.solvers import SOLVERS

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]

DISTANCES = ("l2", "huber")


@dataclasses.dataclass(frozen=True)
class ConsistencyLossConfig:
  """Options of LCD and LCF. Defaults are the paper's (Sec. 5.1) where it states them.

  Attributes:
    solver: "ddim" (the paper's choice), "dpm_solver" or "dpm_solver_pp".
    skipping_step: k on the training schedule (20: 50 solver steps on 1000).
    omega_min, omega_max: omega ~ U[omega_min, omega_max] (the paper: [2, 14]; diffusers'
      script samples [5, 15]).
    distance: "l2" (mean squared error) or "huber" (pseudo-Huber, sqrt(d^2 + c^2) - c).
    huber_c: c of the pseudo-Huber distance.
    timestep_scaling, sigma_data: boundary scalings c_skip, c_out.
    guidance_embedding_dim: the student's time_cond_proj_dim.
    caption_dropout: proportion of samples whose caption is replaced by the unconditional
      context (for LCD the teacher then sees no caption either, so guidance is a no-op).
    lcf_data_anchor: LCF only: the proportion of samples whose target is the data latent z
      itself, f(z, 0) = z by the boundary condition, instead of f_theta-(z_{t_n}) (a skip all
      the way to the data; 0 is Algorithm 4).
  """
  solver: str = "ddim"
  skipping_step: int = 20
  omega_min: float = 2.0
  omega_max: float = 14.0
  distance: str = "l2"
  huber_c: float = 0.001
  timestep_scaling: float = TIMESTEP_SCALING
  sigma_data: float = SIGMA_DATA
  guidance_embedding_dim: int = 256
  caption_dropout: float = 0.0
  lcf_data_anchor: float = 0.0

  def __post_init__(self):
    if self.solver not in SOLVERS:
      raise LcmJaxError(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
    if self.distance not in DISTANCES:
      raise LcmJaxError(f"unknown distance {self.distance!r}; choose from {', '.join(DISTANCES)}")
    if not 0.0 <= self.lcf_data_anchor <= 1.0:
      raise LcmJaxError(f"lcf_data_anchor={self.lcf_data_anchor} must be in [0, 1]")
    if not 0.0 <= self.caption_dropout < 1.0:
      raise LcmJaxError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
    if self.omega_min > self.omega_max:
      raise LcmJaxError(f"omega_min={self.omega_min} exceeds omega_max={self.omega_max}")


@dataclasses.dataclass(frozen=True)
class Draws:
  """The random numbers of one loss evaluation, drawn by `draw` (or given by a test).

  index: [B] int32 position on the skipping-step grid; omega: [B] float32; noise: like the
  latents; drop: [B] bool, caption replaced by the unconditional context.
  """
  index: jax.Array
  omega: jax.Array
  noise: jax.Array
  drop: jax.Array


jax.tree_util.register_dataclass(Draws, data_fields=["index", "omega", "noise", "drop"], meta_fields=[])


def draw(rng: jax.Array, latents: jax.Array, schedule: Schedule, config: ConsistencyLossConfig) -> Draws:
  """Samples n ~ U{0..N/k-1}, omega ~ U[omega_min, omega_max], eps ~ N(0, I) and the dropout mask."""
  k_index, k_omega, k_noise, k_drop = jax.random.split(rng, 4)
  b = latents.shape[0]
  n = len(skipping_step_timesteps(schedule.num_train_timesteps, config.skipping_step))
  omega, noise = draw_omega_noise(k_omega, k_noise, latents, config.omega_min, config.omega_max)
  return Draws(index=jax.random.randint(k_index, (b,), 0, n, dtype=jnp.int32), omega=omega, noise=noise,
               drop=jax.random.bernoulli(k_drop, config.caption_dropout, (b,)))


def draw_omega_noise(k_omega: jax.Array, k_noise: jax.Array, latents: jax.Array, omega_min: float,
                     omega_max: float) -> tuple[jax.Array, jax.Array]:
  """omega ~ U[omega_min, omega_max] per example ([B] float32) and eps ~ N(0, I) like `latents`:
  the guidance weight and noise of every distillation loss (LCD, LoRA LCD, Guided-Distill)."""
  omega = jax.random.uniform(k_omega, (latents.shape[0],), jnp.float32, omega_min, omega_max)
  return omega, jax.random.normal(k_noise, latents.shape, jnp.float32)


def interval(schedule: Schedule, config: ConsistencyLossConfig, index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(t_{n+k}, t_n), each [B] int32, for positions `index` on the skipping-step grid."""
  grid = jnp.asarray(skipping_step_timesteps(schedule.num_train_timesteps, config.skipping_step), jnp.int32)
  start = grid[index]
  return start, jnp.maximum(start - config.skipping_step, 0)


def apply_caption_dropout(context: jax.Array, uncond_context: jax.Array, drop: jax.Array) -> jax.Array:
  """context [B, L, D] with the rows where drop [B] holds replaced by uncond_context [1 or B, L, D]."""
  return jnp.where(drop[:, None, None], jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype),
                   context)


def distance(a: jax.Array, b: jax.Array, config: ConsistencyLossConfig) -> jax.Array:
  """Mean over all elements of d(a, b) in float32: l2 -> (a - b)^2, huber -> sqrt((a-b)^2 + c^2) - c."""
  d2 = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
  if config.distance == "l2":
    return jnp.mean(d2)
  return jnp.mean(jnp.sqrt(d2 + config.huber_c ** 2) - config.huber_c)


def consistency_function(apply_fn: ApplyFn, params, z: jax.Array, t: jax.Array, context: jax.Array,
                         w_embedding: jax.Array, schedule: Schedule, config: ConsistencyLossConfig) -> jax.Array:
  """f_theta(z, omega, c, t) = c_skip(t) z + c_out(t) x0_hat(z, t) in float32: [B, H, W, C]."""
  out = apply_fn(params, z, t, context, w_embedding).astype(jnp.float32)
  x0, _ = to_x0_eps(out, z, *alpha_sigma(schedule, t), schedule.prediction_type)
  return consistency_output(z, x0, t, config.timestep_scaling, config.sigma_data)


def guided_teacher(teacher_apply: ApplyFn, teacher_params, context: jax.Array, uncond_context: jax.Array,
                   omega: jax.Array, schedule: Schedule):
  """The teacher as `model_fn(z, t) -> (x0, eps)` of the augmented PF-ODE.

  cond and uncond run in one batched call; each branch's output is converted to (x0, eps) by
  the teacher's prediction type, then x0 = x0_c + omega (x0_c - x0_u) and eps likewise.
  """
  b = context.shape[0]
  both_context = jnp.concatenate([context, jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype)])

  def model_fn(z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = teacher_apply(teacher_params, jnp.concatenate([z, z]).astype(jnp.float32), jnp.concatenate([t, t]),
                        both_context, None).astype(jnp.float32)
    alpha, sigma = alpha_sigma(schedule, t)
    x0_c, eps_c = to_x0_eps(out[:b], z, alpha, sigma, schedule.prediction_type)
    x0_u, eps_u = to_x0_eps(out[b:], z, alpha, sigma, schedule.prediction_type)
    w = broadcast_to(omega, z)
    return x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)

  return model_fn


def noisy(schedule: Schedule, latents: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """z_t = alpha_t z + sigma_t eps: [B, H, W, C] float32."""
  alpha, sigma = alpha_sigma(schedule, t)
  return broadcast_to(alpha, latents) * latents.astype(jnp.float32) + broadcast_to(sigma, noise) * noise


def lcd_terms(student_apply: ApplyFn, teacher_apply: ApplyFn, schedule: Schedule, config: ConsistencyLossConfig,
              student_params, target_params, teacher_params, latents: jax.Array, context: jax.Array,
              uncond_context: jax.Array, draws: Draws) -> dict[str, jax.Array]:
  """The quantities of LCD (Algorithm 1) for given random draws, all float32 [B, H, W, C].

  Args:
    latents: [B, H, W, C] z = E(x) * scaling_factor. context: [B, L, D] caption embeddings;
      uncond_context: [1 or B, L, D] the unconditional (empty-prompt) embedding.
  Returns:
    z_start: z_{t_{n+k}} = alpha z + sigma eps; z_target: z_hat_{t_n} = Psi(z_start) on the
    guided teacher (no gradient); prediction: f_theta(z_start, omega, c, t_{n+k});
    target: f_theta-(z_target, omega, c, t_n) with the EMA parameters (no gradient).
  """
  start, target_t = interval(schedule, config, draws.index)
  context = apply_caption_dropout(context, uncond_context, draws.drop)
  w_embedding = guidance_embedding(draws.omega, config.guidance_embedding_dim)
  z_start = noisy(schedule, latents, draws.noise, start)
  model_fn = guided_teacher(teacher_apply, teacher_params, context, uncond_context, draws.omega, schedule)
  z_target = jax.lax.stop_gradient(SOLVERS[config.solver](schedule, z_start, start, target_t, model_fn))
  return _consistency_pair(student_apply, schedule, config, student_params, target_params, z_start, start,
                           z_target, target_t, context, w_embedding)


def lcf_terms(student_apply: ApplyFn, schedule: Schedule, config: ConsistencyLossConfig, student_params,
              target_params, latents: jax.Array, context: jax.Array, uncond_context: jax.Array,
              draws: Draws, anchor: jax.Array | None = None) -> dict[str, jax.Array]:
  """The quantities of LCF (Algorithm 4): as `lcd_terms`, but with no teacher: one eps gives
  both z_{t_{n+k}} and z_{t_n} = alpha(t_n) z + sigma(t_n) eps. anchor [B] bool (optional):
  those samples' target is the data latent z itself (`lcf_data_anchor`)."""
  start, target_t = interval(schedule, config, draws.index)
  context = apply_caption_dropout(context, uncond_context, draws.drop)
  w_embedding = guidance_embedding(draws.omega, config.guidance_embedding_dim)
  z_start = noisy(schedule, latents, draws.noise, start)
  z_target = noisy(schedule, latents, draws.noise, target_t)
  terms = _consistency_pair(student_apply, schedule, config, student_params, target_params, z_start, start,
                            z_target, target_t, context, w_embedding)
  if anchor is not None:
    terms["target"] = jnp.where(anchor[:, None, None, None], latents.astype(jnp.float32), terms["target"])
  return terms


def _consistency_pair(student_apply, schedule, config, student_params, target_params, z_start, start, z_target,
                      target_t, context, w_embedding) -> dict[str, jax.Array]:
  prediction = consistency_function(student_apply, student_params, z_start, start, context, w_embedding,
                                    schedule, config)
  target = jax.lax.stop_gradient(consistency_function(student_apply, target_params, z_target, target_t,
                                                      context, w_embedding, schedule, config))
  return {"z_start": z_start, "z_target": z_target, "prediction": prediction, "target": target}


def _metrics(draws: Draws, schedule: Schedule, config: ConsistencyLossConfig) -> dict[str, jax.Array]:
  start, _ = interval(schedule, config, draws.index)
  return {"omega": jnp.mean(draws.omega), "timestep": jnp.mean(start.astype(jnp.float32)),
          "caption_dropped": jnp.mean(draws.drop.astype(jnp.float32))}


def lora_student_apply(apply_fn: ApplyFn, scale: float) -> ApplyFn:
  """The LCM-LoRA student as an `ApplyFn` of `{"base": UNet params, "lora": adapters}`: the
  base UNet with `scale` (alpha / r) times the adapters added (`lcm_jax.lora.apply_loras`,
  inside the traced function, so the base is never copied in storage). As in diffusers'
  LCM-LoRA script the student has no guidance input: `timestep_cond` is dropped."""
  from lcm_jax.lora import apply_loras

  def apply(params, z, t, context, timestep_cond):
    del timestep_cond
    return apply_fn(apply_loras(params["base"], [(params["lora"], scale)]), z, t, context, None)
  return apply


def make_loss_fn(mode: str, student_apply: ApplyFn, schedule: Schedule, config: ConsistencyLossConfig,
                 teacher_apply: ApplyFn | None = None, lora_scale: float | None = None):
  """The loss for `lcm_jax.train_step.make_train_step`:

      loss_fn(student_params, target_params, frozen, batch, rng) -> (loss, metrics)

  with `frozen = {"teacher": teacher params (LCD only), "uncond_context": [1, L, D]}` and
  `batch = {"latents": [B, H, W, C], "context": [B, L, D]}`.

  With `lora_scale` (LCM-LoRA, LCD only), the student and target parameters are LoRA
  adapters (`lcm_jax.lora`) on the frozen teacher, `student_apply` is the teacher's UNet
  and the student gets no guidance embedding (`lora_student_apply`).
  """
  if mode not in ("lcd", "lcf"):
    raise LcmJaxError(f"unknown mode {mode!r}; choose lcd or lcf")
  if mode == "lcd" and teacher_apply is None:
    raise LcmJaxError("LCD needs a teacher")
  if lora_scale is not None:
    if mode != "lcd":
      raise LcmJaxError("a LoRA student is distilled from a teacher: it needs mode 'lcd'")
    lora_apply = lora_student_apply(student_apply, lora_scale)
    full_loss = make_loss_fn(mode, lora_apply, schedule, config, teacher_apply)

    def lora_loss_fn(student_params, target_params, frozen, batch, rng):
      base = frozen["teacher"]
      return full_loss({"base": base, "lora": student_params}, {"base": base, "lora": target_params}, frozen,
                       batch, rng)
    return lora_loss_fn

  def loss_fn(student_params, target_params, frozen, batch, rng):
    draws = draw(rng, batch["latents"], schedule, config)
    if mode == "lcd":
      terms = lcd_terms(student_apply, teacher_apply, schedule, config, student_params, target_params,
                        frozen["teacher"], batch["latents"], batch["context"], frozen["uncond_context"], draws)
    else:
      anchor = (jax.random.bernoulli(jax.random.fold_in(rng, 1), config.lcf_data_anchor, draws.drop.shape)
                if config.lcf_data_anchor else None)
      terms = lcf_terms(student_apply, schedule, config, student_params, target_params, batch["latents"],
                        batch["context"], frozen["uncond_context"], draws, anchor)
    return distance(terms["prediction"], terms["target"], config), _metrics(draws, schedule, config)

  return loss_fn


def student_params_from_teacher(teacher_params: dict, student_abstract: dict, rng: jax.Array,
                                init: str = "zeros") -> dict:
  """The student's parameters: the teacher's, plus the guidance input `cond_proj`.

  Args:
    teacher_params: the teacher UNet's parameter tree (no cond_proj).
    student_abstract: the student UNet's parameter shapes (`jax.eval_shape`), which has
      `time_embedding/cond_proj/kernel` [Dc, C0] and otherwise the teacher's shapes.
    init: "zeros" (default) makes the student compute exactly the teacher's function at the
      start, whatever omega, so distillation starts from the teacher rather than from a
      perturbed copy of it; "torch_default" draws U(-1/sqrt(Dc), 1/sqrt(Dc)), the PyTorch
      nn.Linear default that diffusers' script leaves in place.
  """
  kernel = student_abstract["time_embedding"]["cond_proj"]["kernel"]
  if init == "zeros":
    cond = jnp.zeros(kernel.shape, kernel.dtype)
  elif init == "torch_default":
    bound = 1.0 / np.sqrt(kernel.shape[0])
    cond = jax.random.uniform(rng, kernel.shape, kernel.dtype, -bound, bound)
  else:
    raise LcmJaxError(f"unknown cond_proj init {init!r}; choose zeros or torch_default")
  student = jax.tree_util.tree_map(lambda x: x, teacher_params)  # a new tree, same leaves
  student["time_embedding"] = dict(student["time_embedding"], cond_proj={"kernel": cond})
  teacher_shapes = jax.tree_util.tree_map(lambda x: (tuple(x.shape)), teacher_params)
  student_shapes = jax.tree_util.tree_map(lambda x: (tuple(x.shape)), student_abstract)
  student_shapes["time_embedding"] = dict(student_shapes["time_embedding"])
  del student_shapes["time_embedding"]["cond_proj"]
  if teacher_shapes != student_shapes:
    raise LcmJaxError("the student UNet's architecture differs from the teacher's beyond the guidance input")
  return student
