"""The train step: EMA, its order, AdamW + clipping + schedules, shardings, distributed start-up.

References are independent: EMA and AdamW re-derived in NumPy (float64), the optimiser
against torch.optim.AdamW + clip_grad_norm_ + diffusers' `get_scheduler`. The multi-device
checks run in a subprocess with 8 fake CPU devices (`tests/helpers/sharded_step_check.py`).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcm_jax.errors import LcmJaxError
from lcm_jax.sharding import (
  DEFAULT_RULES,
  FSDP,
  REPLICATED,
  distributed_launch_args,
  initialize_distributed,
  local_batch_size,
  make_mesh,
  param_partition_specs,
  partition_spec_for,
)
from lcm_jax.train_step import (
  create_train_state,
  ema_update,
  learning_rate_of,
  make_lr_schedule,
  make_optimizer,
  make_train_step,
)
from tests.helpers import REPO  # noqa: E402


def _tree_allclose(got, want, **tol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float64), w, **tol),
               got, want)


# ---------------------------------------------------------------------------------------
# EMA.

@pytest.mark.parametrize("decay", [0.999943, 0.95, 0.5])
def test_ema_update_matches_numpy(decay):
  rng = np.random.default_rng(0)
  target = {"a": rng.standard_normal((3, 4)), "b": {"c": rng.standard_normal(5)}}
  params = jax.tree.map(lambda t: t + rng.standard_normal(t.shape), target)
  got = ema_update(jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), target),
                   jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), params), decay)
  want = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, target, params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
  _tree_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_ema_update_keeps_a_bf16_target_in_bf16():
  target = jnp.linspace(-1, 1, 16, dtype=jnp.bfloat16)
  params = jnp.linspace(1, -1, 16, dtype=jnp.float32)
  got = ema_update(target, params, 0.5)
  assert got.dtype == jnp.bfloat16
  want = 0.5 * np.asarray(target, np.float64) + 0.5 * np.asarray(params, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-6)


def _adamw_clip_numpy(p, g, m, v, t, lr, b1, b2, eps, wd, max_norm):
  """One step of clip_by_global_norm + AdamW on a dict of float64 arrays (t counts from 1)."""
  norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
  scale = min(1.0, max_norm / norm)
  out = {}
  for k in p:
    gk = g[k] * scale
    m[k] = b1 * m[k] + (1 - b1) * gk
    v[k] = b2 * v[k] + (1 - b2) * gk**2
    m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
    out[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
  return out, norm


@pytest.mark.parametrize("decay", [0.95, 0.5])
def test_step_updates_target_from_the_post_step_student(decay):
  """A toy quadratic loss whose gradient also depends on the target and the step's noise,
  re-derived in NumPy: AdamW step first, then EMA from the *updated* student."""
  n, m, batch_size, steps = 3, 4, 5, 4
  rs = np.random.default_rng(1)
  a = rs.standard_normal((m, n))
  y = rs.standard_normal((batch_size, m))
  d = np.abs(rs.standard_normal(2)) + 0.5
  p0 = {"w": rs.standard_normal(n), "v": rs.standard_normal(2)}
  key = jax.random.PRNGKey(7)
  lam = 0.3
  hp = dict(lr=0.05, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2, max_norm=0.5)

  def loss_fn(params, target, frozen, batch, rng):
    noise = jax.random.normal(rng, (m,))
    resid = params["w"] @ frozen["A"].T - (batch["y"] + 0.1 * noise)
    loss = (0.5 * jnp.mean(jnp.sum(resid**2, -1)) + 0.5 * jnp.sum(frozen["d"] * params["v"]**2)
            + 0.5 * lam * jnp.sum((params["w"] - target["w"])**2))
    return loss, {"resid": jnp.mean(jnp.abs(resid))}

  tx = make_optimizer(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                      weight_decay=hp["wd"], max_grad_norm=hp["max_norm"])
  f32 = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float32))
  state = create_train_state(f32(p0), tx, key)
  step = make_train_step(loss_fn, tx, decay)
  frozen, batch = f32({"A": a, "d": d}), f32({"y": y})

  p = dict(p0)
  target = {k: x.copy() for k, x in p0.items()}
  mom = {k: np.zeros_like(x) for k, x in p0.items()}
  vel = {k: np.zeros_like(x) for k, x in p0.items()}
  diverged_from_pre_step = 0.0
  for t in range(steps):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t), (m,)), np.float64)
    resid = p["w"] @ a.T - (y + 0.1 * noise)
    loss = (0.5 * np.mean(np.sum(resid**2, -1)) + 0.5 * np.sum(d * p["v"]**2)
            + 0.5 * lam * np.sum((p["w"] - target["w"])**2))
    grads = {"w": a.T @ resid.mean(0) + lam * (p["w"] - target["w"]), "v": d * p["v"]}
    new_p, norm = _adamw_clip_numpy(p, grads, mom, vel, t + 1, hp["lr"], hp["b1"], hp["b2"],
                                    hp["eps"], hp["wd"], hp["max_norm"])
    pre_step_target = {k: decay * target[k] + (1 - decay) * p[k] for k in p}
    target = {k: decay * target[k] + (1 - decay) * new_p[k] for k in p}
    p = new_p
    state, metrics = step(state, frozen, batch)
    assert int(state.step) == t + 1
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lr"]), hp["lr"], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["resid"]), np.mean(np.abs(resid)), rtol=1e-5)
    _tree_allclose(state.params, p, rtol=1e-5, atol=1e-6)
    _tree_allclose(state.target_params, target, rtol=1e-5, atol=1e-6)
    diverged_from_pre_step = max(diverged_from_pre_step, max(
        np.max(np.abs(target[k] - pre_step_target[k])) for k in p))
  assert norm > hp["max_norm"]  # clipping was exercised
  # The test can tell the two orders apart.
  assert diverged_from_pre_step > 1e-3


# ---------------------------------------------------------------------------------------
# Optimiser against PyTorch / diffusers.

@pytest.mark.parametrize("schedule,diffusers_name,warmup", [
    ("constant", "constant", 0),
    ("warmup_constant", "constant_with_warmup", 3),
    ("warmup_constant", "constant_with_warmup", 0),
    ("warmup_cosine", "cosine", 3),
    ("warmup_cosine", "cosine", 0),
])
def test_lr_schedules_match_diffusers(schedule, diffusers_name, warmup):
  torch = pytest.importorskip("torch")
  from diffusers.optimization import get_scheduler
  total, lr = 10, 1e-4
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  sched = get_scheduler(diffusers_name, opt, num_warmup_steps=warmup, num_training_steps=total)
  want = []
  # Up to total_steps only: past it diffusers' cosine climbs again (max(0, cos) of a
  # progress > 1); ours stays at 0.
  for _ in range(total + 1):
    want.append(sched.get_last_lr()[0])
    opt.step()
    sched.step()
  ours = make_lr_schedule(lr, schedule, warmup, total)
  got = [float(ours(i)) for i in range(total + 1)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  assert float(ours(total + 5)) == pytest.approx(0.0 if schedule == "warmup_cosine" else lr)


def test_lr_schedule_errors():
  with pytest.raises(LcmJaxError, match="unknown learning-rate schedule"):
    make_lr_schedule(1e-4, "linear")
  with pytest.raises(LcmJaxError, match="total_steps"):
    make_lr_schedule(1e-4, "warmup_cosine", 10)
  with pytest.raises(LcmJaxError, match="total_steps"):
    make_optimizer(1e-4, warmup_steps=10, schedule="warmup_cosine", total_steps=10)
  with pytest.raises(LcmJaxError, match="warmup_constant"):
    make_lr_schedule(1e-4, "constant", warmup_steps=5)


def test_step_matches_torch_adamw_clipping_cosine_and_ema():
  """A small MLP trained for a few steps by our step and by torch.optim.AdamW +
  clip_grad_norm_ + diffusers' cosine schedule + diffusers' EMA update."""
  torch = pytest.importorskip("torch")
  from diffusers.optimization import get_scheduler
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
  ema = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
  ema.load_state_dict(net.state_dict())
  lr, warmup, total, steps, decay, max_norm = 3e-2, 2, 8, 6, 0.9, 0.2
  opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  sched = get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=total)
  rs = np.random.default_rng(0)
  xs = [rs.standard_normal((6, 4)) for _ in range(steps)]
  ys = [rs.standard_normal((6, 3)) for _ in range(steps)]

  def to_jax(module):
    return {"w1": jnp.asarray(module[0].weight.detach().numpy().T, jnp.float32),
            "b1": jnp.asarray(module[0].bias.detach().numpy(), jnp.float32),
            "w2": jnp.asarray(module[2].weight.detach().numpy().T, jnp.float32),
            "b2": jnp.asarray(module[2].bias.detach().numpy(), jnp.float32)}

  def loss_fn(params, target, frozen, batch, rng):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - batch["y"])**2), {}

  tx = make_optimizer(lr, warmup_steps=warmup, schedule="warmup_cosine", total_steps=total,
                      weight_decay=1e-2, max_grad_norm=max_norm)
  state = create_train_state(to_jax(net), tx, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, tx, decay)
  clipped = 0
  for i in range(steps):
    x, y = torch.from_numpy(xs[i]), torch.from_numpy(ys[i])
    opt.zero_grad()
    loss = torch.mean((net(x) - y)**2)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm))
    lr_used = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    with torch.no_grad():  # diffusers' update_ema: targ.mul_(rate).add_(src, alpha=1 - rate)
      for targ, src in zip(ema.parameters(), net.parameters()):
        targ.mul_(decay).add_(src, alpha=1 - decay)
    clipped += norm > max_norm
    state, metrics = step(state, None, {"x": jnp.asarray(xs[i], jnp.float32),
                                        "y": jnp.asarray(ys[i], jnp.float32)})
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lr"]), lr_used, rtol=1e-5, atol=1e-12)
    _tree_allclose(state.params, to_jax(net), rtol=1e-4, atol=2e-6)
    _tree_allclose(state.target_params, to_jax(ema), rtol=1e-4, atol=2e-6)
  assert clipped >= 2 and float(learning_rate_of(state.opt_state)) < lr


# ---------------------------------------------------------------------------------------
# State and step plumbing.

def test_create_train_state_copies_and_casts_the_target_and_donates():
  params = {"k": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  tx = make_optimizer(1e-3)
  state = create_train_state(params, tx, jax.random.PRNGKey(0), target_dtype=jnp.bfloat16)
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  assert state.target_params["k"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(state.target_params["k"], np.float32), params["k"])
  key = jax.random.PRNGKey(0)
  state = create_train_state(params, tx, key)
  assert state.target_params["k"].dtype == jnp.float32
  assert (state.target_params["k"].unsafe_buffer_pointer()
          != state.params["k"].unsafe_buffer_pointer())

  def loss_fn(p, target, frozen, batch, rng):
    return jnp.sum((p["k"] - batch) ** 2) + jnp.sum(p["b"] * jax.random.normal(rng, (3,))), {}

  step = make_train_step(loss_fn, tx, 0.9)
  old_leaves = jax.tree_util.tree_leaves_with_path(state)
  new_state, metrics = step(state, {}, jnp.zeros((2, 3)))
  assert set(metrics) == {"loss", "grad_norm", "lr"}
  # All donated except the stored learning rate: the step only writes it (recomputing it
  # from the count), so jit prunes that input.
  kept = [jax.tree_util.keystr(path) for path, leaf in old_leaves if not leaf.is_deleted()]
  assert kept == [".opt_state.hyperparams['learning_rate']"]
  assert int(new_state.step) == 1
  # The caller's trees and key were copied, not donated.
  assert not params["k"].is_deleted() and not key.is_deleted()
  # Per-step noise: same state and step -> same loss; the key is not consumed.
  keep = make_train_step(loss_fn, tx, 0.9, donate=False)
  _, m1 = keep(new_state, {}, jnp.zeros((2, 3)))
  _, m2 = keep(new_state, {}, jnp.zeros((2, 3)))
  assert float(m1["loss"]) == float(m2["loss"])
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


def test_step_rejects_clashing_aux_and_shardings_without_mesh():
  tx = make_optimizer(1e-3)
  state = create_train_state({"w": jnp.ones(2)}, tx, jax.random.PRNGKey(0))
  step = make_train_step(lambda p, t, f, b, r: (jnp.sum(p["w"]), {"lr": 1.0}), tx, 0.9)
  with pytest.raises(LcmJaxError, match="clash"):
    step(state, None, None)
  with pytest.raises(LcmJaxError, match="mesh"):
    make_train_step(lambda *a: (0.0, {}), tx, 0.9, batch_shardings=P())


# ---------------------------------------------------------------------------------------
# Sharding rules, mesh and distributed start-up (single device here).

def test_partition_rules_first_match_and_thresholds():
  tree = {
      "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32),
               "bias": jax.ShapeDtypeStruct((64,), jnp.float32)},
      "proj": {"kernel": jax.ShapeDtypeStruct((256, 12), jnp.float32)},
      "odd": {"kernel": jax.ShapeDtypeStruct((3, 3, 5, 7), jnp.float32)},
      "tiny": {"kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32)},
      "norm": {"scale": jax.ShapeDtypeStruct((4096,), jnp.float32)},
  }
  specs = param_partition_specs(tree, 4, min_size=100)
  assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")  # output channels preferred
  assert specs["conv"]["bias"] == P()
  assert specs["proj"]["kernel"] == P(None, "fsdp")  # 12 % 4 == 0
  assert specs["odd"]["kernel"] == P()  # no dimension divides
  assert specs["tiny"]["kernel"] == P(None, "fsdp")
  assert specs["norm"]["scale"] == P()
  specs8 = param_partition_specs(tree, 8, min_size=100)
  assert specs8["proj"]["kernel"] == P("fsdp", None)  # 12 % 8 != 0: largest divisible dim
  # Default threshold: a 16x16 kernel is too small to be worth splitting.
  assert param_partition_specs(tree, 4)["tiny"]["kernel"] == P()
  assert all(s == P() for s in jax.tree.leaves(param_partition_specs(tree, 1, min_size=1),
                                                is_leaf=lambda x: isinstance(x, P)))
  # First match wins; explicit PartitionSpecs pass through.
  rules = ((r"^proj/", P("fsdp", None)), (r"^conv/", REPLICATED)) + DEFAULT_RULES
  custom = param_partition_specs(tree, 4, rules=rules, min_size=100)
  assert custom["proj"]["kernel"] == P("fsdp", None) and custom["conv"]["kernel"] == P()
  with pytest.raises(LcmJaxError, match="unknown sharding rule"):
    partition_spec_for("a/kernel", (64, 64), 4, rules=((r"kernel", "tensor"),), min_size=1)
  assert partition_spec_for("a/kernel", (64, 64), 4, rules=((r"bias", FSDP),), min_size=1) == P()


def test_default_rules_split_almost_all_of_an_sd21_unet():
  """The default table on the real SD 2.1 UNet (+ LCM cond_proj), from shapes only."""
  unet = pytest.importorskip("lcm_jax.models.unet")
  config = unet.UNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True, time_cond_proj_dim=256)
  model = unet.UNet2DConditionModel(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs())["params"]
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  specs = jax.tree.leaves(param_partition_specs(abstract, 8), is_leaf=lambda x: isinstance(x, P))
  total = sum(leaf.size for _, leaf in flat)
  split = sum(leaf.size for (_, leaf), spec in zip(flat, specs) if spec != P())
  assert total > 8e8 and split / total > 0.999
  for (path, leaf), spec in zip(flat, specs):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']") and leaf.size >= 2**14:
      # Every large kernel splits on its output channels (all SD widths divide by 8).
      assert spec == P(*([None] * (leaf.ndim - 1)), "fsdp"), (name, leaf.shape, spec)
    else:
      assert spec == P(), (name, spec)


def test_make_mesh_errors_on_one_device():
  mesh = make_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (jax.device_count(), 1)
  assert make_mesh(data=1, fsdp=-1).devices.shape == (1, jax.device_count())
  n = jax.device_count()
  with pytest.raises(LcmJaxError, match="needs"):
    make_mesh(data=n + 1, fsdp=1)
  with pytest.raises(LcmJaxError, match="only one"):
    make_mesh(data=-1, fsdp=-1)
  with pytest.raises(LcmJaxError, match="positive integer"):
    make_mesh(data=0)
  with pytest.raises(LcmJaxError, match="not a multiple"):
    make_mesh(data=-1, fsdp=n + 1)


def test_distributed_launch_detection():
  assert distributed_launch_args({}) is None
  assert distributed_launch_args({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert distributed_launch_args({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == {}
  assert distributed_launch_args({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == {}
  assert distributed_launch_args({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed_launch_args({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {}
  assert distributed_launch_args({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": "1"}) == {
      "coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(LcmJaxError, match="JAX_NUM_PROCESSES"):
    distributed_launch_args({"JAX_COORDINATOR_ADDRESS": "h0:1234"})
  assert initialize_distributed({}) is False  # single process: nothing to start
  assert local_batch_size(16, 4) == 4
  with pytest.raises(LcmJaxError, match="not divisible"):
    local_batch_size(10, 4)


# ---------------------------------------------------------------------------------------
# Multi-device: 8 fake CPU devices in a subprocess (XLA_FLAGS must precede importing jax).

def test_sharded_step_matches_single_device():
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_step_check"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  assert set(report["meshes"]) == {"8x1", "2x4", "1x8"}
  for name, result in report["meshes"].items():
    assert result["max_param_diff"] < 1e-5, (name, result)
    assert result["max_target_diff"] < 1e-5, (name, result)
    assert result["max_loss_diff"] < 1e-5, (name, result)


# ---------------------------------------------------------------------------------------
# Gradient accumulation.

def _regression_loss(params, target, frozen, batch, rng):
  """A per-example mean loss that draws no randomness: microbatching must not change it."""
  del target, frozen, rng
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  err = h @ params["w2"] - batch["y"]
  return jnp.mean(err ** 2), {"err": jnp.mean(jnp.abs(err))}


def _regression_setup(batch_size=8):
  rng = np.random.default_rng(3)
  params = {"w1": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
            "b1": jnp.asarray(rng.standard_normal(7), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.standard_normal((batch_size, 5)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((batch_size, 3)), jnp.float32)}
  return params, batch


def test_four_microbatches_of_two_equal_one_batch_of_eight():
  """The accumulated gradient, the loss, the metrics and the updated parameters equal the
  whole batch's (lr 1e-2: a skipped or doubled microbatch moves the parameters by ~1e-3)."""
  from lcm_jax.train_step import accumulated_value_and_grad
  params, batch = _regression_setup(8)
  key = jax.random.key(0)
  (loss1, aux1), grads1 = accumulated_value_and_grad(_regression_loss, params, None, None, batch, key, 1)
  (loss4, aux4), grads4 = accumulated_value_and_grad(_regression_loss, params, None, None, batch, key, 4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
  np.testing.assert_allclose(aux4["err"], aux1["err"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grads4, grads1)
  # Leaving one microbatch out would be a different gradient by far more than the tolerance.
  (_, _), grads3 = accumulated_value_and_grad(_regression_loss, params, None, None,
                                              jax.tree.map(lambda x: x[:6], batch), key, 3)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads3), jax.tree.leaves(grads1))) > 1e-3

  optimizer = make_optimizer(1e-2, weight_decay=1e-2, max_grad_norm=1.0)
  states = {m: create_train_state(params, optimizer, jax.random.PRNGKey(0)) for m in (1, 4)}
  for m in (1, 4):
    step = make_train_step(_regression_loss, optimizer, 0.9, grad_accum_steps=m, donate=False)
    states[m], _ = step(states[m], None, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               states[4].params, states[1].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               states[4].target_params, states[1].target_params)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(params)))
  assert moved > 1e-3


