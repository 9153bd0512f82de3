"""Resuming a workdir: damaged checkpoints fall back to the previous one bit-exactly, a changed
config is one line naming what differs, and a workdir in the way of a file is refused."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lcm_jax import training
from lcm_jax.errors import LcmJaxError
from tests.test_train import load_tiny_config, write_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
  """A workdir trained 4 steps (checkpoints at 2 and 4), and the run that resumes from 2."""
  root = tmp_path_factory.mktemp("resume")
  setup = {"teacher": tiny_pipeline("sd1"), "data.path": write_image_folder(str(root / "images")),
           "compilation_cache_dir": str(root / "jax_cache")}
  config = lambda **kw: load_tiny_config(**{**setup, **kw})
  workdir = str(root / "trained")
  training.train(config(num_train_steps=4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # The reference: the same workdir without its step-4 checkpoint, continued to step 5.
  reference = str(root / "reference")
  shutil.copytree(workdir, reference)
  shutil.rmtree(os.path.join(reference, "checkpoints", "4"))
  state = jax.device_get(training.train(config(num_train_steps=5), reference))
  yield {"root": root, "workdir": workdir, "config": config, "reference": state}
  jax.config.update("jax_compilation_cache_dir", None)


def _damage_missing_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "target_params"))


def _damage_truncated_array(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True) if os.path.isfile(p)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _damage_empty_folder(step_dir):
  for entry in os.listdir(step_dir):
    path = os.path.join(step_dir, entry)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@pytest.mark.parametrize("damage", [_damage_missing_item, _damage_truncated_array, _damage_empty_folder],
                         ids=["missing_item", "truncated_array", "empty_folder"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(trained, damage, capsys):
  workdir = str(trained["root"] / damage.__name__)
  shutil.copytree(trained["workdir"], workdir)
  damage(os.path.join(workdir, "checkpoints", "4"))
  state = jax.device_get(training.train(trained["config"](num_train_steps=5), workdir))
  out = capsys.readouterr().out
  assert "resumed" in out and "at step 2" in out, out
  if damage is not _damage_empty_folder:  # Orbax does not list an empty step folder at all
    assert "warning: the checkpoint of step 4 cannot be restored" in out, out
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert int(state.step) == 5
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (state.params, state.target_params), (trained["reference"].params, trained["reference"].target_params))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]  # step 4 saved anew


def test_resuming_with_another_model_is_one_line_naming_the_keys(trained):
  workdir = str(trained["root"] / "changed")
  shutil.copytree(trained["workdir"], workdir)
  before = sorted(os.listdir(workdir))
  with pytest.raises(LcmJaxError) as e:
    training.train(trained["config"](num_train_steps=5, **{"loss.guidance_embedding_dim": 128, "seed": 3}), workdir)
  message = str(e.value)
  assert "\n" not in message
  assert "loss.guidance_embedding_dim: 256 -> 128" in message and "seed: 0 -> 3" in message
  assert "num_train_steps" not in message  # a safe change is not an error
  assert sorted(os.listdir(workdir)) == before  # nothing written


def test_resume_with_changes_accepts_a_safe_change_of_the_loss(trained, capsys):
  workdir = str(trained["root"] / "accepted")
  shutil.copytree(trained["workdir"], workdir)
  state = training.train(trained["config"](num_train_steps=5, resume_with_changes=True,
                                           **{"loss.omega_min": 3.0}), workdir)
  assert int(jax.device_get(state.step)) == 5
  assert "loss.omega_min: 2.0 -> 3.0" in capsys.readouterr().out


def test_a_workdir_that_is_a_file_is_refused(trained):
  path = trained["root"] / "a_file"
  path.write_text("not a folder")
  for workdir, message in ((path, "is a file, not a folder"), (path / "below", "cannot be created")):
    with pytest.raises(LcmJaxError, match=message):
      training.train(trained["config"](), str(workdir))
  assert path.read_text() == "not a folder"


def _scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one TensorBoard scalar in the workdir's event files."""
  import struct

  from tensorboardX.proto import event_pb2
  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    data, offset = open(path, "rb").read(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      values.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
      offset += 12 + length + 4
  return values


def _expected_skips(records: list[tuple[str, str | None]], batch: int, steps: int) -> list[dict]:
  """The skip log of `steps` steps over an unshuffled stream of `records` ((name, reason or
  None if usable), repeating): a bad record is consumed by the batch of the first usable
  record after it."""
  expected, pending, used, position = [], [], 0, 0
  while used < batch * steps:
    name, reason = records[position % len(records)]
    if reason is None:
      used += 1
      expected += [dict(p, step=(used - 1) // batch + 1) for p in pending]
      pending = []
    else:
      pending.append({"index": position % len(records), "name": name, "reason": reason})
    position += 1
  return expected


def test_skipped_records_are_counted_and_named_as_training_consumes_them(tiny_pipeline, tmp_path, capsys):
  """An image folder with a corrupt image and an image without caption: the skip log names
  each record (source, index, id, reason) at the step whose batch consumed it, TensorBoard
  counts the same records, the console names them; resumed from step 2 after the log was
  written to step 4, the log is the same, with no record twice."""
  from PIL import Image
  folder = write_image_folder(str(tmp_path / "images"))
  with open(os.path.join(folder, "2b.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not an image")
  with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
    f.write('{"file_name": "2b.png", "text": "a red dog"}\n')
  Image.new("RGB", (20, 20)).save(os.path.join(folder, "4b.png"))  # no metadata line
  names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
  reasons = {"2b.png": "cannot decode image", "4b.png": "image has no line in the metadata"}
  expected = _expected_skips([(n, reasons.get(n)) for n in names], batch=2, steps=4)
  assert [e["step"] for e in expected] == [2, 3]  # the derivation, on this layout
  config = lambda **kw: load_tiny_config(**{"teacher": tiny_pipeline("sd1"), "data.path": folder,
                                            "data.shuffle": False, "compilation_cache_dir": str(tmp_path / "cache"),
                                            **kw})
  workdir = str(tmp_path / "run")
  training.train(config(num_train_steps=4), workdir)
  out = capsys.readouterr().out
  log_path = os.path.join(workdir, "skipped_records.jsonl")
  lines = [json.loads(line) for line in open(log_path)]
  assert len(lines) == len(expected)
  for number, (line, want) in enumerate(zip(lines, expected), 1):
    assert line["number"] == number and line["step"] == want["step"], line
    assert line["source"] == folder and line["index"] == want["index"], line
    assert line["id"] == os.path.join(folder, want["name"]) and line["reason"].startswith(want["reason"]), line
    assert f"data: skipped record {number} (step {want['step']}): {line['id']}" in out, out
  counts = _scalars(workdir, "data/skipped_records")
  assert counts == {s: sum(e["step"] <= s for e in expected) for s in range(1, 5)}
  # A run stopped after writing the log to step 4 but with its last checkpoint at step 2.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  training.train(config(num_train_steps=4), resumed)
  assert open(os.path.join(resumed, "skipped_records.jsonl")).read() == open(log_path).read()
  jax.config.update("jax_compilation_cache_dir", None)


# A training process killed (SIGKILL) at a point of its step-4 checkpoint write: in an item's
# handler (the step folder is still a temporary one, an item missing), just before Orbax
# renames the complete temporary folder, and just after.
_KILL_SCRIPT = r"""
import asyncio, json, os, signal, sys
from orbax.checkpoint._src.path import atomicity
from lcm_jax import checkpoint, training
from tests.test_train import load_tiny_config

point, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "in_item":
  checkpoint.DataIteratorHandler.save = lambda self, directory, args: kill()
else:
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize_then_die(self, *a, **k):
    step_folder = self.get_final().name == "4"  # not another folder Orbax finalizes
    if step_folder and point == "before_rename":
      kill()
    await finalize(self, *a, **k)
    if step_folder:
      kill()
  atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
training.train(load_tiny_config(**overrides), workdir)
print("not killed")
"""


@pytest.mark.parametrize("point,resumes_at", [("in_item", 2), ("before_rename", 2), ("after_rename", 4)])
def test_a_run_killed_while_writing_a_checkpoint_resumes_bit_exactly(trained, point, resumes_at, capsys):
  import json
  import signal
  import subprocess
  import sys

  from tests.helpers import REPO
  workdir = str(trained["root"] / f"killed_{point}")
  shutil.copytree(trained["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the killed run writes step 4 again
  config = trained["config"](num_train_steps=4)
  overrides = {"teacher": config.teacher, "data.path": config.data.path, "num_train_steps": 4,
               "compilation_cache_dir": config.compilation_cache_dir}
  r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, point, workdir, json.dumps(overrides)], cwd=REPO,
                     env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=1500)
  assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
  steps = sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps == (["2", "4"] if point == "after_rename" else ["2"]), os.listdir(os.path.join(workdir, "checkpoints"))
  capsys.readouterr()
  state = jax.device_get(training.train(trained["config"](num_train_steps=5), workdir))
  assert f"at step {resumes_at}" in capsys.readouterr().out
  assert int(state.step) == 5
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (state.params, state.target_params), (trained["reference"].params, trained["reference"].target_params))


_SIGTERM_WHILE_COMPILING = r"""
import json, os, signal, sys
from lcm_jax import training
from lcm_jax.training import trainer
from tests.test_train import load_tiny_config

compile_step = trainer.compile_step
def terminated_while_compiling(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  return compile_step(*args, **kwargs)
trainer.compile_step = terminated_while_compiling
training.train(load_tiny_config(**json.loads(sys.argv[2])), sys.argv[1])
"""


def test_sigterm_while_compiling_saves_after_the_first_step_and_resumes_bit_exactly(trained, capsys):
  import json
  import subprocess
  import sys

  from tests.helpers import REPO
  workdir = str(trained["root"] / "sigterm_compiling")
  config = trained["config"](num_train_steps=5)
  overrides = {"teacher": config.teacher, "data.path": config.data.path, "num_train_steps": 5,
               "compilation_cache_dir": config.compilation_cache_dir}
  r = subprocess.run([sys.executable, "-c", _SIGTERM_WHILE_COMPILING, workdir, json.dumps(overrides)], cwd=REPO,
                     env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                     timeout=1500)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  assert "received SIGTERM" in r.stdout and "stopped at step 1 with a checkpoint" in r.stdout, r.stdout[-2000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  capsys.readouterr()
  state = jax.device_get(training.train(config, workdir))
  assert "at step 1" in capsys.readouterr().out
  assert int(state.step) == 5
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (state.params, state.target_params), (trained["reference"].params, trained["reference"].target_params))
