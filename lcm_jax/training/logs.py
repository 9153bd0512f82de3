"""What a run reports, in its workdir: TensorBoard scalars and images, `metrics.jsonl` (one
JSON object per log point: {"step", "time", <scalar name>: value, ...}) for scripts, and
`train.log`, the console's lines and each log point's scalars as plain text with times.

On resume, metrics.jsonl drops the lines of steps the resumed run trains again (those a run
logged after its last checkpoint); train.log keeps everything, in order, as it happened.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

from lcm_jax.errors import LcmJaxError


METRICS_FILE = "metrics.jsonl"
TEXT_LOG_FILE = "train.log"


def append_text_log(workdir: str, message: str) -> None:
  """Appends `message` to WORKDIR/train.log with the local time (the folder is created if needed)."""
  os.makedirs(workdir, exist_ok=True)
  stamp = time.strftime("%Y-%m-%d %H:%M:%S")
  with open(os.path.join(workdir, TEXT_LOG_FILE), "a", encoding="utf-8") as f:
    f.writelines(f"{stamp} {line}\n" for line in str(message).splitlines() or [""])


def drop_metrics_from(path: str, step: int) -> None:
  """Removes the lines of metrics.jsonl at `step` or later (a resumed run logs them again)."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] < step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a half-written last line of a killed run
  if len(kept) != len(lines):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(kept)


class MetricWriter:
  """TensorBoard scalars and images, metrics.jsonl and train.log lines in the workdir
  (process 0 only; a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    self._workdir, self._enabled, self._first = workdir, enabled, True
    if enabled:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise LcmJaxError("TensorBoard logging needs tensorboardX: pip install tensorboardX") from None
      self._writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)
    path = os.path.join(self._workdir, METRICS_FILE)
    if self._first:
      drop_metrics_from(path, step)
      self._first = False
    values = {name: float(value) for name, value in values.items()}
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **values}) + "\n")
    append_text_log(self._workdir, f"step {step}: " + " ".join(f"{k}={v:.6g}" for k, v in values.items()))

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


def console(is_main: bool, workdir: str | None = None):
  """print(..., flush=True) on process 0, also appended to WORKDIR/train.log when `workdir`
  is given; nothing elsewhere."""
  if not is_main:
    return lambda *a: None

  def log(*args) -> None:
    print(*args, flush=True)
    if workdir:
      append_text_log(workdir, " ".join(str(a) for a in args))
  return log


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
