"""The package as users install it (issue 17 item 6): build the wheel from a copy of the
sources, install it into a fresh virtual environment (its dependencies from pip's index or
cache; no torch, no diffusers), and run the CLIs' --help from a folder outside the repository,
so nothing is imported from the checkout. Also: the wheel holds the toy weights and no tests.

Measured on the 2-core development machine with a warm pip cache: 1 min 52 s (build, venv,
install of jax, jaxlib, tensorstore and the other dependencies, three --help runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _run(cmd, **kwargs):
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kwargs)
  assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-4000:])
  return r


def test_wheel_installs_without_torch_and_the_clis_run(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "lcm_jax"), src / "lcm_jax", ignore=shutil.ignore_patterns("__pycache__"))
  _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
        str(tmp_path / "dist"), str(src)])
  [wheel] = list((tmp_path / "dist").glob("lcm_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert "lcm_jax/toy/weights/teacher/unet/diffusion_pytorch_model.safetensors" in names
  assert not any(n.startswith("tests/") for n in names)

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])
  python = str(venv / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  _run([python, "-m", "pip", "install", "--quiet", str(wheel)], env=env)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  r = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=elsewhere, env=env)
  assert r.returncode != 0 and "No module named 'torch'" in r.stderr
  r = _run([python, "-c", "import lcm_jax, os; print(os.path.dirname(lcm_jax.__file__))"], cwd=elsewhere, env=env)
  assert r.stdout.strip().startswith(str(venv))  # the installed copy, not the checkout
  for module, flag in (("lcm_jax.sample", "--model"), ("lcm_jax.train", "--workdir"), ("lcm_jax.export", "--push_to_hub")):
    r = _run([python, "-m", module, "--help"], cwd=elsewhere, env={**env, "JAX_PLATFORMS": "cpu"})
    assert flag in r.stdout + r.stderr, module
