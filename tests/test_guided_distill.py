"""Guided-Distill (lcm_jax.guided_distill) against an independent torch derivation on diffusers UNets.

The reference follows the papers' formulas as written, in float64 on torch UNets holding the
same weights as our Flax ones, with the same fixed draws:
* stage 1 (Meng et al. 2023, eq. 6): guidance on the raw UNet output, eps_w = (1 + w) out_c
  - w out_u, then x0 from it (ours guides x0 of each branch: the same by linearity), and the
  truncated-SNR weight max(alpha^2 / sigma^2, 1);
* stage 2 (Salimans & Ho 2022, Algorithm 2): z_t' = alpha_t' x + (sigma_t' / sigma_t)(z_t -
  alpha_t x) twice, then x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' -
  (sigma_t'' / sigma_t) alpha_t), on the nested grid g(N, j) = floor(1000 j / N) - 1 computed
  in Python integers;
* the sampler: DDIM in the form (alpha_s / alpha_t)(z_t - sigma_t eps) + sigma_s eps on
  timesteps written out by hand.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lcm_jax import guided_distill as gd
from lcm_jax.config import base_config, check_config
from lcm_jax.errors import LcmJaxError
from lcm_jax.train_step import create_train_state, make_train_step
from tests.test_losses import Setup, _nchw, _nhwc

CONFIG = gd.GuidedDistillConfig(stage1_steps=5, round_steps=3, initial_steps=8)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def setup(request):
  return Setup(request.param)


class Reference:
  def __init__(self, st: Setup):
    self.st = st
    self.ac = st.scheduler.alphas_cumprod.to(torch.float64)
    self.ptype = st.scheduler.config.prediction_type
    self.x = torch.tensor(st.latents, dtype=torch.float64)
    self.noise = torch.tensor(st.noise, dtype=torch.float64)
    self.ctx = torch.tensor(st.context)
    self.uncond = torch.tensor(st.uncond).expand_as(self.ctx)
    self.omega = torch.tensor(st.omega, dtype=torch.float64)
    import diffusers
    self.w_emb = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(st.omega), embedding_dim=256)

  def alpha_sigma(self, t):
    """Per-example python-int timesteps; -1 is the data."""
    a = torch.tensor([1.0 if ti < 0 else float(self.ac[ti].sqrt()) for ti in t], dtype=torch.float64)
    s = torch.tensor([0.0 if ti < 0 else float((1 - self.ac[ti]).sqrt()) for ti in t], dtype=torch.float64)
    return a[:, None, None, None], s[:, None, None, None]

  def out(self, model, z, t, ctx, cond=None):
    with torch.no_grad():
      return model(z.float(), torch.tensor(t), ctx, timestep_cond=cond).sample.to(torch.float64)

  def x0(self, out, z, t):
    a, s = self.alpha_sigma(t)
    if self.ptype == "epsilon":
      return (z - s * out) / a
    return a * z - s * out  # v_prediction

  def noisy(self, t):
    a, s = self.alpha_sigma(t)
    return a * self.x + s * self.noise

  def stage1(self, t):
    st = self.st
    z = self.noisy(t)
    out_c, out_u = self.out(st.teacher, z, t, self.ctx), self.out(st.teacher, z, t, self.uncond)
    w = self.omega[:, None, None, None]
    target = self.x0(out_c + w * (out_c - out_u), z, t)
    prediction = self.x0(self.out(st.student, z, t, self.ctx, self.w_emb), z, t)
    a, s = self.alpha_sigma(t)
    weight = torch.clamp((a / s) ** 2, min=1.0).flatten()
    loss = torch.mean(weight * ((prediction - target) ** 2).mean(dim=(1, 2, 3)))
    return dict(prediction=prediction, target=target, weight=weight, loss=loss)

  def stage2(self, teacher_steps, positions):
    st = self.st
    g = lambda j: (1000 * j) // teacher_steps - 1
    half = teacher_steps // 2
    i = [min(math.floor(u * half), half - 1) + 1 for u in positions]
    t, t1, t2 = [g(2 * k) for k in i], [g(2 * k - 1) for k in i], [g(2 * k - 2) for k in i]
    z = self.noisy(t)
    a, s = self.alpha_sigma(t)
    a1, s1 = self.alpha_sigma(t1)
    a2, s2 = self.alpha_sigma(t2)
    x = self.x0(self.out(st.target, z, t, self.ctx, self.w_emb), z, t)
    z1 = a1 * x + (s1 / s) * (z - a * x)
    x1 = self.x0(self.out(st.target, z1, t1, self.ctx, self.w_emb), z1, t1)
    z2 = a2 * x1 + (s2 / s1) * (z1 - a1 * x1)
    target = (z2 - (s2 / s) * z) / (a2 - (s2 / s) * a)
    prediction = self.x0(self.out(st.student, z, t, self.ctx, self.w_emb), z, t)
    return dict(t=t, t2=t2, z=z, z2=z2, prediction=prediction, target=target,
                weight=torch.clamp((a / s) ** 2, min=1.0).flatten())


def _close(ours, ref, what, rel=1e-4):
  ours, ref = _nchw(ours), ref.numpy()
  err = np.abs(ours - ref).max()
  assert err <= rel * max(1.0, np.abs(ref).max()), f"{what}: max error {err:.3g}"


def _draws(st, timestep=(0, 0), position=(0.0, 0.0)):
  return gd.Draws(timestep=jnp.asarray(timestep, jnp.int32), position=jnp.asarray(position, jnp.float32),
                  omega=jnp.asarray(st.omega), noise=jnp.asarray(_nhwc(st.noise)))


def _batch(st):
  return jnp.asarray(_nhwc(st.latents)), jnp.asarray(st.context)


def test_stage1_matches_reference(setup):
  st, ref = setup, Reference(setup)
  t = [17, 803]
  latents, context = _batch(st)
  ours = gd.stage1_terms(st.student_apply, st.teacher_apply, st.schedule, CONFIG, st.student_params,
                         st.teacher_params, latents, context, jnp.asarray(st.uncond), _draws(st, timestep=t))
  r = ref.stage1(t)
  _close(ours["target"], r["target"], "guided teacher x0")
  _close(ours["prediction"], r["prediction"], "student x0")
  np.testing.assert_allclose(np.asarray(ours["weight"]), r["weight"].numpy(), rtol=1e-5)
  assert r["weight"][0] > 10 and r["weight"][1] == 1.0  # both sides of the truncation
  loss = gd.weighted_l2(ours["prediction"], ours["target"], ours["weight"])
  np.testing.assert_allclose(float(loss), float(r["loss"]), rtol=1e-3)


@pytest.mark.parametrize("teacher_steps,positions", [(8, (0.05, 0.8)), (2, (0.3, 0.9)), (32, (0.49, 0.97))])
def test_stage2_matches_reference(setup, teacher_steps, positions):
  st, ref = setup, Reference(setup)
  latents, context = _batch(st)
  ours = gd.stage2_terms(st.student_apply, st.schedule, CONFIG, st.student_params, st.target_params, latents, context,
                         jnp.int32(teacher_steps), _draws(st, position=positions))
  r = ref.stage2(teacher_steps, positions)
  np.testing.assert_array_equal(np.asarray(ours["timestep"]), r["t"])
  _close(ours["z"], r["z"], "z_t")
  _close(ours["target"], r["target"], "x_tilde")
  _close(ours["prediction"], r["prediction"], "student x0")
  np.testing.assert_allclose(np.asarray(ours["weight"]), r["weight"].numpy(), rtol=1e-5)


def test_stage2_grid_points():
  """The student grid point i = floor(u N/2) + 1 and the teacher's two steps, by hand (T = 1000)."""
  st = Setup("epsilon")
  ref = Reference(st)
  r = ref.stage2(8, (0.05, 0.8))
  assert r["t"] == [249, 999] and r["t2"] == [-1, 749]
  r = ref.stage2(2, (0.3, 0.9))
  assert r["t"] == [999, 999] and r["t2"] == [-1, -1]


