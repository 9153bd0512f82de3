"""The Colab notebooks run headless (issue 17 item 1): nbclient executes each one in a fresh
kernel with no network, against local models and a tiny budget, and the test checks what it
wrote (images, the export, the loss curve and the numbers in its summary).

The budget goes in as papermill does it: a cell inserted after the one tagged `parameters`
that assigns the overrides. The install cell skips itself where lcm_jax is importable (here,
the editable install).
"""

from __future__ import annotations

import json
import math
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.helpers import REPO

COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("sample_lcm.ipynb", "distill_toy.ipynb")

pytestmark = pytest.mark.slow  # each runs compiles (and a short training) in a kernel: 1-3 min


def _with_parameters(nb, overrides: dict):
  """The notebook with a cell after its `parameters` cell that sets `overrides` (papermill's way)."""
  [index] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


def _run(name: str, overrides: dict, cwd) -> nbformat.NotebookNode:
  nb = _with_parameters(nbformat.read(os.path.join(COLAB, name), as_version=4), overrides)
  env_before = dict(os.environ)
  os.environ.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: plots become outputs
  try:
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_structure(name):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  text = "\n".join(c.source for c in nb.cells)
  assert f"https://colab.research.google.com/github/<OWNER>/lcm-jax/blob/main/colab/{name}" in text
  # Installs for the runtime's accelerator from the repository.
  assert 'f"lcm-jax{extra} @ git+{REPO_URL}"' in text and '"tpu": "[tpu]", "gpu": "[cuda]"' in text


def test_sample_notebook(tiny_pipeline, tmp_path):
  out, exported = tmp_path / "out", tmp_path / "exported"
  nb = _run("sample_lcm.ipynb", dict(MODEL=tiny_pipeline("sd1_lcm"), PROMPTS=["a red circle", "a photo of a cat"],
                                     STEPS=[1, 2], GUIDANCE_SWEEP=[1.0, 8.5], OUTPUT_DIR=str(out),
                                     EXPORT_DIR=str(exported)), tmp_path)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["dtype"] == "fp32" and (summary["height"], summary["width"]) == (16, 16)
  assert set(summary["seconds_per_image"]) == {"1", "2"}
  assert all(0 < s < 300 for s in summary["seconds_per_image"].values())
  assert all(1 < s < 128 for s in summary["image_std"].values())  # images, not blank or noise
  # Guidance changes the images (w = g - 1 reaches the UNet).
  assert summary["guidance_image_std"]["1.0"] != summary["guidance_image_std"]["8.5"]
  steps_grid = np.asarray(Image.open(out / "steps_grid.png"))
  assert steps_grid.ndim == 3 and steps_grid.shape[0] > 2 * 16 and steps_grid.std() > 0
  assert (out / "guidance_grid.png").is_file()
  assert {"model_index.json", "README.md", "unet"} <= set(summary["exported"])
  assert "LatentConsistencyModelPipeline" in (exported / "README.md").read_text()
  # The grids are displayed as images in the notebook's outputs.
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) == 2


def test_distill_toy_notebook(tmp_path):
  workdir = tmp_path / "toy_lcm"
  nb = _run("distill_toy.ipynb", dict(NUM_IMAGES=48, NUM_TRAIN_STEPS=4, BATCH_SIZE=4, LOG_EVERY=2,
                                      WORKDIR=str(workdir), DATA=str(tmp_path / "data"), TEACHER_STEPS=2,
                                      LCM_STEPS=[1, 2], NUM_PROMPTS=2), tmp_path)
  summary = json.loads((workdir / "notebook_summary.json").read_text())
  assert summary["steps"] == [2, 4]
  assert all(math.isfinite(x) and 0 < x < 10 for x in summary["losses"])
  assert all(0 < s < 128 for s in summary["lcm_image_std"].values()) and summary["teacher_image_std"] > 1
  grid = np.asarray(Image.open(workdir / "teacher_vs_lcm.png"))
  assert grid.shape[0] > 3 * 32 and grid.std() > 0  # teacher row + 2 LCM rows of 32 px images
  assert np.asarray(Image.open(workdir / "loss_curve.png")).std() > 0
  # The run's logs beside TensorBoard: the notebook plotted metrics.jsonl; train.log has the messages.
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [2, 4]
  assert re.search(r"step 4: .*train/loss=", (workdir / "train.log").read_text())
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 3
