"""LCD and LCF against an independent PyTorch re-derivation on diffusers UNets.

The reference below follows docs/conventions.md (sections 8-11) and diffusers' `train_lcm_distill_sd_wds.py`
step by step with diffusers' own pieces (the scheduler's alphas_cumprod, LCMScheduler's
boundary scalings, the LCM pipeline's guidance embedding, DDIMSolver's alphas_cumprod_prev),
on torch UNets holding the same weights as our Flax ones, with the same fixed random draws.
The second-order solvers are re-derived from the DPM-Solver papers' update formulas.
"""

from __future__ import annotations

import copy

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax import losses, weights
from lcm_jax.schedule import schedule_from_config
from lcm_jax.sd_pipeline import abstract_params, build_module
from tests.helpers import perturb_
from tests.helpers.tiny_models import unet_kwargs

B, L, D = 2, 6, 32
K = 20
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class Setup:
  """Teacher, student and EMA target as torch and as Flax, with inputs and draws."""

  def __init__(self, prediction_type: str):
    flavour = "sd2" if prediction_type == "v_prediction" else "sd1"
    torch.manual_seed(0)
    self.teacher = diffusers.UNet2DConditionModel(**unet_kwargs(flavour)).eval()
    perturb_(self.teacher, 1)
    self.student = diffusers.UNet2DConditionModel(**unet_kwargs(flavour + "_lcm")).eval()
    missing, unexpected = self.student.load_state_dict(self.teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    self.target = copy.deepcopy(self.student)
    perturb_(self.target, 2, std=0.02)  # the EMA target differs from the online student
    self.scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, **SCHED)
    self.schedule = schedule_from_config(dict(self.scheduler.config))

    teacher_module = build_module("unet", dict(self.teacher.config))
    student_module = build_module("unet", dict(self.student.config))
    to_flax = lambda m, mod: weights.torch_to_flax({k: v.detach().numpy() for k, v in m.state_dict().items()},
                                                   abstract_params(mod))
    self.teacher_params = to_flax(self.teacher, teacher_module)
    self.student_params = to_flax(self.student, student_module)
    self.target_params = to_flax(self.target, student_module)
    self.teacher_apply = lambda p, z, t, c, tc: teacher_module.apply({"params": p}, z, t, c, tc)
    self.student_apply = lambda p, z, t, c, tc: student_module.apply({"params": p}, z, t, c, tc)

    rng = np.random.default_rng(0)
    self.latents = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)  # NCHW, as torch
    self.context = rng.standard_normal((B, L, D)).astype(np.float32)
    self.uncond = rng.standard_normal((1, L, D)).astype(np.float32)
    # index 0 starts at t=19 and targets t=0 (the boundary); index 37 starts at 759.
    self.index = np.array([0, 37], np.int32)
    self.omega = np.array([3.0, 9.5], np.float32)
    self.noise = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)
    self.drop = np.array([False, False])

  def draws(self, drop=None) -> losses.Draws:
    return losses.Draws(index=jnp.asarray(self.index), omega=jnp.asarray(self.omega),
                        noise=jnp.asarray(_nhwc(self.noise)),
                        drop=jnp.asarray(self.drop if drop is None else drop))


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def setup(request):
  return Setup(request.param)


# ------------------------------------------------------------------------------ reference


def _x0_eps(out, z, a, s, prediction_type, official_repo_mistake=False):
  """The teacher's output as (x0, eps). With official_repo_mistake, the raw output is used as
  eps whatever the prediction type, as the official LCM repository does."""
  if prediction_type == "epsilon" or official_repo_mistake:
    return (z - s * out) / a, out
  return a * z - s * out, a * out + s * z  # v_prediction


