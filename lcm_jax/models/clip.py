"""CLIP text encoder, equal to transformers' `CLIPTextModel` (the SD text encoder).

token + position embeddings -> `num_hidden_layers` pre-LayerNorm transformer layers with a
causal mask -> final LayerNorm. The pooled output is the final hidden state at the end
token; which token that is follows transformers' rule (see `CLIPTextConfig.eos_token_id`).
SD 1.x uses OpenAI CLIP ViT-L/14's text tower (`quick_gelu`), SD 2.x OpenCLIP ViT-H's
(`gelu`); Stable Diffusion reads `last_hidden_state` only.

Parameter paths follow the naming contract in `lcm_jax.weights` and the layout of SD
checkpoints on the hub: `text_model/embeddings/token_embedding/embedding`,
`text_model/encoder/layers_0/self_attn/q_proj/kernel`, `text_model/final_layer_norm/scale`.
Layer-norm statistics and the attention softmax are computed in float32 whatever `dtype` is.

For the CLIP score (`lcm_jax.eval.clip_score`) the module also has transformers'
`CLIPModel`: the same text transformer, a ViT vision tower (`CLIPVisionTransformer`,
bidirectional attention, class-token pooling) and the two bias-free projections, so the
`model.safetensors` of `openai/clip-vit-large-patch14`, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
and `laion/CLIP-ViT-g-14-laion2B-s12B-b42K` load by name (`vision_model/embeddings/
class_embedding`, `visual_projection/kernel`, `logit_scale`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.errors import UnsupportedConfigError
from lcm_jax.models.layers import one_of, read_diffusers_config

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _exact_gelu(x: jax.Array) -> jax.Array:
  # transformers' "gelu" is torch's default erf form, not the tanh approximation.
  return jax.nn.gelu(x, approximate=False)


# transformers' `hidden_act` names -> the function. Only these two occur in SD text encoders.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": _exact_gelu,
}

# eos_token_id that checkpoints converted before transformers PR #24773 carry (SD 1.x and 2.x
# among them); for it transformers pools at the largest token id instead of at the first
# `eos_token_id`.
LEGACY_EOS_TOKEN_ID = 2

# Keys that do not change what CLIPTextModel computes at inference.
_INERT_KEYS = frozenset({
    # Bookkeeping and storage: the compute dtype is an argument of the module, not the config.
    "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "torchscript",
    "tf_legacy_loss", "gradient_checkpointing", "attn_implementation",
    # Only CLIPTextModelWithProjection has a projection (rejected through `architectures`).
    "projection_dim",
    # Dropout is off at inference; initialisation does not matter for loaded weights.
    "dropout", "attention_dropout", "initializer_range", "initializer_factor",
    # Token ids the tokenizer uses; the model reads only eos_token_id.
    "pad_token_id", "bos_token_id", "sep_token_id", "decoder_start_token_id",
    # What a forward returns, not what it computes.
    "output_hidden_states", "output_attentions", "return_dict",
    # Generic PreTrainedConfig options CLIPTextModel never reads (it has no decoder, no
    # cross-attention, no output embeddings, no chunked feed-forward, no head).
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "is_encoder_decoder",
    "tie_encoder_decoder", "tie_word_embeddings", "chunk_size_feed_forward",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params",
    # Text-generation settings, which transformers v4 saved into every config.
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids",
    "begin_suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "encoder_repetition_penalty", "epsilon_cutoff",
    "eta_cutoff", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
    "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p", "typical_p",
    "use_cache",
})


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# Keys whose value must be one lcm-jax implements: key -> (predicate, description).
_FIXED_KEYS = {
    "hidden_act": one_of(*ACTIVATIONS),
    # The class the weights were saved from; only CLIPTextModel has exactly our parameters.
    "architectures": ((lambda v: v is None or list(v) == ["CLIPTextModel"]),
                      "['CLIPTextModel'] (CLIPTextModelWithProjection is not implemented)"),
    "model_type": one_of("clip_text_model"),
    # None or a list makes transformers' pooling fail; a model we cannot pool is not built.
    "eos_token_id": (_is_int, "one integer token id"),
    "layer_norm_eps": (_is_positive_number, "a positive number"),
    # Pruned heads change the attention shapes.
    "pruned_heads": ((lambda v: not v), "none pruned ({})"),
    # diffusers passes the tokenizer's attention mask to encoders that set this; we take no mask.
    "use_attention_mask": one_of(False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The options of a transformers CLIPTextConfig that change what the text encoder computes.

  Defaults are transformers' (`openai/clip-vit-base-patch32`'s text tower), so a key absent
  from a `config.json` means what it means to transformers.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # The pooled output is taken at the first token equal to it; for the legacy value 2 at the
  # largest token id (the end token in CLIP's vocabulary) instead, as transformers does.
  eos_token_id: int = 49407

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UnsupportedConfigError(
          f"CLIP text config has hidden_size={self.hidden_size}, which num_attention_heads="
          f"{self.num_attention_heads} does not divide.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """Reads a transformers CLIPTextModel `config.json` dict.

    Raises:
      UnsupportedConfigError naming the key and value of any unknown key or unimplemented option.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = read_diffusers_config(d, what="CLIP text", fields=fields, fixed=_FIXED_KEYS,
                                   inert=_INERT_KEYS)
    return cls(**kwargs)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class _CLIPModule(nn.Module):
  """The fields every module of the text encoder has: the config, compute and parameter dtypes."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def dtypes(self) -> dict[str, Dtype]:
    """The dtype keyword arguments for a submodule."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class CLIPTextEmbeddings(_CLIPModule):
  """Token embedding plus learned absolute position embedding. [B, L] ids -> [B, L, D]."""

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    length = input_ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(f"CLIP text encoder: {length} tokens, more than max_position_embeddings="
                       f"{c.max_position_embeddings}")
    kw = dict(features=c.hidden_size, **self.dtypes)
    tokens = nn.Embed(c.vocab_size, name="token_embedding", **kw)(input_ids)
    positions = nn.Embed(c.max_position_embeddings, name="position_embedding", **kw)(
        jnp.arange(length))
    return tokens + positions[None]


