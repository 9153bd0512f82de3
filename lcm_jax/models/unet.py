"""The Stable Diffusion UNet (diffusers `UNet2DConditionModel`) in Flax, NHWC.

Covers what SD 1.x / 2.x checkpoints and LCM students use: CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D and CrossAttnUpBlock2D; per-block head
counts; conv or linear transformer projections; `upcast_attention`; and LCM's
`time_cond_proj_dim` (a bias-free `cond_proj` of the guidance embedding added to the
sinusoidal timestep features before `linear_1`). Every other diffusers option is refused
by `UNetConfig.from_dict` with an `UnsupportedConfigError`.

Submodule names are diffusers' (see `lcm_jax.weights`), so a diffusers state dict loads
with `lcm_jax.weights.torch_to_flax` and no renaming.
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
  Downsample2D,
  GroupNorm,
  ResnetBlock2D,
  TimestepEmbedding,
  Transformer2DModel,
  Upsample2D,
  as_tuple,
  conv,
  one_of,
  read_diffusers_config,
  timestep_embedding,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _is_one(v) -> bool:
  return not isinstance(v, bool) and v == 1


# config.json keys whose value must be the one lcm-jax implements (diffusers' default).
_FIXED = {
    "mid_block_type": one_of("UNetMidBlock2DCrossAttn"),
    "only_cross_attention": (
        lambda v: v is False or (isinstance(v, (list, tuple)) and all(x is False for x in v)),
        "false"),
    "dropout": one_of(0.0),
    "act_fn": one_of("silu", "swish"),  # the same nn.SiLU in diffusers
    "transformer_layers_per_block": (
        lambda v: _is_one(v) or (isinstance(v, (list, tuple)) and all(_is_one(x) for x in v)),
        "1"),
    "reverse_transformer_layers_per_block": one_of(None),
    "encoder_hid_dim": one_of(None),
    "encoder_hid_dim_type": one_of(None),
    # diffusers itself refuses a non-null num_attention_heads for this model.
    "num_attention_heads": one_of(None),
    "dual_cross_attention": one_of(False),
    "class_embed_type": one_of(None),
    "num_class_embeds": one_of(None),
    "class_embeddings_concat": one_of(False),
    "addition_embed_type": one_of(None),
    "resnet_time_scale_shift": one_of("default"),
    "time_embedding_type": one_of("positional"),
    "time_embedding_act_fn": one_of(None),
    "timestep_post_act": one_of(None),
    "conv_in_kernel": one_of(3),
    "conv_out_kernel": one_of(3),
    "attention_type": one_of("default"),
}

# Keys accepted with any value: they change nothing in the blocks lcm-jax builds.
_INERT = frozenset({
    "sample_size",  # a default for pipelines, not part of the model
    # Read only with an addition/class embedding, all refused above.
    "addition_time_embed_dim", "addition_embed_type_num_heads",
    "projection_class_embeddings_input_dim",
    # Read only by the Simple*/ResnetDownsample* blocks and UNetMidBlock2DSimpleCrossAttn.
    "mid_block_only_cross_attention", "cross_attention_norm", "resnet_skip_time_act",
    "resnet_out_scale_factor",
})


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The UNet options lcm-jax implements, named and defaulted as diffusers' config keys.

  Per-block options (`layers_per_block`, `attention_head_dim`) may be given as an int or a
  list, as in diffusers, and are stored as tuples with one entry per down block.
  `cross_attention_dim` is stored as an int (one text-embedding width for all blocks).

  Note diffusers' naming quirk, kept for compatibility: with `num_attention_heads` unset
  (always, for this model), `attention_head_dim` is the *number of heads* per block; each
  head has channels // heads dimensions. `num_attention_heads` below returns it by its
  real meaning.
  """
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: Any = 2  # int or one per block; stored as tuple[int, ...]
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Any = 1280  # int, or a list of equal ints; stored as int
  attention_head_dim: Any = 8  # heads per block (see above); stored as tuple[int, ...]
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: int | None = None  # default 4 * block_out_channels[0]
  time_cond_proj_dim: int | None = None

  def __post_init__(self):
    what = "UNet"
    put = lambda key, value: object.__setattr__(self, key, value)
    put("block_out_channels", tuple(int(c) for c in self.block_out_channels))
    n = len(self.block_out_channels)
    # diffusers maps "UNetResX" to "X" for down and up blocks.
    strip = lambda t: t[len("UNetRes"):] if t.startswith("UNetRes") else t
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
      types = tuple(strip(t) for t in getattr(self, key))
      bad = [t for t in types if t not in allowed]
      if bad:
        raise UnsupportedConfigError(
            f"{what} config has {key}={list(getattr(self, key))!r}: block type(s) {bad} are not "
            f"implemented (supported: {', '.join(allowed)}).")
      if len(types) != n:
        raise UnsupportedConfigError(
            f"{what} config has {key}={list(types)!r} but {n} block_out_channels; diffusers "
            "requires one block per entry.")
      put(key, types)
    put("layers_per_block", tuple(int(x) for x in as_tuple(self.layers_per_block, n,
                                                           "layers_per_block", what)))
    heads = as_tuple(self.attention_head_dim, n, "attention_head_dim", what)
    if any(h is None or isinstance(h, bool) or int(h) < 1 for h in heads):
      raise UnsupportedConfigError(
          f"{what} config has attention_head_dim={self.attention_head_dim!r}; lcm-jax needs a "
          "positive number of heads for every block.")
    put("attention_head_dim", tuple(int(h) for h in heads))
    cross = as_tuple(self.cross_attention_dim, n, "cross_attention_dim", what)
    if len(set(cross)) != 1:
      # Every block sees the same encoder_hidden_states, so different widths cannot all fit.
      raise UnsupportedConfigError(
          f"{what} config has cross_attention_dim={self.cross_attention_dim!r}; lcm-jax "
          "supports one width for all blocks.")
    put("cross_attention_dim", int(cross[0]))
    if self.norm_num_groups is None:
      raise UnsupportedConfigError(
          f"{what} config has norm_num_groups=None (no output normalisation); lcm-jax does not "
          "implement it.")

  @property
  def num_attention_heads(self) -> tuple[int, ...]:
    """Heads per down block (diffusers' `attention_head_dim`, see the class docstring)."""
    return self.attention_head_dim

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """Reads a diffusers `unet/config.json` dict; raises UnsupportedConfigError for any
    option lcm-jax does not implement, naming the key and its value."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return cls(**read_diffusers_config(d, what="UNet", fields=fields, fixed=_FIXED,
                                       inert=_INERT))


class DownBlock(nn.Module):
  """diffusers CrossAttnDownBlock2D (`cross_attention`) or DownBlock2D.

  `num_layers` x (ResnetBlock2D `resnets_i` [+ Transformer2DModel `attentions_i`]), then an
  optional stride-2 conv `downsamplers_0`.
  """
  config: UNetConfig
  out_channels: int
  num_layers: int
  heads: int
  cross_attention: bool
  add_downsample: bool
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """x [B, H, W, C], temb [B, T], context [B, S, D] -> (x [B, H', W', out], skips)."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    skips = []
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps,
                        name=f"resnets_{i}", **kw)(x, temb)
      if self.cross_attention:
        x = _transformer(c, self.out_channels, self.heads, self.attention, f"attentions_{i}",
                         kw)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, c.downsample_padding, name="downsamplers_0", **kw)(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """diffusers CrossAttnUpBlock2D (`cross_attention`) or UpBlock2D.

  Each layer concatenates the next skip (last first) to the channels, then ResnetBlock2D
  `resnets_i` [+ Transformer2DModel `attentions_i`]; an optional `upsamplers_0` follows.
  """
  config: UNetConfig
  out_channels: int
  num_layers: int
  heads: int
  cross_attention: bool
  add_upsample: bool
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array, upsample_size: tuple[int, int] | None = None) -> jax.Array:
    """x [B, H, W, C], skips num_layers x [B, H, W, C_i] -> [B, 2H, 2W, out] (or upsample_size)."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = ResnetBlock2D(self.out_channels, c.norm_num_groups, c.norm_eps,
                        name=f"resnets_{i}", **kw)(x, temb)
      if self.cross_attention:
        x = _transformer(c, self.out_channels, self.heads, self.attention, f"attentions_{i}",
                         kw)(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nn.Module):
  """diffusers UNetMidBlock2DCrossAttn: `resnets_0`, `attentions_0`, `resnets_1`."""
  config: UNetConfig
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, H, W, C], temb [B, T], context [B, S, D] -> [B, H, W, C]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = c.block_out_channels[-1]
    resnet = lambda i: ResnetBlock2D(channels, c.norm_num_groups, c.norm_eps,
                                     c.mid_block_scale_factor, name=f"resnets_{i}", **kw)
    x = resnet(0)(x, temb)
    x = _transformer(c, channels, c.num_attention_heads[-1], self.attention, "attentions_0",
                     kw)(x, context)
    return resnet(1)(x, temb)


def _transformer(c: UNetConfig, channels: int, heads: int, attention: str, name: str,
                 kw) -> Transformer2DModel:
  # diffusers gives each block's transformer `heads` heads of channels // heads dimensions.
  return Transformer2DModel(heads, channels // heads, c.norm_num_groups, c.use_linear_projection,
                            c.upcast_attention, attention=attention, name=name, **kw)


class UNet2DConditionModel(nn.Module):
  """diffusers UNet2DConditionModel for SD 1.x/2.x and LCM students, NHWC.

  Attributes:
    config: the architecture.
    dtype: compute dtype (GroupNorm/LayerNorm statistics and softmax stay float32).
    param_dtype: parameter dtype.
    remat: wrap each down, mid and up block in `nn.remat` (recompute activations in the
      backward pass to save memory when training).
    attention: the attention backend of every transformer block, one of
      `lcm_jax.models.attention.BACKENDS` ("auto": the fastest the platform allows).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  def dummy_inputs(self) -> tuple[jax.Array, ...]:
    """Small inputs for `init`: (sample, timesteps, encoder_hidden_states[, timestep_cond])."""
    c = self.config
    size = 2 ** (len(c.block_out_channels) - 1)
    inputs = (jnp.zeros((1, size, size, c.in_channels), jnp.float32),
              jnp.zeros((1,), jnp.int32),
              jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32))
    if c.time_cond_proj_dim is not None:
      inputs += (jnp.zeros((1, c.time_cond_proj_dim), jnp.float32),)
    return inputs

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
               encoder_hidden_states: jax.Array,
               timestep_cond: jax.Array | None = None) -> jax.Array:
    """Predicts the noise (or v, or x0) for a noisy latent.

    Args:
      sample: [B, H, W, in_channels] noisy latents.
      timesteps: [B] or a scalar (int or float), broadcast over the batch.
      encoder_hidden_states: [B, L, cross_attention_dim] text embeddings.
      timestep_cond: [B, time_cond_proj_dim] (LCM's guidance embedding) or None; when the
        config has `time_cond_proj_dim` and this is None, `cond_proj` is skipped, as in
        diffusers.

    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(kw, attention=self.attention)
    batch = sample.shape[0]
    timesteps = jnp.asarray(timesteps)
    timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
    if c.center_input_sample:
      sample = 2 * sample - 1.0

    # 1. time: sinusoids in float32, then the MLP in the compute dtype (as diffusers casts
    # them to the sample's dtype).
    t_emb = timestep_embedding(timesteps, c.block_out_channels[0],
                               flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
    emb = TimestepEmbedding(c.time_embed_dim, c.time_cond_proj_dim, name="time_embedding",
                            **kw)(t_emb.astype(self.dtype), timestep_cond)

    # 2. down
    down_cls, mid_cls, up_cls = DownBlock, UNetMidBlock2DCrossAttn, UpBlock
    if self.remat:
      down_cls, mid_cls = nn.remat(DownBlock), nn.remat(UNetMidBlock2DCrossAttn)
      up_cls = nn.remat(UpBlock, static_argnums=(5,))  # upsample_size (self is 0)
    x = conv(c.block_out_channels[0], 3, name="conv_in", **kw)(sample)
    skips: tuple[jax.Array, ...] = (x,)
    n = len(c.block_out_channels)
    for i, block_type in enumerate(c.down_block_types):
      x, res = down_cls(
          c, c.block_out_channels[i], c.layers_per_block[i], c.num_attention_heads[i],
          cross_attention=block_type == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
          name=f"down_blocks_{i}", **block_kw)(x, emb, encoder_hidden_states)
      skips += res

    # 3. mid
    x = mid_cls(c, name="mid_block", **block_kw)(x, emb, encoder_hidden_states)

    # 4. up. When the input size is not a multiple of 2 ** (n - 1), each upsampler is told
    # the size of the skip it will meet next, as diffusers does.
    forward_size = any(s % 2 ** (n - 1) for s in sample.shape[1:3])
    reversed_channels = c.block_out_channels[::-1]
    reversed_heads = c.num_attention_heads[::-1]
    reversed_layers = c.layers_per_block[::-1]
    for i, block_type in enumerate(c.up_block_types):
      num_layers = reversed_layers[i] + 1
      res, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == n - 1
      upsample_size = tuple(skips[-1].shape[1:3]) if forward_size and not is_final else None
      x = up_cls(
          c, reversed_channels[i], num_layers, reversed_heads[i],
          cross_attention=block_type == "CrossAttnUpBlock2D", add_upsample=not is_final,
          name=f"up_blocks_{i}", **block_kw)(x, res, emb, encoder_hidden_states, upsample_size)

    # 5. out
    x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(x))
    return conv(c.out_channels, 3, name="conv_out", **kw)(x)
