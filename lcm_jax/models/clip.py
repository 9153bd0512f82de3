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
  """Causal multi-head self-attention with biased q/k/v/out projections. [B, L, D] -> [B, L, D]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = self.dtypes
    batch, length, _ = x.shape
    heads = lambda name: nn.Dense(c.hidden_size, name=name, **kw)(x).reshape(
        batch, length, c.num_attention_heads, c.head_dim)
    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    # XLA's implementation takes the logits and the softmax in float32 for any input dtype.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = self.dtypes
    x = x + CLIPAttention(self.config, name="self_attn", **kw)(
        _layer_norm(self.config, "layer_norm1", **kw)(x))
    return x + CLIPMLP(self.config, name="mlp", **kw)(_layer_norm(self.config, "layer_norm2", **kw)(x))


class CLIPEncoder(_CLIPModule):
  """`layers_0` ... `layers_{N-1}`. [B, L, D] -> [B, L, D]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, name=f"layers_{i}", **self.dtypes)(x)
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
