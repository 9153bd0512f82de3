"""Builds the toy Stable Diffusion teacher from scratch on a CPU and saves it as a diffusers folder.

    python -m lcm_jax.toy.teacher --output lcm_jax/toy/weights/teacher [--seed 0]

The toy teacher has Stable Diffusion's parts, at toy size, built with lcm-jax's own modules:

* tokenizer: a CLIP BPE tokenizer whose tokens are the domain's words (`toy.vocabulary`).
* text encoder: a 2-layer, 64-wide `CLIPTextModel`, **randomly initialised and frozen**
  (as SD's CLIP is frozen; ours is never trained at all: a random causal transformer already
  gives every word a distinct, position-aware embedding, and the UNet's cross-attention
  learns to read it).
* VAE: an `AutoencoderKL` with latent factor 2 (32x32x3 images -> 16x16x4 latents), trained
  for reconstruction (L1 + a small KL term) on images of all the domain's colours, shifted
  ones included (SD's autoencoder, too, was trained on broader data than its UNet). At
  factor 4 a shape would cover about 3x3 latent pixels and its outline would live in the
  channel values only; at factor 2 it covers about 6x6, which a small UNet learns reliably.
  `scaling_factor` is 1 / std of the training latents, as SD's 0.18215 was chosen.
* UNet: an epsilon-prediction `UNet2DConditionModel` (32/64/96 channels at 16/8/4 latent
  pixels, cross-attention on the 4x4 level and in the mid block: attention at 8x8 too cost
  40% more time per step for a 2% lower loss), trained on the teacher's colours only, with
  10% of captions
  replaced by the empty prompt so that classifier-free guidance works, min-SNR-5 loss
  weighting (Hang et al. 2023; it speeds up convergence) and an EMA of the weights.
* scheduler: SD's DDPM schedule (scaled_linear, 0.00085 -> 0.012, 1000 steps) in a
  DDIMScheduler config with "trailing" timestep spacing, so that a 1-step DDIM starts at
  t = 999 (with SD's "leading" spacing it would start at t = 1 from pure noise, an unfair
  baseline).

Everything runs in float32 under `jax.jit` (bf16 is slower on CPUs) and is deterministic for
a seed. The folder also gets `toy_teacher.json`: the recipe, losses and measured times.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcm_jax.models.vae import draw_latents
from lcm_jax.schedule import alpha_sigma, broadcast_to, schedule_from_config
from lcm_jax.sd_pipeline import Pipeline, build_module, save_pipeline
from lcm_jax.tokenizer import load_tokenizer, tokenize
from lcm_jax.toy import TEACHER_DIR, display_path, domain, vocabulary

DIFFUSERS_VERSION = "0.42.1"  # written into the configs as diffusers would

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

TEXT_HIDDEN = 64


def text_encoder_config() -> dict:
  """The CLIPTextModel config.json (transformers' keys), sized to the domain's tokenizer."""
  vocab = vocabulary.vocab_size()
  return {
      "architectures": ["CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": vocab,
      "hidden_size": TEXT_HIDDEN,
      "intermediate_size": 4 * TEXT_HIDDEN,
      "projection_dim": TEXT_HIDDEN,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": vocabulary.MODEL_MAX_LENGTH,
      "hidden_act": "quick_gelu",
      "layer_norm_eps": 1e-5,
      "attention_dropout": 0.0,
      "dropout": 0.0,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
      # <|startoftext|> and <|endoftext|> are the last two ids, as in CLIP.
      "bos_token_id": vocab - 2,
      "eos_token_id": vocab - 1,
      "pad_token_id": vocab - 1,
  }


VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "sample_size": domain.SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained VAE's latents
}

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "sample_size": domain.SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 96],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": [1, 2, 3],  # heads per block (diffusers' naming): 32 channels each
    "cross_attention_dim": TEXT_HIDDEN,
    "norm_num_groups": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": False,
    "time_cond_proj_dim": None,
}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the teacher is trained. Defaults: the shipped teacher (48.8 minutes on 2 cores).

  Attributes:
    seed: every random choice (data, initialisation, noise) derives from it.
    num_images: images of the teacher's colours (the UNet's training set; the VAE's too).
    num_shifted_images: images of the shifted colours, for the VAE only.
    vae_steps, vae_batch, vae_lr, kl_weight: autoencoder training (Adam, cosine decay); the
      loss is mean |x - x_hat| + kl_weight * mean KL(q(z|x) || N(0, I)) per latent element.
    unet_steps, unet_batch, unet_lr, warmup_steps: UNet training (AdamW, cosine decay).
    caption_dropout: fraction of captions replaced by the empty prompt.
    min_snr_gamma: loss weight min(SNR, gamma) / SNR per sample (None: plain MSE).
    ema_decay: the saved UNet is this EMA of the trained one.
  """
  seed: int = 0
  num_images: int = 24000
  num_shifted_images: int = 6000
  vae_steps: int = 2500
  vae_batch: int = 32
  vae_lr: float = 1e-3
  kl_weight: float = 1e-4
  unet_steps: int = 5000
  unet_batch: int = 64
  unet_lr: float = 1e-3
  warmup_steps: int = 200
  caption_dropout: float = 0.1
  min_snr_gamma: float | None = 5.0
  ema_decay: float = 0.998


def to_model_images(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 in [-1, 1], the VAE's input range."""
  return images.astype(np.float32) / 127.5 - 1.0


def _progress(name: str, step: int, total: int, loss: float, start: float) -> None:
  elapsed = time.perf_counter() - start
  eta = elapsed / max(step, 1) * (total - step)
  print(f"[{name}] step {step}/{total} loss {loss:.5f} elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)


def _cosine(lr: float, steps: int, warmup: int = 0) -> optax.Schedule:
  warmup = min(warmup, steps // 10)
  return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, max(warmup, 1), max(steps, 2), lr * 0.1)


# ----------------------------------------------------------------------------------------
# Text encoder


def build_text_encoder(seed: int):
  """(module, params): a randomly initialised CLIPTextModel (it stays frozen)."""
  module = build_module("text_encoder", text_encoder_config())
  params = module.init(jax.random.key(seed), *module.dummy_inputs())["params"]
  return module, params


def encode_texts(module, params, tokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
  """texts -> last hidden states [N, L, D] float32, as SD pipelines use them."""
  from lcm_jax.text_to_image import encode_ids
  out = [np.asarray(encode_ids(module, params, jnp.asarray(tokenize(tokenizer, texts[i:i + batch]))))
         for i in range(0, len(texts), batch)]
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------
# Autoencoder


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element, same shape as mean."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def train_autoencoder(images: np.ndarray, recipe: Recipe, log: Callable[..., None] = _progress):
  """Trains the VAE on uint8 images [N, H, W, 3]. Returns (module, params, final loss)."""
  from lcm_jax.models.vae import AutoencoderKL
  module = build_module("vae", VAE_CONFIG)
  key_init, key_train = jax.random.split(jax.random.key(recipe.seed + 1))
  params = module.init(key_init, *module.dummy_inputs())["params"] if init_params is None else init_params
  optimizer = optax.adam(_cosine(recipe.vae_lr, recipe.vae_steps, 100))
  opt_state = optimizer.init(params)

  def loss_fn(params, x, key):
    mean, logvar = module.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = draw_latents(mean, logvar, key, 1.0)
    recon = module.apply({"params": params}, z, method=AutoencoderKL.decode)
    return jnp.mean(jnp.abs(recon - x)) + recipe.kl_weight * jnp.mean(kl_divergence(mean, logvar))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(recipe.seed + 1)
  start, loss = time.perf_counter(), None
  for i in range(recipe.vae_steps):
    x = to_model_images(images[rng.integers(0, len(images), recipe.vae_batch)])
    params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jax.random.fold_in(key_train, i))
    if (i + 1) % 100 == 0 or i + 1 == recipe.vae_steps:
      log("vae", i + 1, recipe.vae_steps, float(loss), start)
  return module, params, float(loss)


def encode_images(module, params, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [N, H, W, 3] -> posterior (mean, logvar), each [N, h, w, C] float32."""
  from lcm_jax.models.vae import AutoencoderKL
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))
  means, logvars = [], []
  for i in range(0, len(images), batch):
    m, lv = encode(params, jnp.asarray(to_model_images(images[i:i + batch])))
    means.append(np.asarray(m))
    logvars.append(np.asarray(lv))
  return np.concatenate(means), np.concatenate(logvars)


def latent_scaling_factor(mean: np.ndarray, logvar: np.ndarray, seed: int) -> float:
  """1 / std of posterior samples, rounded to 5 significant digits (SD's 0.18215 rule)."""
  z = np.asarray(draw_latents(jnp.asarray(mean), jnp.asarray(logvar), jax.random.key(seed), 1.0))
  return float(f"{1.0 / float(z.std()):.5g}")


# ----------------------------------------------------------------------------------------
# UNet


def train_unet(latent_mean: np.ndarray, latent_logvar: np.ndarray, scaling_factor: float,
               caption_ids: np.ndarray, contexts: np.ndarray, uncond_context: np.ndarray,
               recipe: Recipe, log: Callable[..., None] = _progress, init_params=None):
  """Trains the epsilon-prediction UNet with caption dropout (from `init_params` if given: a
  fine-tune, lcm_jax.toy.finetune; else from a fresh initialisation).

  Args:
    latent_mean, latent_logvar: [N, h, w, C] VAE posteriors of the training images.
    caption_ids: [N] int, each image's row in `contexts`.
    contexts: [K, L, D] text embeddings of the K distinct captions.
    uncond_context: [L, D] the empty prompt's embedding.
  Returns:
    (module, EMA params, final loss).
  """
  module = build_module("unet", UNET_CONFIG)
  schedule = schedule_from_config(SCHEDULER_CONFIG)
  key_init, key_train = jax.random.split(jax.random.key(recipe.seed + 2))
  params = module.init(key_init, *module.dummy_inputs())["params"] if init_params is None else init_params
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(_cosine(recipe.unet_lr, recipe.unet_steps, recipe.warmup_steps),
                                      weight_decay=1e-2))
  opt_state = optimizer.init(params)
  ema = jax.tree.map(jnp.array, params)
  # All contexts (captions + the empty prompt, last) live on the device; a batch is indices.
  table = jnp.asarray(np.concatenate([contexts, uncond_context[None]]))
  uncond_row = len(contexts)

  def loss_fn(params, mean, logvar, rows, key):
    k_latent, k_t, k_noise, k_drop = jax.random.split(key, 4)
    z0 = draw_latents(mean, logvar, k_latent, scaling_factor)
    b = z0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, z0.shape)
    alpha, sigma = alpha_sigma(schedule, t)
    zt = broadcast_to(alpha, z0) * z0 + broadcast_to(sigma, z0) * noise
    drop = jax.random.bernoulli(k_drop, recipe.caption_dropout, (b,))
    context = table[jnp.where(drop, uncond_row, rows)]
    eps = module.apply({"params": params}, zt, t, context)
    per_sample = jnp.mean(jnp.square(eps - noise), axis=(1, 2, 3))
    if recipe.min_snr_gamma is not None:
      snr = jnp.square(alpha / sigma)
      per_sample = per_sample * jnp.minimum(snr, recipe.min_snr_gamma) / snr
    return jnp.mean(per_sample)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, opt_state, ema, i, mean, logvar, rows, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, mean, logvar, rows, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # EMA warm-up (1 + i) / (10 + i): early averages do not hold on to the initialisation.
    decay = jnp.minimum(recipe.ema_decay, (1.0 + i) / (10.0 + i))
    ema = optax.incremental_update(params, ema, 1.0 - decay)
    return params, opt_state, ema, loss

  rng = np.random.default_rng(recipe.seed + 2)
  start, losses = time.perf_counter(), []
  for i in range(recipe.unet_steps):
    idx = rng.integers(0, len(latent_mean), recipe.unet_batch)
    params, opt_state, ema, loss = step(params, opt_state, ema, jnp.float32(i), jnp.asarray(latent_mean[idx]),
                                        jnp.asarray(latent_logvar[idx]), jnp.asarray(caption_ids[idx]),
                                        jax.random.fold_in(key_train, i))
    losses.append(loss)
    if (i + 1) % 100 == 0 or i + 1 == recipe.unet_steps:
      log("unet", i + 1, recipe.unet_steps, float(np.mean(jax.device_get(losses[-100:]))), start)
  return module, ema, float(np.mean(jax.device_get(losses[-100:])))


# ----------------------------------------------------------------------------------------
# The whole teacher


def build_teacher(output: str, recipe: Recipe = Recipe()) -> dict:
  """Trains every component and writes the diffusers pipeline folder `output`.

  Returns the build report (also written to `output/toy_teacher.json`).
  """
  times: dict[str, float] = {}
  t0 = time.perf_counter()
  print(f"[data] drawing {recipe.num_images} + {recipe.num_shifted_images} images", flush=True)
  images, attrs = domain.batch(recipe.seed, 0, recipe.num_images)
  shifted, _ = domain.batch(recipe.seed + 100, 0, recipe.num_shifted_images, colours=domain.SHIFTED_COLOURS)
  times["data_s"] = time.perf_counter() - t0

  t = time.perf_counter()
  tok_dir = os.path.join(output, "tokenizer")
  vocabulary.write_tokenizer(tok_dir)
  tokenizer = load_tokenizer(tok_dir)
  text_encoder, text_params = build_text_encoder(recipe.seed)
  captions = sorted({a.caption for a in attrs})
  row = {c: i for i, c in enumerate(captions)}
  contexts = encode_texts(text_encoder, text_params, tokenizer, captions)
  uncond = encode_texts(text_encoder, text_params, tokenizer, [""])[0]
  times["text_s"] = time.perf_counter() - t

  t = time.perf_counter()
  vae, vae_params, vae_loss = train_autoencoder(np.concatenate([images, shifted]), recipe)
  mean, logvar = encode_images(vae, vae_params, images)
  scaling = latent_scaling_factor(mean, logvar, recipe.seed)
  times["vae_s"] = time.perf_counter() - t
  print(f"[vae] latents {mean.shape[1:]}, scaling_factor {scaling}", flush=True)

  t = time.perf_counter()
  caption_ids = np.asarray([row[a.caption] for a in attrs], np.int32)
  unet, unet_params, unet_loss = train_unet(mean, logvar, scaling, caption_ids, contexts, uncond, recipe)
  times["unet_s"] = time.perf_counter() - t

  vae_config = dict(VAE_CONFIG, scaling_factor=scaling)
  pipe = Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  params={"unet": unet_params, "vae": vae_params, "text_encoder": text_params},
                  configs={"unet": UNET_CONFIG, "vae": vae_config, "text_encoder": text_encoder_config(),
                           "scheduler": SCHEDULER_CONFIG},
                  model_index=MODEL_INDEX, path=output)
  save_pipeline(pipe, output, overwrite=True)  # a rebuild replaces the folder
  times["total_s"] = time.perf_counter() - t0
  report = {"recipe": dataclasses.asdict(recipe), "vae_final_loss": vae_loss, "unet_final_loss": unet_loss,
            "scaling_factor": scaling, "num_captions": len(captions),
            "seconds": {k: round(v, 1) for k, v in times.items()}, "jax": jax.__version__,
            "cpu_count": os.cpu_count()}
  with open(os.path.join(output, "toy_teacher.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(f"[done] wrote {output} in {times['total_s'] / 60:.1f} min", flush=True)
  return report


def main(argv) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  recipe = Recipe(seed=f.seed, vae_steps=f.vae_steps, unet_steps=f.unet_steps)
  build_teacher(f.output, recipe)


def _define_flags() -> None:
  from absl import flags
  defaults = Recipe()
  flags.DEFINE_string("output", display_path(TEACHER_DIR), "Folder to write the diffusers pipeline to.")
  flags.DEFINE_integer("seed", defaults.seed, "Seed of the data, initialisation and noise.")
  flags.DEFINE_integer("vae_steps", defaults.vae_steps, "Autoencoder training steps.")
  flags.DEFINE_integer("unet_steps", defaults.unet_steps, "UNet training steps.")


if __name__ == "__main__":
  from lcm_jax import cli
  _define_flags()
  cli.run(main)
