"""Every command-line program answers bad flag values and bad paths with one `error:` line on
stderr and exit status 2, before any work: no file is created or changed.

Each case runs the real program (`python -m ...`) in a sandbox folder holding a file where a
folder is expected (`a_file`), an output folder with a folder where an image would go
(`out/000.png/`) and a workdir with a file in it; the sandbox is compared file by file
(names, sizes, contents) before and after."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

TINY = os.path.join(REPO, "configs", "tiny.py")
MISSING = "no_such_model"

# (module, flags, words the error line holds). Paths are relative to the sandbox.
CASES = [
    ("lcm_jax.train", [f"--config={TINY}", "--workdir=a_file"], "a_file is a file, not a folder"),
    ("lcm_jax.train", [f"--config={TINY}", "--workdir=a_file/below"], "cannot be created"),
    ("lcm_jax.train", [f"--config={TINY}", "--workdir=new", "--config.batch_size=abc"], "batch_size"),
    ("lcm_jax.train", [f"--config={TINY}", "--workdir=new", "--config.no_such_key=1"], "unknown config key"),
    ("lcm_jax.sample", [f"--model={MISSING}", "--prompt=a", "--output=out"], "folder named 000.png"),
    ("lcm_jax.sample", [f"--model={MISSING}", "--prompt=a", "--output=a_file/x"], "cannot be created"),
    ("lcm_jax.sample", [f"--model={MISSING}", "--prompt=a", "--output=new", "--steps=abc"], "--steps=abc"),
    ("lcm_jax.export", [f"--model={MISSING}", "--output=new"], "does not exist"),
    ("lcm_jax.export", [f"--model={MISSING}", "--output=new", "--dtype=fp8"], "--dtype=fp8"),
    ("lcm_jax.export", ["--model=workdir", "--output=a_file"], "a_file is a file"),
    ("lcm_jax.cache_latents", [f"--model={MISSING}", "--resolution=64", "--data_path=.", "--output=a_file"],
     "a_file is a file"),
    ("lcm_jax.cache_latents", [f"--model={MISSING}", "--resolution=abc", "--output=new"], "--resolution=abc"),
    ("lcm_jax.evaluate", [f"--lcm={MISSING}", "--output=new", "--num_prompts=abc"], "--num_prompts=abc"),
    ("lcm_jax.evaluate", [f"--lcm={MISSING}", "--output=new"], f"--lcm {MISSING} does not exist"),
    ("lcm_jax.toy.demo", ["--num_images=many"], "--num_images=many"),
    ("lcm_jax.toy.evaluate", ["--output=new", "--domain=elsewhere"], "--domain=elsewhere"),
    ("lcm_jax.bench.memory_plan", [f"--config={TINY}", "--batch_size=abc"], "--batch_size=abc"),
    ("lcm_jax.bench.memory_plan", [f"--config={TINY}", "--no_such_flag=1"], "no_such_flag"),
]


def snapshot(root: str) -> dict[str, tuple[str, str]]:
  """{relative path: (kind, sha256 of a file's bytes)} of everything under root."""
  entries = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      entries[os.path.relpath(os.path.join(folder, name), root)] = ("dir", "")
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        entries[os.path.relpath(path, root)] = ("file", hashlib.sha256(f.read()).hexdigest())
  return entries


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_errors")
  (root / "a_file").write_text("in the way\n")
  (root / "out" / "000.png").mkdir(parents=True)
  (root / "workdir").mkdir()
  (root / "workdir" / "config.json").write_text("{}\n")
  return str(root)


@pytest.mark.parametrize("module,args,words", CASES, ids=[f"{m.split('.', 1)[1]}:{a[-1]}" for m, a, _ in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(sandbox, module, args, words):
  before = snapshot(sandbox)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=sandbox, env=env, capture_output=True, text=True,
                     timeout=600)
  lines = r.stderr.splitlines()
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert words in lines[0], lines[0]
  assert snapshot(sandbox) == before
