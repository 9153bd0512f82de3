"""Per-process, deterministic, checkpointable training batches with grain.

The pipeline of one process (`make_train_data`):

  source (records)  -> this process's share (tar shards [p::P], or records [p::P])
  -> random_map: decode, resize, crop, flip, tokenize  (an unusable record -> skip marker)
  -> shuffle (seed; a new order every epoch) -> repeat forever -> read threads
  -> drop skip markers (counting them) -> batch -> [worker processes: everything above]
  -> float pixels -> running count of skipped records, in every batch as "num_skipped"

Every random choice is a function of (seed, process, epoch, record), so the same seed gives
the same batches; the iterator's state (`get_state`/`set_state`, JSON) resumes the exact
sequence, skip count included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from lcm_jax.data import latents as latents_lib
from lcm_jax.data import preprocess, sources
from lcm_jax.errors import LcmJaxError

FORMATS = ("wds", "imagefolder", "tfds", "latents")
IMAGE_FORMATS = ("wds", "imagefolder", "tfds")

# Format defaults for `image_key` / `caption_key` when the config leaves them "".
_DEFAULT_KEYS = {
    "wds": (",".join(sources.IMAGE_EXTENSIONS), "txt"),
    "imagefolder": ("", "text"),
    "tfds": ("image", "caption"),
    "latents": ("", ""),
}
# A run of consecutive skips this long (or 2 x the records of the process, if fewer) means
# the data is unreadable, not merely damaged here and there: stop rather than spin forever.
_MAX_CONSECUTIVE_SKIPS = 1000


def default_data_config() -> ml_collections.ConfigDict:
  """Every key `make_train_data` reads, with its default."""
  return ml_collections.ConfigDict(dict(
      # A folder, a file, a glob, a brace pattern (shard-{000..009}.tar) or a URL (gs://...).
      # For `latents`, the cache folder; for `tfds`, the dataset name if tfds_name is "".
      path="",
      format="wds",  # wds | imagefolder | tfds | latents
      center_crop=True,  # False: random crop
      random_flip=False,  # horizontal flip with probability 1/2
      num_workers=0,  # grain worker processes; 0 decodes in this process (with read threads)
      shuffle=True,  # a new global order of this process's records every epoch
      # wds: image member extensions in order of preference (default "jpg,jpeg,png,webp");
      # tfds: the image feature (default "image"); imagefolder: unused.
      image_key="",
      # wds: caption member extension (default "txt"); imagefolder: metadata column (default
      # "text"); tfds: caption feature, "a/b" for nested ones (default "caption"); a list of
      # captions (COCO) gives one at random per epoch.
      caption_key="",
      tfds_name="",
      tfds_split="train",
      data_dir="",  # TFDS data_dir ("" = TFDS's default)
      read_threads=16,  # threads reading and decoding records, per process or worker
      prefetch_buffer_size=256,  # decoded examples buffered by those threads
      worker_buffer_size=2,  # batches buffered per worker process
  ))


def resolve_data_config(data_config: Mapping | None) -> ml_collections.ConfigDict:
  """`data_config` on top of the defaults; unknown keys and formats are errors."""
  config = default_data_config()
  given = dict(data_config.items()) if data_config is not None else {}
  unknown = sorted(set(given) - set(config))
  if unknown:
    raise LcmJaxError(f"unknown data config keys {unknown}; known: {sorted(config)}")
  for key, value in given.items():
    try:
      config[key] = value
    except TypeError as e:  # ConfigDict keeps each key's type: num_workers="2" is an error
      raise LcmJaxError(f"data.{key}: {e}") from None
  if config.format not in FORMATS:
    raise LcmJaxError(f"unknown data format {config.format!r}; choose from {', '.join(FORMATS)}")
  default_image_key, default_caption_key = _DEFAULT_KEYS[config.format]
  config.image_key = config.image_key or default_image_key
  config.caption_key = config.caption_key or default_caption_key
  if config.num_workers < 0:
    raise LcmJaxError(f"data.num_workers must be >= 0, got {config.num_workers}")
  return config


# ----------------------------------------------------------------------------- sources


def image_source(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1):
  """The raw-record source of this process for an image format, and whether it still has
  to be split by record ([p::P]); tar shards are split whole, before indexing, so that each
  process indexes only its own shards."""
  if config.format == "wds":
    fs, shards = sources.find_files(config.path, ("tar",), "tar shards")
    if len(shards) < process_count:
      raise LcmJaxError(f"{config.path}: {len(shards)} tar shard(s) cannot be split over {process_count} "
                        "processes (each process reads whole shards); write at least one shard per process")
    extensions = tuple(e.strip().lower().lstrip(".") for e in config.image_key.split(",") if e.strip())
    return sources.TarShardSource(fs, shards[process_index::process_count], image_extensions=extensions,
                                  caption_extension=config.caption_key.lstrip(".")), False
  if config.format == "imagefolder":
    return sources.ImageFolderSource(config.path, caption_key=config.caption_key), True
  if config.format == "tfds":
    return sources.TfdsSource(config.tfds_name or config.path, split=config.tfds_split,
                              data_dir=config.data_dir or None, image_key=config.image_key,
                              caption_key=config.caption_key), True
  raise LcmJaxError(f"{config.format!r} is not an image format")


def _records(source, split_by_record: bool, process_index: int, process_count: int, what: str) -> grain.MapDataset:
  if len(source) == 0:
    raise LcmJaxError(f"{what} is empty: no records")
  ds = grain.MapDataset.source(source)
  if split_by_record:
    if len(source) < process_count:
      raise LcmJaxError(f"{what} has {len(source)} records, fewer than the {process_count} processes")
    ds = ds[process_index::process_count]
  return ds


# ----------------------------------------------------------------------------- skip handling


class _DropSkipped(grain.IterDataset):
  """Drops skip markers; each example kept gets "skipped_before": how many were dropped just
  before it, so that the count survives batching and worker processes."""

  def __init__(self, parent: grain.IterDataset, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __iter__(self):
    return _DropSkippedIterator(self._parent.__iter__(), self._max_consecutive)


class _DropSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __next__(self) -> dict:
    skipped = 0
    while True:
      element = next(self._parent)
      if not preprocess.is_skip(element):
        return {**element, "skipped_before": np.int64(skipped)}
      skipped += 1
      if skipped >= self._max_consecutive:
        raise LcmJaxError(f"the last {skipped} records read were all unusable (the last: {element['id']}: "
                          f"{element[preprocess.SKIP_KEY]}); is the data readable?")

  # The state between two examples has no pending skips, so the parent's state is the state.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _CountSkipped(grain.IterDataset):
  """Replaces each batch's per-example "skipped_before" [b] by "num_skipped", the running
  total of skipped records on this process (int64 scalar), kept in the iterator state."""

  def __iter__(self):
    return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._num_skipped = 0

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    self._num_skipped += int(np.sum(batch.pop("skipped_before")))
    batch["num_skipped"] = np.int64(self._num_skipped)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "num_skipped": self._num_skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._num_skipped = int(state["num_skipped"])


def _pixels_to_float(batch: dict) -> dict:
  """Batches carry uint8 pixels until here (4x less memory in the read buffers)."""
  if "pixels" in batch:
    batch = {**batch, "pixels": preprocess.to_model_pixels(batch["pixels"])}
  return batch


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass
class TrainData:
  """The training batches of this process.

  Iterate it (or `iterator`) for batches, dicts of numpy arrays:
    image formats: "pixels" float32 [b, R, R, 3] in [-1, 1], "input_ids" int32 [b, L];
    latents: "latent_mean", "latent_logvar" float32 [b, h, w, C], "context" float32 [b, L, D];
    always: "num_skipped" int64 scalar: records skipped on this process since the start of
      training (counted across restarts: it is part of the iterator state).
  b = global_batch_size // process_count. The iterator never ends (epochs repeat).

  Attributes:
    iterator: the grain `DatasetIterator`; `get_state()` / `set_state(state)` (a JSON-able
      dict), or Orbax: `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore`.
    local_batch_size: b.
    num_records: records in this process's share of one epoch (skipped ones included).
    format: the data format.
    latents_metadata: for `latents`, the cache's metadata.json (vae_scaling_factor,
      latent_shape, text_shape, model, resolution, ...); None otherwise.
  """
  iterator: grain.DatasetIterator
  local_batch_size: int
  num_records: int
  format: str
  latents_metadata: dict | None = None

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)

  def close(self) -> None:
    """Stops worker processes and read threads."""
    self.iterator.close()


def _seeds(seed: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed): 32-bit, independent, different per process."""
  shuffle_seed, augment_seed = np.random.SeedSequence([seed % 2**63, process_index]).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def make_train_data(data_config: Mapping | None, *, resolution: int, global_batch_size: int, seed: int,
                    tokenizer=None, process_index: int | None = None,
                    process_count: int | None = None) -> TrainData:
  """Builds this process's infinite, shuffled, checkpointable stream of training batches.

  Args:
    data_config: keys as `default_data_config()` (missing keys take the defaults).
    resolution: R, the side of the square training images (for `latents`, checked against
      the resolution the cache was written at).
    global_batch_size: batch size over all processes; must be divisible by process_count.
    seed: the data seed: same seed, same batches (for the same process count and num_workers).
    tokenizer: the pipeline's CLIP tokenizer (required for image formats).
    process_index, process_count: this process and how many share the data; default
      `jax.process_index()`, `jax.process_count()`.

  Raises:
    LcmJaxError: bad config, a path that matches nothing, an empty dataset, a batch size not
      divisible by the process count, tfds without the extra installed.
  """
  config = resolve_data_config(data_config)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise LcmJaxError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise LcmJaxError(f"global batch size {global_batch_size} is not a positive multiple of the "
                      f"process count {process_count}")
  local_batch_size = global_batch_size // process_count
  shuffle_seed, augment_seed = _seeds(seed, process_index)

  metadata = None
  if config.format == "latents":
    if not config.center_crop or config.random_flip:
      raise LcmJaxError("the latents format holds centre-cropped, unflipped images: set "
                        "data.center_crop=True and data.random_flip=False (or train from images)")
    folder = sources.local_path(config.path) if config.path else ""
    if not folder:
      raise LcmJaxError("data path is empty; set data.path to the latent cache folder")
    metadata = latents_lib.read_metadata(folder)
    if metadata["resolution"] != resolution:
      raise LcmJaxError(f"latent cache {config.path} was written at resolution {metadata['resolution']}, "
                        f"training asks for {resolution}")
    source = latents_lib.LatentCacheSource(folder, metadata["shards"])
    ds = _records(source, True, process_index, process_count, f"latent cache {config.path}")
    ds = ds.map(latents_lib.LatentsExample(latents_lib.layout_from_metadata(metadata)))
  else:
    if tokenizer is None:
      raise LcmJaxError(f"the {config.format} format needs the pipeline's tokenizer to tokenize captions")
    source, split_by_record = image_source(config, process_index=process_index, process_count=process_count)
    ds = _records(source, split_by_record, process_index, process_count, f"data path {config.path or config.tfds_name}")
    transform = preprocess.ImageExample(resolution, tokenizer=tokenizer, center_crop=config.center_crop,
                                        random_flip=config.random_flip)
    ds = ds.random_map(transform, seed=augment_seed)
  num_records = len(ds)
  if config.shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(None)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                               prefetch_buffer_size=config.prefetch_buffer_size))
  max_skips = min(_MAX_CONSECUTIVE_SKIPS, 2 * num_records * max(1, config.num_workers))
  it_ds = _DropSkipped(it_ds, max_skips)
  it_ds = it_ds.batch(local_batch_size, drop_remainder=True)
  if config.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags here; outside an absl app (a notebook)
      flags.FLAGS.mark_as_parsed()  # they were never parsed, so take their defaults
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
  # Pixels become float here, after the workers: uint8 batches cross processes 4x faster.
  iterator = iter(_CountSkipped(it_ds.map(_pixels_to_float)))
  return TrainData(iterator=iterator, local_batch_size=local_batch_size, num_records=num_records,
                   format=config.format, latents_metadata=metadata)


def iterate_examples_once(config: ml_collections.ConfigDict, *, resolution: int, tokenizer,
                          source=None) -> tuple[int, Iterator[dict]]:
  """All records of an image dataset once, in order, centre-cropped and unflipped (for
  `cache_latents`): (number of records, iterator of examples with "pixels" uint8,
  "input_ids", "caption", or skip markers). `source`: `image_source(config)` if already open."""
  if source is None:
    source, _ = image_source(config)
  ds = _records(source, False, 0, 1, f"data path {config.path or config.tfds_name}")
  ds = ds.map(preprocess.ImageExample(resolution, tokenizer=tokenizer, center_crop=True, random_flip=False,
                                      keep_caption=True, random_caption=False))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                               prefetch_buffer_size=config.prefetch_buffer_size))
  return len(ds), iter(it_ds)