class Reference:
  """LCD / LCF in torch, independently of lcm_jax."""

  def __init__(self, st: Setup, drop=None, solver="ddim", official_repo_mistake=False):
    self.st = st
    ac = st.scheduler.alphas_cumprod.to(torch.float64)
    self.ac = ac
    self.ptype = st.scheduler.config.prediction_type
    grid = torch.arange(1, 1000 // K + 1) * K - 1
    self.start = grid[torch.tensor(st.index).long()]
    self.tn = torch.clamp(self.start - K, min=0)
    # DDIMSolver's alphas_cumprod_prev: [ac[0]] + ac[grid[:-1]], indexed like the grid.
    self.ac_prev = torch.cat([ac[:1], ac[grid[:-1]]])[torch.tensor(st.index).long()]
    drop = st.drop if drop is None else drop
    ctx = torch.tensor(st.context)
    self.ctx = torch.where(torch.tensor(drop)[:, None, None], torch.tensor(st.uncond).expand_as(ctx), ctx)
    self.uncond = torch.tensor(st.uncond).expand_as(ctx)
    self.omega = torch.tensor(st.omega, dtype=torch.float64)
    self.w_emb = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(st.omega), embedding_dim=256)
    self.lcm = diffusers.LCMScheduler.from_config(st.scheduler.config)
    self.solver = solver
    self.mistake = official_repo_mistake
    z = torch.tensor(st.latents, dtype=torch.float64)
    self.z = z
    self.noise = torch.tensor(st.noise, dtype=torch.float64)
    self.z_start = self._noisy(self.start)

  def _bc(self, x):
    return x.to(torch.float64)[:, None, None, None]

  def _noisy(self, t):
    return self._bc(self.ac[t].sqrt()) * self.z + self._bc((1 - self.ac[t]).sqrt()) * self.noise

  def _unet(self, m, z, t, ctx, cond=None):
    with torch.no_grad():
      return m(z.float(), t, ctx, timestep_cond=cond).sample.to(torch.float64)

  def _alpha_sigma(self, t):
    """alpha, sigma at integer or (for the solvers' midpoints) fractional t: log alpha
    interpolated linearly in t, as DPM-Solper's discrete-time schedule does."""
    t = torch.as_tensor(t, dtype=torch.float64)
    log_alpha = 0.5 * torch.log(self.ac)
    la = torch.tensor(np.interp(t.numpy(), np.arange(1000), log_alpha.numpy()))
    return la.exp(), (1 - (2 * la).exp()).sqrt()

  def guided(self, z, t):
    """(x0, eps) of the guided teacher at z, t (t [B], possibly fractional)."""
    st = self.st
    a, s = (self._bc(v) for v in self._alpha_sigma(t))
    tt = torch.as_tensor(t, dtype=torch.float32)
    x0_c, eps_c = _x0_eps(self._unet(st.teacher, z, tt, self.ctx), z, a, s, self.ptype, self.mistake)
    x0_u, eps_u = _x0_eps(self._unet(st.teacher, z, tt, self.uncond), z, a, s, self.ptype, self.mistake)
    w = self._bc(self.omega)
    return x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)

  def z_hat(self):
    z, t, s = self.z_start, self.start, self.tn
    if self.solver == "ddim":  # diffusers' DDIMSolver.ddim_step
      x0, eps = self.guided(z, t)
      return self._bc(self.ac_prev.sqrt()) * x0 + self._bc((1 - self.ac_prev).sqrt()) * eps
    # DPM-Solver-2 / DPM-Solver++(2S) with r = 1/2 in lambda (Lu et al. 2022a, 2022b).
    lam = lambda tt: torch.log(self._alpha_sigma(tt)[0]) - torch.log(self._alpha_sigma(tt)[1])
    lt, ls = lam(t), lam(s)
    h = ls - lt
    lm = lt + h / 2
    log_alpha = 0.5 * torch.log(self.ac)
    la_m = -0.5 * torch.log1p(torch.exp(-2 * lm))
    t_mid = torch.tensor(np.interp(la_m.numpy(), log_alpha.numpy()[::-1], np.arange(1000)[::-1].astype(float)))
    a_t, s_t = self._alpha_sigma(t)
    a_s, s_s = self._alpha_sigma(s)
    a_m, s_m = self._alpha_sigma(t_mid)
    bc = self._bc
    if self.solver == "dpm_solver":
      _, eps_t = self.guided(z, t)
      u = bc(a_m / a_t) * z - bc(s_m * torch.expm1(h / 2)) * eps_t
      _, eps_m = self.guided(u, t_mid)
      return bc(a_s / a_t) * z - bc(s_s * torch.expm1(h)) * eps_m
    x0_t, _ = self.guided(z, t)
    u = bc(s_m / s_t) * z - bc(a_m * torch.expm1(-h / 2)) * x0_t
    x0_m, _ = self.guided(u, t_mid)
    return bc(s_s / s_t) * z - bc(a_s * torch.expm1(-h)) * x0_m

  def f(self, model, z, t):
    """f_theta = c_skip z + c_out x0, with LCMScheduler's boundary scalings."""
    out = self._unet(model, z, t, self.ctx, self.w_emb)
    a, s = self._bc(self.ac[t].sqrt()), self._bc((1 - self.ac[t]).sqrt())
    x0, _ = _x0_eps(out, z, a, s, self.ptype)
    c_skip, c_out = zip(*[self.lcm.get_scalings_for_boundary_condition_discrete(int(ti)) for ti in t])
    return self._bc(torch.tensor(c_skip)) * z + self._bc(torch.tensor(c_out)) * x0

  def lcd(self):
    z_hat = self.z_hat()
    pred = self.f(self.st.student, self.z_start, self.start)
    target = self.f(self.st.target, z_hat, self.tn)
    return dict(z_start=self.z_start, z_target=z_hat, prediction=pred, target=target)

  def lcf(self):
    z_tn = self._noisy(self.tn)
    pred = self.f(self.st.student, self.z_start, self.start)
    target = self.f(self.st.target, z_tn, self.tn)
    return dict(z_start=self.z_start, z_target=z_tn, prediction=pred, target=target)


