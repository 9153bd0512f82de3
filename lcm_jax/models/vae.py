"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax, NHWC.

`encode` maps images in [-1, 1] to the posterior's (mean, logvar); `decode` maps latents
back to images. Neither applies `scaling_factor` (it is carried in `VAEConfig` for the
caller: latents for the UNet are sample * scaling_factor, and decode takes z / scaling_factor).

Submodule names are diffusers' (see `lcm_jax.weights`); old checkpoints whose mid-block
attention is named query/key/value/proj_attn are renamed by the loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.errors import UnsupportedConfigError
from lcm_jax.models.layers import (
  Attention,
  Downsample2D,
  GroupNorm,
  ResnetBlock2D,
  Upsample2D,
  conv,
  one_of,
  read_diffusers_config,
)

Dtype = Any

# The VAE's norms all use this epsilon in diffusers (hard-coded, not a config key).
_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_FIXED = {
    "act_fn": one_of("silu", "swish"),
    "use_quant_conv": one_of(True),
    "use_post_quant_conv": one_of(True),
    # Latent statistics used by newer pipelines (SD3, Flux, ...) in place of scaling_factor;
    # SD 1.x/2.x have none. Refused rather than silently dropped.
    "shift_factor": one_of(None),
    "latents_mean": one_of(None),
    "latents_std": one_of(None),
}
# Accepted with any value: a pipeline default size, and an fp16 hint for pipelines.
_INERT = frozenset({"sample_size", "force_upcast"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The AutoencoderKL options lcm-jax implements, named and defaulted as diffusers' keys."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215  # not applied by the model; for the caller
  mid_block_add_attention: bool = True

  def __post_init__(self):
    put = lambda key, value: object.__setattr__(self, key, value)
    put("block_out_channels", tuple(int(c) for c in self.block_out_channels))
    n = len(self.block_out_channels)
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
      types = tuple(getattr(self, key))
      if any(t != allowed for t in types):
        raise UnsupportedConfigError(
            f"VAE config has {key}={list(types)!r}; lcm-jax implements only {allowed}.")
      if len(types) != n:
        raise UnsupportedConfigError(
            f"VAE config has {key}={list(types)!r} but {n} block_out_channels; lcm-jax needs "
            "one block per entry.")
      put(key, types)

  @property
  def downsampling_factor(self) -> int:
    """Pixels per latent along each axis: 2 per block but the last (8 for Stable Diffusion),
    as diffusers' `vae_scale_factor`."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Reads a diffusers `vae/config.json` dict; raises UnsupportedConfigError for any
    option lcm-jax does not implement, naming the key and its value."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return cls(**read_diffusers_config(d, what="VAE", fields=fields, fixed=_FIXED,
                                       inert=_INERT))


class UNetMidBlock2D(nn.Module):
  """diffusers UNetMidBlock2D as the VAE uses it: `resnets_0`, [`attentions_0`], `resnets_1`.

  The attention is single-head over all channels, with its own GroupNorm, q/k/v biases and
  a residual connection. `attention` is its attention backend.
  """
  config: VAEConfig
  channels: int
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock2D(self.channels, c.norm_num_groups, _EPS, name="resnets_0", **kw)(x)
    if c.mid_block_add_attention:
      x = Attention(heads=1, dim_head=self.channels, use_bias=True,
                    norm_num_groups=c.norm_num_groups, norm_eps=_EPS, residual_connection=True,
                    attention=self.attention, name="attentions_0", **kw)(x)
    return ResnetBlock2D(self.channels, c.norm_num_groups, _EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
  """diffusers DownEncoderBlock2D: `resnets_i` (no time embedding), optional `downsamplers_0`
  with the encoder's asymmetric padding."""
  config: VAEConfig
  out_channels: int
  add_downsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H/2, W/2, out] (or [B, H, W, out] in the last block)."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(c.layers_per_block):
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, _EPS, name=f"resnets_{i}", **kw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """diffusers UpDecoderBlock2D: layers_per_block + 1 `resnets_i`, optional `upsamplers_0`."""
  config: VAEConfig
  out_channels: int
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, 2H, 2W, out] (or [B, H, W, out] in the last block)."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(c.layers_per_block + 1):
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, _EPS, name=f"resnets_{i}", **kw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """diffusers vae.Encoder with double_z: image -> 2 * latent_channels moments (pre quant_conv)."""
  config: VAEConfig
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, in_channels] -> [B, H / 2^(n-1), W / 2^(n-1), 2 * latent_channels]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = c.block_out_channels
    x = conv(channels[0], 3, name="conv_in", **kw)(x)
    for i, out in enumerate(channels):
      x = DownEncoderBlock2D(c, out, add_downsample=i < len(channels) - 1,
                             name=f"down_blocks_{i}", **kw)(x)
    x = UNetMidBlock2D(c, channels[-1], self.attention, name="mid_block", **kw)(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x))
    return conv(2 * c.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """diffusers vae.Decoder (group norm): latents (post post_quant_conv) -> image."""
  config: VAEConfig
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, latent_channels] -> [B, h * 2^(n-1), w * 2^(n-1), out_channels]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    reversed_channels = c.block_out_channels[::-1]
    x = conv(reversed_channels[0], 3, name="conv_in", **kw)(z)
    x = UNetMidBlock2D(c, reversed_channels[0], self.attention, name="mid_block", **kw)(x)
    for i, out in enumerate(reversed_channels):
      x = UpDecoderBlock2D(c, out, add_upsample=i < len(reversed_channels) - 1,
                           name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x))
    return conv(c.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.

  Attributes:
    config: the architecture.
    dtype: compute dtype (GroupNorm statistics and softmax stay float32).
    param_dtype: parameter dtype.
    attention: the mid-blocks' attention backend, one of `lcm_jax.models.attention.BACKENDS`.
  Outputs are in `dtype`.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    latent = self.config.latent_channels
    self.encoder = Encoder(self.config, self.attention, **kw)
    self.decoder = Decoder(self.config, self.attention, **kw)
    self.quant_conv = conv(2 * latent, 1, name="quant_conv", **kw)
    self.post_quant_conv = conv(latent, 1, name="post_quant_conv", **kw)

  def dummy_inputs(self) -> tuple[jax.Array]:
    """Small inputs for `init`: (images,)."""
    size = self.config.downsampling_factor
    return (jnp.zeros((1, size, size, self.config.in_channels), jnp.float32),)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, h, w, latent_channels].

    logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, latent_channels] (unscaled) -> images [B, H, W, out_channels], about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Encodes x [B, H, W, C] and decodes the posterior mean (creates every parameter in init)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


# ---------------------------------------------------------------------------------------
# What callers of the VAE need besides the module: its factors and the posterior draw.

def downsampling_factor(config: Mapping[str, Any] | VAEConfig) -> int:
  """The VAE's spatial downsampling factor from its config (a `vae/config.json` dict or a
  `VAEConfig`): 8 for Stable Diffusion, 2 for the tests' two-block VAE."""
  return (config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)).downsampling_factor


def scaling_factor(config: Mapping[str, Any]) -> float:
  """The latent scaling factor of a `vae/config.json` dict (SD 1.x/2.x's 0.18215 when absent)."""
  return float(config.get("scaling_factor", VAEConfig.scaling_factor))


def draw_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array, scaling_factor: float) -> jax.Array:
  """A draw from the VAE posterior times the scaling factor: z = (mean + exp(logvar / 2) eps) s.

  Every path to training latents (images encoded in the step, a latent cache of moments, the
  toy teacher's training) goes through this one function, so they agree given the same key.
  mean, logvar [B, h, w, C] -> [B, h, w, C] float32.
  """
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps) * scaling_factor
