"""`lcm_jax` must import and run without torch (torch is only a test/benchmark dependency)."""

import os
import subprocess
import sys

from tests.helpers import REPO  # noqa: E402

# Command-line programs: each runs `--help` in its own process with torch blocked.
CLIS = ("lcm_jax.export", "lcm_jax.sample", "lcm_jax.train", "lcm_jax.cache_latents", "lcm_jax.toy.evaluate",
        "lcm_jax.toy.demo", "lcm_jax.toy.teacher", "lcm_jax.eval.convert_inception")

SCRIPT = f"CLIS = {CLIS!r}\n" + r"""
import importlib, pkgutil, sys
sys.modules["torch"] = None            # any `import torch` now raises ImportError
import lcm_jax
for m in pkgutil.walk_packages(lcm_jax.__path__, "lcm_jax."):
  if not m.name.startswith("lcm_jax.bench"):  # benchmarks compare against PyTorch on purpose
    importlib.import_module(m.name)
# and a real computation: load a tiny pipeline folder and run its text encoder and UNet
import jax.numpy as jnp
pipe = lcm_jax.load_pipeline(sys.argv[1])
ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                     return_tensors="np").input_ids
text, _ = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids)
out = pipe.unet.apply({"params": pipe.params["unet"]}, jnp.zeros((1, 8, 8, 4)), jnp.array([10]), text)
assert "torch" not in {k for k, v in sys.modules.items() if v is not None}
print("OK", out.shape)
"""


def test_lcm_jax_imports_and_runs_without_torch(tiny_pipeline):
  path = tiny_pipeline("sd1")
  r = subprocess.run([sys.executable, "-c", SCRIPT, path], cwd=REPO, capture_output=True, text=True, timeout=1200,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "OK (1, 8, 8, 4)" in r.stdout


HELP = r"""
import runpy, sys
sys.modules["torch"] = None
name = sys.argv[1]
sys.argv = [name, "--help"]
runpy.run_module(name, run_name="__main__")
"""


def test_command_line_programs_explain_themselves_without_torch():
  import importlib.util
  for name in CLIS:
    try:
      if importlib.util.find_spec(name) is None:
        continue  # not built yet
    except ModuleNotFoundError:  # its package is not built yet
      continue
    r = subprocess.run([sys.executable, "-c", HELP, name], cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, (name, r.stderr[-2000:])
    assert "--" in r.stdout + r.stderr, name
