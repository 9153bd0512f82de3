"""A tiny CLIP tokenizer and text-encoder config, built at test time (no downloads).

`write_tiny_tokenizer(folder)` writes a diffusers `tokenizer/` folder in OpenAI CLIP's BPE
layout (`lcm_jax.tokenizer.write_word_tokenizer` with the word list below):
every word of `WORDS` is a single token; any other text still tokenizes, letter by letter.

`tiny_clip_text_config(...)` is a transformers `CLIPTextConfig` whose vocabulary and special
token ids match that tokenizer.
"""

from __future__ import annotations

import numpy as np

from lcm_jax.tokenizer import END, START, vocab_and_merges, write_word_tokenizer

# Short, so that tiny models stay tiny; long enough to show padding and truncation.
MODEL_MAX_LENGTH = 16

# Words of the toy text-to-image domain and of the tests' prompts; each becomes one token.
WORDS = (
    "a", "an", "the", "on", "in", "of", "with", "and", "photo", "picture", "drawing", "image",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray",
    "brown", "small", "large", "big", "tiny", "dark", "light", "bright",
    "circle", "square", "triangle", "star", "ring", "cross", "stripe", "stripes", "dot", "dots",
    "background", "left", "right", "top", "bottom", "center", "middle", "corner",
    "cat", "dog", "tree", "house", "sky", "sea", "sun", "moon",
)


def tiny_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary (token -> id) and the ordered merge list of the tiny tokenizer."""
  return vocab_and_merges(words)


def write_tiny_tokenizer(folder: str, *, pad_token: str = END,
                         model_max_length: int = MODEL_MAX_LENGTH) -> str:
  """Writes a working CLIP tokenizer folder and returns its path.

  pad_token: "<|endoftext|>" as in SD 1.x's tokenizer, or "!" as in SD 2.x's.
  """
  return write_word_tokenizer(folder, WORDS, model_max_length, pad_token)


def tiny_vocab_size() -> int:
  return len(tiny_vocab_and_merges()[0])


def tiny_clip_text_config(hidden_act: str = "quick_gelu", *, hidden_size: int = 32,
                          num_hidden_layers: int = 2, num_attention_heads: int = 4,
                          intermediate_size: int | None = None,
                          max_position_embeddings: int = MODEL_MAX_LENGTH,
                          legacy_eos_token_id: bool = False, **kwargs):
  """A transformers `CLIPTextConfig` matching the tiny tokenizer.

  legacy_eos_token_id: write `eos_token_id=2` as SD 1.x/2.x checkpoints do (transformers then
  pools at the largest token id) instead of the tokenizer's real `<|endoftext|>` id.
  """
  import transformers
  vocab, _ = tiny_vocab_and_merges()
  return transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads,
      intermediate_size=intermediate_size or 4 * hidden_size,
      max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
      bos_token_id=0 if legacy_eos_token_id else vocab[START],
      eos_token_id=2 if legacy_eos_token_id else vocab[END],
      pad_token_id=1, projection_dim=hidden_size, **kwargs)


def checkpoint_state_dict(model) -> dict[str, np.ndarray]:
  """A transformers CLIPTextModel's weights as NumPy arrays, named as in hub checkpoints.

  transformers v5 keeps CLIPTextModel's modules at the top level (`embeddings.…`) and adds
  the `text_model.` prefix back only when it saves a model that was loaded from a checkpoint
  with it; SD checkpoints on the hub all have it (`text_model.embeddings.…`), which is the
  naming `lcm_jax.models.clip` follows. Non-persistent buffers (`position_ids`) are not in
  the state dict.
  """
  out = {}
  for key, tensor in model.state_dict().items():
    key = key if key.startswith("text_model.") else "text_model." + key
    out[key] = tensor.detach().cpu().numpy()
  return out
