"""The workdir's plain-text log (train.log) and metrics.jsonl (issue 17 item 5).

TensorBoard's scalars are read back with tensorboard's own event reader where installed;
metrics.jsonl and train.log are checked line by line, including a resume that logs steps a
killed run had logged after its last checkpoint. A real run writes them too: the toy
notebook's test (tests/test_notebooks.py) plots its loss curve from metrics.jsonl.
"""

from __future__ import annotations

import json
import re

from lcm_jax.training.logs import MetricWriter, console


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_and_text_log(tmp_path, capsys):
  log = console(True, str(tmp_path))
  log("loading models from x ...")
  writer = MetricWriter(str(tmp_path), enabled=True)
  for step, loss in ((20, 0.5), (40, 0.25), (60, 0.125)):
    writer.scalars(step, {"train/loss": loss, "perf/step_time": 0.1})
  writer.close()
  assert "loading models from x ..." in capsys.readouterr().out
  rows = _jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in rows] == [(20, 0.5), (40, 0.25), (60, 0.125)]
  assert all(isinstance(r["time"], float) and r["perf/step_time"] == 0.1 for r in rows)
  lines = (tmp_path / "train.log").read_text().splitlines()
  assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d loading models from x \.\.\.", lines[0])
  assert lines[-1].endswith("step 60: train/loss=0.125 perf/step_time=0.1")


def test_resume_drops_the_steps_it_trains_again(tmp_path):
  writer = MetricWriter(str(tmp_path), enabled=True)
  for step in (20, 40, 60):
    writer.scalars(step, {"train/loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 80, "train/lo')  # killed while writing
  # Resumed from the checkpoint at step 50: the next log point is 60.
  resumed = MetricWriter(str(tmp_path), enabled=True)
  resumed.scalars(60, {"train/loss": -60.0})
  resumed.scalars(80, {"train/loss": -80.0})
  assert [(r["step"], r["train/loss"]) for r in _jsonl(tmp_path / "metrics.jsonl")] == [
      (20, 20.0), (40, 40.0), (60, -60.0), (80, -80.0)]
  # The text log keeps the history as it happened.
  assert len((tmp_path / "train.log").read_text().splitlines()) == 5


def test_other_processes_write_nothing(tmp_path):
  console(False, str(tmp_path))("x")
  MetricWriter(str(tmp_path / "w"), enabled=False).scalars(1, {"a": 1.0})
  assert list(tmp_path.iterdir()) == []
