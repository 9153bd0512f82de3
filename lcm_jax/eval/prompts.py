"""Prompt sets for evaluation, and a deterministic sample of N prompts by seed.

Sources (`load_prompt_set`):
* COCO-2014 captions: an annotations file (`captions_val2014.json`: {"annotations":
  [{"id", "image_id", "caption"}, ...]}), or TFDS `coco_captions` (whose `val`, `restval`
  and `test` splits are Karpathy's split of COCO-2014 val, 40,504 images together; needs the
  dataset prepared locally). By default one caption per image (the usual "COCO-30K" protocol:
  N distinct images, one of their five captions each).
* PartiPrompts: `PartiPrompts.tsv` (columns Prompt, Category, Challenge, Note).
* A plain text file: one prompt per line; blank lines are skipped.

Every prompt keeps a stable id (COCO annotation id, TSV row, line number), so a sample can
be written down and reproduced. `sample` draws without replacement with NumPy's PCG64 from
the seed; the same (set, N, seed) always gives the same prompts in the same order.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from lcm_jax import jsonfile
from lcm_jax.errors import LcmJaxError

MAX_CAPTIONS_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """A named list of prompts with a stable id each (ids[i] belongs to prompts[i])."""
  name: str
  prompts: tuple[str, ...]
  ids: tuple[str, ...]

  def __post_init__(self):
    if len(self.prompts) != len(self.ids):
      raise ValueError("prompts and ids differ in length")

  def __len__(self) -> int:
    return len(self.prompts)

  def sample(self, n: int | None, seed: int = 0) -> "PromptSet":
    """n prompts drawn without replacement (all of them, shuffled, for n=None), by seed.

    Raises:
      LcmJaxError if n exceeds the set's size.
    """
    n = len(self) if n is None else n
    if n > len(self) or n < 0:
      raise LcmJaxError(f"cannot draw {n} prompts from {self.name}, which has {len(self)}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(self))[:n]
    return PromptSet(f"{self.name}[n={n},seed={seed}]", tuple(self.prompts[i] for i in order),
                     tuple(self.ids[i] for i in order))


def _clean(text: str) -> str:
  # COCO captions carry stray newlines and trailing spaces; a prompt is one line.
  return " ".join(str(text).split())


def read_text_prompts(path: str) -> PromptSet:
  """One prompt per line (blank lines skipped); ids are 1-based line numbers."""
  prompts, ids = [], []
  with _open(path) as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        prompts.append(_clean(line))
        ids.append(f"line{number}")
  return _nonempty(PromptSet(os.path.basename(path), tuple(prompts), tuple(ids)), path)


def read_parti_prompts(path: str, category: str | None = None) -> PromptSet:
  """PartiPrompts' TSV (header row with a `Prompt` column); ids are 0-based data rows.

  category: keep only rows of this `Category` (e.g. "Animals").
  """
  with _open(path) as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  if rows and "Prompt" not in rows[0]:
    raise LcmJaxError(f"{path} has no 'Prompt' column; it is not PartiPrompts' TSV")
  kept = [(i, r) for i, r in enumerate(rows)
          if (category is None or r.get("Category") == category) and (r.get("Prompt") or "").strip()]
  return _nonempty(PromptSet("parti" + (f"/{category}" if category else ""),
                             tuple(_clean(r["Prompt"]) for _, r in kept),
                             tuple(f"row{i}" for i, _ in kept)), path)


def read_coco_captions(path: str, *, one_per_image: bool = True, seed: int = 0) -> PromptSet:
  """A COCO captions annotation file -> prompts; ids are the captions' annotation ids.

  one_per_image: one caption per image, chosen by `seed` (images in increasing id order);
  otherwise every caption.
  """
  if not os.path.isfile(path):
    raise LcmJaxError(f"prompt file {path} does not exist")
  # COCO 2017's train captions are 90 MB; the bound only stops a wrong file being parsed whole.
  data = jsonfile.read_json(path, max_bytes=MAX_CAPTIONS_BYTES)
  annotations = data.get("annotations") if isinstance(data, dict) else None
  if not annotations or not all("caption" in a and "image_id" in a for a in annotations):
    raise LcmJaxError(f"{path} has no COCO caption annotations (a list of {{image_id, id, caption}})")
  captions = [(int(a["image_id"]), int(a.get("id", i)), _clean(a["caption"])) for i, a in enumerate(annotations)]
  return _coco_set("coco2014", captions, one_per_image, seed)


def _coco_set(name: str, captions: list[tuple[int, int, str]], one_per_image: bool, seed: int) -> PromptSet:
  """(image id, caption id, text) triples -> a PromptSet, one caption per image if asked."""
  captions = sorted(captions)
  if one_per_image:
    by_image: dict[int, list[tuple[int, str]]] = {}
    for image_id, caption_id, text in captions:
      by_image.setdefault(image_id, []).append((caption_id, text))
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = []
    for image_id in sorted(by_image):
      options = by_image[image_id]
      caption_id, text = options[int(rng.integers(len(options)))]
      chosen.append((image_id, caption_id, text))
    captions, name = chosen, f"{name}/one_per_image(seed={seed})"
  return PromptSet(name, tuple(t for _, _, t in captions), tuple(f"coco{c}" for _, c, _ in captions))


def tfds_coco_captions(split: str = "val+restval+test", *, data_dir: str | None = None,
                       one_per_image: bool = True, seed: int = 0) -> PromptSet:
  """COCO captions from TFDS `coco_captions` (prepared locally; no TensorFlow needed).

  The default split is all of COCO-2014 val (Karpathy's val, restval and test together).
  """
  from lcm_jax.data.sources import import_tfds
  tfds = import_tfds()
  try:
    source = tfds.data_source("coco_captions", split=split, data_dir=data_dir,
                              decoders={"image": tfds.decode.SkipDecoding()})
    captions = []
    for i in range(len(source)):
      example = source[i]
      image_id = int(example["image/id"])
      texts, ids = example["captions"]["text"], example["captions"]["id"]
      captions += [(image_id, int(c), _clean(_text(t))) for t, c in zip(texts, ids)]
  except Exception as e:  # TFDS raises many types (DatasetNotFoundError, ...)
    hint = ("TFDS's coco_captions builder needs TensorFlow: pip install 'lcm-jax[tfds]'" if "tensorflow" in str(e)
            else "prepare it with `tfds build coco_captions` (it downloads COCO-2014)")
    raise LcmJaxError(f"cannot read TFDS coco_captions split {split!r}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}. {hint}, or pass the captions JSON "
                      "file (captions_val2014.json) instead.") from None
  return _nonempty(_coco_set(f"tfds:coco_captions/{split}", captions, one_per_image, seed), "coco_captions")


def _text(t) -> str:
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def load_prompt_set(source: str, *, seed: int = 0, data_dir: str | None = None) -> PromptSet:
  """A prompt set by name or file.

  source: "coco2014" (TFDS coco_captions), a `.json` COCO captions file, a `.tsv`
  PartiPrompts file, or any other text file (one prompt per line).
  seed: which caption of each COCO image.
  """
  if source == "coco2014":
    return tfds_coco_captions(data_dir=data_dir, seed=seed)
  if source == "parti":
    raise LcmJaxError("PartiPrompts are not bundled: pass the path of PartiPrompts.tsv (from the "
                      "google-research/parti repository on GitHub)")
  if source.endswith(".json"):
    return read_coco_captions(source, seed=seed)
  if source.endswith(".tsv"):
    return read_parti_prompts(source)
  return read_text_prompts(source)


def _open(path: str):
  if not os.path.isfile(path):
    raise LcmJaxError(f"prompt file {path} does not exist")
  return open(path, encoding="utf-8", newline="")


def _nonempty(prompts: PromptSet, where: str) -> PromptSet:
  if not len(prompts):
    raise LcmJaxError(f"{where}: no prompts found")
  return prompts
