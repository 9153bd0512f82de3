"""Random-access sources of raw image-caption records: webdataset tars, image folders, TFDS.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose records are
plain dicts, the same for every format:

  {"id": str,                      # where the record lives, for messages
   "source": str, "index": int | None,   # the file or data set it is in, and its index there
   "image": bytes | np.ndarray | None,   # encoded file bytes, or decoded [H, W, C] uint8 (TFDS)
   "caption": str | list[str] | None,
   "error": str | None}            # why the record cannot be used (read failure, missing part)

A source never raises for one bad record: it returns the record with `error` set, and the
pipeline skips and counts it. Files are read through fsspec, so a path may be local or remote
(`gs://`, `s3://`, `memory://`, ... with the filesystem package installed).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence

import numpy as np
from absl import logging

from lcm_jax.errors import LcmJaxError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Shards indexed at once: remote reads are latency-bound, so threads overlap them.
_INDEX_THREADS = 16
# The largest tar members read: a header's size field is not trusted beyond these (nor
# beyond the end of the shard).
MAX_IMAGE_BYTES = 256 << 20
MAX_CAPTION_BYTES = 1 << 20


def raw_record(record_id: str, *, source: str | None = None, index: int | None = None, image=None, caption=None,
               error: str | None = None) -> dict:
  """The record dict every source returns (see the module docstring); `source` defaults to the id."""
  return {"id": record_id, "source": record_id if source is None else source,
          "index": None if index is None else int(index), "image": image, "caption": caption, "error": error}


# ----------------------------------------------------------------------------- paths


def expand_braces(pattern: str) -> list[str]:
  """Expands webdataset-style braces: `a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar.

  `{x..y}` is a numeric range (zero-padded to the width of `x` when `x` has a leading zero or
  both ends have the same width); `{a,b,c}` is a list. Several groups multiply out, left to
  right; a pattern without braces is returned as it is.
  """
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match is None:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    lo, hi = numeric.groups()
    width = len(lo) if len(lo) == len(hi) or lo.startswith("0") else 0
    step = 1 if int(hi) >= int(lo) else -1
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  elif "," in body:
    options = body.split(",")
  else:  # `{abc}` is no pattern; keep it literally (glob does not treat braces specially)
    return [head + "{" + body + "}" + t for t in expand_braces(tail)]
  return [head + o + t for o in options for t in expand_braces(tail)]


def filesystem(path: str):
  """(fsspec filesystem, path inside it) for a local path or URL.

  Raises:
    LcmJaxError: the protocol is unknown, or its fsspec implementation is not installed.
  """
  try:
    import fsspec
  except ImportError:
    raise LcmJaxError(f"reading {path} needs fsspec: pip install fsspec") from None
  try:
    return fsspec.core.url_to_fs(path)
  except ImportError as e:  # fsspec knows the protocol but its package is missing
    raise LcmJaxError(f"cannot read {path}: {e} (for gs:// run `pip install gcsfs`, for s3:// "
                      "`pip install s3fs`)") from None
  except ValueError as e:
    raise LcmJaxError(f"cannot read {path}: {e}") from None


def display_path(fs, path: str) -> str:
  """A path as the user would write it: plain for local files, a URL otherwise."""
  protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
  return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def find_files(path: str, extensions: Sequence[str], what: str):
  """Files that `path` names: a file, a folder (its files with `extensions`), a glob, braces.

  Returns:
    (fs, sorted list of paths inside fs).
  Raises:
    LcmJaxError if nothing matches.
  """
  if not path:
    raise LcmJaxError(f"data path is empty; set data.path to the {what}")
  patterns = expand_braces(path)
  fs, _ = filesystem(patterns[0])
  found: set[str] = set()
  for pattern in patterns:
    _, inner = filesystem(pattern)
    if any(c in inner for c in "*?["):
      found.update(p for p, info in fs.glob(inner, detail=True).items() if info.get("type") == "file")
    elif fs.isdir(inner):
      found.update(info["name"] for info in fs.ls(inner, detail=True)
                   if info.get("type") == "file" and info["name"].rsplit(".", 1)[-1].lower() in extensions)
    elif fs.isfile(inner):
      found.add(inner)
  if not found:
    kinds = ", ".join("." + e for e in extensions)
    raise LcmJaxError(f"data path {path} matches no {what} (looked for a file, a folder of {kinds} "
                      "files, a glob or a {a..b} brace pattern)")
  return fs, sorted(found)


# ----------------------------------------------------------------------------- webdataset tars


@dataclasses.dataclass
class TarShardIndex:
  """Where each sample of one tar shard lives. Arrays have one entry per sample (key).

  Offsets and sizes are in bytes; -1 marks a missing member. `error` is set (and the arrays
  are empty) when the shard cannot be read at all.
  """
  path: str
  keys: list[str]
  image_offset: np.ndarray  # int64
  image_size: np.ndarray  # int64
  caption_offset: np.ndarray  # int64
  caption_size: np.ndarray  # int64
  error: str | None = None
  file_size: int = -1  # bytes in the shard (-1: unknown)

  def __len__(self) -> int:
    # An unreadable shard still counts as one (skipped) record, so it is reported every epoch.
    return 1 if self.error else len(self.keys)

  def member_error(self, i: int) -> str | None:
    """Why sample i's image or caption member cannot be read as its header says (a size past
    the end of the shard, or over the limit), or None."""
    for what, offset, size, limit in (("image", self.image_offset[i], self.image_size[i], MAX_IMAGE_BYTES),
                                      ("caption", self.caption_offset[i], self.caption_size[i], MAX_CAPTION_BYTES)):
      if 0 <= self.file_size < offset + size:
        return (f"the {what} member is truncated: its header says {size} bytes from byte {offset}, past "
                f"the end of the shard ({self.file_size} bytes)")
      if size > limit:
        return f"the {what} member has {size} bytes, over the limit of {limit} bytes"
    return None


class _BoundedReader:
  """A file object whose reads never ask for more than the bytes left in the file, so that no
  length field of a tar header (a GNU long name, a pax header) makes tarfile allocate more
  memory than the file holds."""

  def __init__(self, f, size: int):
    self._f, self._size = f, size

  def read(self, n: int | None = -1) -> bytes:
    left = max(0, self._size - self._f.tell())
    return self._f.read(left if n is None or n < 0 else min(n, left))

  def __getattr__(self, name):
    return getattr(self._f, name)


def split_member_name(name: str) -> tuple[str, str]:
  """Tar member name -> (key, extension) as webdataset groups them: `dir/00001.seg.png` ->
  (`dir/00001`, `seg.png`); the key ends at the first dot of the base name."""
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return posixpath.join(folder, stem) if folder else stem, ext.lower()


def index_tar_shard(fs, path: str, image_extensions: Sequence[str], caption_extension: str) -> TarShardIndex:
  """Reads the member headers of one uncompressed tar (seeking over the data) and groups the
  members into samples by key; the image is the first of `image_extensions` present."""
  samples: dict[str, dict[str, tuple[int, int]]] = {}
  error, file_size = None, -1
  try:
    file_size = int(fs.size(path))
    with fs.open(path, "rb") as f:
      with tarfile.open(fileobj=_BoundedReader(f, file_size), mode="r:") as tar:
        while True:
          try:
            member = tar.next()
          except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or damaged tail
            logging.warning("tar shard %s: stopped reading headers after %d samples: %s",
                            display_path(fs, path), len(samples), e)
            break
          if member is None:
            break
          if member.isfile():
            key, ext = split_member_name(member.name)
            samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
  except (tarfile.TarError, OSError, EOFError) as e:
    error = f"cannot read tar shard (img2dataset writes uncompressed .tar files): {e}"
  if error is not None or not samples:
    if error is None:
      error = "tar shard holds no samples"
    logging.warning("tar shard %s skipped: %s", display_path(fs, path), error)
    empty = np.zeros((0,), np.int64)
    return TarShardIndex(path, [], empty, empty, empty, empty, error=error)
  keys = list(samples)
  image = [next((samples[k][e] for e in image_extensions if e in samples[k]), (-1, -1)) for k in keys]
  caption = [samples[k].get(caption_extension, (-1, -1)) for k in keys]
  image, caption = np.asarray(image, np.int64), np.asarray(caption, np.int64)
  return TarShardIndex(path, keys, image[:, 0], image[:, 1], caption[:, 0], caption[:, 1], file_size=file_size)


class TarShardSource:
  """Samples of webdataset-style tar shards (as img2dataset writes them), by random access.

  The member headers of every shard are indexed once, at construction (shards in parallel);
  then each record is two ranged reads (image, caption) through fsspec.
  """

  def __init__(self, fs, shards: Sequence[str], *, image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
               caption_extension: str = "txt"):
    self._fs = fs
    with concurrent.futures.ThreadPoolExecutor(min(_INDEX_THREADS, max(1, len(shards)))) as pool:
      self.shards = list(pool.map(
          lambda p: index_tar_shard(fs, p, image_extensions, caption_extension), shards))
    self._ends = np.cumsum([len(s) for s in self.shards]).tolist()
    self.image_extensions = tuple(image_extensions)
    self.caption_extension = caption_extension

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _read(self, path: str, offset: int, size: int) -> bytes:
    data = self._fs.cat_file(path, start=int(offset), end=int(offset + size))
    if len(data) != size:
      raise OSError(f"member is truncated ({len(data)} of {size} bytes)")
    return data

  def __getitem__(self, index: int) -> dict:
    shard_number = bisect.bisect_right(self._ends, index)
    shard = self.shards[shard_number]
    i = index - (self._ends[shard_number - 1] if shard_number else 0)
    where = display_path(self._fs, shard.path)
    if shard.error:
      return raw_record(where, source=where, error=shard.error)
    record = functools.partial(raw_record, f"{where}:{shard.keys[i]}", source=where, index=i)
    if shard.image_size[i] < 0:
      return record(error=f"no image member ({'/'.join(self.image_extensions)})")
    if shard.caption_size[i] < 0:
      return record(error=f"no caption member (.{self.caption_extension})")
    if shard.member_error(i):
      return record(error=shard.member_error(i))
    try:
      image = self._read(shard.path, shard.image_offset[i], shard.image_size[i])
      caption = self._read(shard.path, shard.caption_offset[i], shard.caption_size[i]).decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
      return record(error=f"cannot read: {e}")
    return record(image=image, caption=caption)


# ----------------------------------------------------------------------------- image folders

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _read_metadata_rows(fs, path: str) -> list[dict | str]:
  """Rows of a metadata.jsonl / metadata.csv file: dicts, or an error string per bad line."""
  text = fs.cat_file(path).decode("utf-8", errors="replace")
  if path.endswith(".csv"):
    import csv
    import io
    return list(csv.DictReader(io.StringIO(text)))
  rows: list[dict | str] = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      rows.append(row if isinstance(row, dict) else f"line {number} is not a JSON object")
    except json.JSONDecodeError as e:
      rows.append(f"line {number} is not JSON: {e}")
  return rows


class ImageFolderSource:
  """A folder of images with Hugging Face ImageFolder metadata (`metadata.jsonl` lines
  `{"file_name": ..., "text": ...}`, or `metadata.csv`), in any subfolder; `file_name` is
  relative to the metadata file's folder.

  Records: every image file under the folder (sorted by path; one the metadata does not
  mention is a record without caption, skipped and counted), then every metadata row that
  names no existing image or cannot be parsed (also skipped and counted).
  """

  def __init__(self, path: str, *, caption_key: str = "text"):
    if not path:
      raise LcmJaxError("data path is empty; set data.path to the image folder")
    fs, root = filesystem(path)
    if not fs.isdir(root):
      raise LcmJaxError(f"imagefolder data path {path} is not a folder")
    files = sorted(fs.find(root))
    metadata = [f for f in files if posixpath.basename(f) in METADATA_FILES]
    if not metadata:
      raise LcmJaxError(f"image folder {path} has no metadata.jsonl (lines like "
                        '{"file_name": "0001.jpg", "text": "a caption"}) or metadata.csv')
    images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    captions: dict[str, object] = {}
    orphans: list[dict] = []  # rows that cannot be matched to an image
    for meta in metadata:
      folder = posixpath.dirname(meta)
      for number, row in enumerate(_read_metadata_rows(fs, meta), 1):
        where = f"{display_path(fs, meta)} row {number}"
        if isinstance(row, str):
          orphans.append(raw_record(where, error=row))
        elif not isinstance(row.get("file_name"), str):
          orphans.append(raw_record(where, error="row has no file_name"))
        else:
          captions[posixpath.normpath(posixpath.join(folder, row["file_name"]))] = row.get(caption_key)
    image_set = set(images)
    for name in sorted(set(captions) - image_set):
      orphans.append(raw_record(display_path(fs, name), error="listed in the metadata but the file is missing"))
    self._fs = fs
    self._where = path
    self._images = images
    self._captions = [captions.get(f) for f in images]
    self._has_caption = [f in captions for f in images]
    self._orphans = orphans
    self.caption_key = caption_key

  def __len__(self) -> int:
    return len(self._images) + len(self._orphans)

  def __getitem__(self, index: int) -> dict:
    return {**self._record(index), "source": self._where, "index": int(index)}

  def _record(self, index: int) -> dict:
    if index >= len(self._images):
      return self._orphans[index - len(self._images)]
    path = self._images[index]
    record_id = display_path(self._fs, path)
    if not self._has_caption[index]:
      return raw_record(record_id, error="image has no line in the metadata (no caption)")
    caption = self._captions[index]
    if caption is None:
      return raw_record(record_id, error=f"metadata row has no {self.caption_key!r}")
    try:
      return raw_record(record_id, image=self._fs.cat_file(path), caption=caption)
    except OSError as e:
      return raw_record(record_id, error=f"cannot read: {e}")


# ----------------------------------------------------------------------------- TFDS


def import_tfds():
  """`tensorflow_datasets`, or an LcmJaxError saying how to install it."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise LcmJaxError("the tfds data format needs TensorFlow Datasets: pip install 'lcm-jax[tfds]'") from None
  return tfds


def _nested_get(example, key: str):
  """example["a"]["b"] for key "a/b"."""
  for part in key.split("/"):
    example = example[part]
  return example


class TfdsSource:
  """A TFDS split read by random access (`tfds.data_source`, ArrayRecord files)."""

  def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", caption_key: str = "caption"):
    if not name:
      raise LcmJaxError("the tfds format needs a dataset name: set data.tfds_name (or data.path)")
    tfds = import_tfds()
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises many types (DatasetNotFoundError, AssertionError, ...)
      raise LcmJaxError(f"cannot open TFDS dataset {name!r} split {split!r}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key, caption_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = functools.partial(raw_record, f"{self.name}/{self.split}[{index}]", source=f"{self.name}/{self.split}",
                               index=index)
    try:
      example = self._source[index]
    except Exception as e:  # a damaged record: any decoding error of TFDS's feature code
      return record(error=f"cannot read: {type(e).__name__}: {e}")
    try:
      image = np.asarray(_nested_get(example, self.image_key))
    except (KeyError, TypeError):
      return record(error=f"no image feature {self.image_key!r}")
    try:
      caption = _nested_get(example, self.caption_key)
    except (KeyError, TypeError):
      return record(error=f"no caption feature {self.caption_key!r}")
    return record(image=image, caption=caption)


def local_path(path: str) -> str:
  """`path` as a local file path, for readers that cannot use fsspec (ArrayRecord)."""
  fs, inner = filesystem(path)
  if display_path(fs, inner) != inner:
    raise LcmJaxError(f"{path}: latent caches are read with ArrayRecord, which needs a local path "
                      "(copy the cache to local disk, or mount the bucket with gcsfuse)")
  return os.path.abspath(inner)
