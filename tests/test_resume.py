"""Resuming a workdir: damaged checkpoints fall back to the previous one bit-exactly, a changed
config is one line naming what differs, and a workdir in the way of a file is refused."""

from __future__ import annotations

import glob
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
