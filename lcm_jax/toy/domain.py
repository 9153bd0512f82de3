"""A procedurally generated captioned-image domain: one coloured shape on a coloured background.

Each image is SIZE x SIZE RGB: a filled shape (circle, square, triangle or cross) of one
colour, at one of five positions, on a flat background of another colour; its caption names
the four attributes in a fixed template, e.g.

    "a red circle on the left on a blue background"
    "a green cross in the center on a black background"

Images are drawn at 4x resolution and box-filtered (anti-aliased edges), with small random
jitter in position, size and colour so that a caption has many images and the distribution
has a proper covariance (an FID needs one). Everything is deterministic: sample `i` of seed
`s` depends on (s, i) only, not on how many samples are drawn.

Sub-domains:
* `TRAIN_COLOURS`: the shape and background colours the toy teacher is trained on.
* `SHIFTED_COLOURS`: shape colours the teacher never sees (its words never appear in its
  captions either), drawn on the teacher's background colours. Latent consistency
  fine-tuning (LCF) adapts a distilled LCM to this sub-domain without the teacher.

`write_imagefolder` writes the Hugging Face imagefolder layout (`metadata.jsonl` with
`file_name` and `text`) that `python -m lcm_jax.train` reads with data.format=imagefolder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

SIZE = 32
SUPERSAMPLE = 4

# name -> sRGB. Far apart in RGB (>= 90 in some channel from each other) so that a colour
# is unambiguous after +-COLOUR_JITTER and a blurry reconstruction.
PALETTE = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (240, 215, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    # Shifted colours: never in the teacher's data.
    "orange": (245, 135, 20),
    "purple": (135, 45, 180),
    "pink": (250, 150, 200),
}
TRAIN_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SHIFTED_COLOURS = ("orange", "purple", "pink")
COLOURS = TRAIN_COLOURS + SHIFTED_COLOURS
SHAPES = ("circle", "square", "triangle", "cross")
# name -> (centre x, centre y) in pixels of a SIZE image, and the caption phrase.
POSITIONS = {
    "left": ((9.0, 16.0), "on the left"),
    "right": ((23.0, 16.0), "on the right"),
    "top": ((16.0, 9.0), "at the top"),
    "bottom": ((16.0, 23.0), "at the bottom"),
    "center": ((16.0, 16.0), "in the center"),
}
POSITION_NAMES = tuple(POSITIONS)

# Jitter ranges (uniform): centre +-POSITION_JITTER px, half-size in RADIUS_RANGE px,
# each colour channel +-COLOUR_JITTER.
POSITION_JITTER = 1.5
RADIUS_RANGE = (5.5, 7.5)
COLOUR_JITTER = 12

# Every word a caption can contain (the tokenizer makes each a single token).
VOCABULARY = tuple(dict.fromkeys(
    ("a", "on", "the", "at", "in", "background") + COLOURS + SHAPES
    + tuple(w for _, phrase in POSITIONS.values() for w in phrase.split())))


@dataclasses.dataclass(frozen=True)
class Attributes:
  """What one image shows; `caption` is its text."""
  colour: str
  shape: str
  position: str
  background: str

  @property
  def caption(self) -> str:
    return caption(self.colour, self.shape, self.position, self.background)


def caption(colour: str, shape: str, position: str, background: str) -> str:
  """The caption of an image: "a {colour} {shape} {position phrase} on a {background} background"."""
  return f"a {colour} {shape} {POSITIONS[position][1]} on a {background} background"


def parse_caption(text: str) -> Attributes:
  """The inverse of `caption`. Raises ValueError for text that is not a domain caption."""
  words = text.split()
  try:
    if words[0] != "a" or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
      raise ValueError
    phrase = " ".join(words[3:-4])
    position = next(p for p, (_, ph) in POSITIONS.items() if ph == phrase)
    attrs = Attributes(words[1], words[2], position, words[-2])
  except (IndexError, StopIteration, ValueError):
    raise ValueError(f"not a caption of the toy domain: {text!r}") from None
  if attrs.colour not in PALETTE or attrs.background not in PALETTE or attrs.shape not in SHAPES:
    raise ValueError(f"not a caption of the toy domain: {text!r}")
  return attrs


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Inside-test of a shape of half-size r at offsets (dx, dy) from its centre (y down): bool."""
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    # A little smaller than the bounding box so that its area is close to the circle's.
    h = 0.85 * r
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == "triangle":
    # Apex up at (0, -r), base from (-r, 0.8 r) to (r, 0.8 r).
    base = 0.8 * r
    slope = (base + r) / r  # dy per |dx| along the two sides
    return (dy <= base) & (dy >= -r + slope * np.abs(dx))
  if shape == "cross":
    arm = 0.35 * r
    return (((np.abs(dx) <= arm) & (np.abs(dy) <= r))
            | ((np.abs(dy) <= arm) & (np.abs(dx) <= r)))
  raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def render(attrs: Attributes, centre: tuple[float, float], radius: float,
           colour_rgb: Sequence[float], background_rgb: Sequence[float], size: int = SIZE) -> np.ndarray:
  """Draws one image: uint8 [size, size, 3]. Coverage is averaged over SUPERSAMPLE^2 points
  per pixel, so the edges are anti-aliased."""
  n = size * SUPERSAMPLE
  # Pixel (i, j) covers [j, j + 1) x [i, i + 1); sample points at the sub-pixel centres.
  coords = (np.arange(n) + 0.5) / SUPERSAMPLE
  dy, dx = coords[:, None] - centre[1], coords[None, :] - centre[0]
  mask = shape_mask(attrs.shape, dx, dy, radius).astype(np.float32)
  coverage = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
  fg = np.asarray(colour_rgb, np.float32)
  bg = np.asarray(background_rgb, np.float32)
  return np.round(coverage * fg + (1.0 - coverage) * bg).clip(0, 255).astype(np.uint8)


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _jittered(rng: np.random.Generator, name: str) -> np.ndarray:
  return np.asarray(PALETTE[name], np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)


