"""The evaluation table's outputs: Markdown in the paper's layout, JSON, the plot, a sample grid.

The paper's Table 1 layout: one row per method, then the first metric at every step count,
then the next metric at every step count ("FID ↓ 1-step ... CLIP ↑ 8-step"). Reference rows
(cells without steps) are listed under the table, then notes that say how each metric was
computed (FID mode and reference preprocessing, CLIP model): numbers from another protocol
are not comparable, so the table carries its own.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from lcm_jax.eval.metric import Column
from lcm_jax.eval.table import Cell, Evaluation, rates

ROW_NAMES = {"ddim": "DDIM", "dpm_solver": "DPM-Solver", "dpm_solver_pp": "DPM-Solver++", "lcm": "LCM"}


def row_name(row: str) -> str:
  return ROW_NAMES.get(row, row)


def summary_line(cell: Cell, result: dict) -> str:
  """One printed line per finished cell: its scores and images/s (generation, each metric)."""
  scores = "  ".join(f"{k} {v:.4g}" for k, v in result["scores"].items())
  speed = ", ".join(f"{k} {v:.2f}" for k, v in rates(result["timings"]).items() if v)
  where = f"{row_name(cell.row)} {cell.steps} steps" if cell.steps is not None else cell.row
  return f"[evaluate] {where}: {scores}  (images/s: {speed})"


def columns_of(metrics: Sequence) -> list[Column]:
  return [c for m in metrics for c in m.columns]


def arrange(cells: Sequence[Cell], results: dict[str, dict]) -> tuple[dict, dict]:
  """(grid[row][str(steps)], references[row]) of the finished cells: each entry holds the
  scores, the timings and `images_per_second` (generation and each metric)."""
  grid: dict = {}
  references: dict = {}
  for cell in cells:
    if cell.name not in results:
      continue
    r = results[cell.name]
    entry = dict(r["scores"], timings=r["timings"], images_per_second=rates(r["timings"]))
    if cell.steps is None:
      references[cell.row] = entry
    else:
      grid.setdefault(cell.row, {})[str(cell.steps)] = entry
  return grid, references


def markdown_table(results: dict, rows: Sequence[str], steps: Sequence[int], columns: Sequence[Column],
                   references: dict | None = None, notes: Sequence[str] = ()) -> str:
  """The paper's layout; "—" marks a cell not scored yet. references: {label: scores}."""
  head = "| Method | " + " | ".join(f"{c.header} {s}-step" for c in columns for s in steps) + " |"
  lines = [head, "|" + "---|" * (1 + len(columns) * len(steps))]
  for row in rows:
    values = [c.format(results.get(row, {}).get(str(s), {}).get(c.key)) for c in columns for s in steps]
    lines.append(f"| {row_name(row)} | " + " | ".join(values) + " |")
  text = "\n".join(lines) + "\n"
  if references:
    text += "\nReferences (same prompts): " + "; ".join(
        f"{name}: " + ", ".join(f"{c.short} {c.format(r.get(c.key))}" for c in columns)
        for name, r in references.items()) + ".\n"
  if notes:
    text += "\n" + "\n".join(f"* {n}" for n in notes) + "\n"
  return text


def plot(results: dict, rows: Sequence[str], steps: Sequence[int], columns: Sequence[Column]) -> np.ndarray | None:
  """Each column against steps, one line per row (None while nothing is scored)."""
  from lcm_jax import figures
  panels = []
  for c in columns:
    data = {row_name(r): {k: results[r][str(k)][c.key] for k in steps
                          if str(k) in results.get(r, {}) and math.isfinite(results[r][str(k)].get(c.key, math.nan))}
            for r in rows}
    panels.append((c.plot_title or c.header, {name: v for name, v in data.items() if v}))
  if not any(data for _, data in panels):
    return None
  return figures.line_plot(panels, log_y=[c.log_plot for c in columns])