def test_one_student_step_with_x_tilde_lands_on_the_teachers_two_steps():
  """The defining property of the target: DDIM from (z_t, t) with x0 = x_tilde reaches z_t''."""
  st = Setup("epsilon")
  r = Reference(st).stage2(8, (0.05, 0.8))
  ref = Reference(st)
  a, s = ref.alpha_sigma(r["t"])
  a2, s2 = ref.alpha_sigma(r["t2"])
  x = r["target"]
  z2 = a2 * x + (s2 / s) * (r["z"] - a * x)
  assert torch.allclose(z2, r["z2"], atol=1e-9 * float(r["z2"].abs().max()) + 1e-12)


def test_sampler_matches_reference():
  st = Setup("epsilon")
  ref = Reference(st)
  latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
  timesteps = {1: [999, -1], 2: [999, 499, -1], 4: [999, 749, 499, 249, -1]}
  for n, ts in timesteps.items():
    np.testing.assert_array_equal(gd.sampling_timesteps(1000, n), ts)
    z = torch.tensor(latents, dtype=torch.float64)
    for t, s in zip(ts[:-1], ts[1:]):
      eps = ref.out(st.student, z, [t, t], ref.ctx, ref.w_emb)
      a_t, s_t = ref.alpha_sigma([t, t])
      a_s, s_s = ref.alpha_sigma([s, s])
      z = (a_s / a_t) * (z - s_t * eps) + s_s * eps
    ours = gd.sample(st.student_apply, st.student_params, jnp.asarray(_nhwc(latents)), jnp.asarray(st.context),
                     st.schedule, jnp.asarray(st.omega), num_steps=n)
    _close(ours, z, f"{n}-step sample")


