"""Tiny random Stable Diffusion pipelines in the diffusers layout, built at test time.

Two flavours, each optionally with LCM's guidance input (`time_cond_proj_dim=256`):
* "sd1": SD 1.x-like: epsilon prediction, int `attention_head_dim`, conv `proj_in`,
  quick_gelu text encoder.
* "sd2": SD 2.x-like: v_prediction, per-block head counts, `use_linear_projection`,
  `upcast_attention`, gelu text encoder.
Every parameter is perturbed away from its initial value (norm scales of one, zero biases)
so that a transposed or swapped tensor cannot hide behind a symmetric initialisation.
"""

from __future__ import annotations

import os

import torch

from tests.helpers import perturb_, tiny_clip

FLAVOURS = ("sd1", "sd2", "sd1_lcm", "sd2_lcm")
LATENT_CHANNELS = 4


def unet_kwargs(flavour: str) -> dict:
  sd2 = flavour.startswith("sd2")
  kwargs = dict(
      sample_size=8,
      in_channels=LATENT_CHANNELS,
      out_channels=LATENT_CHANNELS,
      block_out_channels=(32, 64),
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32,
      norm_num_groups=8,
      attention_head_dim=(2, 4) if sd2 else 4,
      use_linear_projection=sd2,
      upcast_attention=sd2,
  )
  if flavour.endswith("_lcm"):
    kwargs["time_cond_proj_dim"] = 256
  return kwargs


def build_torch_pipeline(flavour: str, seed: int = 0):
  """A diffusers `StableDiffusionPipeline` with tiny random weights, on CPU in fp32."""
  import diffusers
  import transformers
  if flavour not in FLAVOURS:
    raise ValueError(flavour)
  sd2 = flavour.startswith("sd2")
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**unet_kwargs(flavour))
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      sample_size=16)
  text_config = tiny_clip.tiny_clip_text_config(hidden_act="gelu" if sd2 else "quick_gelu", hidden_size=32)
  text_encoder = transformers.CLIPTextModel(text_config)
  for i, m in enumerate((unet, vae, text_encoder)):
    perturb_(m, seed * 10 + i)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
      prediction_type="v_prediction" if sd2 else "epsilon")
  return unet, vae, text_encoder, scheduler


def save_tiny_pipeline(folder: str, flavour: str, seed: int = 0) -> str:
  """Writes a tiny diffusers pipeline folder of the given flavour and returns its path."""
  import diffusers
  unet, vae, text_encoder, scheduler = build_torch_pipeline(flavour, seed)
  tok_dir = os.path.join(folder, "_tokenizer_src")
  tiny_clip.write_tiny_tokenizer(tok_dir)
  import transformers
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  out = os.path.join(folder, flavour)
  pipe.save_pretrained(out, safe_serialization=True)
  add_text_model_prefix(os.path.join(out, "text_encoder", "model.safetensors"))
  return out


def add_text_model_prefix(path: str) -> None:
  """Rewrites a text encoder file with the `text_model.` names that published checkpoints use.

  transformers v5 saves a freshly built CLIPTextModel without that prefix; every SD
  checkpoint on the hub has it. Tests use the hub's form; one test covers v5's.
  """
  import safetensors.numpy
  tensors = safetensors.numpy.load_file(path)
  if not any(k.startswith("text_model.") for k in tensors):
    safetensors.numpy.save_file({"text_model." + k: v for k, v in tensors.items()}, path, metadata={"format": "pt"})
