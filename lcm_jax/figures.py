"""PNG images and figures without matplotlib (not a dependency): image grids, labelled grids and
line plots, drawn with Pillow. Every PNG the library writes goes through `save_png`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GRAY = (255, 255, 255), (0, 0, 0), (190, 190, 190)
# One colour per plotted series (colour-blind-safe "Okabe-Ito" palette).
SERIES_COLOURS = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233))


def _font():
  return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
  left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
  return right - left


def labelled_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], column_labels: Sequence[str] = (),
                  scale: int = 3, pad: int = 2) -> np.ndarray:
  """Images in rows with a label left of each row and optional labels above the columns.

  Args:
    rows: R arrays uint8 [C, H, W, 3] (the same C, H, W).
    row_labels: R strings. column_labels: C strings (wrapped at spaces), or empty.
    scale: nearest-neighbour upscaling of each image (32x32 images are small on screen).
  Returns:
    uint8 [height, width, 3].
  """
  cols, h, w, _ = rows[0].shape
  h, w = h * scale, w * scale
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_w = max(_text_width(probe, s) for s in row_labels) + 2 * pad + 4
  wrapped = [_wrap(probe, s, w + pad) for s in column_labels]
  header_h = (12 * max(len(x) for x in wrapped) + pad) if wrapped else 0
  canvas = Image.new("RGB", (label_w + cols * (w + pad), header_h + len(rows) * (h + pad)), WHITE)
  draw = ImageDraw.Draw(canvas)
  for c, lines in enumerate(wrapped):
    for k, line in enumerate(lines):
      draw.text((label_w + c * (w + pad), pad + 12 * k), line, fill=BLACK, font=_font())
  for r, (images, label) in enumerate(zip(rows, row_labels)):
    y = header_h + r * (h + pad)
    draw.text((pad, y + h // 2 - 6), label, fill=BLACK, font=_font())
    for c, image in enumerate(images):
      tile = Image.fromarray(np.asarray(image, np.uint8)).resize((w, h), Image.NEAREST)
      canvas.paste(tile, (label_w + c * (w + pad), y))
  return np.asarray(canvas)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if line and _text_width(draw, candidate) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  return lines + ([line] if line else [])


def line_plot(panels: Sequence[tuple[str, Mapping[str, Mapping[int, float]]]], x_label: str = "steps",
              size: tuple[int, int] = (380, 300), log_y: Sequence[bool] = ()) -> np.ndarray:
  """Side-by-side line plots, one per panel, with a log2 x axis and a shared legend.

  Args:
    panels: (title, {series name: {x: y}}) per panel.
    log_y: per panel, whether its y axis is logarithmic (positive values only).
  Returns:
    uint8 [height, width, 3].
  """
  pw, ph = size
  margin_l, margin_r, margin_t, margin_b = 56, 14, 26, 40
  series = list(dict.fromkeys(name for _, data in panels for name in data))
  legend_h = 16 * len(series) + 8
  canvas = Image.new("RGB", (pw * len(panels), ph + legend_h), WHITE)
  draw = ImageDraw.Draw(canvas)
  for p, (title, data) in enumerate(panels):
    x0, x1 = p * pw + margin_l, (p + 1) * pw - margin_r
    y0, y1 = margin_t, ph - margin_b
    log = p < len(log_y) and log_y[p]
    fy = (lambda y: np.log10(max(y, 1e-12))) if log else (lambda y: y)
    xs = sorted({x for values in data.values() for x in values})
    ys = [fy(y) for values in data.values() for y in values.values() if np.isfinite(y)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-9:
      lo, hi = lo - 0.5, hi + 0.5
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    lx = {x: np.log2(x) for x in xs}
    span = (max(lx.values()) - min(lx.values())) or 1.0
    px = lambda x: x0 + (lx[x] - min(lx.values())) / span * (x1 - x0)
    py = lambda y: y1 - (y - lo) / (hi - lo) * (y1 - y0)
    draw.rectangle((x0, y0, x1, y1), outline=BLACK)
    draw.text((x0 + (x1 - x0) // 2 - _text_width(draw, title) // 2, 6), title, fill=BLACK, font=_font())
    for k in range(5):
      y = lo + (hi - lo) * k / 4
      draw.line((x0, py(y), x1, py(y)), fill=GRAY)
      label = f"{10 ** y:.3g}" if log else f"{y:.3g}"
      draw.text((x0 - 6 - _text_width(draw, label), py(y) - 6), label, fill=BLACK, font=_font())
    for x in xs:
      draw.line((px(x), y1, px(x), y1 + 4), fill=BLACK)
      draw.text((px(x) - 3, y1 + 6), str(x), fill=BLACK, font=_font())
    draw.text((x0 + (x1 - x0) // 2 - _text_width(draw, x_label) // 2, y1 + 20), x_label, fill=BLACK, font=_font())
    for name, values in data.items():
      colour = SERIES_COLOURS[series.index(name) % len(SERIES_COLOURS)]
      points = [(px(x), py(fy(y))) for x, y in sorted(values.items()) if np.isfinite(y)]
      if len(points) > 1:
        draw.line(points, fill=colour, width=2)
      for x, y in points:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
  for i, name in enumerate(series):
    y = ph + 4 + 16 * i
    colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
    draw.line((margin_l, y + 6, margin_l + 24, y + 6), fill=colour, width=3)
    draw.text((margin_l + 30, y), name, fill=BLACK, font=_font())
  return np.asarray(canvas)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] (or [H, W]) as a PNG, creating the folder if needed."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def image_grid(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows H, cols W, 3] image, cols = ceil(sqrt(N)), row-major;
  empty cells are black."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
  return grid


def rows_by_columns(images: np.ndarray) -> np.ndarray:
  """uint8 [R, C, H, W, 3] -> one uint8 [R H, C W, 3] image: row r, column c is images[r, c]."""
  r, c, h, w, ch = images.shape
  return np.asarray(images).transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)
