"""Reading and writing `.safetensors` files with NumPy only (no torch, no copies).

The format is 8 bytes of little-endian header length, a JSON header mapping each tensor
name to {dtype, shape, data_offsets}, then the raw little-endian bytes. Reading hands out
one tensor at a time, read straight from the file (no memory map: mapped pages would stay
resident and double the host memory of a large load), so loading a model holds the model
plus a tensor or two in host memory. bfloat16 is read and written through `ml_dtypes`
(a JAX dependency), which `safetensors.numpy` cannot do.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from lcm_jax.errors import WeightsError

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile(Mapping):
  """A read-only, lazy mapping name -> np.ndarray over one `.safetensors` file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WeightsError(f"{self.path}: not a readable safetensors file ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._data_start = 8 + n

  def __getitem__(self, name: str) -> np.ndarray:
    info = self._header[name]
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      raw = f.read(end - begin)
    if len(raw) != end - begin:
      raise WeightsError(f"{self.path}: file is truncated (tensor {name!r})")
    return np.frombuffer(raw, dtype=dtype).reshape(info["shape"])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)


class ShardedSafetensors(Mapping):
  """The union of several safetensors files (a sharded checkpoint) as one mapping."""

  def __init__(self, paths: list[str]):
    self.files = [SafetensorsFile(p) for p in paths]
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for name in f:
        if name in self._where:
          raise WeightsError(f"tensor {name!r} appears in both {self._where[name].path} and {f.path}")
        self._where[name] = f

  def __getitem__(self, name: str) -> np.ndarray:
    return self._where[name][name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array) to `path` in the safetensors format."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order="C")  # keeps 0-d arrays 0-d (ascontiguousarray makes them 1-d)
    if a.dtype.newbyteorder("<") != a.dtype and a.dtype.byteorder not in ("=", "|", "<"):
      a = a.astype(a.dtype.newbyteorder("<"))
    dt = _NAMES.get(np.dtype(a.dtype))
    if dt is None:
      raise WeightsError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
    header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes(order="C"))
  os.replace(tmp, path)
