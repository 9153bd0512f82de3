"""Benchmark scripts. Each runs lcm-jax and the PyTorch reference in separate processes, so
that their peak memory is measured cleanly, and prints both with their ratio."""

from __future__ import annotations

import json
import subprocess
import sys


def run_role(module: str, role: str, args: list[str]) -> dict:
  """Runs `python -m module *args --_role role` and returns the dict it printed after
  `RESULT `; exits with the role's stderr tail if it failed."""
  print(f"[{role}] ...", flush=True)
  p = subprocess.run([sys.executable, "-m", module, *args, "--_role", role], capture_output=True, text=True)
  if p.returncode:
    sys.exit(f"{role} failed:\n{p.stderr[-4000:]}")
  return json.loads(p.stdout.split("RESULT ", 1)[1])
