"""Sharded train step vs one device, on 8 fake CPU devices.

Run by `tests/test_train_step.py` in a subprocess, because the device count is fixed when
jax is first imported:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.sharded_step_check

For each mesh (data x fsdp = 8x1, 2x4, 1x8) it runs the same steps as an unsharded run and
checks the shardings of the parameters, Adam moments, EMA target and batch, and that the
old state's buffers were donated. Sharding checks are assertions here; the numerical
differences are printed as one JSON line for the test to judge.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lcm_jax.errors import LcmJaxError
from lcm_jax.sharding import (
  batch_sharding,
  make_global_batch,
  make_mesh,
  param_shardings,
  replicated,
)
from lcm_jax.train_step import (
  create_train_state,
  make_optimizer,
  make_train_step,
  train_state_shardings,
)

MESHES = ((8, 1), (2, 4), (1, 8))
STEPS = 3
BATCH = 16
MIN_SIZE = 2048  # small enough that the toy model's big kernels are split


class ToyNet(nn.Module):
  """Conv + Dense stand-in for the UNet: kernels big enough to split, a bias, a norm."""

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x [B, 8, 8, 4], cond [B, 16] -> [B, 12]."""
    h = nn.Conv(64, (3, 3), name="conv_in")(x)                  # kernel [3, 3, 4, 64]
    h = nn.Conv(64, (3, 3), name="conv_mid")(nn.silu(h))        # kernel [3, 3, 64, 64]
    h = h + nn.Dense(64, name="cond_proj")(cond)[:, None, None]  # kernel [16, 64]: small
    h = nn.GroupNorm(8, name="norm")(h)
    h = nn.Dense(256, name="dense_hidden")(h.mean((1, 2)))      # kernel [64, 256]
    return nn.Dense(12, name="dense_out")(nn.silu(h))           # kernel [256, 12]


MODEL = ToyNet()


def loss_fn(params, target, frozen, batch, rng):
  """A consistency-style loss touching student, target, teacher, batch and the step key."""
  noisy = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
  student = MODEL.apply({"params": params}, noisy, batch["cond"])
  target_out = MODEL.apply({"params": target}, batch["x"], batch["cond"])
  teacher_out = MODEL.apply({"params": frozen["teacher"]}, batch["x"], batch["cond"])
  loss = jnp.mean((student - target_out) ** 2) + jnp.mean((student - teacher_out) ** 2)
  return loss, {"teacher_gap": jnp.mean(jnp.abs(student - teacher_out))}


def host_inputs():
  rs = np.random.default_rng(0)
  x = rs.standard_normal((BATCH, 8, 8, 4)).astype(np.float32)
  cond = rs.standard_normal((BATCH, 16)).astype(np.float32)
  student = jax.device_get(MODEL.init(jax.random.PRNGKey(1), x[:1], cond[:1])["params"])
  teacher = jax.device_get(MODEL.init(jax.random.PRNGKey(2), x[:1], cond[:1])["params"])
  return student, teacher, {"x": x, "cond": cond}


