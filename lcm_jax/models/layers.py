"""Blocks shared by the UNet and the VAE, equal to their diffusers (PyTorch) namesakes.

Layout is NHWC throughout (`[B, H, W, C]`); token sequences are `[B, L, C]`.
Every module takes `dtype` (compute) and `param_dtype` (storage). Normalisation statistics
and attention softmax are always computed in float32, whatever `dtype` is, because bf16
has too few mantissa bits for a variance or a softmax over thousands of tokens. Attention
itself is `lcm_jax.models.attention.attention`; the modules that use it take its backend
name as `attention`.

Submodule names follow the naming contract in `lcm_jax.weights` (diffusers' attribute
names; element N of a PyTorch list `X` is `X_N`).

The file also holds `read_diffusers_config`, the one routine that turns a diffusers
`config.json` dict into dataclass keyword arguments for both `UNetConfig` and `VAEConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.errors import UnsupportedConfigError
from lcm_jax.models import attention as attention_lib

Dtype = Any


# --------------------------------------------------------------------------------------
# config.json parsing shared by UNetConfig and VAEConfig


def read_diffusers_config(
    d: Mapping[str, Any], *, what: str, fields: Iterable[str],
    fixed: Mapping[str, tuple[Callable[[Any], bool], str]], inert: Iterable[str],
) -> dict[str, Any]:
  """Checks a diffusers `config.json` dict and returns the entries that become dataclass fields.

  Args:
    d: the dict as read from `config.json` (or `model.config` of a diffusers model).
    what: names the model in error messages ("UNet", "VAE").
    fields: keys the dataclass implements for any value.
    fixed: key -> (predicate, description): keys whose value must satisfy the predicate
      (the only value lcm-jax implements); a key absent from `d` takes diffusers' default,
      which always satisfies it.
    inert: keys accepted with any value because they do not change what the model computes
      (hub metadata, or options read only by blocks lcm-jax rejects anyway).

  Raises:
    UnsupportedConfigError naming the key and its value, for an unknown key or a `fixed`
    key with another value.
  """
  d = dict(d)
  # diffusers drops the keys listed in `_use_default_values` and applies its own current
  # defaults to them instead; our defaults are diffusers' defaults, so dropping is enough.
  for key in d.get("_use_default_values") or ():
    d.pop(key, None)
  # Keys starting with "_" are diffusers bookkeeping (`_class_name`, `_diffusers_version`,
  # `_name_or_path`, ...), never constructor arguments.
  d = {k: v for k, v in d.items() if not k.startswith("_")}
  fields, inert = frozenset(fields), frozenset(inert)
  unknown = sorted(k for k in d if k not in fields and k not in fixed and k not in inert)
  if unknown:
    listed = ", ".join(f"{k}={d[k]!r}" for k in unknown)
    raise UnsupportedConfigError(
        f"{what} config has key(s) lcm-jax does not know: {listed}. They may change what the "
        f"model computes, so the model cannot be built faithfully.")
  for key, (supported, description) in fixed.items():
    if key in d and not supported(d[key]):
      raise UnsupportedConfigError(
          f"{what} config has {key}={d[key]!r}, which lcm-jax does not implement "
          f"(supported: {description}).")
  return {k: v for k, v in d.items() if k in fields}


def one_of(*values) -> tuple[Callable[[Any], bool], str]:
  """A `fixed` entry for `read_diffusers_config` accepting exactly these values."""
  # Booleans and None must match by identity (0 is not False); numbers compare as numbers,
  # because JSON may write 1.0 as 1 and diffusers does not care.
  def same(v, x):
    if isinstance(x, bool) or x is None:
      return v is x
    return not isinstance(v, bool) and v == x
  return (lambda v: any(same(v, x) for x in values)), " or ".join(repr(x) for x in values)


def as_tuple(value, n: int, key: str, what: str) -> tuple:
  """An int (or str, ...) repeated n times, or a list/tuple checked to have length n."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise UnsupportedConfigError(
          f"{what} config has {key}={list(value)!r} with {len(value)} entries; it needs one per "
          f"block ({n}).")
    return tuple(value)
  return (value,) * n


