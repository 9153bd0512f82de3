"""Per-process, deterministic, checkpointable training batches with grain.

The pipeline of one process (`make_train_data`):

  source (records; for tar shards only this process's shards [p::P])
  -> random_map: decode, resize, crop, flip, tokenize  (an unusable record -> skip marker)
  -> shuffle (seed; a new order every epoch) -> repeat forever: the stream
  -> this process's slice of every global batch -> read threads
  -> drop skip markers (counting them) -> batch -> [worker processes: everything above]
  -> float pixels -> running count of skipped records, in every batch as "num_skipped"

Skipped records are counted where training consumes them, not where they are read: a batch's
"num_skipped" counts the records skipped up to its last example, and `TrainData.take_skipped`
names them (source, index, id, reason), so the training loop's log and TensorBoard count the
same records (read-ahead threads and workers may have read further).

Global batches: with records read by random access (image folders, TFDS, latent caches)
every process builds the same stream, and global batch s is its positions [s*B, (s+1)*B);
process p of P trains on the contiguous slice [s*B + p*b, s*B + (p+1)*b), b = B / P. So the
global batch holds the same records in the same order whatever the number of processes, and
a run's result does not depend on how many processes read its data. (An unusable record is
dropped and the process takes the next record of its own slices, so with skipped records the
batches from there on do depend on the process count.) Tar shards are the exception: each
process indexes and reads only its own whole shards (indexing every shard on every host would
read the data set once per host), so a webdataset run's batches depend on the process count.

Every random choice is a function of (seed, epoch, record) (and of the process for tar
shards), so the same seed gives the same batches; the iterator's state (`get_state` /
`set_state`, JSON) resumes the exact sequence, skip count included, and a run with another
process count resumes at the same global batch (`TrainData.resume_from_processes`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

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


def shared_stream(data_format: str) -> bool:
  """Whether every process reads the same stream of the whole data set (random access), or,
  for tar shards, only its own shards."""
  return data_format != "wds"


def image_source(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1):
  """The raw-record source of this process for an image format, and whether it is shared by
  all processes (each then takes its slice of every global batch). Tar shards are not: they
  are split whole, before indexing, so that each process indexes only its own shards."""
  if config.format == "wds":
    fs, shards = sources.find_files(config.path, ("tar",), "tar shards")
    if len(shards) < process_count:
      raise LcmJaxError(f"{config.path}: {len(shards)} tar shard(s) cannot be split over {process_count} "
                        "processes (each process reads whole shards); write at least one shard per process")
    extensions = tuple(e.strip().lower().lstrip(".") for e in config.image_key.split(",") if e.strip())
    source = sources.TarShardSource(fs, shards[process_index::process_count], image_extensions=extensions,
                                    caption_extension=config.caption_key.lstrip("."))
  elif config.format == "imagefolder":
    source = sources.ImageFolderSource(config.path, caption_key=config.caption_key)
  elif config.format == "tfds":
    source = sources.TfdsSource(config.tfds_name or config.path, split=config.tfds_split,
                                data_dir=config.data_dir or None, image_key=config.image_key,
                                caption_key=config.caption_key)
  else:
    raise LcmJaxError(f"{config.format!r} is not an image format")
  return source, shared_stream(config.format)


def _records(source, what: str) -> grain.MapDataset:
  if len(source) == 0:
    raise LcmJaxError(f"{what} is empty: no records")
  return grain.MapDataset.source(source)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Where this process's examples sit in the stream: global batch s is stream positions
  [s*B, (s+1)*B) and this process takes [s*B + p*b, s*B + (p+1)*b) of it (B = b * P).

  `shared` is False for tar shards: the stream is then this process's own, and it takes all
  of it (the layout of one process); `process_index`/`process_count` still name the run's."""
  process_index: int
  process_count: int
  local_batch_size: int
  shared: bool

  @property
  def slices(self) -> tuple[int, int]:
    """(this process's slice, slices per global batch) of the stream it reads."""
    return (self.process_index, self.process_count) if self.shared else (0, 1)

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class _GlobalBatchSlice(grain.MapDataset):
  """This process's examples of an (infinite) stream: its slice of every global batch
  (`BatchLayout`), from global batch `start_batch` on."""

  def __init__(self, parent: grain.MapDataset, layout: BatchLayout, start_batch: int):
    super().__init__(parent)
    self._slice, self._slices = layout.slices
    self._local = layout.local_batch_size
    self._global = self._local * self._slices
    self._start = start_batch
    self._length = max(0, len(parent) // self._global - start_batch) * self._local

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"_GlobalBatchSlice({self._slice} of {self._slices}, from batch {self._start})"

  def _stream_index(self, index: int) -> int:
    batch, offset = divmod(index, self._local)
    return (self._start + batch) * self._global + self._slice * self._local + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._stream_index(index)]


