"""The toy domain's CLIP tokenizer: every word of the domain's vocabulary is one token.

`write_tokenizer(folder)` writes it with `lcm_jax.tokenizer.write_word_tokenizer`; any other
text still tokenizes, character by character, so a prompt outside the vocabulary is not an
error (the text encoder just has never seen it).
"""

from __future__ import annotations

from collections.abc import Sequence

from lcm_jax.tokenizer import END, vocab_and_merges, write_word_tokenizer
from lcm_jax.toy.domain import VOCABULARY

# The longest caption is 10 words + start + end; 16 leaves room and keeps the encoder tiny.
MODEL_MAX_LENGTH = 16


def write_tokenizer(folder: str, words: Sequence[str] = VOCABULARY, model_max_length: int = MODEL_MAX_LENGTH,
                    pad_token: str = END) -> str:
  """Writes the toy tokenizer files to `folder` and returns it."""
  return write_word_tokenizer(folder, words, model_max_length, pad_token)


def vocab_size(words: Sequence[str] = VOCABULARY) -> int:
  """The number of tokens `write_tokenizer(words=words)` writes."""
  return len(vocab_and_merges(words)[0])
