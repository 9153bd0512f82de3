"""The LCM-LoRA distillation loss and its gradient against diffusers' UNet with PEFT adapters.

The reference re-derives LCD as diffusers' `train_lcm_distill_lora_sd_wds.py` runs it, in
torch and independently of lcm_jax: the frozen teacher guided with omega on x0 and eps, one
DDIM step with DDIMSolver's alphas_cumprod_prev, then the student (the teacher's weights plus
a PEFT LoRA, no guidance embedding) and the target (here a second adapter, as an EMA target
would be) through LCMScheduler's boundary scalings. The gradient is torch autograd on the
adapter's parameters only. The adapters hold the same random numbers on both sides, with
nonzero B, and lora_alpha != r, so a mis-scaled or transposed adapter shows.
"""

from __future__ import annotations

import copy

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax import lora, losses, weights
from lcm_jax.schedule import schedule_from_config
from lcm_jax.sd_pipeline import abstract_params, build_module
from tests.helpers import perturb_
from tests.helpers.tiny_models import unet_kwargs
from tests.test_lora import random_lora

peft = pytest.importorskip("peft")

B, L, D, K = 2, 6, 32, 20
RANK, ALPHA = 4, 8.0
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _with_adapter(teacher, adapters) -> torch.nn.Module:
  """A copy of the torch teacher with a PEFT LoRA holding `adapters` (diffusers' layout)."""
  model = copy.deepcopy(teacher)
  model.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.DEFAULT_TARGETS)))
  state = {k.removeprefix("unet."): torch.from_numpy(v) for k, v in lora.to_diffusers_state_dict(adapters).items()}
  named = dict(model.named_parameters())
  with torch.no_grad():
    for key, value in state.items():
      name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
      named[name].copy_(value)
  assert sum(1 for n in named if ".lora_" in n) == len(state)
  return model


@pytest.fixture(scope="module")
def setup():
  torch.manual_seed(0)
  teacher = diffusers.UNet2DConditionModel(**unet_kwargs("sd1")).eval()
  perturb_(teacher, 1)
  module = build_module("unet", dict(teacher.config))
  teacher_params = weights.torch_to_flax({k: v.detach().numpy() for k, v in teacher.state_dict().items()},
                                         abstract_params(module))
  student_lora = random_lora(teacher_params, RANK, seed=11, b_std=0.03)
  target_lora = random_lora(teacher_params, RANK, seed=12, b_std=0.03)
  rng = np.random.default_rng(0)
  return dict(
      teacher=teacher, module=module, teacher_params=teacher_params, student_lora=student_lora,
      target_lora=target_lora, student=_with_adapter(teacher, student_lora).train(),
      target=_with_adapter(teacher, target_lora).eval(),
      scheduler=diffusers.DDIMScheduler(prediction_type="epsilon", **SCHED),
      latents=rng.standard_normal((B, 4, 8, 8)).astype(np.float32),
      context=rng.standard_normal((B, L, D)).astype(np.float32),
      uncond=rng.standard_normal((1, L, D)).astype(np.float32),
      index=np.array([0, 37], np.int32), omega=np.array([5.5, 14.0], np.float32),
      noise=rng.standard_normal((B, 4, 8, 8)).astype(np.float32))


