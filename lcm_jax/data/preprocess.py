"""Raw records -> training examples: image decoding, resize, crop, flip, caption tokenization.

The geometry is that of diffusers' text-to-image training scripts (torchvision on PIL images):
resize the shorter side to R with PIL's *bilinear* filter (the longer side becomes
int(R * long / short)), then crop R x R, centred (torchvision's `CenterCrop` rounding) or at a
uniformly random position; then an optional horizontal flip with probability 1/2.

A record that cannot be used becomes a *skip marker* `{SKIP_KEY: reason, "id", "source",
"index"}` instead of an example; the loader drops the markers and hands them, with the batch
that consumed them, to the training loop, which counts and names them (`lcm_jax.data.loader`).
Nothing is logged here: records read ahead of training are not yet skipped by training.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lcm_jax.tokenizer import tokenize

SKIP_KEY = "skipped"


def skip_marker(record: dict, reason: str) -> dict:
  """The element that stands for an unusable raw `record` (see `lcm_jax.data.sources`):
  why, and where the record lives (its id, its source file or data set, its index there)."""
  return {SKIP_KEY: reason, "id": record["id"], "source": record.get("source", record["id"]),
          "index": record.get("index")}


def skip_info(marker: dict) -> dict:
  """A skip marker as a JSON-able line of the skip log: source, index, id, reason."""
  index = marker.get("index")
  return {"source": str(marker["source"]), "index": None if index is None else int(index),
          "id": str(marker["id"]), "reason": str(marker[SKIP_KEY])}


def is_skip(element: dict) -> bool:
  return SKIP_KEY in element


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
  """(width, height) after scaling the shorter side to `resolution` (torchvision's rule:
  the longer side is truncated, not rounded)."""
  if width <= height:
    return resolution, int(resolution * height / width)
  return int(resolution * width / height), resolution


def crop_origin(width: int, height: int, resolution: int, rng: np.random.Generator | None) -> tuple[int, int]:
  """(top, left) of the R x R crop: centred as torchvision's CenterCrop rounds it when
  `rng` is None, else uniform over every position (torchvision's RandomCrop)."""
  if rng is None:
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
  return int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))


def preprocess_image(image: Image.Image, resolution: int, *, rng: np.random.Generator | None = None,
                     center_crop: bool = True, random_flip: bool = False) -> np.ndarray:
  """A PIL image -> uint8 [R, R, 3]: RGB, shorter side resized to R (bilinear), R x R crop,
  optional horizontal flip. `rng` is needed for a random crop or flip."""
  image = image.convert("RGB")
  size = resized_size(*image.size, resolution)
  if image.size != size:  # torchvision leaves an image of the right size untouched too
    image = image.resize(size, Image.BILINEAR)
  top, left = crop_origin(*size, resolution, None if center_crop else rng)
  pixels = np.asarray(image)[top:top + resolution, left:left + resolution]
  if random_flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def to_model_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], as the VAE expects (x / 127.5 - 1)."""
  return pixels.astype(np.float32) / 127.5 - 1.0


def decode_image(image) -> Image.Image:
  """Encoded bytes (JPEG, PNG, WebP, ...) or a decoded uint8 array [H, W, C] -> a loaded PIL image."""
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(np.asarray(image, np.uint8))
  decoded = Image.open(io.BytesIO(image))
  decoded.load()  # decode now, so a truncated or corrupt file fails here
  return decoded


def pick_caption(caption, rng: np.random.Generator | None) -> str | None:
  """A caption as a str: bytes are decoded; from a list (COCO has five per image) one is
  drawn with `rng`, or the first without one. None when there is no usable text."""
  if isinstance(caption, np.ndarray):
    caption = caption.tolist()
  if isinstance(caption, (list, tuple)):
    if not caption:
      return None
    caption = caption[0] if rng is None else caption[int(rng.integers(len(caption)))]
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8", errors="replace")
  return caption if isinstance(caption, str) else None


class ImageExample:
  """grain random-map transform: raw record (see `sources`) -> example or skip marker.

  Example: {"pixels": uint8 [R, R, 3], "input_ids": int32 [L]} (with a tokenizer) and
  {"caption": str} when `keep_caption`.
  """

  def __init__(self, resolution: int, *, tokenizer=None, center_crop: bool = True,
               random_flip: bool = False, keep_caption: bool = False, random_caption: bool = True):
    self.resolution = resolution
    self.tokenizer = tokenizer
    self.center_crop = center_crop
    self.random_flip = random_flip
    self.keep_caption = keep_caption
    self.random_caption = random_caption

  def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
    if record["error"]:
      return skip_marker(record, record["error"])
    caption = pick_caption(record["caption"], rng if self.random_caption else None)
    if caption is None:
      return skip_marker(record, "no caption")
    try:
      image = decode_image(record["image"])
    except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, ...)
      message = str(e).split(" <_io.")[0]  # PIL names the in-memory file object; say nothing of it
      return skip_marker(record, f"cannot decode image: {type(e).__name__}: {message}")
    try:
      pixels = preprocess_image(image, self.resolution, rng=rng, center_crop=self.center_crop,
                                random_flip=self.random_flip)
    except (OSError, ValueError) as e:  # e.g. a truncated tile found only while converting
      return skip_marker(record, f"cannot decode image: {type(e).__name__}: {e}")
    example = {"pixels": pixels}
    if self.tokenizer is not None:
      example["input_ids"] = tokenize(self.tokenizer, [caption])[0]
    if self.keep_caption:
      example["caption"] = caption
    return example