# ----------------------------------------------------------------------------- skip handling


class _DropSkipped(grain.IterDataset):
  """Drops skip markers; each example kept gets "skipped_before": how many were dropped just
  before it, and "skipped_log": them, as a JSON list of `preprocess.skip_info` (a string
  array, so that it survives batching and worker processes)."""

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
    skipped = []
    while True:
      element = next(self._parent)
      if not preprocess.is_skip(element):
        return {**element, "skipped_before": np.int64(len(skipped)),
                "skipped_log": np.asarray(json.dumps(skipped) if skipped else "")}
      skipped.append(preprocess.skip_info(element))
      if len(skipped) >= self._max_consecutive:
        raise LcmJaxError(f"the last {len(skipped)} records read were all unusable (the last: {element['id']}: "
                          f"{element[preprocess.SKIP_KEY]}); is the data readable?")

  # The state between two examples has no pending skips, so the parent's state is the state.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _CountSkipped(grain.IterDataset):
  """Replaces each batch's per-example "skipped_before" [b] by "num_skipped", the running
  total of skipped records on this process (int64 scalar), kept in the iterator state; the
  records themselves wait in `take_skipped` (not part of the state: the loop takes them
  with each batch)."""

  def __iter__(self):
    return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._num_skipped = 0
    self._pending: list[dict] = []

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    self._num_skipped += int(np.sum(batch.pop("skipped_before")))
    for text in np.asarray(batch.pop("skipped_log")).reshape(-1).tolist():
      self._pending.extend(json.loads(text) if text else [])
    batch["num_skipped"] = np.int64(self._num_skipped)
    return batch

  def take_skipped(self) -> list[dict]:
    """The records skipped by the batches returned since the last call, in stream order."""
    taken, self._pending = self._pending, []
    return taken

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

  Iterate it for batches, dicts of numpy arrays:
    image formats: "pixels" float32 [b, R, R, 3] in [-1, 1], "input_ids" int32 [b, L];
    latents: "latent_mean", "latent_logvar" float32 [b, h, w, C], "context" float32 [b, L, D];
    always: "num_skipped" int64 scalar: records skipped on this process since the start of
      training (counted across restarts: it is part of the iterator state).
  b = global_batch_size // process_count. The iterator never ends (epochs repeat).

  Attributes:
    iterator: the grain `DatasetIterator` (replaced when a restore moves the start batch).
    local_batch_size: b.
    num_records: records in one epoch of the stream this process draws from, skipped ones
      included: the whole data set, or for tar shards this process's shards.
    format: the data format.
    latents_metadata: for `latents`, the cache's metadata.json (vae_scaling_factor,
      latent_shape, text_shape, model, resolution, ...); None otherwise.
    layout: where this process's examples sit in the global batches.
    build: start batch -> a fresh iterator of this process's batches from that global batch.
  """
  iterator: grain.DatasetIterator
  local_batch_size: int
  num_records: int
  format: str
  layout: BatchLayout
  build: Callable[[int], grain.DatasetIterator]
  latents_metadata: dict | None = None
  start_batch: int = 0
  batches: int = 0  # batches yielded since start_batch: the data position is start_batch + batches

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = next(self.iterator)
    self.batches += 1
    return batch

  def take_skipped(self) -> list[dict]:
    """The records skipped by the batches returned since the last call (the records they
    consumed, not those read ahead), in order: dicts with "source", "index" (the record's
    index in its source; None for a whole unreadable tar shard), "id" and "reason"."""
    return self.iterator.take_skipped()

  def get_state(self) -> dict[str, Any]:
    """The position, JSON-able: the grain iterator's state, the global batch it started at,
    the batches yielded since, and the layout (a restore checks it)."""
    return {"iterator": self.iterator.get_state(), "start_batch": self.start_batch, "batches": self.batches,
            "layout": self.layout.as_json()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at a `get_state()` of a run with the same processes (or a bare grain iterator
    state, as checkpoints written before the layout was recorded hold)."""
    if "iterator" not in state:
      self.iterator.set_state(state)
      return
    if state["layout"] != self.layout.as_json():
      raise LcmJaxError(f"the data position {state['layout']} was saved by another process layout than "
                        f"this one {self.layout.as_json()}; restore it with resume_from_processes")
    if state["start_batch"] != self.start_batch:
      self._restart(int(state["start_batch"]))
    self.iterator.set_state(state["iterator"])
    self.batches = int(state["batches"])

  def resume_from_processes(self, states: list[dict[str, Any]]) -> None:
    """Resumes at the global batch where the processes of another run (another process count)
    stopped, given every one of their `get_state()`s; this process gets their whole skip count
    if it is process 0. Exact when no record was skipped (see the module docstring)."""
    if not states or any("layout" not in s for s in states):
      raise LcmJaxError("the checkpoint's data position was written by another number of processes "
                        "without a record of its layout; resume with that number of processes")
    saved = states[0]["layout"]
    if not saved["shared"] or not self.layout.shared:
      raise LcmJaxError(f"the checkpoint's data position was written by {saved['process_count']} process(es), "
                        f"this run has {self.layout.process_count}: with tar shards each process reads its "
                        "own whole shards, so resume with the same number of processes")
    positions = {int(s["start_batch"]) + int(s["batches"]) for s in states}
    if len(positions) != 1:
      raise LcmJaxError(f"the checkpoint's processes saved different data positions {sorted(positions)}")
    skipped = sum(int(s["iterator"]["num_skipped"]) for s in states)
    self._restart(positions.pop())
    fresh = self.iterator.get_state()
    self.iterator.set_state({**fresh, "num_skipped": skipped if self.layout.process_index == 0 else 0})
    if skipped:
      logging.warning("resuming the data at global batch %d with %d processes (was %d): %d records were "
                      "skipped before, so the batches from here differ slightly from an uninterrupted run",
                      self.start_batch, self.layout.process_count, saved["process_count"], skipped)

  def _restart(self, start_batch: int) -> None:
    self.iterator.close()
    self.iterator = self.build(start_batch)
    self.start_batch, self.batches = start_batch, 0

  def close(self) -> None:
    """Stops worker processes and read threads."""
    self.iterator.close()


