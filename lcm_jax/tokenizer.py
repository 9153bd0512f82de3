"""The CLIP tokenizer of a diffusers pipeline, and prompt -> token ids as diffusers makes them.

A thin wrapper over transformers' `CLIPTokenizer` (which needs no PyTorch): `load_tokenizer`
reads a pipeline's `tokenizer/` folder offline, and `tokenize` pads and truncates every
prompt to the tokenizer's `model_max_length` (77 for SD), as `StableDiffusionPipeline` does.
`write_word_tokenizer` writes a CLIP tokenizer folder for a closed vocabulary of words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from lcm_jax.errors import LcmJaxError

# Either the BPE files CLIP's tokenizer was released with, or a fast-tokenizer file.
_BPE_FILES = ("vocab.json", "merges.txt")
_FAST_FILE = "tokenizer.json"
START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def load_tokenizer(folder: str):
  """Loads the transformers `CLIPTokenizer` in `folder` (a pipeline's `tokenizer/`), offline.

  Raises:
    LcmJaxError if the folder or its vocabulary files are missing or cannot be read.
  """
  if not os.path.isdir(folder):
    raise LcmJaxError(f"tokenizer folder {folder} does not exist; a diffusers pipeline keeps "
                      f"its CLIP tokenizer in <pipeline>/tokenizer/ ({', '.join(_BPE_FILES)}).")
  present = set(os.listdir(folder))
  if _FAST_FILE not in present and not set(_BPE_FILES) <= present:
    missing = ", ".join(f for f in _BPE_FILES if f not in present)
    raise LcmJaxError(f"tokenizer folder {folder} has no {missing} (nor {_FAST_FILE}); "
                      f"it is not a CLIP tokenizer folder.")
  # lcm-jax uses transformers for the tokenizer only; without torch, transformers would print
  # an advisory that "models won't be available" on import, which does not concern us.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import (
    CLIPTokenizer,  # Imported late: it takes seconds and most callers never need it.
  )
  try:
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise LcmJaxError(f"cannot read the CLIP tokenizer in {folder}: {e}") from e


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
  """prompts (B strings) -> token ids [B, L] int32, L = max_length or `tokenizer.model_max_length`.

  Each row is <|startoftext|>, the prompt's tokens truncated to L - 2, <|endoftext|>, then
  the pad token; the same ids as diffusers' `tokenizer(prompt, padding="max_length",
  max_length=tokenizer.model_max_length, truncation=True)`.
  """
  if isinstance(prompts, str):
    raise TypeError("tokenize takes a list of prompts, not one string")
  length = tokenizer.model_max_length if max_length is None else max_length
  if not prompts:  # transformers' batch call fails on an empty list
    return np.zeros((0, length), np.int32)
  ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                  return_tensors="np").input_ids
  return np.asarray(ids, dtype=np.int32).reshape(len(prompts), length)


# ---------------------------------------------------------------------------------------
# Writing a closed-vocabulary CLIP tokenizer.

def byte_alphabet() -> list[str]:
  """CLIP's (GPT-2's) byte-level alphabet in vocabulary order: 256 printable characters.

  Printable Latin-1 bytes stand for themselves, in byte order; the remaining bytes (space,
  controls, ...) are mapped to code points 256 and up.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in set(printable)]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _apply_merges(pieces: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
  """BPE as CLIPTokenizer runs it: merge the best-ranked adjacent pair until none is ranked."""
  while len(pieces) > 1:
    pairs = list(zip(pieces, pieces[1:]))
    best = min(pairs, key=lambda p: rank.get(p, len(rank) + 1))
    if best not in rank:
      return pieces
    out, i = [], 0
    while i < len(pieces):
      if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
        out.append(pieces[i] + pieces[i + 1])
        i += 2
      else:
        out.append(pieces[i])
        i += 1
    pieces = out
  return pieces


def merges_for(words: Sequence[str]) -> list[tuple[str, str]]:
  """Ordered merges under which each word (lower-case ASCII) becomes one token.

  Words are taken in order; for each, the merge of its current first two pieces is appended
  until it is one piece. A new merge ranks below every earlier one, and an earlier word is
  already whole before the new merge could apply, so earlier words stay single tokens.
  """
  rank: dict[tuple[str, str], int] = {}
  for word in words:
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces := _apply_merges(pieces, rank)) > 1:
      rank[(pieces[0], pieces[1])] = len(rank)
  return sorted(rank, key=rank.get)


def vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary (token -> id, CLIP's order) and the ordered merges that make each word one token."""
  merges = merges_for(words)
  alphabet = byte_alphabet()
  tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [START, END]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_word_tokenizer(folder: str, words: Sequence[str], model_max_length: int, pad_token: str = END) -> str:
  """Writes a CLIP tokenizer folder in which each of `words` is one token, and returns it.

  The files are those of a diffusers `tokenizer/` folder (vocab.json, merges.txt,
  special_tokens_map.json, tokenizer_config.json) that transformers' `CLIPTokenizer` reads,
  in OpenAI CLIP's layout: the 256 byte-level characters, the same with the end-of-word
  marker `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>` (the largest
  id, as in CLIP). Any other text still tokenizes, character by character. Used for small
  closed-vocabulary models (the toy domain's, the tests' tiny pipelines).

  pad_token: "<|endoftext|>" as SD 1.x's tokenizer (the default), or "!" as SD 2.x's.
  """
  vocab, merges = vocab_and_merges(words)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
  with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f)
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length,
                   do_lower_case=True, errors="replace", add_prefix_space=False), f)
  return folder
