"""The metric protocol of the evaluation table, and its two paper metrics (FID, CLIP score).

A metric scores a stream of (images, prompts) batches and knows nothing of sampling: the
table engine (`lcm_jax.eval.table`) reads each cell's cached images back in chunks and hands
every chunk to every metric. Anything with this shape plugs in (the toy's attribute-network
FID and text alignment do, from `lcm_jax.toy.evaluate`):

    class Metric(Protocol):
      name: str                        # unique, e.g. "fid"; the key of its cached scores
      columns: tuple[Column, ...]      # the values it reports, in table order
      def settings(self) -> dict       # JSON: everything its numbers depend on (the cache key)
      def describe(self) -> str        # one line for the table's notes (mode, reference, ...)
      def start(self) -> Accumulator   # a fresh running score

    class Accumulator(Protocol):
      def update(self, images, prompts) -> None   # uint8 [B, H, W, 3], B prompts
      def result(self) -> dict[str, float]        # one value per column key (extras allowed)

`load_plugin("module:object")` imports a metric (or a factory of metrics) by name, so a
command line can take metrics the library does not know.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from lcm_jax.errors import LcmJaxError


@dataclasses.dataclass(frozen=True)
class Column:
  """One reported value: how the table, the references line and the plot show it."""
  key: str                 # key in a metric's result ("fid")
  header: str              # table header, followed by " {k}-step" ("FID ↓")
  short: str               # label in the references line ("FID")
  lower_is_better: bool
  percent: bool = False    # a fraction, shown as 100 x value with "%"
  digits: int = 2
  plot_title: str = ""
  log_plot: bool = False

  def format(self, value: float | None) -> str:
    """The value as the table prints it ("—" for a cell not scored yet)."""
    if value is None:
      return "—"
    return f"{100 * value:.{self.digits}f}%" if self.percent else f"{value:.{self.digits}f}"


class Accumulator(Protocol):
  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None: ...
  def result(self) -> dict[str, float]: ...


class Metric(Protocol):
  name: str
  columns: tuple[Column, ...]
  def settings(self) -> dict: ...
  def describe(self) -> str: ...
  def start(self) -> Accumulator: ...


FID_COLUMN = Column("fid", "FID ↓", "FID", lower_is_better=True, plot_title="FID, log scale (lower is better)",
                    log_plot=True)
CLIP_COLUMN = Column("clip", "CLIP ↑", "CLIP", lower_is_better=False, plot_title="CLIP score (higher is better)")

# What each FID mode does to an image before Inception (printed in the table's notes).
FID_MODE_DESCRIPTIONS = {
    "pytorch_fid": "pytorch-fid semantics: uint8 / 255, bilinear resize to 299 without antialiasing "
                   "(torch's interpolate, align_corners=False), 2x - 1, pool3 2048-d",
    "clean": "clean-fid semantics: PIL bicubic resize to 299 of each float channel, (x - 128) / 128, pool3 2048-d",
}


# ---------------------------------------------------------------------------------------
# FID


class _FIDAccumulator:
  def __init__(self, features: Callable[[np.ndarray], np.ndarray], reference: tuple[np.ndarray, np.ndarray],
               key: str):
    from lcm_jax.eval.fid import FeatureStats
    self.features, self.reference, self.key, self.stats = features, reference, key, FeatureStats()

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    del prompts  # FID compares distributions of images only
    self.stats.update(self.features(images))

  def result(self) -> dict[str, float]:
    from lcm_jax.eval.fid import frechet_distance
    return {self.key: frechet_distance(self.stats.mu, self.stats.sigma, *self.reference)}


class FIDMetric:
  """FID of the generated images against fixed reference statistics.

  features: uint8 [B, H, W, 3] -> [B, D] (an `InceptionFeatures`; any feature network works).
  reference: (mu [D], sigma [D, D]) float64.
  settings / description: what the numbers depend on, and the line the table prints.
  name, column: its name and column (another FID beside Inception's needs its own).
  """

  def __init__(self, features: Callable[[np.ndarray], np.ndarray], reference: tuple[np.ndarray, np.ndarray],
               settings: dict, description: str, *, name: str = "fid", column: Column = FID_COLUMN):
    self.features, self.reference = features, reference
    self._settings, self._description = settings, description
    self.name, self.columns = name, (column,)

  def settings(self) -> dict:
    return dict(self._settings)

  def describe(self) -> str:
    return self._description

  def start(self) -> _FIDAccumulator:
    return _FIDAccumulator(self.features, self.reference, self.columns[0].key)


def centre_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, 3] uint8 -> [size, size, 3]: the central square, resized with PIL bicubic (as
  clean-fid and most text-to-image papers prepare COCO references for square samples)."""
  from PIL import Image
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  square = Image.fromarray(np.ascontiguousarray(image[top:top + s, left:left + s]))
  return np.asarray(square.resize((size, size), resample=Image.BICUBIC))


def fid_metric(inception: str, reference: str, *, mode: str = "pytorch_fid", resolution: int | None = None,
               reference_cache: str | None = None, reference_limit: int | None = None,
               batch_size: int = 50) -> FIDMetric:
  """FID with pytorch-fid's Inception weights against a reference `.npz` or image folder.

  inception: converted weights (`python -m lcm_jax.eval.convert_inception`), a .safetensors.
  reference: a statistics `.npz`, or a folder of images whose statistics are computed once and
    cached in `reference_cache`. With `resolution`, every folder image is first centre-cropped
    and resized to resolution x resolution (the generated images' size), then prepared as the
    generated images are; without it, it goes to Inception as it is (pytorch-fid's folder mode).
  """
  from lcm_jax.eval.fid import reference_statistics
  from lcm_jax.eval.inception import InceptionFeatures, load_inception
  features = InceptionFeatures(load_inception(inception), mode=mode, batch_size=batch_size)
  prepare = (lambda ims: [centre_crop_resize(im, resolution) for im in ims]) if resolution else list
  mu, sigma, meta = reference_statistics(reference, lambda ims: features.of_images(prepare(ims)), mode=mode,
                                         cache=reference_cache, limit=reference_limit)
  if reference.endswith(".npz"):
    preprocessing = f"precomputed statistics {reference} ({meta.get('num_images', '?')} images, " \
                    f"mode {meta.get('mode', 'not recorded')})"
  else:
    crop = f"centre-cropped and resized to {resolution}x{resolution} (PIL bicubic), then " if resolution else ""
    preprocessing = f"{meta.get('num_images')} images of {reference}, {crop}prepared as the samples"
  settings = {"mode": mode, "inception": fingerprint(inception), "reference": preprocessing,
              "reference_mu": hashlib.sha256(np.asarray(mu, np.float64).tobytes()).hexdigest()[:16]}
  description = f"FID: {mode} mode ({FID_MODE_DESCRIPTIONS[mode]}); reference: {preprocessing}."
  return FIDMetric(features, (mu, sigma), settings, description)


# ---------------------------------------------------------------------------------------
# CLIP score


class _CLIPAccumulator:
  def __init__(self, scorer):
    from lcm_jax.eval.clip_score import ClipScores
    self.scorer, self.scores = scorer, ClipScores()

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    self.scores.update(self.scorer.scores(images, list(prompts)))

  def result(self) -> dict[str, float]:
    return {"clip": self.scores.value, "clip_mean_unclamped": self.scores.mean}


class CLIPMetric:
  """CLIP score (torchmetrics' definition) of each image with its own prompt.

  scorer: a `lcm_jax.eval.clip_score.CLIPScorer`; name: what the table calls the model.
  """
  name = "clip"
  columns = (CLIP_COLUMN,)

  def __init__(self, scorer, model: str, identity: Any = None):
    self.scorer, self.model, self.identity = scorer, model, identity

  def settings(self) -> dict:
    return {"model": self.model, "identity": self.identity, "preprocess": dataclasses.asdict(self.scorer.preprocess)}

  def describe(self) -> str:
    p = self.scorer.preprocess
    return (f"CLIP score: 100 x cos(image, prompt) averaged, clamped at 0 (torchmetrics), with {self.model}; "
            f"images: shortest side {p.shortest_edge} (PIL bicubic), centre crop {p.crop_height}x{p.crop_width}, "
            "CLIP mean/std.")

  def start(self) -> _CLIPAccumulator:
    return _CLIPAccumulator(self.scorer)


def clip_metric(path_or_repo_id: str, *, batch_size: int = 32) -> CLIPMetric:
  """A CLIP-score metric with a CLIPModel folder or hub id (the paper: ViT-g/14)."""
  from lcm_jax.eval.clip_score import load_clip, resolve_clip_folder
  folder = resolve_clip_folder(path_or_repo_id)
  return CLIPMetric(load_clip(folder, batch_size=batch_size), path_or_repo_id, fingerprint(folder))


# ---------------------------------------------------------------------------------------
# Plugins and identities


@dataclasses.dataclass(frozen=True)
class MetricContext:
  """What a metric factory (a `module:object` plugin) may need to build its metrics."""
  prompts: tuple[str, ...]
  images_per_prompt: int
  resolution: int | None
  output: str


def metrics_from_plugin(spec: str, context: MetricContext) -> list:
  """The metrics of a "module:object" plugin: the object itself if it is a metric, else
  object(context), which returns a metric or a list of metrics."""
  obj = load_plugin(spec)
  made = obj if hasattr(obj, "start") else obj(context) if callable(obj) else None
  made = [made] if hasattr(made, "start") else list(made or [])
  if not made or not all(hasattr(m, "start") and hasattr(m, "columns") for m in made):
    raise LcmJaxError(f"metric plugin {spec} gave no metrics (objects with name, columns, settings, "
                      "describe and start; see lcm_jax/eval/metric.py)")
  return made


def load_plugin(spec: str) -> Any:
  """The object named by "package.module:attribute" (a metric, or a factory of metrics).

  Raises:
    LcmJaxError when the spec is malformed, the module cannot be imported or lacks the name.
  """
  module_name, _, attribute = spec.partition(":")
  if not module_name or not attribute:
    raise LcmJaxError(f"metric plugin {spec!r} must look like package.module:object")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise LcmJaxError(f"cannot import the metric plugin module {module_name!r}: {e}") from None
  if not hasattr(module, attribute):
    raise LcmJaxError(f"module {module_name} has no {attribute!r} (metric plugin {spec})")
  return getattr(module, attribute)


def fingerprint(path: str, chunk: int = 1 << 20) -> str:
  """A cheap identity of a file or folder: a hash of sizes and the first and last MiB of
  each file (weights change everywhere when retrained; hashing 5 GB whole would take minutes)."""
  if not os.path.exists(path):
    return f"missing:{path}"
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
  h = hashlib.sha256()
  for f in files:
    size = os.path.getsize(f)
    h.update(f"{os.path.relpath(f, path)}:{size}".encode())
    with open(f, "rb") as fh:
      h.update(fh.read(chunk))
      if size > 2 * chunk:
        fh.seek(-chunk, os.SEEK_END)
        h.update(fh.read(chunk))
  return h.hexdigest()[:16]
