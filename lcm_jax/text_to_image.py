"""Text-to-image with a loaded Stable Diffusion pipeline: prompts -> uint8 images.

The library layer under `python -m lcm_jax.sample` (no flag parsing here):

    pipe = load_pipeline("path/to/lcm")
    t2i = TextToImage(pipe)
    images = t2i(["a photo of a cat"], sampler="lcm", num_steps=4, seed=0)  # [1, H, W, 3] uint8

What each sampler reproduces (on the same initial latents):
* "lcm": diffusers' `LatentConsistencyModelPipeline` with `LCMScheduler.from_config(<the
  model's scheduler config>)`: one UNet call per step, no classifier-free guidance; the UNet
  sees w = guidance_scale - 1 through its guidance embedding when it has `time_cond_proj_dim`
  (without it the guidance scale is unused). The prompt is never paired with a negative one:
  LCD distils guidance against the empty prompt.
* "ddim", "dpm_solver", "dpm_solver_pp": `StableDiffusionPipeline` with DDIMScheduler or
  DPMSolverMultistepScheduler (algorithm_type "dpmsolver" / "dpmsolver++") from the same
  config, with classifier-free guidance against `negative_prompt` (the empty string by
  default) when guidance_scale > 1, as diffusers does. On a UNet with `time_cond_proj_dim`
  StableDiffusionPipeline runs no CFG and embeds w = guidance_scale - 1 instead (the guidance
  is in the model); so do we, and the negative prompt is then unused.

The schedule is `schedule_from_config(pipe.scheduler_config)` for every sampler: it keeps the
options each diffusers scheduler would read from that config and leaves the others to each
sampler's defaults, so for LCM on a DDIM/PNDM config (SD's) it gives what
`LCMScheduler.from_config` gives: original_inference_steps 50, timestep_scaling 10,
clip_sample as the config says (SD's configs: false), the config's betas and prediction type.

Randomness is per image, not per batch: image i of a call draws from
`fold_in(key(seed), indices[i])`, split into a key for its initial latents and one for LCM's
re-noising noise, and the LCM loop is vmapped over the batch so that each image draws its own
noise. An image therefore does not depend on the batch it was generated in.

Compilation: one AOT-compiled function per (sampler, steps, batch, height, width, dtype,
guidance on/off) runs the whole sampler loop plus the VAE decode and the uint8 conversion.
Parameters are arguments of it, never closed over (closed-over weights become constants
that XLA folds and copies); the guidance scale and seeds are arguments too, so changing them
never recompiles.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.consistency import guidance_embedding
from lcm_jax.errors import LcmJaxError
from lcm_jax.lora import apply_loras
from lcm_jax.models.vae import AutoencoderKL
from lcm_jax.samplers import (
  INIT_NOISE_SIGMA,
  ddim_sample,
  dpm_solver_sample,
  lcm_sample,
)
from lcm_jax.schedule import Schedule, schedule_from_config
from lcm_jax.tokenizer import tokenize

SAMPLERS = ("lcm", "ddim", "dpm_solver", "dpm_solver_pp")
# diffusers' DPMSolverMultistepScheduler algorithm_type for each of our DPM sampler names.
DPM_ALGORITHMS = {"dpm_solver": "dpmsolver", "dpm_solver_pp": "dpmsolver++"}
DEFAULT_GUIDANCE_SCALE = 8.5  # LatentConsistencyModelPipeline's default (w = 7.5)


# ---------------------------------------------------------------------------------------
# Sizes


def vae_scale_factor(pipe) -> int:
  """The VAE's spatial downsampling factor, 2 ** (len(block_out_channels) - 1) as diffusers
  computes it: 8 for Stable Diffusion, 2 for the tests' tiny VAE."""
  return pipe.vae.config.downsampling_factor


def default_size(pipe) -> tuple[int, int]:
  """(height, width) in pixels: the UNet config's sample_size times the VAE factor, as
  diffusers' pipelines default it (512 for SD 1.x / 2.1-base, 768 for SD 2.1)."""
  size = pipe.configs["unet"].get("sample_size")
  if size is None:
    raise LcmJaxError("the UNet config has no sample_size; give the height and width explicitly")
  h, w = (size, size) if isinstance(size, (int, float)) else size
  f = vae_scale_factor(pipe)
  return int(h) * f, int(w) * f


