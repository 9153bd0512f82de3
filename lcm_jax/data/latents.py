"""The latent cache written by `python -m lcm_jax.cache_latents`: layout, metadata, decoding.

A cache is a folder with ArrayRecord shards `latents-00000.array_record`, ... and
`metadata.json` (written last, so its presence means the cache is complete). Each record is
the bytes of, in this order and in the stored dtype (`metadata["dtype"]`, little-endian):

  latent_mean    [h, w, C]   the VAE posterior mean (unscaled)
  latent_logvar  [h, w, C]   its log-variance (clamped to [-30, 20] as diffusers does)
  context        [L, D]      the text encoder's last hidden state for the tokenized caption

followed by the caption as UTF-8 (the rest of the record). Training samples
z = mean + exp(logvar / 2) n and multiplies it by `metadata["vae_scaling_factor"]`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from lcm_jax import jsonfile
from lcm_jax.errors import LcmJaxError

METADATA_FILE = "metadata.json"
FORMAT_NAME = "lcm_jax.latents"
FORMAT_VERSION = 1
FIELDS = ("latent_mean", "latent_logvar", "context")
DTYPES = ("float32", "float16")


def shard_name(number: int) -> str:
  return f"latents-{number:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class LatentsLayout:
  """Shapes and stored dtype of one cache record."""
  latent_shape: tuple[int, int, int]  # (h, w, C)
  text_shape: tuple[int, int]  # (L, D)
  dtype: str = "float32"

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {"latent_mean": self.latent_shape, "latent_logvar": self.latent_shape, "context": self.text_shape}

  @property
  def array_bytes(self) -> int:
    itemsize = np.dtype(self.dtype).itemsize
    return sum(int(np.prod(s)) * itemsize for s in self.shapes().values())

  def encode(self, arrays: dict[str, np.ndarray], caption: str = "") -> bytes:
    """One example's arrays (shapes as `shapes()`) and caption -> record bytes."""
    parts = []
    for name, shape in self.shapes().items():
      a = np.asarray(arrays[name])
      if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, the cache's layout says {shape}")
      parts.append(a.astype(np.dtype(self.dtype).newbyteorder("<")).tobytes())
    return b"".join(parts) + caption.encode("utf-8")

  def decode(self, record: bytes) -> tuple[dict[str, np.ndarray], str]:
    """Record bytes -> ({name: float32 array}, caption). Raises ValueError if it is too short."""
    if len(record) < self.array_bytes:
      raise ValueError(f"record has {len(record)} bytes, fewer than the {self.array_bytes} its arrays need")
    dtype = np.dtype(self.dtype).newbyteorder("<")
    arrays, offset = {}, 0
    for name, shape in self.shapes().items():
      count = int(np.prod(shape))
      arrays[name] = np.frombuffer(record, dtype, count, offset).reshape(shape).astype(np.float32)
      offset += count * dtype.itemsize
    return arrays, record[offset:].decode("utf-8", errors="replace")


def layout_from_metadata(metadata: dict) -> LatentsLayout:
  return LatentsLayout(tuple(metadata["latent_shape"]), tuple(metadata["text_shape"]), metadata["dtype"])


def write_metadata(folder: str, metadata: dict) -> None:
  with open(os.path.join(folder, METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
    f.write("\n")


def read_metadata(folder: str) -> dict:
  """The metadata.json of a latent cache folder, checked.

  Raises:
    LcmJaxError if the folder is not a complete cache written by this version.
  """
  path = os.path.join(folder, METADATA_FILE)
  if not os.path.isdir(folder):
    raise LcmJaxError(f"latent cache {folder} does not exist (write one with python -m lcm_jax.cache_latents)")
  metadata = jsonfile.read_json(path, missing=f"{folder} has no {METADATA_FILE}: not a latent cache, or "
                                              "cache_latents did not finish")
  if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
    raise LcmJaxError(f"{path} is not a version-{FORMAT_VERSION} lcm-jax latent cache "
                      f"(format={metadata.get('format')!r}, version={metadata.get('version')!r})")
  missing = [s for s in metadata["shards"] if not os.path.isfile(os.path.join(folder, s))]
  if missing:
    raise LcmJaxError(f"latent cache {folder} is missing shards: {', '.join(missing)}")
  return metadata


class LatentCacheSource:
  """The records of a cache's shards, by random access: {"id", "source", "index", "data": bytes,
  "error"}."""

  def __init__(self, folder: str, shards: list[str]):
    import grain
    self.folder = folder
    self._source = grain.sources.ArrayRecordDataSource([os.path.join(folder, s) for s in shards])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    where = {"id": f"{self.folder}[{index}]", "source": self.folder, "index": int(index)}
    try:
      return {**where, "data": self._source[index], "error": None}
    except Exception as e:  # ArrayRecord raises RuntimeError/OSError etc. for damaged chunks
      return {**where, "data": None, "error": f"cannot read: {type(e).__name__}: {e}"}


class LatentsExample:
  """grain map transform: a `LatentCacheSource` record -> {"latent_mean", "latent_logvar",
  "context"} (float32, shapes as the layout says), or a skip marker for a damaged record."""

  def __init__(self, layout: LatentsLayout):
    self.layout = layout

  def __call__(self, record: dict) -> dict:
    from lcm_jax.data.preprocess import skip_marker
    if record["error"]:
      return skip_marker(record, record["error"])
    try:
      arrays, _ = self.layout.decode(record["data"])
    except ValueError as e:
      return skip_marker(record, f"damaged latent record: {e}")
    return arrays