def test_schedule_of_a_run():
  """stage 1 for 5 steps, then rounds of 3 steps: N = 8 -> 4, 4 -> 2, 2 -> 1."""
  c = CONFIG
  assert (c.num_rounds, c.total_steps, c.boundaries()) == (3, 14, [5, 8, 11, 14])
  phases = [tuple(int(v) for v in gd.phase(s, c)) for s in range(14)]
  assert phases == [(1, 8)] * 5 + [(0, 8)] * 3 + [(0, 4)] * 3 + [(0, 2)] * 3
  decays = [float(gd.target_decay(s, c)) for s in range(1, 15)]
  assert decays == [0.0 if s in (5, 8, 11, 14) else 1.0 for s in range(1, 15)]
  assert [c.checkpoint_step(n) for n in (8, 4, 2, 1)] == [5, 8, 11, 14]
  with pytest.raises(LcmJaxError):
    c.checkpoint_step(3)
  with pytest.raises(LcmJaxError, match="power of 2"):
    gd.GuidedDistillConfig(initial_steps=12)


def test_train_step_freezes_the_target_and_copies_the_student_at_round_ends():
  """make_train_step with a step-dependent decay and a loss that reads the step: the target
  stays put inside a phase and equals the student right after each boundary."""
  c = CONFIG
  seen = []

  def loss_fn(params, target, frozen, batch, rng, step):
    seen.append(step)
    return jnp.sum((params["w"] - batch["x"]) ** 2) + 0.0 * jnp.sum(target["w"]), {"step": step}

  step_fn = make_train_step(loss_fn, optax.sgd(0.1), lambda s: gd.target_decay(s, c), donate=False,
                            loss_takes_step=True)
  state = create_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1), jax.random.key(0))
  batch = {"x": jnp.ones((2, 3))}
  previous_target = np.asarray(state.target_params["w"])
  for s in range(1, 15):
    state, metrics = step_fn(state, None, batch)
    assert int(metrics["step"]) == s - 1
    target, params = np.asarray(state.target_params["w"]), np.asarray(state.params["w"])
    if s in c.boundaries():
      np.testing.assert_array_equal(target, params)
    else:
      np.testing.assert_array_equal(target, previous_target)
    previous_target = target