def run_unsharded(tx, student, teacher, batch):
  step = make_train_step(loss_fn, tx, 0.9)
  state = create_train_state(jax.tree.map(jnp.asarray, student), tx, jax.random.PRNGKey(3))
  frozen = {"teacher": jax.tree.map(jnp.asarray, teacher)}
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen, jax.tree.map(jnp.asarray, batch))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def donatable_leaves(state):
  """(path, leaf) of every state leaf the step reads. The stored learning rate is output
  only (the step recomputes it from the count), so jit prunes that input and keeps it."""
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)
          if "learning_rate" not in jax.tree_util.keystr(path)]


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_sharded(data, fsdp, tx, student, teacher, batch, reference, ref_losses):
  mesh = make_mesh(data=data, fsdp=fsdp)
  abstract = jax.eval_shape(lambda: student)
  p_shardings = param_shardings(abstract, mesh, min_size=MIN_SIZE)
  state_sh = train_state_shardings(tx, abstract, p_shardings, mesh)
  frozen_sh = {"teacher": param_shardings(jax.eval_shape(lambda: teacher), mesh, min_size=MIN_SIZE)}
  step = make_train_step(loss_fn, tx, 0.9, mesh=mesh, state_shardings=state_sh,
                         frozen_shardings=frozen_sh, batch_shardings=batch_sharding(mesh))

  # Build the state straight into its shardings, as the training loop does.
  init = jax.jit(lambda p, r: create_train_state(p, tx, r), out_shardings=state_sh)
  state = init(student, jax.random.PRNGKey(3))
  frozen = jax.device_put({"teacher": teacher}, frozen_sh)
  global_batch = make_global_batch(batch, batch_sharding(mesh))

  # The specified layouts.
  kernel_spec = P(None, None, None, "fsdp") if fsdp > 1 else P()
  out_spec = {1: P(), 4: P(None, "fsdp"), 8: P("fsdp", None)}[fsdp]  # [256, 12]
  adam = state.opt_state.inner_state[1][0]
  for tree in (state.params, state.target_params, adam.mu, adam.nu, frozen["teacher"]):
    assert tree["conv_mid"]["kernel"].sharding.spec == kernel_spec
    assert tree["dense_out"]["kernel"].sharding.spec == out_spec
    for name in ("conv_mid", "dense_out", "norm"):
      assert tree[name]["bias"].sharding.spec == P()
    assert tree["cond_proj"]["kernel"].sharding.spec == P()  # below min_size
  shard = state.params["conv_mid"]["kernel"].addressable_shards[0].data
  assert shard.shape == (3, 3, 64, 64 // fsdp), shard.shape
  assert state.step.sharding.is_equivalent_to(replicated(mesh), 0)
  for leaf in jax.tree.leaves(global_batch):
    assert leaf.sharding.spec == P(("data", "fsdp")), leaf.sharding
    assert leaf.addressable_shards[0].data.shape[0] == BATCH // 8
  compiled = step.lower(state, frozen, global_batch).compile()
  batch_in = compiled.input_shardings[0][2]
  assert all(s.is_equivalent_to(batch_sharding(mesh), 4) for s in jax.tree.leaves(batch_in))

  losses = []
  for _ in range(STEPS):
    old_leaves = donatable_leaves(state)
    state, metrics = step(state, frozen, global_batch)
    kept = [path for path, leaf in old_leaves if not leaf.is_deleted()]
    assert not kept, f"state leaves not donated: {kept}"
    losses.append(float(metrics["loss"]))
  assert state.params["conv_mid"]["kernel"].sharding.spec == kernel_spec
  assert state.target_params["dense_out"]["kernel"].sharding.spec == out_spec
  assert not frozen["teacher"]["conv_mid"]["kernel"].is_deleted()  # frozen is not donated
  host = jax.device_get(state)
  return {
      "max_param_diff": max_diff(host.params, reference.params),
      "max_target_diff": max_diff(host.target_params, reference.target_params),
      "max_loss_diff": float(np.max(np.abs(np.subtract(losses, ref_losses)))),
      "losses": losses,
  }


def check_mesh_sizes():
  assert make_mesh().devices.shape == (8, 1)
  assert make_mesh(data=-1, fsdp=4).devices.shape == (2, 4)
  assert make_mesh(data=2, fsdp=-1).devices.shape == (2, 4)
  for bad in (dict(data=3, fsdp=1), dict(data=-1, fsdp=3), dict(data=2, fsdp=2)):
    try:
      make_mesh(**bad)
    except LcmJaxError:
      continue
    raise AssertionError(f"make_mesh({bad}) did not fail")


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  check_mesh_sizes()
  tx = make_optimizer(1e-3, warmup_steps=1, schedule="warmup_constant", max_grad_norm=1.0)
  student, teacher, batch = host_inputs()
  reference, ref_losses = run_unsharded(tx, student, teacher, batch)
  report = {"devices": jax.device_count(), "ref_losses": ref_losses, "meshes": {}}
  for data, fsdp in MESHES:
    report["meshes"][f"{data}x{fsdp}"] = run_sharded(data, fsdp, tx, student, teacher, batch,
                                                     reference, ref_losses)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