def sample_attributes(seed: int, index: int, colours: Sequence[str] = TRAIN_COLOURS,
                      backgrounds: Sequence[str] = TRAIN_COLOURS) -> Attributes:
  """Attributes of sample `index` of `seed`: uniform colour, shape, position, and a uniform
  background among `backgrounds` other than the shape's colour."""
  rng = _rng(seed, index)
  colour = colours[rng.integers(len(colours))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  position = POSITION_NAMES[rng.integers(len(POSITION_NAMES))]
  others = [b for b in backgrounds if b != colour]
  return Attributes(colour, shape, position, others[rng.integers(len(others))])


def draw(attrs: Attributes, seed: int, index: int, size: int = SIZE) -> np.ndarray:
  """An image of `attrs` with the jitter of sample (seed, index): uint8 [size, size, 3]."""
  # A stream separate from sample_attributes', so that the same attributes can be drawn with
  # a given jitter (e.g. real images for a fixed prompt set).
  rng = _rng(seed, index + 2 ** 40)
  (cx, cy), _ = POSITIONS[attrs.position]
  scale = size / SIZE
  centre = ((cx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * scale,
            (cy + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * scale)
  radius = rng.uniform(*RADIUS_RANGE) * scale
  return render(attrs, centre, radius, _jittered(rng, attrs.colour), _jittered(rng, attrs.background), size)


def sample(seed: int, index: int, colours: Sequence[str] = TRAIN_COLOURS,
           backgrounds: Sequence[str] = TRAIN_COLOURS) -> tuple[np.ndarray, Attributes]:
  """Sample `index` of `seed`: (uint8 [SIZE, SIZE, 3], its attributes)."""
  attrs = sample_attributes(seed, index, colours, backgrounds)
  return draw(attrs, seed, index), attrs


def batch(seed: int, start: int, n: int, colours: Sequence[str] = TRAIN_COLOURS,
          backgrounds: Sequence[str] = TRAIN_COLOURS) -> tuple[np.ndarray, list[Attributes]]:
  """Samples start .. start + n - 1: (uint8 [n, SIZE, SIZE, 3], n attributes)."""
  pairs = [sample(seed, i, colours, backgrounds) for i in range(start, start + n)]
  return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def draw_all(attrs: Sequence[Attributes], seed: int) -> np.ndarray:
  """Images of given attributes, image i with jitter (seed, i): uint8 [n, SIZE, SIZE, 3]."""
  return np.stack([draw(a, seed, i) for i, a in enumerate(attrs)])


def all_attributes(colours: Sequence[str] = TRAIN_COLOURS,
                   backgrounds: Sequence[str] = TRAIN_COLOURS) -> list[Attributes]:
  """Every attribute combination of the sub-domain, in a fixed order."""
  return [Attributes(c, s, p, b) for c in colours for s in SHAPES for p in POSITION_NAMES
          for b in backgrounds if b != c]


def prompt_set(n: int, seed: int = 1234, colours: Sequence[str] = TRAIN_COLOURS,
               backgrounds: Sequence[str] = TRAIN_COLOURS) -> list[Attributes]:
  """A fixed, balanced evaluation prompt set of n attribute tuples.

  Shape colour, shape and position are cycled so that each value appears equally often
  (the text-alignment score is not dominated by an easy value); backgrounds and the order
  come from `seed`.
  """
  rng = np.random.default_rng(seed)
  combos = [(c, s, p) for c in colours for s in SHAPES for p in POSITION_NAMES]
  order = rng.permutation(len(combos))
  out = []
  for i in range(n):
    if i % len(combos) == 0 and i:
      order = rng.permutation(len(combos))
    c, s, p = combos[order[i % len(combos)]]
    others = [b for b in backgrounds if b != c]
    out.append(Attributes(c, s, p, others[rng.integers(len(others))]))
  return out


def write_imagefolder(out: str, n: int, seed: int = 0, colours: Sequence[str] = TRAIN_COLOURS,
                      backgrounds: Sequence[str] = TRAIN_COLOURS) -> str:
  """Writes n samples as a Hugging Face imagefolder: `out/00000.png ...` + `out/metadata.jsonl`.

  Each metadata line is {"file_name": ..., "text": caption, plus the four attributes}.
  Returns `out`.
  """
  from PIL import Image
  os.makedirs(out, exist_ok=True)
  width = max(5, len(str(n - 1)))
  with open(os.path.join(out, "metadata.jsonl"), "w") as f:
    for i in range(n):
      image, attrs = sample(seed, i, colours, backgrounds)
      name = f"{i:0{width}d}.png"
      Image.fromarray(image).save(os.path.join(out, name))
      f.write(json.dumps({"file_name": name, "text": attrs.caption, **dataclasses.asdict(attrs)}) + "\n")
  return out


def main(argv: list[str]) -> None:
  """`python -m lcm_jax.toy.domain`: writes a training set of the domain as an imagefolder."""
  del argv
  import time

  from absl import flags

  from lcm_jax.errors import LcmJaxError
  f = flags.FLAGS
  if not f.output:
    raise LcmJaxError("--output is required (the folder to write)")
  if f.num_images < 1:
    raise LcmJaxError(f"--num_images must be positive, got {f.num_images}")
  colours = TRAIN_COLOURS if f.colours == "teacher" else SHIFTED_COLOURS
  start = time.perf_counter()
  write_imagefolder(f.output, f.num_images, seed=f.seed, colours=colours)
  print(f"wrote {f.num_images} images ({f.colours} colours: {', '.join(colours)}) to {f.output} "
        f"in {time.perf_counter() - start:.0f}s", flush=True)


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("output", None, "Folder to write (PNG files + metadata.jsonl); required.")
  flags.DEFINE_integer("num_images", 8000, "Images to write.")
  flags.DEFINE_enum("colours", "teacher", ["teacher", "shifted"],
                    "Shape colours: the teacher's, or the shifted ones it never saw (for LCF).")
  flags.DEFINE_integer("seed", 0, "Seed: image i depends on (seed, i) only.")


if __name__ == "__main__":
  from lcm_jax import cli
  _define_flags()
  cli.run(main)
