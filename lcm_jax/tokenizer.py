"""The CLIP tokenizer of a diffusers pipeline, and prompt -> token ids as diffusers makes them.

A thin wrapper over transformers' `CLIPTokenizer` (which needs no PyTorch): `load_tokenizer`
reads a pipeline's `tokenizer/` folder offline, and `tokenize` pads and truncates every
prompt to the tokenizer's `model_max_length` (77 for SD), as `StableDiffusionPipeline` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lcm_jax.errors import LcmJaxError

# Either the BPE files CLIP's tokenizer was released with, or a fast-tokenizer file.
_BPE_FILES = ("vocab.json", "merges.txt")
_FAST_FILE = "tokenizer.json"


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
  from transformers import CLIPTokenizer  # Imported late: it takes seconds and most callers never need it.
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
