"""`load_pipeline`: a model by any name users give it (diffusers folder, hub id, or training workdir)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from lcm_jax import workdir as workdir_lib
from lcm_jax.sd_pipeline import DEFAULT_COMPONENTS, Pipeline, load_pipeline_folder


def load_pipeline(path_or_repo_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                  components: tuple[str, ...] = DEFAULT_COMPONENTS, variant: str | None = None,
                  revision: str | None = None, token: str | bool | None = None, params: str = "ema",
                  loras=(), fuse: bool = True, attention: str = "auto") -> Pipeline:
  """Loads a Stable Diffusion / LCM pipeline into Flax modules and parameter trees.

  Args:
    path_or_repo_id: a local diffusers pipeline folder, a Hugging Face Hub repo id
      (downloaded with `huggingface_hub` when online), or a `python -m lcm_jax.train`
      workdir (its latest checkpoint's UNet with the workdir's VAE, text encoder and LCM
      scheduler; all components are loaded).
    params: for a workdir, which UNet parameters: "ema" (the EMA target, default) or
      "online" (the student).
    dtype: compute dtype of the modules (jnp.float32 or jnp.bfloat16).
    param_dtype: dtype the parameters are stored in.
    components: which of unet, vae, text_encoder, tokenizer, scheduler to load (folders only).
    variant: a weights variant such as "fp16" (`diffusion_pytorch_model.fp16.safetensors`).
    loras: LoRA files to add to the UNet, each "PATH" or "PATH:SCALE" (a folder with
      `pytorch_lora_weights.safetensors`, or the file; diffusers, PEFT or kohya naming) or a
      (path, scale) pair; several are summed (`lcm_jax.lora`).
    fuse: fuse the LoRAs into the UNet weights (default), or keep them apart and add them
      inside the sampler's compiled function.
    attention: the attention backend of the UNet and the VAE ("auto", "xla", "chunked",
      "cudnn", "splash": `lcm_jax.models.attention`); "auto" picks per platform.
    revision: hub revision (a branch, tag or commit hash).
    token: hub token for gated or private repos (default: the HF_TOKEN environment
      variable or the token saved by `hf auth login`).

  Raises:
    LcmJaxError (and subclasses) with a message that says what is wrong.
  """
  from lcm_jax.models.attention import check_backend
  check_backend(attention)
  path = os.path.expanduser(path_or_repo_id)
  if workdir_lib.is_workdir(path):
    pipe = workdir_lib.load_pipeline_from_workdir(path, params=params, dtype=dtype, param_dtype=param_dtype)
  else:
    pipe = load_pipeline_folder(path_or_repo_id, dtype=dtype, param_dtype=param_dtype, components=components,
                                variant=variant, revision=revision, token=token)
  for name in ("unet", "vae"):
    if getattr(pipe, name, None) is not None and attention != "auto":
      setattr(pipe, name, getattr(pipe, name).clone(attention=attention))
  if loras:
    from lcm_jax.lora import add_loras
    add_loras(pipe, loras, fuse=fuse)
  return pipe
