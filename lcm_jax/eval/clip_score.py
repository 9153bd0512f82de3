"""CLIP score: 100 * cos(image embedding, text embedding), averaged (torchmetrics' definition).

* Model: transformers' `CLIPModel` layout in Flax (`lcm_jax.models.clip.CLIPModel`); the
  paper reports ViT-g/14 (`laion/CLIP-ViT-g-14-laion2B-s12B-b42K`); ViT-H/14 and OpenAI
  ViT-L/14 load the same way (a folder or hub id with config.json, model.safetensors, the
  tokenizer files and preprocessor_config.json).
* Images are preprocessed on the host with PIL exactly as transformers' PIL image processor
  (`CLIPImageProcessorPil` in transformers v5, `CLIPImageProcessor` in v4): shortest side to
  224 with PIL bicubic (the long side truncated: int(224 * long / short)), centre crop 224
  (top/left = (size - 224) // 2), x / 255 in float64 then float32, (x - mean) / std with
  CLIP's mean and std in float32. transformers v5's default `CLIPImageProcessor` resizes with
  torchvision instead when torchvision is installed, which differs slightly.
* Text: the model's tokenizer, padded to 77 tokens and truncated keeping the end token (the
  pooled state is at the end token, so padding does not change it). torchmetrics instead cuts
  a tokenised caption longer than 77 tokens at 77, losing its end token; only such captions
  score differently.
* Score: torchmetrics' `CLIPScore` returns max(mean over pairs of 100 cos, 0): the clamp is on
  the *mean*, not on each pair (its docstring's per-pair max is not what its code does).
  `mean_clip_score` returns that; `ClipScores` also keeps the unclamped mean and the count.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import jsonfile, weights
from lcm_jax.errors import LcmJaxError, UnsupportedConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3

# Files of a CLIPModel repository that lcm-jax reads (not open_clip's duplicate weights).
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "model.safetensors",
                "model.safetensors.index.json", "model-*-of-*.safetensors"]


@dataclasses.dataclass(frozen=True)
class CLIPPreprocess:
  """transformers' CLIP image processor settings (the defaults are every CLIP's)."""
  shortest_edge: int = 224
  crop_height: int = 224
  crop_width: int = 224
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  resample: int = PIL_BICUBIC

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPPreprocess":
    """Reads a `preprocessor_config.json` (old int sizes or new dict sizes).

    Raises:
      UnsupportedConfigError for a processor that skips a step or rescales differently.
    """
    for step in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
      if d.get(step, True) is not True:
        raise UnsupportedConfigError(f"CLIP preprocessor has {step}={d[step]!r}; only true is implemented")
    if abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
      raise UnsupportedConfigError(f"CLIP preprocessor has rescale_factor={d['rescale_factor']!r}; only 1/255")
    size, crop = d.get("size", 224), d.get("crop_size", 224)
    if isinstance(size, Mapping):
      if "shortest_edge" not in size or "longest_edge" in size:
        raise UnsupportedConfigError(f"CLIP preprocessor has size={size!r}; only {{'shortest_edge': n}}")
      size = size["shortest_edge"]
    ch, cw = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop, crop)
    return cls(int(size), int(ch), int(cw), tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
               tuple(d.get("image_std", OPENAI_CLIP_STD)), int(d.get("resample", PIL_BICUBIC)))


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(new_height, new_width): the short side becomes `shortest_edge`, the long side is truncated."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shortest_edge * long / short)
  return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] -> [height, width, C]; zero-padded (centred) first where the image is smaller."""
  h, w = image.shape[:2]
  if h < height or w < width:
    ph, pw = max(height, h), max(width, w)
    padded = np.zeros((ph, pw) + image.shape[2:], image.dtype)
    top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)  # ceil, as transformers pads
    padded[top:top + h, left:left + w] = image
    image, h, w = padded, ph, pw
  top, left = (h - height) // 2, (w - width) // 2
  return image[top:top + height, left:left + width]


def preprocess_image(image, config: CLIPPreprocess = CLIPPreprocess()) -> np.ndarray:
  """One image ([H, W, 3] uint8 or a PIL image) -> [crop_h, crop_w, 3] float32, CLIP-normalised."""
  from PIL import Image
  pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
  pil = pil.convert("RGB")
  h, w = resized_size(pil.height, pil.width, config.shortest_edge)
  resized = np.asarray(pil.resize((w, h), resample=config.resample))
  cropped = _centre_crop(resized, config.crop_height, config.crop_width)
  x = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def preprocess_images(images, config: CLIPPreprocess = CLIPPreprocess()) -> np.ndarray:
  """[B, H, W, 3] uint8 (or a list of images of any sizes) -> [B, crop_h, crop_w, 3] float32."""
  return np.stack([preprocess_image(im, config) for im in images]) if len(images) else \
      np.zeros((0, config.crop_height, config.crop_width, 3), np.float32)


def pair_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
  """[B, P] and [B, P] (unnormalised) -> [B] float64: 100 * cos of each (image, text) pair."""
  a = np.asarray(image_embeds, np.float64)
  b = np.asarray(text_embeds, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"image embeddings {a.shape} and text embeddings {b.shape} do not pair up")
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


def mean_clip_score(scores: np.ndarray) -> float:
  """torchmetrics' CLIPScore of per-pair scores: max(mean, 0)."""
  return max(float(np.mean(scores)), 0.0)