def _close(ours, ref, what, rel=1e-4):
  ours, ref = _nchw(ours), ref.numpy()
  err = np.abs(ours - ref).max()
  assert err <= rel * max(1.0, np.abs(ref).max()), f"{what}: max error {err:.3g}"
  return err


def _ours_lcd(st, config, drop=None):
  return losses.lcd_terms(st.student_apply, st.teacher_apply, st.schedule, config, st.student_params,
                          st.target_params, st.teacher_params, jnp.asarray(_nhwc(st.latents)),
                          jnp.asarray(st.context), jnp.asarray(st.uncond), st.draws(drop))


# ------------------------------------------------------------------------------ tests


def test_lcd_ddim_matches_reference(setup):
  st = setup
  config = losses.ConsistencyLossConfig(skipping_step=K)
  ours = _ours_lcd(st, config)
  ref = Reference(st).lcd()
  for name in ("z_start", "z_target", "prediction", "target"):
    _close(ours[name], ref[name], name)
  loss = losses.distance(ours["prediction"], ours["target"], config)
  ref_loss = torch.mean((ref["prediction"] - ref["target"]) ** 2).item()
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
  huber = losses.ConsistencyLossConfig(skipping_step=K, distance="huber", huber_c=0.001)
  ref_huber = torch.mean(torch.sqrt((ref["prediction"] - ref["target"]) ** 2 + 0.001 ** 2) - 0.001).item()
  np.testing.assert_allclose(float(losses.distance(ours["prediction"], ours["target"], huber)), ref_huber, rtol=1e-4)


def test_v_prediction_teacher_is_converted_not_taken_as_eps():
  """The official LCM repository's mistake (raw v output used as eps) moves z_hat far more
  than our tolerance, so the reference comparison above would catch it."""
  st = Setup("v_prediction")
  ours = _ours_lcd(st, losses.ConsistencyLossConfig(skipping_step=K))
  right = Reference(st).lcd()["z_target"].numpy()
  wrong = Reference(st, official_repo_mistake=True).lcd()["z_target"].numpy()
  err_right = np.abs(_nchw(ours["z_target"]) - right).max()
  err_wrong = np.abs(_nchw(ours["z_target"]) - wrong).max()
  assert err_right <= 1e-4 * max(1.0, np.abs(right).max())
  assert err_wrong > 100 * 1e-4 * max(1.0, np.abs(right).max()), err_wrong