def test_make_loss_fn_dispatches_on_the_step():
  st = Setup("epsilon")
  loss_fn = gd.make_loss_fn(st.student_apply, st.teacher_apply, st.schedule, CONFIG)
  frozen = {"teacher": st.teacher_params, "uncond_context": jnp.asarray(st.uncond)}
  latents, context = _batch(st)
  rng = jax.random.key(7)
  draws = gd.draw(rng, latents, st.schedule, CONFIG)
  loss1, m1 = loss_fn(st.student_params, st.target_params, frozen, {"latents": latents, "context": context}, rng,
                      jnp.int32(2))
  terms = gd.stage1_terms(st.student_apply, st.teacher_apply, st.schedule, CONFIG, st.student_params,
                          st.teacher_params, latents, context, frozen["uncond_context"], draws)
  np.testing.assert_allclose(float(loss1), float(gd.weighted_l2(terms["prediction"], terms["target"],
                                                                 terms["weight"])), rtol=1e-5)
  assert float(m1["teacher_steps"]) == 0
  loss2, m2 = loss_fn(st.student_params, st.target_params, frozen, {"latents": latents, "context": context}, rng,
                      jnp.int32(9))
  terms = gd.stage2_terms(st.student_apply, st.schedule, CONFIG, st.student_params, st.target_params, latents,
                          context, jnp.int32(4), draws)
  np.testing.assert_allclose(float(loss2), float(gd.weighted_l2(terms["prediction"], terms["target"],
                                                                 terms["weight"])), rtol=1e-5)
  assert float(m2["teacher_steps"]) == 4
  # The loss compiled for one stage (the trainer's StagedStep) is the same function at its steps.
  batch = {"latents": latents, "context": context}
  for stage, step, loss, metrics in ((1, 2, loss1, m1), (2, 9, loss2, m2)):
    fixed = gd.make_loss_fn(st.student_apply, st.teacher_apply, st.schedule, CONFIG, stage=stage)
    assert gd.stage_of(step, CONFIG) == stage
    loss_s, m_s = fixed(st.student_params, st.target_params, frozen, batch, rng, jnp.int32(step))
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-6)
    assert float(m_s["teacher_steps"]) == float(metrics["teacher_steps"])
  with pytest.raises(LcmJaxError, match="stage must be None, 1 or 2"):
    gd.make_loss_fn(st.student_apply, st.teacher_apply, st.schedule, CONFIG, stage=3)


def test_staged_step_compiles_one_function_per_stage_and_switches_on_the_host():
  """The trainer's Guided-Distill step: the first step's stage compiled at once, the other on
  its first call, each step run by its stage's function (stage 1 below stage1_steps = 5)."""
  from lcm_jax.training.trainer import StagedStep
  compiled = []

  class Jitted:
    def __init__(self, stage):
      self.stage = stage

    def lower(self, *args):
      return self

    def compile(self):
      compiled.append(self.stage)
      return lambda state, frozen, batch: (state.replace(step=state.step + 1), {"stage": self.stage})

  state = create_train_state({"w": jnp.zeros(3)}, optax.sgd(0.1), jax.random.key(0)).replace(step=jnp.int32(3))
  staged = StagedStep(lambda gd_stage=None: (Jitted(gd_stage), lambda b: b), CONFIG, state, None, {}, lambda m: None)
  assert compiled == [1]
  stages = []
  for _ in range(4):
    state, metrics = staged(state, None, {})
    stages.append(metrics["stage"])
  assert stages == [1, 1, 2, 2] and compiled == [1, 2] and int(state.step) == 7


def test_config_checks_the_step_budget():
  c = base_config()
  c.mode, c.teacher, c.data.path = "guided_distill", "teacher", "data"
  c.guided_distill.stage1_steps, c.guided_distill.round_steps, c.guided_distill.initial_steps = 250, 150, 32
  c.num_train_steps = 1000
  check_config(c)
  c.num_train_steps = 999
  with pytest.raises(LcmJaxError, match="num_train_steps"):
    check_config(c)
  c.num_train_steps, c.teacher = 1000, ""
  with pytest.raises(LcmJaxError, match="teacher"):
    check_config(c)