def check_size(pipe, height: int, width: int) -> None:
  """Raises LcmJaxError unless height and width are positive multiples of the VAE factor.

  That is the hard requirement (the latent grid is [H / f, W / f]); for Stable Diffusion,
  f = 8, it is diffusers' rule "divisible by 8". diffusers asks for 8 whatever the VAE; we ask
  for f, so the tests' tiny VAE (f = 2) also takes e.g. 10x10. The UNet itself takes any
  latent size (its upsamplers follow the skip connections' sizes, as diffusers' do).
  """
  f = vae_scale_factor(pipe)
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value < f or value % f:
      raise LcmJaxError(f"{name}={value!r} must be a positive multiple of {f} "
                        f"(the VAE's downsampling factor)")


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
  """(H / f, W / f, latent channels): one image's latents, NHWC without the batch."""
  f = vae_scale_factor(pipe)
  return height // f, width // f, int(pipe.unet.config.in_channels)


# ---------------------------------------------------------------------------------------
# Prompts, keys, latents, images


@functools.partial(jax.jit, static_argnums=0)
def encode_ids(text_encoder, params, ids: jax.Array) -> jax.Array:
  """Token ids [B, L] -> the text encoder's last hidden state [B, L, D] (jitted per module and shape)."""
  return text_encoder.apply({"params": params}, ids)[0]


def encode_prompts(pipe, prompts: Sequence[str]) -> jax.Array:
  """prompts (B strings) -> text embeddings [B, L, D] (L = the tokenizer's model_max_length).

  As diffusers' `encode_prompt`: padded/truncated to model_max_length, no attention mask,
  the text encoder's last hidden state (no clip_skip). Jitted once per batch size.
  """
  ids = tokenize(pipe.tokenizer, list(prompts))
  return encode_ids(pipe.text_encoder, pipe.params["text_encoder"], jnp.asarray(ids))


def sample_keys(seed: int, indices: Sequence[int] | np.ndarray) -> jax.Array:
  """[B] PRNG keys, one per image: fold_in(key(seed), index). An image's key (so its initial
  latents and LCM noise) depends on its index only, not on the batch it is in."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.uint32))


def split_sample_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One image's key -> (key of its initial latents, key of its LCM re-noising noise)."""
  latent_key, noise_key = jax.random.split(key)
  return latent_key, noise_key


