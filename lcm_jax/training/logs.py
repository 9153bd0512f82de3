"""What a run reports: TensorBoard scalars and images in the workdir, and console lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

from lcm_jax.errors import LcmJaxError


class MetricWriter:
  """TensorBoard scalars and images in the workdir (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise LcmJaxError("TensorBoard logging needs tensorboardX: pip install tensorboardX") from None
      self._writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self._writer:
      self._writer.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def mean_metrics(pending: list[dict]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device scalars) on the host."""
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def console(is_main: bool):
  """print(..., flush=True) on process 0, nothing elsewhere."""
  return (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)


SKIP_LOG_FILE = "skipped_records.jsonl"
NAME_FIRST_SKIPS = 10  # the console names this many skipped records, then gives counts


def skip_log_path(workdir: str, process_index: int) -> str:
  """WORKDIR/skipped_records.jsonl (process 0), skipped_records.process<p>.jsonl (others)."""
  name = SKIP_LOG_FILE if process_index == 0 else SKIP_LOG_FILE.replace(".jsonl", f".process{process_index}.jsonl")
  return os.path.join(workdir, name)


class SkipLog:
  """Every record the training batches skipped, one JSON line each in the skip log file
  ({"number", "step", "source", "index", "id", "reason"}); the console names the first
  `name_first` of the run and then, at log points, gives the count (the one TensorBoard's
  data/skipped_records shows).

  `already`: the records skipped before the state this run resumed from (its data position's
  count); lines past it were written by a run that stopped before its next checkpoint, and
  are removed, since this run consumes those batches again."""

  def __init__(self, path: str, already: int, log: Callable[..., None], name_first: int = NAME_FIRST_SKIPS):
    self.path, self.count, self._log, self._name_first = path, already, log, name_first
    self._reported = already
    if os.path.exists(path):
      with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
      if len(lines) > already:
        with open(path, "wb") as f:
          f.writelines(lines[:already])

  def add(self, step: int, records: list[dict]) -> None:
    """The records skipped by the batch of `step` (the step it is trained in)."""
    if not records:
      return
    lines = []
    for record in records:
      self.count += 1
      lines.append(json.dumps({"number": self.count, "step": step, **record}) + "\n")
      if self.count <= self._name_first:
        where = record["source"] if record["index"] is None else f"{record['source']} #{record['index']}"
        self._log(f"data: skipped record {self.count} (step {step}): {record['id']} [{where}]: {record['reason']}")
    with open(self.path, "a") as f:
      f.writelines(lines)

  def report(self, total: int) -> None:
    """At a log point: the count of skipped records (all processes), if it grew past the named ones."""
    if total != self._reported and total > self._name_first:
      self._log(f"data: {total} records skipped so far (each in {self.path})")
    self._reported = total