@pytest.mark.parametrize("solver", ["dpm_solver", "dpm_solver_pp"])
def test_lcd_second_order_solvers_match_reference(solver):
  st = Setup("epsilon")
  config = losses.ConsistencyLossConfig(skipping_step=K, solver=solver)
  ours = _ours_lcd(st, config)
  ref = Reference(st, solver=solver).lcd()
  _close(ours["z_target"], ref["z_target"], "z_target")
  _close(ours["target"], ref["target"], "target")
  # and the second-order step is not DDIM's
  ddim = Reference(st).lcd()["z_target"].numpy()
  assert np.abs(_nchw(ours["z_target"]) - ddim).max() > 1e-3


def test_caption_dropout_replaces_the_caption_for_teacher_and_student():
  st = Setup("epsilon")
  config = losses.ConsistencyLossConfig(skipping_step=K, caption_dropout=0.5)
  drop = np.array([True, False])
  ours = _ours_lcd(st, config, drop=drop)
  ref = Reference(st, drop=drop).lcd()
  for name in ("z_target", "prediction", "target"):
    _close(ours[name], ref[name], name)
  # the proportion is actually applied by `draw`
  draws = losses.draw(jax.random.key(0), jnp.zeros((4000, 1, 1, 1)), st.schedule, config)
  assert abs(float(draws.drop.mean()) - 0.5) < 0.03
  none = losses.draw(jax.random.key(0), jnp.zeros((4000, 1, 1, 1)), st.schedule,
                     losses.ConsistencyLossConfig())
  assert not bool(none.drop.any())
  assert float(none.omega.min()) >= 2.0 and float(none.omega.max()) <= 14.0
  assert set(np.unique(np.asarray(none.index))) == set(range(50))


def test_lcf_matches_reference(setup):
  st = setup
  config = losses.ConsistencyLossConfig(skipping_step=K)
  ours = losses.lcf_terms(st.student_apply, st.schedule, config, st.student_params, st.target_params,
                          jnp.asarray(_nhwc(st.latents)), jnp.asarray(st.context), jnp.asarray(st.uncond),
                          st.draws())
  ref = Reference(st).lcf()
  for name in ("z_start", "z_target", "prediction", "target"):
    _close(ours[name], ref[name], name)


def test_lcd_gradient_matches_torch_autograd():
  """The gradient of the LCD loss w.r.t. every student parameter against torch autograd on
  the reference loss (the target and the teacher get no gradient)."""
  st = Setup("epsilon")
  config = losses.ConsistencyLossConfig(skipping_step=K)
  ref = Reference(st)
  z_hat = ref.z_hat()
  target = ref.f(st.target, z_hat, ref.tn)
  student = copy.deepcopy(st.student).train()
  out = student(ref.z_start.float(), ref.start, ref.ctx, timestep_cond=ref.w_emb).sample.double()
  a, s = ref._bc(ref.ac[ref.start].sqrt()), ref._bc((1 - ref.ac[ref.start]).sqrt())
  x0 = (ref.z_start - s * out) / a
  c = [ref.lcm.get_scalings_for_boundary_condition_discrete(int(t)) for t in ref.start]
  pred = ref._bc(torch.tensor([x[0] for x in c])) * ref.z_start + ref._bc(torch.tensor([x[1] for x in c])) * x0
  torch.mean((pred - target) ** 2).backward()

  def loss_fn(params):
    terms = losses.lcd_terms(st.student_apply, st.teacher_apply, st.schedule, config, params, st.target_params,
                             st.teacher_params, jnp.asarray(_nhwc(st.latents)), jnp.asarray(st.context),
                             jnp.asarray(st.uncond), st.draws())
    return losses.distance(terms["prediction"], terms["target"], config)

  grads = jax.grad(loss_fn)(st.student_params)
  flat = weights.flax_to_torch(grads)
  named = dict(student.named_parameters())
  assert set(flat) == set(named)
  scale = max(float(p.grad.abs().max()) for p in named.values())
  worst = max(float(np.abs(flat[k] - named[k].grad.numpy()).max()) for k in named)
  assert worst <= 1e-4 * scale, (worst, scale)
  assert float(np.abs(flat["time_embedding.cond_proj.weight"]).max()) > 0  # the guidance input learns


