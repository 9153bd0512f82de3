"""`python -m lcm_jax.bench.memory_plan` in its CPU-device mode on a tiny config.

The plan compiles the trainer's own step without weights; what it reports per device is
checked against an independent count: the parameters of diffusers' UNet (torch), times the
bytes each copy takes (fp32 student, two fp32 Adam moments, fp32 EMA target, fp32 teacher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _plan(teacher: str, out: str, *flags: str) -> dict:
  args = [sys.executable, "-m", "lcm_jax.bench.memory_plan", "--config=configs/tiny.py", "--topology=cpu:2",
          f"--config.teacher={teacher}", "--config.data.path=unused", "--config.data.format=latents",
          "--config.loss.uncond=zeros", "--config.batch_size=4", f"--output={out}", *flags]
  r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train step: arguments" in r.stdout, r.stdout
  with open(out) as f:
    return json.load(f)


def test_plan_counts_the_state_and_fsdp_shrinks_it(tiny_pipeline, tmp_path):
  import diffusers

  from tests.helpers.tiny_models import unet_kwargs
  teacher = tiny_pipeline("sd1")
  n = sum(p.numel() for p in diffusers.UNet2DConditionModel(**unet_kwargs("sd1")).parameters())
  cond_proj = 256 * 32  # the student's guidance input (time_cond_proj_dim -> block_out_channels[0])

  replicated = _plan(teacher, str(tmp_path / "data2.json"))
  assert replicated["mesh"] == {"data": 2, "fsdp": 1}
  step = replicated["train_step"]
  # Student, Adam mu and nu, EMA target: 4 x 4 bytes per student parameter; teacher 4 bytes.
  state = 16 * (n + cond_proj) + 4 * n
  # The rest: the batch (latent moments [4, 8, 8, 4] x 2 and context [4, 16, 32], split over 2
  # devices), the unconditional context, counters and keys: well under 1% here.
  assert state <= step["argument_bytes"] <= 1.01 * state, (step["argument_bytes"], state)
  assert step["flops"] > 0 and step["temp_bytes"] > 0

  sharded = _plan(teacher, str(tmp_path / "fsdp2.json"), "--config.mesh.fsdp=2", "--config.mesh.data=1")
  assert sharded["mesh"] == {"data": 1, "fsdp": 2}
  # Kernels of 2^14 elements or more are split in two (the rule table); the tiny UNet has a
  # few, so the per-device arguments must fall, by less than half.
  assert sharded["train_step"]["argument_bytes"] < 0.97 * step["argument_bytes"]
  assert sharded["train_step"]["argument_bytes"] > 0.5 * step["argument_bytes"]


def test_plan_rejects_an_unknown_topology_and_teacher(tmp_path):
  r = subprocess.run([sys.executable, "-m", "lcm_jax.bench.memory_plan", "--config=configs/sd21_768.py",
                      "--topology=cpu:1", "--config.teacher=nobody/unknown-model"],
                     capture_output=True, text=True, cwd=REPO, timeout=1200, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
  assert "neither a local folder nor one of the known architectures" in r.stderr
