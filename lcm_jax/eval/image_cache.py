"""The on-disk cache of one table cell: its settings, its generated images and its scores.

    <root>/<cell>/cell.json        {"settings": ..., "generation": {images, seconds, ...}}
    <root>/<cell>/images/000123.png
    <root>/<cell>/scores.json      {metric name: {"settings", "values", "seconds", ...}}

Images are PNGs (lossless, so a metric reads back exactly what was generated, and external
tools such as pytorch-fid can read the folder), named by image index, each written to a
temporary name and renamed: a file that exists is complete, whenever the run was killed.
A cell whose stored settings differ from the current ones is wiped and starts over; a
metric whose settings differ is re-scored from the kept images.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

from lcm_jax import jsonfile
from lcm_jax.errors import LcmJaxError
from lcm_jax.figures import save_png

CELL_FILE, SCORES_FILE, IMAGES_DIR = "cell.json", "scores.json", "images"
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4)  # PNG coding releases the GIL


def _read_json(path: str) -> dict:
  try:
    return jsonfile.read_json(path)
  except LcmJaxError:
    return {}  # absent, or cut short by a kill: treated as not written


def _write_json(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _canonical(settings: dict) -> dict:
  """Settings as they read back from JSON (tuples become lists), for comparison."""
  return json.loads(json.dumps(settings, sort_keys=True))


class CellCache:
  """One cell's folder. `num_images` images, indexed 0..num_images-1."""

  def __init__(self, folder: str, settings: dict, num_images: int):
    self.folder, self.settings, self.num_images = folder, _canonical(settings), num_images
    self.images_dir = os.path.join(folder, IMAGES_DIR)
    self._pending: list[concurrent.futures.Future] = []

  def open(self) -> str:
    """Creates the folder, or wipes it if it holds another setting's images. Returns
    "new", "kept" or "changed"."""
    stored = _read_json(os.path.join(self.folder, CELL_FILE))
    state = "kept" if stored.get("settings") == self.settings else ("changed" if stored else "new")
    if state == "changed" or (state == "new" and os.path.isdir(self.folder)):
      shutil.rmtree(self.folder)
    os.makedirs(self.images_dir, exist_ok=True)
    if state != "kept":
      _write_json(os.path.join(self.folder, CELL_FILE), {"settings": self.settings, "generation": {}})
    return state

  def _path(self, index: int) -> str:
    return os.path.join(self.images_dir, f"{index:06d}.png")

  def missing(self) -> np.ndarray:
    """Indices [M] of the images not on disk, increasing."""
    present = {int(f[:-4]) for f in os.listdir(self.images_dir) if f.endswith(".png") and f[:-4].isdigit()}
    return np.asarray([i for i in range(self.num_images) if i not in present], np.int64)

  def write(self, indices: Sequence[int], images: np.ndarray) -> None:
    """Queues uint8 images [B, H, W, 3] for writing (PNG coding in threads overlaps the next
    batch's generation); `flush` waits for them."""
    def one(index, image):
      tmp = os.path.join(self.images_dir, f".{index:06d}.tmp.png")
      save_png(tmp, image)
      os.replace(tmp, self._path(index))
    self._pending += [_POOL.submit(one, int(i), im) for i, im in zip(indices, images)]

  def flush(self, raise_errors: bool = True) -> None:
    """Waits for the queued writes; re-raises a failed one if raise_errors."""
    pending, self._pending = self._pending, []
    concurrent.futures.wait(pending)
    for future in pending if raise_errors else ():
      future.result()

  def read(self, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] as stored."""
    from PIL import Image

    def one(index):
      with Image.open(self._path(int(index))) as im:
        return np.asarray(im.convert("RGB"))
    return np.stack(list(_POOL.map(one, indices)))

  @property
  def generation(self) -> dict:
    return _read_json(os.path.join(self.folder, CELL_FILE)).get("generation", {})

  def add_generation(self, **timings: float) -> None:
    """Adds to the stored generation record (images, seconds: summed over resumed runs)."""
    record = self.generation
    for k, v in timings.items():
      record[k] = round(record.get(k, 0) + v, 3)
    _write_json(os.path.join(self.folder, CELL_FILE), {"settings": self.settings, "generation": record})

  def scores(self) -> dict:
    return _read_json(os.path.join(self.folder, SCORES_FILE))

  def valid_score(self, name: str, settings: dict) -> dict | None:
    """The stored record of metric `name` if it was made with these settings."""
    record = self.scores().get(name)
    return record if record and record.get("settings") == _canonical(settings) else None

  def save_score(self, name: str, settings: dict, record: dict) -> None:
    scores = self.scores()
    scores[name] = dict(record, settings=_canonical(settings))
    _write_json(os.path.join(self.folder, SCORES_FILE), scores)
