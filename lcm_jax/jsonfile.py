"""Reading JSON files whose size we do not control, with a bound.

JSON has no length header to check, so the bound is on the file: a config, an index or a
state file of more than `MAX_JSON_BYTES` is refused before it is read, instead of being
parsed into memory (a damaged or hostile file must not make us allocate gigabytes).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lcm_jax.errors import LcmJaxError

# The largest JSON file read whole: diffusers configs are a few KiB, a sharded checkpoint's
# index a few MiB; a data iterator's state is small.
MAX_JSON_BYTES = 64 * 2**20


def check_size(path: str, size: int, max_bytes: int | None = None) -> None:
  """Raises LcmJaxError if a JSON file of `size` bytes is over `max_bytes` (default MAX_JSON_BYTES)."""
  max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
  if size > max_bytes:
    raise LcmJaxError(f"{path} is {size} bytes, more than the {max_bytes} bytes a JSON file "
                      "read here may have: it is damaged or not the file expected")


def read_json(path: str | os.PathLike, *, max_bytes: int | None = None,
              missing: str | None = None) -> Any:
  """The parsed content of the JSON file at `path`.

  missing: the message when the file does not exist (default: "<path> is missing").

  Raises:
    LcmJaxError: the file is missing, over `max_bytes`, unreadable or not JSON.
  """
  path = os.fspath(path)
  max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
  try:
    with open(path, "rb") as f:
      check_size(path, os.fstat(f.fileno()).st_size, max_bytes)
      return json.loads(f.read(max_bytes + 1))
  except FileNotFoundError:
    raise LcmJaxError(missing or f"{path} is missing") from None
  except IsADirectoryError:
    raise LcmJaxError(f"{path} is a folder, not a JSON file") from None
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
    raise LcmJaxError(f"{path} cannot be read as JSON: {e}") from None