def _seeds(seed: int, stream: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed): 32-bit, independent, one pair per stream (0 for a
  stream all processes share, the process index for tar shards)."""
  shuffle_seed, augment_seed = np.random.SeedSequence([seed % 2**63, stream]).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process index, process count), jax's unless given."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise LcmJaxError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def make_train_data(data_config: Mapping | None, *, resolution: int, global_batch_size: int, seed: int,
                    tokenizer=None, process_index: int | None = None,
                    process_count: int | None = None) -> TrainData:
  """Builds this process's infinite, shuffled, checkpointable stream of training batches.

  Args:
    data_config: keys as `default_data_config()` (missing keys take the defaults).
    resolution: R, the side of the square training images (for `latents`, checked against
      the resolution the cache was written at).
    global_batch_size: batch size over all processes; must be divisible by process_count.
    seed: the data seed: same seed, same global batches (for any process count, except
      with tar shards; see the module docstring).
    tokenizer: the pipeline's CLIP tokenizer (required for image formats).
    process_index, process_count: this process and how many share the data; default
      `jax.process_index()`, `jax.process_count()`.

  Raises:
    LcmJaxError: bad config, a path that matches nothing, an empty dataset, a batch size not
      divisible by the process count, tfds without the extra installed.
  """
  config = resolve_data_config(data_config)
  process_index, process_count = _process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise LcmJaxError(f"global batch size {global_batch_size} is not a positive multiple of the "
                      f"process count {process_count}")
  shared = shared_stream(config.format)
  shuffle_seed, augment_seed = _seeds(seed, 0 if shared else process_index)
  examples, metadata = _examples(config, resolution, tokenizer, augment_seed, process_index, process_count)
  layout = BatchLayout(process_index, process_count, global_batch_size // process_count, shared)
  num_records = len(examples)
  stream = (examples.shuffle(seed=shuffle_seed) if config.shuffle else examples).repeat(None)
  build = lambda start_batch: _batch_iterator(stream, config, layout, num_records, start_batch)
  return TrainData(iterator=build(0), local_batch_size=layout.local_batch_size, num_records=num_records,
                   format=config.format, layout=layout, build=build, latents_metadata=metadata)


def _examples(config: ml_collections.ConfigDict, resolution: int, tokenizer, augment_seed: int,
              process_index: int, process_count: int) -> tuple[grain.MapDataset, dict | None]:
  """(the examples of one epoch, by random access; for `latents` the cache's metadata)."""
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
    ds = _records(latents_lib.LatentCacheSource(folder, metadata["shards"]), f"latent cache {config.path}")
    return ds.map(latents_lib.LatentsExample(latents_lib.layout_from_metadata(metadata))), metadata
  if tokenizer is None:
    raise LcmJaxError(f"the {config.format} format needs the pipeline's tokenizer to tokenize captions")
  source, _ = image_source(config, process_index=process_index, process_count=process_count)
  ds = _records(source, f"data path {config.path or config.tfds_name}")
  transform = preprocess.ImageExample(resolution, tokenizer=tokenizer, center_crop=config.center_crop,
                                      random_flip=config.random_flip)
  return ds.random_map(transform, seed=augment_seed), None


def _batch_iterator(stream: grain.MapDataset, config: ml_collections.ConfigDict, layout: BatchLayout,
                    num_records: int, start_batch: int) -> grain.DatasetIterator:
  """This process's batches of `stream` from global batch `start_batch` on."""
  it_ds = _GlobalBatchSlice(stream, layout, start_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size))
  max_skips = min(_MAX_CONSECUTIVE_SKIPS, 2 * num_records * max(1, config.num_workers))
  it_ds = _DropSkipped(it_ds, max_skips)
  it_ds = it_ds.batch(layout.local_batch_size, drop_remainder=True)
  if config.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags here; outside an absl app (a notebook)
      flags.FLAGS.mark_as_parsed()  # they were never parsed, so take their defaults
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
  # Pixels become float here, after the workers: uint8 batches cross processes 4x faster.
  return iter(_CountSkipped(it_ds.map(_pixels_to_float)))


def iterate_examples_once(config: ml_collections.ConfigDict, *, resolution: int, tokenizer,
                          source=None) -> tuple[int, Iterator[dict]]:
  """All records of an image dataset once, in order, centre-cropped and unflipped (for
  `cache_latents`): (number of records, iterator of examples with "pixels" uint8,
  "input_ids", "caption", or skip markers). `source`: `image_source(config)` if already open."""
  if source is None:
    source, _ = image_source(config)
  ds = _records(source, f"data path {config.path or config.tfds_name}")
  ds = ds.map(preprocess.ImageExample(resolution, tokenizer=tokenizer, center_crop=True, random_flip=False,
                                      keep_caption=True, random_caption=False))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                               prefetch_buffer_size=config.prefetch_buffer_size))
  return len(ds), iter(it_ds)
