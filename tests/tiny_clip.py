"""A tiny CLIP tokenizer and text-encoder config, built at test time (no downloads).

`write_tiny_tokenizer(folder)` writes the four files of a diffusers `tokenizer/` folder
(vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json) in the layout of
OpenAI CLIP's BPE: the 256 byte-level base characters, the same 256 with the end-of-word
marker `</w>`, one vocabulary entry per merge, then `<|startoftext|>` and `<|endoftext|>`
last (so, as in real CLIP, the end token has the highest id). The merges are chosen so that
every word of `WORDS` is a single token; any other text still tokenizes, letter by letter.

`tiny_clip_text_config(...)` is a transformers `CLIPTextConfig` whose vocabulary and special
token ids match that tokenizer.
"""

from __future__ import annotations

import json
import os

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
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


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP byte-level alphabet: each byte -> a printable unicode character.

  Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are moved to
  code points 256 and up, so no base character is whitespace or a control character.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  others = [b for b in range(256) if b not in printable]
  # Insertion order is CLIP's vocabulary order: printable bytes first, so "!" gets id 0
  # (SD 2.x's pad token).
  mapping = {b: chr(b) for b in printable}
  mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
  return mapping


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """Applies BPE merges (lowest rank first, every occurrence) until none applies."""
  while len(symbols) > 1:
    pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def tiny_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary (token -> id) and the ordered merge list of the tiny tokenizer."""
  base = list(bytes_to_unicode().values())
  ranks: dict[tuple[str, str], int] = {}
  for word in words:
    initial = list(word[:-1]) + [word[-1] + END_OF_WORD]
    # Adding a merge of lower priority than all earlier ones never changes how earlier words
    # tokenize (they finish before it could apply), so merging the current first two pieces
    # until the word is one token keeps every earlier word whole too.
    while len(pieces := _bpe(initial, ranks)) > 1:
      ranks[(pieces[0], pieces[1])] = len(ranks)
  merges = sorted(ranks, key=ranks.get)
  tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [START, END]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_tiny_tokenizer(folder: str, *, pad_token: str = END,
                         model_max_length: int = MODEL_MAX_LENGTH) -> str:
  """Writes a working CLIP tokenizer folder and returns its path.

  pad_token: "<|endoftext|>" as in SD 1.x's tokenizer, or "!" as in SD 2.x's.
  """
  vocab, merges = tiny_vocab_and_merges()
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
  with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f)
  config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                do_lower_case=True, errors="replace", add_prefix_space=False)
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return folder


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