class CLIPAttention(_CLIPModule):
  """Causal multi-head self-attention with biased q/k/v/out projections. [B, L, D] -> [B, L, D].

  `causal=False` is the vision tower's attention (every patch sees every patch).
  """
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = self.dtypes
    batch, length, _ = x.shape
    heads = lambda name: nn.Dense(c.hidden_size, name=name, **kw)(x).reshape(
        batch, length, c.num_attention_heads, c.head_dim)
    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    # XLA's implementation takes the logits and the softmax in float32 for any input dtype.
    dtype = v.dtype
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
      # XLA:CPU has no float16 product with float32 accumulation: the same sums in float32.
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation="xla").astype(dtype)
    return nn.Dense(c.hidden_size, name="out_proj", **kw)(out.reshape(batch, length, -1))


class CLIPMLP(_CLIPModule):
  """fc1 -> hidden_act -> fc2. [B, L, D] -> [B, L, D]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = self.dtypes
    h = ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="fc1", **kw)(x))
    return nn.Dense(c.hidden_size, name="fc2", **kw)(h)


def _layer_norm(config: CLIPTextConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # Flax takes the statistics in float32 for any dtype; the two-pass variance as torch does.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name,
                      dtype=dtype, param_dtype=param_dtype)


class CLIPEncoderLayer(_CLIPModule):
  """x + attn(LN1(x)), then + mlp(LN2(.)). [B, L, D] -> [B, L, D]."""
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = self.dtypes
    x = x + CLIPAttention(self.config, causal=self.causal, name="self_attn", **kw)(
        _layer_norm(self.config, "layer_norm1", **kw)(x))
    return x + CLIPMLP(self.config, name="mlp", **kw)(_layer_norm(self.config, "layer_norm2", **kw)(x))


class CLIPEncoder(_CLIPModule):
  """`layers_0` ... `layers_{N-1}`. [B, L, D] -> [B, L, D]."""
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, causal=self.causal, name=f"layers_{i}", **self.dtypes)(x)
    return x


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """input_ids [B, L] -> [B] int: where transformers' CLIPTextModel takes the pooled output.

  The first `eos_token_id`, or for the legacy id 2 the first largest id (CLIP's end token is
  the last of its vocabulary). A row without the end token pools at position 0, as in
  transformers.
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(_CLIPModule):
  """embeddings -> encoder -> final_layer_norm, and the pooled end-token state."""

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    kw = self.dtypes
    h = CLIPTextEmbeddings(self.config, name="embeddings", **kw)(input_ids)
    h = CLIPEncoder(self.config, name="encoder", **kw)(h)
    h = _layer_norm(self.config, "final_layer_norm", **kw)(h)
    index = eos_positions(input_ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]
    return h, pooled