@functools.partial(jax.jit, static_argnums=1)
def initial_latents(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  """keys [B] -> initial latents [B, h, w, C] float32, N(0, I) times init_noise_sigma (1)."""
  def one(key):
    return jax.random.normal(split_sample_key(key)[0], shape, jnp.float32) * INIT_NOISE_SIGMA
  return jax.vmap(one)(keys)


def to_uint8_images(images: jax.Array) -> jax.Array:
  """VAE output [B, H, W, 3] in about [-1, 1] -> uint8 [B, H, W, 3].

  diffusers' VaeImageProcessor.postprocess: (x / 2 + 0.5).clamp(0, 1), then, for PIL output,
  (x * 255).round().
  """
  x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return jnp.round(x * 255).astype(jnp.uint8)


def check_latents(latents: Any, batch: int, shape: tuple[int, int, int]) -> jax.Array:
  """Validates diffusers-layout initial latents and returns them NHWC.

  Args:
    latents: float32 [B, C, h, w] (NCHW, as diffusers' `latents=` argument).
    batch: the expected B. shape: (h, w, C) from `latent_shape`.
  Returns:
    [B, h, w, C] float32.
  Raises:
    LcmJaxError for another dtype, rank, count or size.
  """
  latents = np.asarray(latents)
  h, w, c = shape
  if latents.dtype != np.float32:
    raise LcmJaxError(f"latents must be float32, got {latents.dtype}")
  if latents.ndim != 4:
    raise LcmJaxError(f"latents must be [batch, {c}, {h}, {w}] (NCHW), got shape {tuple(latents.shape)}")
  if latents.shape[0] != batch:
    raise LcmJaxError(f"got {latents.shape[0]} latents for {batch} prompts; give one per prompt")
  if tuple(latents.shape[1:]) != (c, h, w):
    raise LcmJaxError(f"latents must be [{batch}, {c}, {h}, {w}] (NCHW: channels, height / "
                      f"VAE factor, width / VAE factor), got shape {tuple(latents.shape)}")
  # Transposed by numpy: an eager jnp.transpose would compile on first use.
  return jnp.asarray(np.ascontiguousarray(latents.transpose(0, 2, 3, 1)))


# ---------------------------------------------------------------------------------------
# The sampler + decode function


def uses_cfg(pipe, sampler: str, guidance_scale: float) -> bool:
  """Whether the sampler runs classifier-free guidance (a second, unconditional UNet branch):
  teacher samplers with guidance_scale > 1 on a UNet without a guidance embedding, as
  StableDiffusionPipeline's `do_classifier_free_guidance`."""
  return (sampler != "lcm" and guidance_scale > 1
          and pipe.unet.config.time_cond_proj_dim is None)


def check_sampler(pipe, schedule: Schedule, sampler: str, num_steps: int) -> None:
  """Raises LcmJaxError for an unknown sampler or a step count it cannot take."""
  if sampler not in SAMPLERS:
    raise LcmJaxError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise LcmJaxError(f"the number of steps must be a positive integer, got {num_steps!r}")
  if sampler == "lcm" and num_steps > schedule.original_inference_steps:
    raise LcmJaxError(
        f"LCM sampling takes at most original_inference_steps={schedule.original_inference_steps} "
        f"steps (its timesteps are a subset of that grid), got {num_steps}")
  if num_steps > schedule.num_train_timesteps:
    raise LcmJaxError(f"{num_steps} steps exceed num_train_timesteps={schedule.num_train_timesteps}")


class TextToImage:
  """Prompts -> images with one pipeline; caches one compiled function per configuration.

  Attributes:
    pipe: the `lcm_jax.sd_pipeline.Pipeline` (needs unet, vae, text_encoder, tokenizer, scheduler).
    schedule: `schedule_from_config(pipe.scheduler_config)`.
    compile_seconds: total time spent compiling (sampler functions and text-encoder warm-up).
    traces: how many times a sampler function was traced (one per compiled configuration).
  """

  def __init__(self, pipe):
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, n) is None]
    if missing or "scheduler" not in pipe.configs:
      raise LcmJaxError(f"text-to-image needs a whole pipeline; missing {missing or ['scheduler']}")
    self.pipe = pipe
    self.schedule = schedule_from_config(pipe.scheduler_config)
    self.compile_seconds = 0.0
    self.traces = 0
    self._compiled: dict[tuple, Any] = {}

  @property
  def dtype(self):
    """The UNet's compute dtype (float32 or bfloat16)."""
    return jnp.dtype(self.pipe.unet.dtype)

  @property
  def num_compiled(self) -> int:
    return len(self._compiled)

  def resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), defaults from the UNet's sample_size, validated (see `check_size`)."""
    if height is None or width is None:
      dh, dw = default_size(self.pipe)
      height, width = height or dh, width or dw
    check_size(self.pipe, height, width)
    return int(height), int(width)

  def _params(self) -> dict:
    return {"unet": self.pipe.params["unet"], "vae": self.pipe.params["vae"],
            "unet_loras": list(self.pipe.unet_loras)}

  def _generate_fn(self, sampler: str, num_steps: int, guided: bool):
    """The function to compile: (params, schedule, context, uncond_context, latents, keys,
    guidance_scale) -> uint8 images [B, H, W, 3]."""
    unet, vae = self.pipe.unet, self.pipe.vae
    scaling = self.pipe.vae_scaling_factor
    cond_dim = unet.config.time_cond_proj_dim

    def apply_unet(p, z, t, context, timestep_cond):
      return unet.apply({"params": p}, z, t, context, timestep_cond)

    def generate(params, schedule, context, uncond_context, latents, keys, guidance_scale):
      self.traces += 1  # runs once per trace: the tests count compilations with it
      # Unfused LoRAs: added to the base weights once per call, inside the compiled function.
      params = dict(params, unet=apply_loras(params["unet"], params["unet_loras"]))
      if sampler == "lcm":
        def one_image(z, c, key):
          # Batch of one inside a vmap: the re-noising noise is drawn per image.
          return lcm_sample(apply_unet, params["unet"], z[None], c[None], schedule, guidance_scale,
                            split_sample_key(key)[1], num_steps=num_steps,
                            time_cond_proj_dim=cond_dim)[0]
        z0 = jax.vmap(one_image)(latents, context, keys)
      else:
        # A Python 1.0 makes the samplers skip the unconditional branch (diffusers runs no
        # CFG for guidance_scale <= 1, nor for a guidance-embedded UNet).
        g = guidance_scale if guided else 1.0
        apply_teacher = apply_unet
        if cond_dim is not None:
          w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32) - 1.0, (latents.shape[0],))
          w_embedding = guidance_embedding(w, cond_dim)

          def apply_teacher(p, z, t, context, timestep_cond):
            del timestep_cond  # None from the teacher samplers: the guidance goes in here
            return apply_unet(p, z, t, context, w_embedding.astype(z.dtype))
        if sampler == "ddim":
          z0 = ddim_sample(apply_teacher, params["unet"], latents, context, uncond_context, schedule,
                           g, num_steps=num_steps)
        else:
          z0 = dpm_solver_sample(apply_teacher, params["unet"], latents, context, uncond_context,
                                 schedule, g, num_steps=num_steps,
                                 algorithm=DPM_ALGORITHMS[sampler])
      images = vae.apply({"params": params["vae"]}, (z0 / scaling).astype(vae.dtype),
                         method=AutoencoderKL.decode)
      return to_uint8_images(images)

    return generate

  def _arg_specs(self, sampler: str, batch: int, height: int, width: int, guided: bool):
    """Abstract arguments of the generate function, for ahead-of-time compilation."""
    ids = jax.ShapeDtypeStruct((batch, self.pipe.tokenizer.model_max_length), jnp.int32)
    context = jax.eval_shape(functools.partial(encode_ids, self.pipe.text_encoder),
                             self.pipe.params["text_encoder"], ids)
    uncond = None
    if sampler != "lcm" and guided:
      uncond = jax.ShapeDtypeStruct((1,) + context.shape[1:], context.dtype)
    latents = jax.ShapeDtypeStruct((batch,) + latent_shape(self.pipe, height, width), jnp.float32)
    keys = jax.eval_shape(lambda: sample_keys(0, np.arange(batch)))
    return (self._params(), self.schedule, context, uncond, latents, keys,
            jax.ShapeDtypeStruct((), jnp.float32))

  def compile(self, sampler: str = "lcm", num_steps: int = 4, batch: int = 1,
              height: int | None = None, width: int | None = None,
              guidance_scale: float = DEFAULT_GUIDANCE_SCALE):
    """Compiles (once) and returns the function for this configuration; also warms up the
    text encoder for this batch size. Calls with the same configuration reuse it."""
    check_sampler(self.pipe, self.schedule, sampler, num_steps)
    height, width = self.resolve_size(height, width)
    if not isinstance(batch, (int, np.integer)) or batch < 1:
      raise LcmJaxError(f"batch size must be a positive integer, got {batch!r}")
    guided = uses_cfg(self.pipe, sampler, guidance_scale)
    key = (sampler, int(num_steps), int(batch), height, width, self.dtype.name, guided)
    if key not in self._compiled:
      start = time.perf_counter()
      fn = jax.jit(self._generate_fn(sampler, num_steps, guided))
      self._compiled[key] = fn.lower(*self._arg_specs(sampler, batch, height, width, guided)).compile()
      # The small functions around it compile on first use: do that here, not in the first call.
      keys = sample_keys(0, np.arange(batch))
      jax.block_until_ready(initial_latents(keys, latent_shape(self.pipe, height, width)))
      jax.block_until_ready(encode_prompts(self.pipe, [""] * batch))
      if guided:
        jax.block_until_ready(encode_prompts(self.pipe, [""]))
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]

  def __call__(self, prompts: Sequence[str], *, sampler: str = "lcm", num_steps: int = 4,
               guidance_scale: float = DEFAULT_GUIDANCE_SCALE, negative_prompt: str = "",
               height: int | None = None, width: int | None = None, latents: Any = None,
               seed: int = 0, indices: Sequence[int] | None = None) -> np.ndarray:
    """Generates one image per prompt.

    Args:
      prompts: B strings (one batch; the compiled function is specific to B).
      sampler: "lcm", "ddim", "dpm_solver" or "dpm_solver_pp". num_steps: sampler steps.
      guidance_scale: diffusers' g (LCM embeds w = g - 1; teachers run CFG when g > 1).
      negative_prompt: the unconditional prompt of the teacher samplers (LCM ignores it).
      height, width: pixels, multiples of the VAE factor; default from the UNet's sample_size.
      latents: None (drawn from the seed), or float32 [B, C, H / f, W / f] in diffusers' NCHW.
      seed, indices: image i uses key fold_in(key(seed), indices[i]) (indices default 0..B-1)
        for its latents and its LCM noise.
    Returns:
      uint8 [B, H, W, 3] numpy array.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise LcmJaxError("no prompts given")
    batch = len(prompts)
    # Every check before compiling: bad input fails in milliseconds, not after a compile.
    check_sampler(self.pipe, self.schedule, sampler, num_steps)
    height, width = self.resolve_size(height, width)
    shape = latent_shape(self.pipe, height, width)
    if latents is not None:
      latents = check_latents(latents, batch, shape)
    indices = np.arange(batch) if indices is None else np.asarray(indices)
    if indices.shape != (batch,):
      raise LcmJaxError(f"need one index per prompt ({batch}), got shape {indices.shape}")
    compiled = self.compile(sampler, num_steps, batch, height, width, guidance_scale)
    keys = sample_keys(seed, indices)
    z = initial_latents(keys, shape) if latents is None else latents
    context = encode_prompts(self.pipe, prompts)
    guided = uses_cfg(self.pipe, sampler, guidance_scale)
    uncond = encode_prompts(self.pipe, [negative_prompt]) if guided else None
    images = compiled(self._params(), self.schedule, context, uncond, z, keys,
                      np.float32(guidance_scale))
    return np.asarray(images)
