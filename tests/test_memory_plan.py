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


def _plan(teacher: str, out: str, *flags: str, expect: str = "train step: arguments") -> dict:
  args = [sys.executable, "-m", "lcm_jax.bench.memory_plan", "--config=configs/tiny.py", "--topology=cpu:2",
          f"--config.teacher={teacher}", "--config.data.path=unused", "--config.data.format=latents",
          "--config.loss.uncond=zeros", "--config.batch_size=4", f"--output={out}", *flags]
  r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert expect in r.stdout, r.stdout
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

  # The same step in its three parts (--part=all), compiled one by one.
  parts = _plan(teacher, str(tmp_path / "parts.json"), "--config.mesh.fsdp=2", "--config.mesh.data=1", "--part=all",
                expect="COMBINED ESTIMATE")
  whole, persistent = sharded["train_step"], parts["persistent_bytes"]
  frozen, student, update = (parts["parts"][k] for k in ("frozen", "student", "update"))
  # The persistent bytes are the step's arguments but the batch (latent moments and context,
  # 8192 bytes a device); the step may prune a scalar it never reads (the injected learning
  # rate, 4 bytes), which the parts keep.
  batch = (2 * 4 * 8 * 8 * 4 + 4 * 16 * 32) * 4 // 2
  assert 0 <= persistent["state"] + persistent["frozen_models"] + batch - whole["argument_bytes"] <= 64
  # The frozen part takes the step's arguments (the whole state and frozen models, kept); the
  # student part the carried tensors instead of the batch; the update the state and the grads.
  assert frozen["argument_bytes"] == persistent["state"] + persistent["frozen_models"] + batch
  carried = (4 * 8 * 8 * 4 * 2 + 4 + 4 * 16 * 32 + 4 * 256) * 4 // 2  # z_start, target, start, context, w
  assert student["argument_bytes"] == persistent["state"] + persistent["frozen_models"] + carried
  assert student["output_bytes"] >= persistent["state"] // 4  # the fp32 grads: a quarter of the fp32 state
  assert update["alias_bytes"] >= persistent["state"] - 64  # the new state reuses the old one's buffers
  # The parts do the step's arithmetic: their FLOPs add up to the whole step's (the update part
  # adds its 2 FLOPs per parameter of <params, grads>, and the loss's draws are made once).
  assert parts["train_step_flops"] == whole["flops"]
  assert abs(parts["combined"]["flops"] / whole["flops"] - 1) < 0.02, (parts["combined"]["flops"], whole["flops"])
  assert frozen["flops"] > 0.3 * whole["flops"] and student["flops"] > 0.3 * whole["flops"]
  combined = parts["combined"]
  assert combined["complete"] and combined["total_bytes"] == (persistent["state"] + persistent["frozen_models"] +
                                                              max(combined["transient_bytes"].values()))
  # On this tiny step the estimate lands near the fused step's own total (0.96 of it when written).
  assert 0.75 < combined["total_bytes"] / whole["total_bytes"] < 1.25, (combined["total_bytes"], whole["total_bytes"])


def test_plan_rejects_an_unknown_topology_and_teacher(tmp_path):
  r = subprocess.run([sys.executable, "-m", "lcm_jax.bench.memory_plan", "--config=configs/sd21_768.py",
                      "--topology=cpu:1", "--config.teacher=nobody/unknown-model"],
                     capture_output=True, text=True, cwd=REPO, timeout=1200, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
  assert "neither a local folder nor one of the known architectures" in r.stderr


@pytest.mark.parametrize("student,microbatches", [("full", 2), ("lora", 1)])
def test_parts_compute_the_train_steps_loss_and_update(tiny_pipeline, student, microbatches):
  """The parts, run on weights, give the real step's loss and new state: the frozen part's
  carried tensors, the student part's loss and grads, the update part's state."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import configs.tiny
  from lcm_jax.bench import memory_plan
  from lcm_jax.training.state import state_initializer
  from lcm_jax.training.trainer import make_step

  config = configs.tiny.get_config()
  config.teacher, config.data.path, config.data.format = tiny_pipeline("sd1"), "unused", "latents"
  config.loss.uncond, config.batch_size, config.grad_accum_steps = "zeros", 4, microbatches
  config.mesh.data, config.mesh.fsdp = 1, 1
  if student == "lora":
    config.student, config.lora.rank = "lora", 4
  run = memory_plan.build_run(config, jax.devices("cpu")[:1])
  count = iter(range(10 ** 6))
  fill = lambda a: (0.1 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), next(count)), a.shape)
                    ).astype(a.dtype)
  frozen = jax.tree.map(fill, run.frozen.arrays)
  params = jax.tree.map(fill, run.student.abstract)
  batch = jax.tree.map(fill, run.batch)
  batch["latent_logvar"] = jnp.full_like(batch["latent_logvar"], -2.0)
  new_state = lambda: jax.jit(state_initializer(config, run.optimizer))(params, jax.random.PRNGKey(1))

  step, _ = make_step(config, run.schedule, run.mesh, run.student, run.frozen, run.state_shardings,
                      run.latents_format)
  want_state, want = step(new_state(), frozen, batch)
  steps = memory_plan.part_steps(run)
  carried = steps["frozen"](new_state(), frozen, batch)
  grads, loss = steps["student"](new_state(), frozen, carried)
  got_state, got = steps["update"](new_state(), grads, {})
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
  assert float(want["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(got_state.target_params), jax.tree.leaves(want_state.target_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
