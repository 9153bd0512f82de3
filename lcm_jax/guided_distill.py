"""Guided-Distill (Meng et al. 2023, "On Distillation of Guided Diffusion Models"): the
baseline row of the LCM paper's Table 1, as a training mode (`config.mode = "guided_distill"`).

Two stages in one run of `config.num_train_steps = stage1_steps + log2(N0) * round_steps`:

* Stage 1 (steps 0 .. stage1_steps - 1): one w-conditioned student eta_1(z_t, w, c) learns the
  classifier-free-guided teacher at every t: with the teacher's (x0, eps) of each branch,
      x0_w = (1 + w) x0(z_t, c) - w x0(z_t, empty)
  (for epsilon-, sample- and v-prediction teachers this is the same as guiding the raw output,
  since x0 is linear in it), loss max(SNR_t, 1) ||x0_student(z_t, w, c, t) - x0_w||^2, the
  truncated-SNR weighting of progressive distillation (Salimans & Ho 2022), t ~ U{0..T-1},
  w ~ U[omega_min, omega_max], z_t = alpha_t x + sigma_t eps from the data.
* Stage 2: progressive distillation of the deterministic DDIM sampler of stage 1's student,
  in log2(N0) rounds of `round_steps`; round r distils the teacher's N = N0 / 2^r steps into
  the student's N / 2, then the student becomes the next round's teacher (down to 1 step).
  With the student grid point t = g(N/2, i) and the teacher's t' = g(N, 2i - 1),
  t'' = g(N, 2i - 2), two teacher DDIM steps z_t -> z_t' -> z_t'' give the target
      x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
  the x0 whose single DDIM step t -> t'' lands on z_t'' (Salimans & Ho, Algorithm 2); loss
  max(SNR_t, 1) ||x0_student(z_t) - x_tilde||^2. The teacher sees the same w and caption (no
  classifier-free guidance: stage 1's student has it built in).

The sampling grid is nested so that every round's grid is every second point of the one
before: g(N, j) = floor(j T / N) - 1 for j = 1..N, and g(N, 0) = -1 (the data: alpha 1,
sigma 0). N = 1 is [999]; 2: [999, 499]; 4: [999, 749, 499, 249] (T = 1000).

In the trainer the round's teacher is the train state's `target_params`: instead of an EMA it
is frozen (decay 1) and replaced by the student (decay 0) at the end of stage 1 and of every
round (`target_decay`), so resuming anywhere continues the same schedule. The student is the
teacher's UNet with the guidance input (`cond_proj`, as the LCM student), in the teacher's
parametrisation (the x0 above is read from its output by the prediction type). `sample` is
its deterministic sampler (DDIM on the grid, one UNet call per step, w embedded).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.consistency import guidance_embedding
from lcm_jax.errors import LcmJaxError
from lcm_jax.losses import draw_omega_noise
from lcm_jax.schedule import Schedule, alpha_sigma, broadcast_to, to_x0_eps

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class GuidedDistillConfig:
  """Options of Guided-Distill (`config.guided_distill` plus the omega range of `config.loss`).

  Attributes:
    stage1_steps: training steps of stage 1 (the w-conditioned student).
    round_steps: training steps of each progressive-distillation round.
    initial_steps: N0, the DDIM steps of stage 1's student that round 1 halves (a power of 2).
    omega_min, omega_max: w ~ U[omega_min, omega_max] (the paper's guidance weight).
    guidance_embedding_dim: the student's time_cond_proj_dim.
  """
  stage1_steps: int = 250
  round_steps: int = 150
  initial_steps: int = 32
  omega_min: float = 2.0
  omega_max: float = 14.0
  guidance_embedding_dim: int = 256

  def __post_init__(self):
    n = self.initial_steps
    if not isinstance(n, (int, np.integer)) or n < 2 or n & (n - 1):
      raise LcmJaxError(f"guided_distill.initial_steps={n} must be a power of 2, at least 2")
    if self.stage1_steps < 0 or self.round_steps < 1:
      raise LcmJaxError(f"guided_distill: stage1_steps={self.stage1_steps} must be >= 0 and "
                        f"round_steps={self.round_steps} >= 1")
    if self.omega_min > self.omega_max:
      raise LcmJaxError(f"omega_min={self.omega_min} exceeds omega_max={self.omega_max}")

  @property
  def num_rounds(self) -> int:
    return int(math.log2(self.initial_steps))

  @property
  def total_steps(self) -> int:
    return self.stage1_steps + self.num_rounds * self.round_steps

  def boundaries(self) -> list[int]:
    """Steps after which the student becomes the teacher: the end of stage 1 and of every round."""
    return [self.stage1_steps + r * self.round_steps for r in range(self.num_rounds + 1)]

  def checkpoint_step(self, student_steps: int) -> int:
    """The training step at which the student that samples in `student_steps` steps is final
    (the end of the round that produced it); N0 itself is stage 1's student."""
    if student_steps < 1 or student_steps > self.initial_steps or student_steps & (student_steps - 1):
      raise LcmJaxError(f"Guided-Distill trains students of 1, 2, 4, ..., {self.initial_steps} steps; "
                        f"not {student_steps}")
    return self.stage1_steps + int(math.log2(self.initial_steps // student_steps)) * self.round_steps


# ---------------------------------------------------------------------------------------
# The schedule of a run.

def phase(step: jax.Array, config: GuidedDistillConfig) -> tuple[jax.Array, jax.Array]:
  """(in stage 1 [] bool, the round's teacher steps N [] int32) of the step that starts with
  `step` steps taken (after the last round, the last round's)."""
  step = jnp.asarray(step, jnp.int32)
  r = jnp.clip((step - config.stage1_steps) // config.round_steps, 0, config.num_rounds - 1)
  return step < config.stage1_steps, jnp.right_shift(jnp.int32(config.initial_steps), r)


def stage_of(step: int, config: GuidedDistillConfig) -> int:
  """1 or 2: the stage of the step that starts with `step` steps taken (host-side `phase`)."""
  return 1 if step < config.stage1_steps else 2


def target_decay(step_after: jax.Array, config: GuidedDistillConfig) -> jax.Array:
  """The decay of the train state's target update after the step that brings the count to
  `step_after`: 0 (the target becomes the student: the next round's teacher) at the end of
  stage 1 and of every round, else 1 (the round's teacher stays frozen)."""
  step_after = jnp.asarray(step_after, jnp.int32)
  at_boundary = jnp.any(step_after == jnp.asarray(config.boundaries(), jnp.int32))
  return jnp.where(at_boundary, 0.0, 1.0).astype(jnp.float32)


def grid_timestep(num_train_timesteps: int, num_steps: jax.Array, j: jax.Array) -> jax.Array:
  """g(N, j) = floor(j T / N) - 1 ([..] int32): point j of the N-step grid; j = 0 is -1 (the data)."""
  j = jnp.asarray(j, jnp.int32)
  return (j * num_train_timesteps) // jnp.asarray(num_steps, jnp.int32) - 1


def sampling_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
  """[g(N, N), ..., g(N, 0)] as numpy int32 (N + 1 values, the last -1)."""
  return np.asarray([(j * num_train_timesteps) // num_steps - 1 for j in range(num_steps, -1, -1)], np.int32)


# ---------------------------------------------------------------------------------------
# The loss.

@dataclasses.dataclass(frozen=True)
class Draws:
  """Random numbers of one loss evaluation: timestep [B] int32 in [0, T) (stage 1), position
  [B] float32 in [0, 1) (stage 2: the student's grid point), omega [B], noise like the latents."""
  timestep: jax.Array
  position: jax.Array
  omega: jax.Array
  noise: jax.Array


jax.tree_util.register_dataclass(Draws, data_fields=["timestep", "position", "omega", "noise"], meta_fields=[])


def draw(rng: jax.Array, latents: jax.Array, schedule: Schedule, config: GuidedDistillConfig) -> Draws:
  k_t, k_pos, k_omega, k_noise = jax.random.split(rng, 4)
  b = latents.shape[0]
  omega, noise = draw_omega_noise(k_omega, k_noise, latents, config.omega_min, config.omega_max)
  return Draws(timestep=jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps, dtype=jnp.int32),
               position=jax.random.uniform(k_pos, (b,), jnp.float32), omega=omega, noise=noise)


def snr_weight(schedule: Schedule, t: jax.Array) -> jax.Array:
  """max(alpha_t^2 / sigma_t^2, 1), the truncated-SNR weight on an x0 error ([B] float32)."""
  alpha, sigma = alpha_sigma(schedule, t)
  return jnp.maximum(jnp.square(alpha) / jnp.square(sigma), 1.0).astype(jnp.float32)


def model_x0_eps(apply_fn: ApplyFn, params, z: jax.Array, t: jax.Array, context: jax.Array, w_embedding,
                 schedule: Schedule) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) of a UNet's output at (z, t), in float32, by the schedule's prediction type."""
  out = apply_fn(params, z, t, context, w_embedding).astype(jnp.float32)
  return to_x0_eps(out, z, *alpha_sigma(schedule, t), schedule.prediction_type)


def _noisy(schedule: Schedule, latents: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  alpha, sigma = alpha_sigma(schedule, t)
  return broadcast_to(alpha, latents) * latents.astype(jnp.float32) + broadcast_to(sigma, noise) * noise


def _ddim(x0: jax.Array, eps: jax.Array, schedule: Schedule, s: jax.Array) -> jax.Array:
  alpha, sigma = alpha_sigma(schedule, s)
  return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, eps) * eps


def stage1_terms(student_apply: ApplyFn, teacher_apply: ApplyFn, schedule: Schedule, config: GuidedDistillConfig,
                 student_params, teacher_params, latents: jax.Array, context: jax.Array,
                 uncond_context: jax.Array, draws: Draws) -> dict[str, jax.Array]:
  """Stage 1 for given draws: z_t, the student's x0 (prediction), the guided teacher's x0
  (target, no gradient) and the weight [B]."""
  t = draws.timestep
  z = _noisy(schedule, latents, draws.noise, t)
  b = z.shape[0]
  both = jnp.concatenate([context, jnp.broadcast_to(uncond_context, context.shape).astype(context.dtype)])
  x0_both, _ = model_x0_eps(teacher_apply, teacher_params, jnp.concatenate([z, z]), jnp.concatenate([t, t]), both,
                            None, schedule)
  x0_c, x0_u = x0_both[:b], x0_both[b:]
  w = broadcast_to(draws.omega, z)
  target = jax.lax.stop_gradient(x0_c + w * (x0_c - x0_u))
  w_embedding = guidance_embedding(draws.omega, config.guidance_embedding_dim)
  prediction, _ = model_x0_eps(student_apply, student_params, z, t, context, w_embedding, schedule)
  return {"z": z, "timestep": t, "prediction": prediction, "target": target, "weight": snr_weight(schedule, t)}


def two_step_target(schedule: Schedule, z_t: jax.Array, t: jax.Array, z_s: jax.Array, s: jax.Array) -> jax.Array:
  """x_tilde: the x0 whose DDIM step from (z_t, t) to s lands on z_s (Salimans & Ho, Alg. 2)."""
  alpha_t, sigma_t = alpha_sigma(schedule, t)
  alpha_s, sigma_s = alpha_sigma(schedule, s)
  ratio = sigma_s / sigma_t
  return (z_s - broadcast_to(ratio, z_t) * z_t) / broadcast_to(alpha_s - ratio * alpha_t, z_t)


def stage2_terms(student_apply: ApplyFn, schedule: Schedule, config: GuidedDistillConfig, student_params,
                 teacher_params, latents: jax.Array, context: jax.Array, teacher_steps: jax.Array,
                 draws: Draws) -> dict[str, jax.Array]:
  """A progressive-distillation round for given draws: the teacher (`teacher_params`, the
  previous student, same UNet) takes two DDIM steps of its N-step grid, the student learns
  their x0 in one step of its N / 2-step grid."""
  half = jnp.asarray(teacher_steps, jnp.int32) // 2
  i = jnp.minimum(jnp.floor(draws.position * half.astype(jnp.float32)).astype(jnp.int32), half - 1) + 1
  T = schedule.num_train_timesteps
  t, t_mid, t_end = (grid_timestep(T, teacher_steps, 2 * i - d) for d in (0, 1, 2))
  z = _noisy(schedule, latents, draws.noise, t)
  w_embedding = guidance_embedding(draws.omega, config.guidance_embedding_dim)
  x0, eps = model_x0_eps(student_apply, teacher_params, z, t, context, w_embedding, schedule)
  z_mid = _ddim(x0, eps, schedule, t_mid)
  x0, eps = model_x0_eps(student_apply, teacher_params, z_mid, t_mid, context, w_embedding, schedule)
  z_end = _ddim(x0, eps, schedule, t_end)
  target = jax.lax.stop_gradient(two_step_target(schedule, z, t, z_end, t_end))
  prediction, _ = model_x0_eps(student_apply, student_params, z, t, context, w_embedding, schedule)
  return {"z": z, "timestep": t, "prediction": prediction, "target": target, "weight": snr_weight(schedule, t)}


def weighted_l2(prediction: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """mean over the batch of weight[b] * mean over b's elements of (prediction - target)^2."""
  per_example = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, prediction.ndim)))
  return jnp.mean(weight * per_example)


def make_loss_fn(student_apply: ApplyFn, teacher_apply: ApplyFn, schedule: Schedule, config: GuidedDistillConfig,
                 stage: int | None = None):
  """`loss_fn(student, target, frozen, batch, rng, step) -> (loss, metrics)` for
  `lcm_jax.train_step.make_train_step(..., ema_decay=lambda s: target_decay(s, config),
  loss_takes_step=True)`: stage 1 or the round of `step`; frozen as LCD's
  ({"teacher", "uncond_context"}); the round's teacher is `target`.

  stage: None chooses by `step` inside the function (a `lax.cond`); 1 or 2 fixes the stage
  when the function is traced (the round still follows `step`), so a trainer that knows the
  step on the host compiles one function per stage (`stage_of`). Measured on the toy UNet
  on CPU: the `lax.cond` step took 17 s against 1.5-2 s for either stage alone (XLA's CPU
  backend runs conditional branches slowly; a cond outside the gradient was as slow).
  """
  if stage not in (None, 1, 2):
    raise LcmJaxError(f"stage must be None, 1 or 2, got {stage!r}")

  def loss_fn(student_params, target_params, frozen, batch, rng, step):
    latents, context = batch["latents"], batch["context"]
    draws = draw(rng, latents, schedule, config)
    in_stage1, teacher_steps = phase(step, config)

    def stage1(_):
      terms = stage1_terms(student_apply, teacher_apply, schedule, config, student_params, frozen["teacher"],
                           latents, context, frozen["uncond_context"], draws)
      return weighted_l2(terms["prediction"], terms["target"], terms["weight"]), terms["timestep"]

    def stage2(_):
      terms = stage2_terms(student_apply, schedule, config, student_params, target_params, latents, context,
                           teacher_steps, draws)
      return weighted_l2(terms["prediction"], terms["target"], terms["weight"]), terms["timestep"]

    if stage is None:
      loss, t = jax.lax.cond(in_stage1, stage1, stage2, None)
    else:
      loss, t = (stage1 if stage == 1 else stage2)(None)
      in_stage1 = jnp.asarray(stage == 1)
    metrics = {"omega": jnp.mean(draws.omega), "timestep": jnp.mean(t.astype(jnp.float32)),
               "teacher_steps": jnp.where(in_stage1, 0, teacher_steps).astype(jnp.float32)}
    return loss, metrics

  return loss_fn


# ---------------------------------------------------------------------------------------
# The sampler.

def sample(apply_fn: ApplyFn, params, latents: jax.Array, context: jax.Array, schedule: Schedule,
           omega: jax.Array | float, *, num_steps: int, guidance_embedding_dim: int = 256) -> jax.Array:
  """The Guided-Distill student's deterministic sampler: DDIM on the nested grid g(N, .),
  one UNet call per step with omega embedded, no noise. latents [B, h, w, C] (N(0, I), as
  the other samplers start); returns the final x0 [B, h, w, C] float32."""
  if num_steps < 1:
    raise LcmJaxError(f"num_steps must be >= 1, got {num_steps}")
  b = latents.shape[0]
  omega = jnp.broadcast_to(jnp.asarray(omega, jnp.float32), (b,))
  w_embedding = guidance_embedding(omega, guidance_embedding_dim)
  timesteps = sampling_timesteps(schedule.num_train_timesteps, num_steps)
  z = latents.astype(jnp.float32)
  for t, s in zip(timesteps[:-1], timesteps[1:]):
    x0, eps = model_x0_eps(apply_fn, params, z, jnp.full((b,), t, jnp.int32), context, w_embedding, schedule)
    z = _ddim(x0, eps, schedule, jnp.full((b,), s, jnp.int32))
  return z


class GuidedDistillImages:
  """Prompts -> uint8 images [B, H, W, 3] with a Guided-Distill student's `sample`, from the
  same initial latents as `lcm_jax.text_to_image.TextToImage` (image i: key (seed, indices[i])),
  so its images line up with every other sampler's. `pipe`: a `Pipeline` whose UNet is the
  student (e.g. `lcm_jax.workdir.load_pipeline_from_workdir(workdir, "online", step)`)."""

  def __init__(self, pipe):
    from lcm_jax.schedule import schedule_from_config
    self.pipe = pipe
    self.schedule = schedule_from_config(pipe.scheduler_config)
    self._compiled: dict[tuple, Any] = {}

  def _fn(self, num_steps: int):
    from lcm_jax.models.vae import AutoencoderKL
    from lcm_jax.text_to_image import to_uint8_images
    unet, vae, scaling = self.pipe.unet, self.pipe.vae, self.pipe.vae_scaling_factor
    dim = int(unet.config.time_cond_proj_dim)
    apply_fn = lambda p, z, t, c, tc: unet.apply({"params": p}, z, t, c, tc)

    def generate(params, schedule, context, latents, omega):
      z0 = sample(apply_fn, params["unet"], latents, context, schedule, omega, num_steps=num_steps,
                  guidance_embedding_dim=dim)
      images = vae.apply({"params": params["vae"]}, (z0 / scaling).astype(vae.dtype), method=AutoencoderKL.decode)
      return to_uint8_images(images)

    return jax.jit(generate)

  def __call__(self, prompts, *, num_steps: int, guidance_scale: float, seed: int = 0, indices=None,
               height: int | None = None, width: int | None = None) -> np.ndarray:
    from lcm_jax.text_to_image import default_size, encode_prompts, initial_latents, latent_shape, sample_keys
    prompts = list(prompts)
    if height is None or width is None:
      height, width = default_size(self.pipe)
    indices = np.arange(len(prompts)) if indices is None else np.asarray(indices)
    if num_steps not in self._compiled:
      self._compiled[num_steps] = self._fn(num_steps)
    latents = initial_latents(sample_keys(seed, indices), latent_shape(self.pipe, height, width))
    context = encode_prompts(self.pipe, prompts)
    params = {"unet": self.pipe.params["unet"], "vae": self.pipe.params["vae"]}
    omega = np.float32(guidance_scale - 1.0)  # diffusers' g = 1 + omega
    return np.asarray(self._compiled[num_steps](params, self.schedule, context, latents, omega))
