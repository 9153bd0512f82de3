"""The published Stable Diffusion architectures, as the configs their diffusers folders carry.

Benchmarks and the memory plan build full-size models from these (random weights, or only
shapes) without downloading anything. `KNOWN_PIPELINES` maps the hub ids of the training
configs (configs/*.py) to their components' configs.
"""

from __future__ import annotations

# The SD 2.1 (768x768, v-prediction) UNet.
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    upcast_attention=True, dual_cross_attention=False)
# SD 2.1-base (512x512, epsilon): the same network, no attention upcast.
SD21_BASE_UNET = dict(SD21_UNET, sample_size=64, upcast_attention=False)
# SD 1.5 (and its fine-tunes such as Dreamshaper v7): 8 heads of width 40/80/160, 768-wide text.
SD15_UNET = dict(SD21_BASE_UNET, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False)

# The SD VAE (1.x and 2.x share it).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu",
              sample_size=768, scaling_factor=0.18215)

# Text encoders (transformers CLIPTextConfig keys): OpenCLIP ViT-H's text tower for SD 2.x,
# OpenAI CLIP ViT-L/14's for SD 1.x.
SD21_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                         layer_norm_eps=1e-5, eos_token_id=2)
SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=2)

# Schedulers (the noise schedule and prediction type the teachers were trained with).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                    timestep_spacing="leading")
SD21_SCHEDULER = dict(SD_SCHEDULER, prediction_type="v_prediction")

KNOWN_PIPELINES = {
    "stabilityai/stable-diffusion-2-1": dict(unet=SD21_UNET, vae=SD_VAE, text_encoder=SD21_TEXT_ENCODER,
                                             scheduler=SD21_SCHEDULER),
    "stabilityai/stable-diffusion-2-1-base": dict(unet=SD21_BASE_UNET, vae=SD_VAE, text_encoder=SD21_TEXT_ENCODER,
                                                  scheduler=SD_SCHEDULER),
    "Lykon/dreamshaper-7": dict(unet=SD15_UNET, vae=SD_VAE, text_encoder=SD15_TEXT_ENCODER, scheduler=SD_SCHEDULER),
    "runwayml/stable-diffusion-v1-5": dict(unet=SD15_UNET, vae=SD_VAE, text_encoder=SD15_TEXT_ENCODER,
                                           scheduler=SD_SCHEDULER),
}
