"""Parity of `lcm_jax.models.clip.CLIPTextModel` with transformers' CLIPTextModel, and the tokenizer.

Tiny random transformers models (every parameter perturbed, layer norms included, so that a
swapped or transposed tensor cannot hide behind ones and zeros) are loaded through
`lcm_jax.weights.torch_to_flax` and run on the same token ids, made by the tiny tokenizer
from real prompts with padding, plus hand-made rows that tell the two pooling rules apart.

Bounds, with scale = max(1, max|reference|) (about 3-4.5 for these models):
* fp32: max abs error <= 1e-4 * scale; measured at most 2.4e-6 absolute on CPU.
* bf16 compute (fp32 parameters, `dtype=jnp.bfloat16`) against the fp32 reference:
  <= 0.03 * scale; measured at most 0.052 absolute (0.012 * scale) on CPU over the four
  configurations of CASES. That is rounding, not a bug: bf16 has 8 mantissa bits, so the
  final cast alone of an output near 4 may move it by 0.008, and each of the two layers'
  bf16 residual adds and matmuls adds a relative 2^-9 or so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax import weights
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError
from lcm_jax.models import clip
from lcm_jax.tokenizer import load_tokenizer, tokenize
from tests.helpers import max_error, perturb_, tiny_clip

PROMPTS = [
    "a red circle on a blue background",
    "",
    # Longer than MODEL_MAX_LENGTH - 2 tokens: truncated, and still ends with <|endoftext|>.
    "a small green triangle in the top left corner of a white background with black dots",
    "A Big, purple Cat!  sitting on the MOON",
]


def perturbation_std(name: str, p) -> float:
  # Layer norms start at scale 1 / bias 0; the rest is small, so give it enough spread for
  # the attention to be far from uniform.
  return 0.3 if "layer_norm" in name else 0.1


def build_pair(hidden_act: str, legacy_eos: bool, seed: int = 0, dtype=jnp.float32):
  """A perturbed transformers CLIPTextModel and our module with its weights loaded."""
  torch.manual_seed(seed)
  config = tiny_clip.tiny_clip_text_config(hidden_act, legacy_eos_token_id=legacy_eos)
  reference = tiny_transformers_model(config, seed)
  module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(config.to_dict()), dtype=dtype)
  params = weights.torch_to_flax(tiny_clip.checkpoint_state_dict(reference), abstract_params(module),
                                 what="tiny CLIP")
  return reference, module, params


def tiny_transformers_model(config, seed: int):
  import transformers
  model = transformers.CLIPTextModel(config).eval()
  perturb_(model, seed, perturbation_std)
  return model


def abstract_params(module):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """pad token -> a tiny CLIP tokenizer (SD 1.x pads with <|endoftext|>, SD 2.x with "!")."""
  import transformers
  out = {}
  for name, pad in (("sd1", tiny_clip.END), ("sd2", "!")):
    folder = tiny_clip.write_tiny_tokenizer(str(tmp_path_factory.mktemp(name)), pad_token=pad)
    out[pad] = transformers.CLIPTokenizer.from_pretrained(folder)
  return out


def token_ids(tokenizer) -> np.ndarray:
  """Tokenized PROMPTS plus rows that separate the pooling rules: [B, MODEL_MAX_LENGTH] int32."""
  ids = tokenize(tokenizer, PROMPTS)
  eos = tokenizer.eos_token_id
  length = ids.shape[1]
  rng = np.random.RandomState(0)
  no_eos = rng.randint(0, eos - 1, size=length)      # pools at position 0 under the new rule
  two_eos = rng.randint(0, eos - 1, size=length)
  two_eos[[5, 9]] = eos                               # the first end token counts
  return np.concatenate([ids, no_eos[None], two_eos[None]]).astype(np.int32)


def reference_outputs(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    out = model(torch.from_numpy(ids.astype(np.int64)))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


# (hidden_act, legacy eos_token_id=2, pad token): SD 1.x's and SD 2.x's encoders as their
# checkpoints configure them, and the same with transformers' current eos_token_id.
CASES = [
    ("quick_gelu", True, tiny_clip.END),
    ("gelu", True, "!"),
    ("quick_gelu", False, "!"),
    ("gelu", False, tiny_clip.END),
]


@pytest.mark.parametrize("hidden_act,legacy_eos,pad", CASES)
def test_parity_fp32(tokenizers, hidden_act, legacy_eos, pad):
  reference, module, params = build_pair(hidden_act, legacy_eos, seed=len(hidden_act) + legacy_eos)
  ids = token_ids(tokenizers[pad])
  ref_hidden, ref_pooled = reference_outputs(reference, ids)
  hidden, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
  assert hidden.dtype == jnp.float32 and pooled.dtype == jnp.float32
  for ours, ref in ((hidden, ref_hidden), (pooled, ref_pooled)):
    err, scale = max_error(ours, ref)
    assert err <= 1e-4 * scale, (err, scale)
  # The pooled row is the hidden state where the rule says, including the hand-made rows.
  index = np.asarray(clip.eos_positions(jnp.asarray(ids), module.config.eos_token_id))
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[np.arange(len(ids)), index])
  assert index[len(PROMPTS)] == (int(np.argmax(ids[len(PROMPTS)])) if legacy_eos else 0)
  assert index[len(PROMPTS) + 1] == 5


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_bf16_compute_close_to_fp32_reference(tokenizers, hidden_act):
  reference, module, params = build_pair(hidden_act, True, seed=7, dtype=jnp.bfloat16)
  ids = token_ids(tokenizers[tiny_clip.END])
  ref_hidden, ref_pooled = reference_outputs(reference, ids)
  hidden, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  assert hidden.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
  for ours, ref in ((hidden, ref_hidden), (pooled, ref_pooled)):
    err, scale = max_error(ours, ref)
    assert err <= 0.03 * scale, (err, scale)


def test_shorter_sequences_and_too_long_ones():
  reference, module, params = build_pair("quick_gelu", False, seed=3)
  ids = np.array([[690, 353, 543, 608, 691, 691]], np.int32)  # fewer tokens than positions
  ref_hidden, ref_pooled = reference_outputs(reference, ids)
  hidden, pooled = module.apply({"params": params}, jnp.asarray(ids))
  assert max_error(hidden, ref_hidden)[0] <= 1e-4 * max_error(hidden, ref_hidden)[1]
  assert max_error(pooled, ref_pooled)[0] <= 1e-4 * max_error(pooled, ref_pooled)[1]
  too_long = jnp.zeros((1, tiny_clip.MODEL_MAX_LENGTH + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    module.apply({"params": params}, too_long)


def test_parameter_names_and_round_trip_is_bit_exact():
  reference = tiny_transformers_model(tiny_clip.tiny_clip_text_config("gelu"), seed=5)
  state = tiny_clip.checkpoint_state_dict(reference)
  module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(reference.config.to_dict()))
  shapes = abstract_params(module)
  assert "token_embedding" in shapes["text_model"]["embeddings"]
  assert shapes["text_model"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
  assert shapes["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].shape == (32, 128)
  back = weights.flax_to_torch(weights.torch_to_flax(state, shapes))
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert back[key].tobytes() == value.tobytes(), key


def test_transformers_state_dict_has_no_buffers():
  # transformers v5 keeps `position_ids` as a non-persistent buffer; nothing but parameters
  # reaches the state dict (old checkpoints may still carry it; the pipeline loader drops it).
  model = tiny_transformers_model(tiny_clip.tiny_clip_text_config(), seed=0)
  assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


# --------------------------------------------------------------------------------------
# Config parsing

# The text encoder config of an SD 2.x checkpoint (OpenCLIP ViT-H text tower), as on the hub.
SD2_TEXT_ENCODER_CONFIG = {
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
    "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408,
}

# What transformers v4 wrote for every PreTrainedConfig (generation settings included).
V4_GENERIC_KEYS = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1,
    "num_beams": 1, "num_return_sequences": 1, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "prefix": None, "problem_type": None,
    "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0,
    "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": True,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False, "typical_p": 1.0,
    "use_bfloat16": False,
}


def test_from_dict_reads_hub_configs():
  sd2 = clip.CLIPTextConfig.from_dict(SD2_TEXT_ENCODER_CONFIG)
  assert sd2 == clip.CLIPTextConfig(
      vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
      layer_norm_eps=1e-5, eos_token_id=2)
  sd1 = clip.CLIPTextConfig.from_dict(dict(
      SD2_TEXT_ENCODER_CONFIG, **V4_GENERIC_KEYS, hidden_act="quick_gelu", hidden_size=768,
      intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768))
  assert (sd1.hidden_act, sd1.num_hidden_layers, sd1.hidden_size) == ("quick_gelu", 12, 768)
  # transformers' defaults fill absent keys, and its own current serialisation is accepted.
  import transformers
  assert clip.CLIPTextConfig.from_dict({}) == clip.CLIPTextConfig.from_dict(
      transformers.CLIPTextConfig().to_dict())


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "relu"),
    ("hidden_act", "gelu_new"),
    ("architectures", ["CLIPTextModelWithProjection"]),
    ("model_type", "clip"),
    ("eos_token_id", None),
    ("eos_token_id", [2, 49407]),
    ("layer_norm_eps", None),
    ("pruned_heads", {"0": [1]}),
    ("use_attention_mask", True),
    ("position_embedding_type", "rotary"),  # unknown to CLIPTextModel: never ignored
])
def test_unsupported_config_names_key_and_value(key, value):
  with pytest.raises(UnsupportedConfigError) as info:
    clip.CLIPTextConfig.from_dict(dict(SD2_TEXT_ENCODER_CONFIG, **{key: value}))
  assert key in str(info.value) and repr(value) in str(info.value)


def test_heads_must_divide_width():
  with pytest.raises(UnsupportedConfigError, match="num_attention_heads"):
    clip.CLIPTextConfig.from_dict(dict(SD2_TEXT_ENCODER_CONFIG, num_attention_heads=3))


# --------------------------------------------------------------------------------------
# Tokenizer


def test_tokenize_matches_diffusers_call(tokenizers):
  for tokenizer in tokenizers.values():
    ours = tokenize(tokenizer, PROMPTS)
    # The call StableDiffusionPipeline.encode_prompt makes.
    theirs = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), tiny_clip.MODEL_MAX_LENGTH)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:, 0] == tokenizer.bos_token_id).all()
    assert ours[2, -1] == tokenizer.eos_token_id  # truncated, end token kept
    assert tokenize(tokenizer, PROMPTS[:1], max_length=10).shape == (1, 10)
    assert tokenize(tokenizer, []).shape == (0, tiny_clip.MODEL_MAX_LENGTH)


def test_tiny_tokenizer_makes_whole_words(tokenizers):
  tokenizer = tokenizers["!"]
  vocab = tokenizer.get_vocab()
  words = "a red circle on a blue background".split()
  expected = ([tokenizer.bos_token_id] + [vocab[w + "</w>"] for w in words]
              + [tokenizer.eos_token_id] + [vocab["!"]] * (tiny_clip.MODEL_MAX_LENGTH - 9))
  np.testing.assert_array_equal(tokenize(tokenizer, [PROMPTS[0]])[0], expected)
  assert vocab["!"] == 0 and tokenizer.eos_token_id == max(vocab.values())
  assert len(vocab) == tiny_clip.tiny_vocab_size() == tiny_clip.tiny_clip_text_config().vocab_size


def test_load_tokenizer(tmp_path, tokenizers):
  folder = tiny_clip.write_tiny_tokenizer(str(tmp_path / "tokenizer"))
  loaded = load_tokenizer(folder)
  np.testing.assert_array_equal(tokenize(loaded, PROMPTS), tokenize(tokenizers[tiny_clip.END], PROMPTS))
  assert loaded.model_max_length == tiny_clip.MODEL_MAX_LENGTH


def test_load_tokenizer_missing_files(tmp_path):
  with pytest.raises(LcmJaxError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "vocab.json").write_text("{}")
  with pytest.raises(LcmJaxError, match="merges.txt"):
    load_tokenizer(str(tmp_path / "empty"))