class CLIPTextModel(_CLIPModule):
  """transformers CLIPTextModel: input_ids [B, L] int -> (last_hidden_state [B, L, D], pooled [B, D]).

  `dtype` is the compute dtype of both outputs and of the matmuls; `param_dtype` is the
  dtype parameters are created in. The sole submodule is `text_model`, as in SD checkpoints.
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """input_ids [B, L] int, L <= max_position_embeddings -> ([B, L, D], [B, D])."""
    if input_ids.ndim != 2:
      raise ValueError(f"CLIPTextModel takes token ids [B, L], got shape {input_ids.shape}")
    return CLIPTextTransformer(self.config, name="text_model", **self.dtypes)(input_ids)

  def dummy_inputs(self) -> tuple[jax.Array]:
    """Inputs for `init` / `jax.eval_shape`: one row of `max_position_embeddings` ids."""
    return (jnp.zeros((1, self.config.max_position_embeddings), jnp.int32),)


# ---------------------------------------------------------------------------------------
# The vision tower and CLIPModel (two towers plus projections), for the CLIP score.

# Keys of a vision config that do not change what the vision tower computes; the text
# tower's generic PreTrainedConfig / generation keys are inert here too.
_VISION_INERT_KEYS = _INERT_KEYS | frozenset({
    # The projection belongs to CLIPModel (its top-level projection_dim decides).
    "projection_dim",
    # transformers v4 saved these token ids into every sub-config, vision included.
    "eos_token_id",
})

_VISION_FIXED_KEYS = {
    "hidden_act": one_of(*ACTIVATIONS),
    "architectures": ((lambda v: v is None or list(v) in (["CLIPVisionModel"], ["CLIPModel"])),
                      "None, ['CLIPVisionModel'] or ['CLIPModel']"),
    "model_type": one_of("clip_vision_model"),
    "layer_norm_eps": (_is_positive_number, "a positive number"),
    "num_channels": one_of(3),
    "pruned_heads": ((lambda v: not v), "none pruned ({})"),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The options of a transformers CLIPVisionConfig that change what the vision tower computes.

  Defaults are transformers' (`openai/clip-vit-base-patch32`'s vision tower). OpenAI
  ViT-L/14: hidden 1024, 24 layers, 16 heads, patch 14, quick_gelu. LAION ViT-H/14: 1280,
  32 layers, 16 heads, gelu; ViT-g/14: 1408, 40 layers, 16 heads, intermediate 6144, gelu.
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UnsupportedConfigError(
          f"CLIP vision config has hidden_size={self.hidden_size}, which num_attention_heads="
          f"{self.num_attention_heads} does not divide.")
    if self.image_size % self.patch_size:
      raise UnsupportedConfigError(
          f"CLIP vision config has image_size={self.image_size}, which patch_size="
          f"{self.patch_size} does not divide.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    """Reads a transformers CLIPVisionConfig dict (the `vision_config` of a CLIPModel).

    Raises:
      UnsupportedConfigError naming the key and value of any unknown key or unimplemented option.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = read_diffusers_config(d, what="CLIP vision", fields=fields, fixed=_VISION_FIXED_KEYS,
                                   inert=_VISION_INERT_KEYS)
    for key in ("image_size", "patch_size"):  # transformers allows [h, w]; only squares are CLIP's
      value = kwargs.get(key)
      if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
          raise UnsupportedConfigError(f"CLIP vision config has {key}={value!r}; only square sizes are implemented")
        kwargs[key] = value[0]
    return cls(**kwargs)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class CLIPVisionEmbeddings(_CLIPModule):
  """[B, S, S, 3] pixels -> [B, 1 + (S/P)^2, D]: class token, then patches in row-major order,
  plus learned position embeddings. S must equal `image_size` (no position interpolation)."""

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    batch, height, width, _ = pixel_values.shape
    if height != c.image_size or width != c.image_size:
      raise ValueError(f"CLIP vision tower: input {height}x{width}, the model takes "
                       f"{c.image_size}x{c.image_size}")
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                      padding="VALID", use_bias=False, name="patch_embedding", **self.dtypes)(pixel_values)
    patches = patches.reshape(batch, -1, c.hidden_size)
    class_embedding = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5),
                                 (c.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, c.hidden_size))
    tokens = jnp.concatenate([cls, patches], axis=1)
    positions = nn.Embed(c.num_patches + 1, c.hidden_size, name="position_embedding", **self.dtypes)(
        jnp.arange(c.num_patches + 1))
    return tokens + positions[None]