# --------------------------------------------------------------------------------------
# Normalisation, convolutions, resampling


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm(num_groups, C, eps, affine=True) over `[B, ..., C]`, statistics in fp32.

  Groups are contiguous channel ranges, as in PyTorch; mean and variance are taken over the
  spatial (or token) axes and the channels of a group.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, ..., C] -> [B, ..., C] in `dtype`."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    # Two-pass variance: E[x^2] - E[x]^2 loses digits when |mean| >> std.
    var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(self.dtype)


def conv(features: int, kernel: int = 3, *, stride: int = 1,
         padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None, dtype: Dtype,
         param_dtype: Dtype, name: str, use_bias: bool = True) -> nn.Conv:
  """A Conv2d as PyTorch builds it: `padding` pixels on every side, (kernel - 1) // 2 by
  default, or explicit ((top, bottom), (left, right))."""
  if padding is None:
    padding = (kernel - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class Downsample2D(nn.Module):
  """diffusers Downsample2D(use_conv=True): a stride-2 3x3 conv named `conv`.

  padding 0 means PyTorch's asymmetric pad of one pixel on the right and bottom only (the
  VAE encoder); padding p > 0 pads p on every side (the UNet, p = 1).
  """
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels] (H, W even for padding 0)."""
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return conv(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """F.interpolate(mode="nearest") on `[B, H, W, C]`: x2, or to `size` = (H', W')."""
  if size is None:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  # PyTorch's nearest rule for an explicit size: source index floor(dst * in / out).
  rows = np.minimum(np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32),
                    x.shape[1] - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32),
                    x.shape[2] - 1)
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """diffusers Upsample2D(use_conv=True): nearest x2 (or to `output_size`), then a 3x3 conv `conv`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """x [B, H, W, C] -> [B, 2H, 2W, out_channels] (or output_size)."""
    x = upsample_nearest(x, output_size)
    return conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(x)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D with time_embedding_norm="default" and SiLU.

  norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU -> conv2, plus the
  input (through a 1x1 `conv_shortcut` when the channel count changes), all divided by
  `output_scale_factor`. Dropout is not implemented (SD configs use 0).
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, C_in], temb [B, T] or None -> [B, H, W, out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(self.out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


# --------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
  """diffusers `Attention` (processor AttnProcessor2_0) without masks.

  Self-attention when `encoder_hidden_states` is None, cross-attention otherwise.
  `norm_num_groups` adds the input GroupNorm `group_norm` (VAE mid-block);
  `residual_connection` adds the input back and the sum is divided by
  `rescale_output_factor`. `to_out_0` maps back to the input width. `attention` names the
  backend of `lcm_jax.models.attention.attention` ("auto", "xla", "chunked", ...).
  """
  heads: int
  dim_head: int
  use_bias: bool = False  # on to_q / to_k / to_v; to_out_0 always has a bias
  upcast_attention: bool = False
  norm_num_groups: int | None = None
  norm_eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: jax.Array,
               encoder_hidden_states: jax.Array | None = None) -> jax.Array:
    """hidden_states [B, L, C] or [B, H, W, C]; encoder_hidden_states [B, S, D] -> shape of input."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shape = hidden_states.shape
    batch, width = shape[0], shape[-1]
    x = hidden_states.reshape(batch, -1, width)
    if self.norm_num_groups is not None:
      x = GroupNorm(self.norm_num_groups, self.norm_eps, name="group_norm", **kw)(x)
    context = x if encoder_hidden_states is None else encoder_hidden_states
    inner = self.heads * self.dim_head
    split = lambda t: t.reshape(batch, -1, self.heads, self.dim_head)
    q = split(nn.Dense(inner, use_bias=self.use_bias, name="to_q", **kw)(x))
    k = split(nn.Dense(inner, use_bias=self.use_bias, name="to_k", **kw)(context))
    v = split(nn.Dense(inner, use_bias=self.use_bias, name="to_v", **kw)(context))
    out = attention_lib.attention(q, k, v, upcast=self.upcast_attention, backend=self.attention)
    out = out.reshape(batch, -1, inner)
    out = nn.Dense(width, name="to_out_0", **kw)(out).reshape(shape)
    if self.residual_connection:
      out = out + hidden_states
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nn.Module):
  """diffusers GEGLU: Dense `proj` to 2 * inner, then value * gelu(gate) (exact erf gelu)."""
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, C] -> [B, L, inner_dim]."""
    h = nn.Dense(2 * self.inner_dim, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers FeedForward(activation_fn="geglu", mult=4): `net_0` (GEGLU), dropout, `net_2`."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, C] -> [B, L, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock with norm_type="layer_norm": self-attn, cross-attn, GEGLU FF.

  Each sub-layer is pre-LayerNorm (eps 1e-5) with a residual; attention has no q/k/v bias.
  `attention` is the attention backend of both attention layers.
  """
  heads: int
  dim_head: int
  upcast_attention: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, L, C], context [B, S, D] -> [B, L, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
    attn = lambda name: Attention(self.heads, self.dim_head, upcast_attention=self.upcast_attention,
                                  attention=self.attention, name=name, **kw)
    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """diffusers Transformer2DModel on continuous inputs (the UNet's spatial transformer).

  GroupNorm `norm` (eps 1e-6) -> `proj_in` (1x1 conv, or Dense when
  `use_linear_projection`) -> `transformer_blocks_i` -> `proj_out` -> + input.
  The width is heads * dim_head; in and out channels are the input's. `attention` is the
  attention backend of every block.
  """
  heads: int
  dim_head: int
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  num_layers: int = 1
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, H, W, C], context [B, S, D] -> [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(batch, -1, channels))
    else:
      h = conv(inner, 1, name="proj_in", **kw)(h).reshape(batch, -1, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.dim_head, self.upcast_attention, self.attention,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    if self.use_linear_projection:
      h = nn.Dense(channels, name="proj_out", **kw)(h).reshape(batch, height, width, channels)
    else:
      h = conv(channels, 1, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
    return h + x


# --------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """diffusers `get_timestep_embedding`: sinusoids of timesteps [N] -> [N, dim] float32.

  Frequencies exp(-log(max_period) * i / (dim // 2 - freq_shift)) for i < dim // 2;
  [sin, cos], or [cos, sin] when `flip_sin_to_cos`; a zero column is appended if dim is odd.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers TimestepEmbedding: `linear_1` -> SiLU -> `linear_2`.

  With `cond_proj_dim` (LCM's guidance embedding input, the UNet's `time_cond_proj_dim`), a
  bias-free Dense `cond_proj` maps the condition to the input width and is added to the
  input before `linear_1`; as in diffusers it is skipped when no condition is given.
  """
  time_embed_dim: int
  cond_proj_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """sample [B, C], condition [B, cond_proj_dim] or None -> [B, time_embed_dim]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cond_proj_dim is not None:
      cond_proj = nn.Dense(sample.shape[-1], use_bias=False, name="cond_proj", **kw)
      if condition is not None:
        sample = sample + cond_proj(condition)
      elif self.is_initializing():
        # Create the parameter anyway so the tree matches a checkpoint that has it.
        cond_proj(jnp.zeros((1, self.cond_proj_dim), self.dtype))
    elif condition is not None:
      raise ValueError("a timestep condition was given but the model has no cond_proj "
                       "(its config has no time_cond_proj_dim)")
    h = nn.silu(nn.Dense(self.time_embed_dim, name="linear_1", **kw)(sample))
    return nn.Dense(self.time_embed_dim, name="linear_2", **kw)(h)