def write_report(output: str, cells: Sequence[Cell], results: dict[str, dict], metrics: Sequence,
                 settings: dict, notes: Sequence[str] = (), extra: dict | None = None) -> str:
  """Writes output/table.md, table.json and plot.png from the finished cells; returns the table.

  notes: lines printed under the table before each metric's `describe()` line.
  extra: more top-level entries of table.json.
  """
  from lcm_jax import figures
  os.makedirs(output, exist_ok=True)
  grid, references = arrange(cells, results)
  rows = list(dict.fromkeys(c.row for c in cells if c.steps is not None))
  steps = list(dict.fromkeys(c.steps for c in cells if c.steps is not None))
  columns = columns_of(metrics)
  table = markdown_table(grid, rows, steps, columns, references, list(notes) + [m.describe() for m in metrics])
  with open(os.path.join(output, "table.md"), "w") as f:
    f.write(table)
  report = {"results": grid, "references": references, "settings": settings,
            "metrics": {m.name: {"settings": m.settings(), "description": m.describe()} for m in metrics},
            "complete": all(c.name in results for c in cells), **(extra or {})}
  with open(os.path.join(output, "table.json"), "w") as f:
    json.dump(report, f, indent=2)
  image = plot(grid, rows, steps, columns)
  if image is not None:
    figures.save_png(os.path.join(output, "plot.png"), image)
  return table


def run_and_report(evaluation: Evaluation, cells: Sequence[Cell], metrics: Sequence, output: str, settings: dict,
                   notes: Sequence[str] = (), *, grid_prompts: int = 0, lead: Sequence[tuple[str, np.ndarray]] = (),
                   log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict[str, dict]:
  """Runs every cell and writes the report: after each cell its summary line (scores,
  images/s) and the partial table.md, table.json and plot.png; at the end samples.png
  (`samples_grid` of the first `grid_prompts` prompts after the `lead` rows; 0: none) and the
  final files, with the run's seconds in table.json, and logs the table. Returns the results
  ({cell name: {"scores", "timings"}}, as `Evaluation.run`). The one run loop of
  `python -m lcm_jax.evaluate` and `python -m lcm_jax.toy.evaluate`."""
  start = time.perf_counter()
  results: dict[str, dict] = {}

  def on_cell(cell, result):
    results[cell.name] = result
    log(summary_line(cell, result))
    write_report(output, cells, results, metrics, settings, notes)

  evaluation.run(cells, on_cell)
  written = ["table.md", "table.json", "plot.png"]
  if grid_prompts:
    from lcm_jax import figures
    figures.save_png(os.path.join(output, "samples.png"), samples_grid(evaluation, cells, grid_prompts, lead))
    written.append("samples.png")
  total = time.perf_counter() - start
  table = write_report(output, cells, results, metrics, settings, notes, extra={"total_seconds": round(total, 1)})
  log(table)
  log(f"[evaluate] wrote {', '.join(os.path.join(output, f) for f in written)} in {total / 60:.1f} min")
  return results


def samples_grid(evaluation: Evaluation, cells: Sequence[Cell], num_prompts: int,
                 lead: Sequence[tuple[str, np.ndarray]] = (), max_size: int = 128) -> np.ndarray:
  """A labelled grid: the first image of each of the first prompts, one row per grid cell,
  after the `lead` rows (label, uint8 [num_prompts, H, W, 3]). Large images are shrunk to
  max_size, small ones enlarged to about 96 pixels."""
  from lcm_jax import figures
  n = min(num_prompts, len(evaluation.prompts))
  indices = np.arange(n) * evaluation.images_per_prompt
  grid_cells = [c for c in cells if c.steps is not None]
  rows = [images for _, images in lead] + [evaluation.cache(c).read(indices) for c in grid_cells]
  labels = [label for label, _ in lead] + [f"{row_name(c.row)} {c.steps}" for c in grid_cells]
  rows = [_thumbnails(r, max_size) for r in rows]
  scale = max(1, 96 // rows[0].shape[1])
  return figures.labelled_grid(rows, labels, evaluation.prompts[:n], scale=scale)


def _thumbnails(images: np.ndarray, max_size: int) -> np.ndarray:
  if max(images.shape[1:3]) <= max_size:
    return images
  from PIL import Image
  f = max_size / max(images.shape[1:3])
  size = (round(images.shape[2] * f), round(images.shape[1] * f))
  return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in images])