class CLIPVisionTransformer(_CLIPModule):
  """transformers' CLIPVisionModel: embeddings -> pre_layrnorm (sic, transformers' name) ->
  bidirectional encoder -> post_layernorm of the class token.

  [B, S, S, 3] normalised pixels -> (last_hidden_state [B, 1 + N, D], pooled [B, D]).
  `config` is a `CLIPVisionConfig`; the encoder modules read only the fields it shares with
  the text config (widths, heads, activation, layer-norm epsilon).
  """

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    kw = self.dtypes
    h = CLIPVisionEmbeddings(self.config, name="embeddings", **kw)(pixel_values)
    h = _layer_norm(self.config, "pre_layrnorm", **kw)(h)
    h = CLIPEncoder(self.config, causal=False, name="encoder", **kw)(h)
    pooled = _layer_norm(self.config, "post_layernorm", **kw)(h[:, 0])
    return h, pooled


_MODEL_FIXED_KEYS = {
    "architectures": ((lambda v: v is None or list(v) == ["CLIPModel"]), "['CLIPModel']"),
    "model_type": one_of("clip"),
    "projection_dim": (lambda v: _is_int(v) and v > 0, "a positive integer"),
}
# Read separately (the towers) or not needed at inference (the logit scale's initial value).
_MODEL_INERT_KEYS = _INERT_KEYS - {"projection_dim"} | frozenset({
    "text_config", "vision_config", "text_config_dict", "vision_config_dict",
    "logit_scale_init_value", "initializer_factor",
})


def _tower_dict(d: Mapping[str, Any], tower: str) -> dict:
  """The effective `text_config` / `vision_config` of a CLIPModel config dict.

  Old configs carry `text_config_dict` / `vision_config_dict` too; transformers then builds
  the tower from that dict alone (its defaults fill the rest, overriding `*_config`), so we do.
  """
  legacy = d.get(f"{tower}_config_dict")
  return dict(legacy if legacy is not None else (d.get(f"{tower}_config") or {}))


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  """A transformers `CLIPConfig`: both towers and the shared projection width."""
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPModelConfig":
    """Reads a CLIPModel `config.json` dict (e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K's).

    Raises:
      UnsupportedConfigError naming the tower, key and value of anything not implemented.
    """
    kwargs = read_diffusers_config(d, what="CLIP", fields=("projection_dim",), fixed=_MODEL_FIXED_KEYS,
                                   inert=_MODEL_INERT_KEYS)
    return cls(text=CLIPTextConfig.from_dict(_tower_dict(d, "text")),
               vision=CLIPVisionConfig.from_dict(_tower_dict(d, "vision")), **kwargs)


class CLIPModel(nn.Module):
  """transformers' CLIPModel: `text_model`, `vision_model`, `text_projection`,
  `visual_projection` (no biases) and the scalar `logit_scale`, named as in hub checkpoints.

  `__call__(pixel_values, input_ids)` runs both towers (for `init`); use
  `apply(..., method="image_embeds")` / `"text_embeds"` for one tower. Embeddings are the
  projected, *unnormalised* features, equal to transformers' `get_image_features` /
  `get_text_features`.
  """
  config: CLIPModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.config
    self.text_model = CLIPTextTransformer(c.text, **kw)
    self.vision_model = CLIPVisionTransformer(c.vision, **kw)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
    # transformers' initial value log(1 / 0.07); loaded weights replace it.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

  def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
    """[B, S, S, 3] CLIP-normalised pixels (NHWC) -> [B, projection_dim]."""
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def text_embeds(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, projection_dim]."""
    return self.text_projection(self.text_model(input_ids)[1])

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (image embeds [B1, P], text embeds [B2, P]); `init` through it creates every
    parameter (setup creates `logit_scale`)."""
    return self.image_embeds(pixel_values), self.text_embeds(input_ids)

  def dummy_inputs(self) -> tuple[jax.Array, jax.Array]:
    """Inputs for `init` / `jax.eval_shape`: one image and one row of token ids."""
    s = self.config.vision.image_size
    return (jnp.zeros((1, s, s, 3), jnp.float32),
            jnp.zeros((1, self.config.text.max_position_embeddings), jnp.int32))
