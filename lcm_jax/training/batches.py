"""Batches: from the data loader's host arrays to the step's latents and text embeddings.

Two batch formats reach the step:
* images: {"pixels" [B, R, R, 3] in [-1, 1], "input_ids" [B, L]}, encoded inside the jitted
  step by the frozen VAE and text encoder;
* latents (the cache of `python -m lcm_jax.cache_latents`): {"latent_mean", "latent_logvar"
  [B, h, w, C], "context" [B, L, D]}.
Either way the step trains on a posterior draw (`lcm_jax.models.vae.draw_latents`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from lcm_jax.errors import LcmJaxError
from lcm_jax.models.vae import AutoencoderKL, draw_latents

# The arrays each batch format sends to the devices; anything else (num_skipped, ...) stays on the host.
IMAGE_KEYS = ("pixels", "input_ids")
LATENT_KEYS = ("latent_mean", "latent_logvar", "context")


def device_keys(latents_format: bool) -> tuple[str, ...]:
  return LATENT_KEYS if latents_format else IMAGE_KEYS


def make_batch_preparation(vae, text_encoder, scaling_factor: float) -> Callable:
  """`prepare(frozen, batch, rng) -> {"latents" [B, h, w, C], "context" [B, L, D]}`, jittable.

  Image batches are encoded with the frozen VAE (`frozen["vae"]`) and text encoder
  (`frozen["text_encoder"]`); latent batches need neither.
  """
  def prepare(frozen, batch, rng):
    if "pixels" in batch:
      mean, logvar = vae.apply({"params": frozen["vae"]}, batch["pixels"].astype(vae.dtype),
                               method=AutoencoderKL.encode)
      context = text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"])[0]
    else:
      mean, logvar, context = batch["latent_mean"], batch["latent_logvar"], batch["context"]
    return {"latents": draw_latents(mean, logvar, rng, scaling_factor), "context": context}

  return prepare


def check_first_batch(batch: Mapping[str, np.ndarray], *, latents_format: bool, local_batch: int,
                      resolution: int, latent_hw: int, latent_channels: int, context_dim: int) -> None:
  """Raises LcmJaxError if the data's arrays do not fit the models (before compiling)."""
  missing = [k for k in device_keys(latents_format) if k not in batch]
  if missing:
    raise LcmJaxError(f"the data loader's batches lack {missing} (got {sorted(batch)})")
  if latents_format:
    want = (local_batch, latent_hw, latent_hw, latent_channels)
    for k in ("latent_mean", "latent_logvar"):
      if tuple(batch[k].shape) != want:
        raise LcmJaxError(f"the latent cache's {k} is {tuple(batch[k].shape)}, training needs {want} "
                          f"(resolution {resolution}); re-cache the data at this resolution with this VAE")
    if batch["context"].shape[-1] != context_dim:
      raise LcmJaxError(f"the latent cache's text embeddings have width {batch['context'].shape[-1]}, "
                        f"the UNet takes {context_dim}: the cache was made with another text encoder")
  elif tuple(batch["pixels"].shape) != (local_batch, resolution, resolution, 3):
    raise LcmJaxError(f"the data loader gives pixels {tuple(batch['pixels'].shape)}, expected "
                      f"{(local_batch, resolution, resolution, 3)}")


def next_batch(data_iter: Iterator[dict], step: int) -> dict:
  """The next host batch; running out of data is an error (the loaders repeat their data)."""
  try:
    return next(data_iter)
  except StopIteration:
    raise LcmJaxError(f"the data ran out at step {step}; the data loader must repeat its data") from None

