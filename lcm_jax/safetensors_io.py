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
# The safetensors format caps its JSON header at 100 MB.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile(Mapping):
  """A read-only, lazy mapping name -> np.ndarray over one `.safetensors` file."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        # The length comes from the file: bound it before reading (a damaged or hostile
        # header must not make us allocate 2^62 bytes).
        if n > min(size - 8, MAX_HEADER_BYTES):
          raise WeightsError(f"{self.path}: not a readable safetensors file (its header claims {n} bytes; the file "
                             f"has {size} bytes and headers are at most {MAX_HEADER_BYTES})")
        header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WeightsError(f"{self.path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
      raise WeightsError(f"{self.path}: not a readable safetensors file (its header is not a JSON object)")
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._data_start = 8 + n
    for name, info in header.items():
      self._check_entry(name, info, size - self._data_start)

  def _check_entry(self, name: str, info, data_bytes: int) -> None:
    """Every tensor's dtype, shape and byte range must be consistent and inside the file."""
    try:
      dtype = _DTYPES.get(info["dtype"])
      shape = [int(d) for d in info["shape"]]
      begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise WeightsError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if dtype is None:
      raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise WeightsError(f"{self.path}: tensor {name!r}: shape {shape} ({info['dtype']}) does not match its byte "
                         f"range [{begin}, {end})")
    if end > data_bytes:
      raise WeightsError(f"{self.path}: file is truncated (tensor {name!r} ends at byte {end} of {data_bytes})")

  def __getitem__(self, name: str) -> np.ndarray:
    info = self._header[name]
    dtype = _DTYPES[info["dtype"]]  # checked at open
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
