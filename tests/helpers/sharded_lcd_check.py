"""The real LCD step (tiny UNets) sharded over 8 fake CPU devices vs one device.

Run by `tests/test_losses.py` in a subprocess (the device count is fixed when jax is first
imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.sharded_lcd_check

Mesh data=2 x fsdp=4 with the default rule table; asserts representative UNet parameter
shardings and prints the differences to the unsharded run as one JSON line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lcm_jax import losses
from lcm_jax.schedule import schedule_from_config
from lcm_jax.sd_pipeline import abstract_params, build_module
from lcm_jax.sharding import (
  batch_sharding,
  make_global_batch,
  make_mesh,
  param_shardings,
)
from lcm_jax.train_step import (
  create_train_state,
  make_optimizer,
  make_train_step,
  train_state_shardings,
)
from tests.helpers.tiny_models import unet_kwargs

STEPS, BATCH, MIN_SIZE = 2, 8, 1024
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  teacher = build_module("unet", unet_kwargs("sd1"))
  student = build_module("unet", unet_kwargs("sd1_lcm"))
  schedule = schedule_from_config(SCHED)
  loss_fn = losses.make_loss_fn("lcd", lambda p, z, t, c, tc: student.apply({"params": p}, z, t, c, tc), schedule,
                                losses.ConsistencyLossConfig(caption_dropout=0.25),
                                lambda p, z, t, c, tc: teacher.apply({"params": p}, z, t, c, tc))
  # The paper's learning rate. Adam's eps is 1e-6 rather than 1e-8: conv biases that feed a
  # GroupNorm have a true gradient of zero, so theirs is float noise (~1e-10) whose sign
  # depends on the reduction order; with eps 1e-8 Adam would turn it into a +-lr step and the
  # sharded and unsharded runs would differ by up to 2 lr for reasons unrelated to sharding.
  tx = make_optimizer(8e-6, eps=1e-6)
  teacher_params = jax.device_get(teacher.init(jax.random.key(1), *teacher.dummy_inputs())["params"])
  student_params = jax.device_get(losses.student_params_from_teacher(
      teacher_params, abstract_params(student), jax.random.key(2), init="torch_default"))
  rs = np.random.default_rng(0)
  frozen = {"teacher": teacher_params, "uncond_context": rs.standard_normal((1, 6, 32)).astype(np.float32)}
  batch = {"latents": rs.standard_normal((BATCH, 8, 8, 4)).astype(np.float32),
           "context": rs.standard_normal((BATCH, 6, 32)).astype(np.float32)}

  # One device.
  step = make_train_step(loss_fn, tx, 0.95)
  state = create_train_state(jax.tree.map(jnp.asarray, student_params), tx, jax.random.key(3))
  ref_losses = []
  for _ in range(STEPS):
    state, metrics = step(state, jax.tree.map(jnp.asarray, frozen), jax.tree.map(jnp.asarray, batch))
    ref_losses.append(float(metrics["loss"]))
  reference = jax.device_get(state)

  # data=2 x fsdp=4.
  mesh = make_mesh(data=2, fsdp=4)
  abstract = abstract_params(student)
  p_sh = param_shardings(abstract, mesh, min_size=MIN_SIZE)
  state_sh = train_state_shardings(tx, abstract, p_sh, mesh)
  frozen_sh = {"teacher": param_shardings(abstract_params(teacher), mesh, min_size=MIN_SIZE),
               "uncond_context": jax.sharding.NamedSharding(mesh, P())}
  step = make_train_step(loss_fn, tx, 0.95, mesh=mesh, state_shardings=state_sh, frozen_shardings=frozen_sh,
                         batch_shardings=batch_sharding(mesh))
  state = jax.jit(lambda p, r: create_train_state(p, tx, r), out_shardings=state_sh)(student_params,
                                                                                      jax.random.key(3))
  frozen_dev = jax.device_put(frozen, frozen_sh)
  global_batch = make_global_batch(batch, batch_sharding(mesh))
  losses_sharded = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen_dev, global_batch)
    losses_sharded.append(float(metrics["loss"]))

  to_q = state.params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  assert to_q.sharding.spec == P(None, "fsdp"), to_q.sharding.spec
  conv = state.target_params["up_blocks_1"]["resnets_0"]["conv1"]["kernel"]
  assert conv.sharding.spec == P(None, None, None, "fsdp"), conv.sharding.spec
  teacher_conv = frozen_dev["teacher"]["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]
  assert teacher_conv.sharding.spec == P(None, None, None, "fsdp"), teacher_conv.sharding.spec
  norm = state.params["conv_norm_out"]["scale"]
  assert norm.sharding.spec == P(), norm.sharding.spec
  host = jax.device_get(state)

  def diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  print("RESULT " + json.dumps({
      "max_param_diff": diff(host.params, reference.params),
      "max_target_diff": diff(host.target_params, reference.target_params),
      "max_loss_diff": float(np.abs(np.subtract(losses_sharded, ref_losses)).max()),
      "losses": losses_sharded, "ref_losses": ref_losses}))


if __name__ == "__main__":
  main()