def test_student_from_teacher():
  st = Setup("epsilon")
  abstract = jax.eval_shape(lambda: st.student_params)
  zero = losses.student_params_from_teacher(st.teacher_params, abstract, jax.random.key(0), init="zeros")
  assert not np.asarray(zero["time_embedding"]["cond_proj"]["kernel"]).any()
  # with a zero guidance input the student computes exactly the teacher's function
  z = jnp.asarray(_nhwc(st.latents))
  t = jnp.array([10, 500])
  w = jnp.ones((B, 256))
  np.testing.assert_allclose(np.asarray(st.student_apply(zero, z, t, jnp.asarray(st.context), w)),
                             np.asarray(st.teacher_apply(st.teacher_params, z, t, jnp.asarray(st.context), None)),
                             atol=1e-6)
  torch_default = losses.student_params_from_teacher(st.teacher_params, abstract, jax.random.key(0),
                                                     init="torch_default")
  k = np.asarray(torch_default["time_embedding"]["cond_proj"]["kernel"])
  bound = 1 / np.sqrt(256)
  assert k.shape == (256, 32) and np.abs(k).max() <= bound and k.std() > 0.5 * bound / np.sqrt(3)
  flat_t, flat_s = weights.flatten_tree(st.teacher_params), weights.flatten_tree(zero)
  assert all(flat_s[p] is flat_t[p] for p in flat_t)


def test_make_loss_fn_uses_the_draws_of_the_step_key():
  """make_loss_fn draws from the step's key: the loss equals lcd_terms on those same draws."""
  st = Setup("epsilon")
  config = losses.ConsistencyLossConfig(skipping_step=K, omega_min=2.0, omega_max=14.0)
  loss_fn = losses.make_loss_fn("lcd", st.student_apply, st.schedule, config, st.teacher_apply)
  frozen = {"teacher": st.teacher_params, "uncond_context": jnp.asarray(st.uncond)}
  batch = {"latents": jnp.asarray(_nhwc(st.latents)), "context": jnp.asarray(st.context)}
  rng = jax.random.key(3)
  loss, metrics = loss_fn(st.student_params, st.target_params, frozen, batch, rng)
  draws = losses.draw(rng, batch["latents"], st.schedule, config)
  terms = losses.lcd_terms(st.student_apply, st.teacher_apply, st.schedule, config, st.student_params,
                           st.target_params, st.teacher_params, batch["latents"], batch["context"],
                           frozen["uncond_context"], draws)
  np.testing.assert_allclose(float(loss), float(losses.distance(terms["prediction"], terms["target"], config)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(metrics["omega"]), float(draws.omega.mean()), rtol=1e-6)


def test_bad_config_is_rejected():
  with pytest.raises(Exception, match="unknown solver"):
    losses.ConsistencyLossConfig(solver="euler")
  with pytest.raises(Exception, match="unknown distance"):
    losses.ConsistencyLossConfig(distance="l1")
  with pytest.raises(Exception, match="caption_dropout"):
    losses.ConsistencyLossConfig(caption_dropout=1.5)


def test_lcd_step_sharded_on_8_devices_equals_one_device():
  """The real LCD step on tiny UNets over a data=2 x fsdp=4 mesh of fake CPU devices."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_lcd_check"], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["max_loss_diff"] <= 1e-5, result
  assert result["max_param_diff"] <= 1e-5, result
  assert result["max_target_diff"] <= 1e-5, result
  assert result["ref_losses"][0] > 0