@dataclasses.dataclass
class ClipScores:
  """Running sum of per-pair scores (stream batches in, read `value` at the end)."""
  total: float = 0.0
  count: int = 0

  def update(self, scores: np.ndarray) -> "ClipScores":
    self.total += float(np.sum(scores))
    self.count += int(np.size(scores))
    return self

  @property
  def mean(self) -> float:
    if not self.count:
      raise LcmJaxError("CLIP score of no images")
    return self.total / self.count

  @property
  def value(self) -> float:
    """torchmetrics' value: the mean clamped at 0."""
    return max(self.mean, 0.0)


# ---------------------------------------------------------------------------------------
# The model


class CLIPScorer:
  """A loaded CLIP model: embeddings of images and prompts, and their CLIP scores.

  Batches are padded to `batch_size`, so each tower compiles once.
  """

  def __init__(self, module, params, tokenizer, preprocess: CLIPPreprocess = CLIPPreprocess(),
               batch_size: int = 32):
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.preprocess, self.batch_size = preprocess, batch_size
    self._image_fn = jax.jit(functools.partial(module.apply, method="image_embeds"))
    self._text_fn = jax.jit(functools.partial(module.apply, method="text_embeds"))
    self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                          module.config.text.max_position_embeddings) if tokenizer is not None else None

  def image_embeddings(self, images) -> np.ndarray:
    """[B, H, W, 3] uint8 (or a list of images) -> [B, P] float32 (unnormalised)."""
    pixels = preprocess_images(images, self.preprocess)
    return self._batched(pixels, lambda x: self._image_fn({"params": self.params}, x))

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """B prompts -> [B, P] float32 (unnormalised)."""
    from lcm_jax.tokenizer import tokenize
    ids = tokenize(self.tokenizer, list(prompts), max_length=self.max_length)
    return self._batched(ids, lambda x: self._text_fn({"params": self.params}, x))

  def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
    """Per-pair 100 * cos for images[i] with prompts[i] -> [B] float64."""
    if len(images) != len(prompts):
      raise LcmJaxError(f"{len(images)} images and {len(prompts)} prompts: CLIP score needs pairs")
    return pair_scores(self.image_embeddings(images), self.text_embeddings(prompts))

  def _batched(self, data: np.ndarray, fn) -> np.ndarray:
    out = []
    for start in range(0, len(data), self.batch_size):
      chunk = data[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(jnp.asarray(chunk)), np.float32)[:n])
    width = self.module.config.projection_dim
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def resolve_clip_folder(path_or_repo_id: str, revision: str | None = None) -> str:
  """A local folder, or a Hugging Face Hub snapshot of the CLIPModel files lcm-jax reads.

  Raises:
    LcmJaxError when the folder does not exist or the hub cannot be reached.
  """
  path = os.path.expanduser(path_or_repo_id)
  if os.path.isdir(path):
    return path
  if path_or_repo_id.count("/") != 1 or path_or_repo_id.startswith((".", "/", "~")):
    raise LcmJaxError(f"CLIP model folder {path_or_repo_id!r} does not exist")
  from lcm_jax.sd_pipeline import download_from_hub
  return download_from_hub(path_or_repo_id, HUB_PATTERNS, revision=revision, what="CLIP model ",
                           hint="If this machine is offline, pass a local folder with config.json, "
                           "model.safetensors and the tokenizer files.")


def load_clip_params(folder: str, module) -> dict:
  """CLIPModel weights (model.safetensors, or sharded) of `folder` -> Flax params of `module`."""
  from lcm_jax.sd_pipeline import _Renamed, open_component_weights
  tensors = open_component_weights(folder, "model")
  # Non-persistent buffers that older transformers versions saved.
  view = _Renamed(tensors, {k: k for k in tensors if not k.endswith("embeddings.position_ids")})
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
  return weights.torch_to_flax(view, shapes, what=folder)


def load_clip(path_or_repo_id: str, *, revision: str | None = None, dtype=jnp.float32,
              batch_size: int = 32) -> CLIPScorer:
  """A `CLIPScorer` for a CLIPModel folder or hub id (e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K).

  Raises:
    LcmJaxError (and subclasses) saying what is missing or unsupported.
  """
  from lcm_jax.models.clip import CLIPModel, CLIPModelConfig
  from lcm_jax.tokenizer import load_tokenizer
  folder = resolve_clip_folder(path_or_repo_id, revision)
  config = CLIPModelConfig.from_dict(jsonfile.read_json(os.path.join(folder, "config.json")))
  module = CLIPModel(config, dtype=dtype)
  params = load_clip_params(folder, module)
  processor_file = os.path.join(folder, "preprocessor_config.json")
  preprocess = CLIPPreprocess.from_dict(jsonfile.read_json(processor_file)) if os.path.exists(processor_file) \
      else CLIPPreprocess()
  if preprocess.crop_height != config.vision.image_size or preprocess.crop_width != config.vision.image_size:
    raise UnsupportedConfigError(f"{folder}: the processor crops {preprocess.crop_height}x{preprocess.crop_width} "
                                 f"but the vision tower takes {config.vision.image_size}")
  return CLIPScorer(module, params, load_tokenizer(folder), preprocess, batch_size)


