"""A CLIP BPE tokenizer whose vocabulary is the toy domain's words.

`write_tokenizer(folder)` writes the files of a diffusers `tokenizer/` folder (vocab.json,
merges.txt, special_tokens_map.json, tokenizer_config.json) that transformers'
`CLIPTokenizer` reads. The layout is OpenAI CLIP's: the 256 byte-level characters, the same
with the end-of-word marker `</w>`, one entry per merge, then `<|startoftext|>` and
`<|endoftext|>` (the largest id, as in CLIP). The merges make every domain word one token;
any other text still tokenizes, character by character, so a prompt outside the vocabulary
is not an error (the text encoder just has never seen it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lcm_jax.toy.domain import VOCABULARY

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# The longest caption is 10 words + start + end; 16 leaves room and keeps the encoder tiny.
MODEL_MAX_LENGTH = 16


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


def vocab_and_merges(words: Sequence[str] = VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The vocabulary (token -> id, CLIP's order) and the ordered merges that make each word one token."""
  merges = merges_for(words)
  alphabet = byte_alphabet()
  tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [START, END]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_tokenizer(folder: str, words: Sequence[str] = VOCABULARY,
                    model_max_length: int = MODEL_MAX_LENGTH, pad_token: str = END) -> str:
  """Writes the tokenizer files to `folder` and returns it.

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


def vocab_size(words: Sequence[str] = VOCABULARY) -> int:
  """The number of tokens `write_tokenizer(words=words)` writes."""
  return len(vocab_and_merges(words)[0])