def _reference_loss(st) -> torch.Tensor:
  """diffusers' LCM-LoRA step up to the loss, in float64 where it is not a UNet call."""
  ac = st["scheduler"].alphas_cumprod.to(torch.float64)
  grid = torch.arange(1, 1000 // K + 1) * K - 1
  index = torch.tensor(st["index"]).long()
  start = grid[index]
  t_n = torch.clamp(start - K, min=0)
  ac_prev = torch.cat([ac[:1], ac[grid[:-1]]])[index]
  bc = lambda x: x.to(torch.float64)[:, None, None, None]
  z = torch.tensor(st["latents"], dtype=torch.float64)
  z_start = bc(ac[start].sqrt()) * z + bc((1 - ac[start]).sqrt()) * torch.tensor(st["noise"], dtype=torch.float64)
  ctx = torch.tensor(st["context"])
  uncond = torch.tensor(st["uncond"]).expand_as(ctx)

  def x0_of(out, zz, t):
    return (zz - bc((1 - ac[t]).sqrt()) * out) / bc(ac[t].sqrt())

  with torch.no_grad():
    out_c = st["teacher"](z_start.float(), start, ctx).sample.double()
    out_u = st["teacher"](z_start.float(), start, uncond).sample.double()
    w = bc(torch.tensor(st["omega"]))
    x0 = x0_of(out_c, z_start, start) + w * (x0_of(out_c, z_start, start) - x0_of(out_u, z_start, start))
    eps = out_c + w * (out_c - out_u)
    z_prev = bc(ac_prev.sqrt()) * x0 + bc((1 - ac_prev).sqrt()) * eps

  lcm = diffusers.LCMScheduler.from_config(st["scheduler"].config)

  def f(model, zz, t):
    out = model(zz.float(), t, ctx, timestep_cond=None).sample.double()
    c_skip, c_out = zip(*[lcm.get_scalings_for_boundary_condition_discrete(int(ti)) for ti in t])
    return bc(torch.tensor(c_skip)) * zz + bc(torch.tensor(c_out)) * x0_of(out, zz, t)

  with torch.no_grad():
    target = f(st["target"], z_prev, t_n)
  prediction = f(st["student"], z_start, start)
  return torch.mean((prediction - target) ** 2)


def _ours_loss(st):
  config = losses.ConsistencyLossConfig(skipping_step=K, omega_min=5.0, omega_max=15.0)
  apply = lambda p, z, t, c, tc: st["module"].apply({"params": p}, z, t, c, tc)
  schedule = schedule_from_config(dict(st["scheduler"].config))
  loss_fn = losses.make_loss_fn("lcd", apply, schedule, config, apply, lora_scale=ALPHA / RANK)
  draws = losses.Draws(index=jnp.asarray(st["index"]), omega=jnp.asarray(st["omega"]),
                       noise=jnp.asarray(st["noise"].transpose(0, 2, 3, 1)), drop=jnp.zeros((B,), bool))
  frozen = {"teacher": st["teacher_params"], "uncond_context": jnp.asarray(st["uncond"])}
  batch = {"latents": jnp.asarray(st["latents"].transpose(0, 2, 3, 1)), "context": jnp.asarray(st["context"])}
  # The loss draws from its key; hand it these draws instead.
  original = losses.draw
  losses.draw = lambda *args: draws
  try:
    def objective(adapters):
      return loss_fn(adapters, st["target_lora"], frozen, batch, jax.random.PRNGKey(0))[0]
    return jax.value_and_grad(objective)(st["student_lora"])
  finally:
    losses.draw = original


def test_lora_lcd_loss_and_adapter_gradient_match_diffusers_peft(setup):
  st = setup
  ref = _reference_loss(st)
  ref.backward()
  loss, grads = _ours_loss(st)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-4)

  ours = {k.removeprefix("unet."): v for k, v in lora.to_diffusers_state_dict(grads).items()}
  theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in st["student"].named_parameters()
            if p.requires_grad and ".lora_" in n}
  assert set(ours) == set(theirs)
  # Only the adapter is trained: PEFT froze the base, and our gradient is the adapter tree.
  assert all(not p.requires_grad for n, p in st["student"].named_parameters() if ".lora_" not in n)
  scale = max(float(np.abs(g).max()) for g in theirs.values())
  worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
  assert worst <= 1e-4 * scale, (worst, scale)
  # Both A and B learn (B's gradient is nonzero because A is; A's because B is nonzero).
  assert all(np.abs(g).max() > 0 for g in theirs.values())


def test_lora_student_with_zero_b_is_the_teacher(setup):
  """A fresh adapter (B = 0) makes the student compute the teacher's function exactly."""
  st = setup
  fresh = lora.init_lora(jax.random.PRNGKey(3), st["teacher_params"], RANK)
  apply = lambda p, z, t, c, tc: st["module"].apply({"params": p}, z, t, c, tc)
  student = losses.lora_student_apply(apply, ALPHA / RANK)
  z = jnp.asarray(st["latents"].transpose(0, 2, 3, 1))
  t = jnp.asarray([19, 759])
  c = jnp.asarray(st["context"])
  np.testing.assert_array_equal(student({"base": st["teacher_params"], "lora": fresh}, z, t, c, jnp.ones((B, 256))),
                                apply(st["teacher_params"], z, t, c, None))


def test_lora_student_needs_lcd():
  with pytest.raises(Exception, match="needs mode 'lcd'"):
    losses.make_loss_fn("lcf", lambda *a: None, None, losses.ConsistencyLossConfig(), lora_scale=1.0)