def test_microbatches_are_strided_and_draw_their_own_keys():
  """With a loss that uses its key, microbatch i sees examples i, i + M, ... and key
  fold_in(rng, i): the accumulated gradient is the mean of those four gradients."""
  from lcm_jax.train_step import accumulated_value_and_grad

  def noisy_loss(params, target, frozen, batch, rng):
    noise = jax.random.normal(rng, batch["y"].shape)
    loss, aux = _regression_loss(params, target, frozen, dict(batch, y=batch["y"] + noise), rng)
    return loss, aux

  params, batch = _regression_setup(8)
  key = jax.random.key(1)
  (_, _), grads = accumulated_value_and_grad(noisy_loss, params, None, None, batch, key, 4)
  parts = [jax.grad(lambda p, i=i: noisy_loss(p, None, None, jax.tree.map(lambda x: x[i::4], batch),
                                              jax.random.fold_in(key, i))[0])(params) for i in range(4)]
  want = jax.tree.map(lambda *g: sum(g) / 4, *parts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grads, want)


def test_grad_accum_rejects_batches_that_do_not_split():
  from lcm_jax.train_step import accumulated_value_and_grad
  params, batch = _regression_setup(6)
  with pytest.raises(LcmJaxError, match="do not split into 4"):
    accumulated_value_and_grad(_regression_loss, params, None, None, batch, jax.random.key(0), 4)
  with pytest.raises(LcmJaxError, match="grad_accum_steps must be a positive integer"):
    make_train_step(_regression_loss, make_optimizer(1e-3), 0.9, grad_accum_steps=0)


def test_default_rules_split_an_sd21_lora_adapter():
  """A LoRA run's trained state is its adapters (lcm_jax.lora): under FSDP the default table
  splits them like kernels (the memory plan found them replicated at fsdp 8 before the rule)."""
  from lcm_jax import lora
  unet = pytest.importorskip("lcm_jax.models.unet")
  config = unet.UNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                           use_linear_projection=True)
  model = unet.UNet2DConditionModel(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs())["params"]
  adapters = jax.eval_shape(lambda: lora.init_lora(jax.random.PRNGKey(0), abstract, 64))
  flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
  specs = jax.tree.leaves(param_partition_specs(adapters, 8), is_leaf=lambda x: isinstance(x, P))
  total = sum(leaf.size for _, leaf in flat)
  split = sum(leaf.size for (_, leaf), spec in zip(flat, specs) if spec != P())
  assert total > 1e7 and split / total > 0.99, split / total
