"""lcm_jax.solvers against independent derivations.

* DDIM against docs/conventions.md's (section 9) z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps on the LCD grid,
  and against the LCM paper's eq. 18 form.
* All three against the exact probability-flow ODE solution for data drawn from a Gaussian
  mixture, whose exact denoiser is known in closed form: the reference integrates
  d(z / alpha) / d lambda = -exp(-lambda) eps(z, lambda) with RK4 in NumPy float64 (checked
  against the closed-form solution for a single Gaussian), and the solvers' errors must
  fall at first (DDIM) and second order (DPM-Solver-2, DPM-Solver++(2S)) as steps are halved.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler

from lcm_jax.consistency import skipping_step_timesteps
from lcm_jax.schedule import (
  Schedule,
  alpha_sigma,
  broadcast_to,
  lambda_t,
  schedule_from_config,
)
from lcm_jax.solvers import SOLVERS, ddim_step

SD15 = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


def test_ddim_step_is_reference_formula_on_the_lcd_grid():
  s = schedule_from_config(SD15)
  ac = DDIMScheduler.from_config(SD15).alphas_cumprod.numpy().astype(np.float64)
  timesteps = skipping_step_timesteps(1000, 20)
  np.testing.assert_array_equal(timesteps, np.arange(1, 51) * 20 - 1)
  start = timesteps[[0, 1, 17, 49]]
  target = np.maximum(start - 20, 0)
  # diffusers' DDIMSolver: alphas_cumprod_prev = [ac[0]] + ac[timesteps[:-1]].
  prev_table = np.concatenate([[ac[0]], ac[timesteps[:-1]]])
  np.testing.assert_array_equal(prev_table[[0, 1, 17, 49]], ac[target])
  rs = np.random.RandomState(0)
  x0, eps = rs.randn(4, 4, 4, 3), rs.randn(4, 4, 4, 3)  # need not be consistent with z
  z = rs.randn(4, 4, 4, 3)
  model_fn = lambda z_, t_: (jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32))
  got = ddim_step(s, jnp.asarray(z, jnp.float32), jnp.asarray(start), jnp.asarray(target), model_fn)
  a_prev = ac[target][:, None, None, None]
  np.testing.assert_allclose(np.asarray(got), np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps,
                             atol=2e-6)


def test_ddim_step_equals_paper_eq18():
  s = schedule_from_config(SD15)
  rs = np.random.RandomState(1)
  z = jnp.asarray(rs.randn(3, 2, 2, 4), jnp.float32)
  eps_hat = jnp.asarray(rs.randn(3, 2, 2, 4), jnp.float32)
  t, tn = jnp.asarray([999, 519, 39]), jnp.asarray([979, 499, 19])

  def model_fn(z_, t_):  # an epsilon model: x0 follows from eps and z
    a, sg = alpha_sigma(s, t_)
    return (z_ - broadcast_to(sg, z_) * eps_hat) / broadcast_to(a, z_), eps_hat

  (a_t, s_t), (a_n, s_n) = alpha_sigma(s, t), alpha_sigma(s, tn)
  b = lambda v: broadcast_to(v, z)
  # Eq. 18 gives the increment Psi = z_hat_{t_n} - z_{t_{n+k}}.
  psi = b(a_n / a_t) * z - b(s_n) * (b(s_t * a_n / (a_t * s_n)) - 1) * eps_hat - z
  np.testing.assert_allclose(np.asarray(ddim_step(s, z, t, tn, model_fn)), np.asarray(z + psi),
                             atol=3e-6)


# ---- Gaussian-mixture data: exact denoiser, RK4 reference --------------------------------

MEANS = np.array([-1.5, 1.0])
WEIGHTS = np.array([0.4, 0.6])
STD = 0.5


def _x0_numpy(z, alpha, sigma, means, weights):
  var = alpha ** 2 * STD ** 2 + sigma ** 2
  logr = np.log(weights) - (z[..., None] - alpha * means) ** 2 / (2 * var)
  r = np.exp(logr - logr.max(-1, keepdims=True))
  r /= r.sum(-1, keepdims=True)
  return (r * (means + alpha * STD ** 2 * (z[..., None] - alpha * means) / var)).sum(-1)


def _rk4_reference(z, lam_t, lam_s, means, weights, steps=1000):
  """Integrates the PF-ODE in x_bar = z / alpha over lambda (sigma / alpha = exp(-lambda))."""
  def alpha_sigma_of(lam):
    return np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))

  def f(xb, lam):
    a, sg = alpha_sigma_of(lam)
    zz = a * xb
    eps = (zz - a * _x0_numpy(zz, a, sg, means, weights)) / sg
    return -np.exp(-lam) * eps

  xb, lam, h = z / alpha_sigma_of(lam_t)[0], lam_t, (lam_s - lam_t) / steps
  for _ in range(steps):
    k1 = f(xb, lam)
    k2 = f(xb + h / 2 * k1, lam + h / 2)
    k3 = f(xb + h / 2 * k2, lam + h / 2)
    k4 = f(xb + h * k3, lam + h)
    xb, lam = xb + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
  return xb * alpha_sigma_of(lam_s)[0]


def _model_fn(schedule: Schedule, means, weights):
  """The exact (x0, eps) for the mixture at (z, t); t may be fractional."""
  def model_fn(z, t):
    a, sg = alpha_sigma(schedule, t)
    a, sg = broadcast_to(a, z)[..., None], broadcast_to(sg, z)[..., None]
    var = a * a * STD ** 2 + sg * sg
    zz = z[..., None]
    r = jax.nn.softmax(jnp.log(weights) - (zz - a * means) ** 2 / (2 * var), axis=-1)
    x0 = (r * (means + a * STD ** 2 * (zz - a * means) / var)).sum(-1)
    return x0, (z - a[..., 0] * x0) / sg[..., 0]
  return model_fn


def _float64_schedule() -> Schedule:
  s = schedule_from_config(SD15)
  return s.replace(alphas_cumprod=jnp.asarray(np.asarray(s.alphas_cumprod), jnp.float64),
                   betas=jnp.asarray(np.asarray(s.betas), jnp.float64))


def _solve(step, schedule, z, t0, t1, n):
  """n steps of the jitted solver step from t0 to t1, equally spaced in lambda (so the
  timesteps between are fractional)."""
  # In NumPy: eager JAX ops would compile afresh for every n.
  table = 0.5 * np.log(np.asarray(schedule.alphas_cumprod, np.float64))
  lam = lambda t: np.interp(t, np.arange(table.size), table) - 0.5 * np.log1p(
      -np.exp(2 * np.interp(t, np.arange(table.size), table)))
  log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.linspace(lam(t0), lam(t1), n + 1))
  ts = np.interp(log_alpha, table[::-1], np.arange(table.size)[::-1].astype(np.float64))
  ts[0], ts[-1] = t0, t1
  b = z.shape[0]
  for i in range(n):
    z = step(schedule, z, jnp.full((b,), ts[i]), jnp.full((b,), ts[i + 1]))
  return np.asarray(z)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@functools.lru_cache(maxsize=None)
def _mixture_reference(t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
  """(z at t0, the exact flow of it at t1) for the mixture, shared by the order tests."""
  with jax.enable_x64(True):
    s = _float64_schedule()
    lam0, lam1 = (float(lambda_t(s, jnp.asarray(t))) for t in (t0, t1))
  z = np.random.RandomState(0).randn(2, 3, 3, 2)
  return z, _rk4_reference(z, lam0, lam1, MEANS, WEIGHTS)


def test_rk4_reference_matches_closed_form_for_gaussian_data():
  # For N(0, c^2) data the flow scales z by sqrt(alpha^2 c^2 + sigma^2) exactly.
  z = np.random.RandomState(0).randn(5)
  lam_t, lam_s = -2.5, 3.0
  got = _rk4_reference(z, lam_t, lam_s, np.array([0.0]), np.array([1.0]), steps=400)
  std = lambda lam: np.sqrt(STD ** 2 / (1 + np.exp(-2 * lam)) + 1 / (1 + np.exp(2 * lam)))
  np.testing.assert_allclose(got, z * std(lam_s) / std(lam_t), rtol=1e-9)


# Expected order of each solver: the error ratio when the step halves is about 2^order.
ORDERS = {"ddim": 1, "dpm_solver": 2, "dpm_solver_pp": 2}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_convergence_order(name, x64):
  s = _float64_schedule()
  model_fn = _model_fn(s, MEANS, WEIGHTS)
  t0, t1 = 999.0, 500.0
  z, ref = _mixture_reference(t0, t1)
  step = jax.jit(functools.partial(SOLVERS[name], model_fn=model_fn))
  errors = np.array([np.abs(_solve(step, s, jnp.asarray(z), t0, t1, n) - ref).max()
                     for n in (8, 16, 32)])
  ratios = errors[:-1] / errors[1:]
  expected = 2.0 ** ORDERS[name]
  assert np.all(ratios > 0.85 * expected) and np.all(ratios < 1.2 * expected), (errors, ratios)
  # Second-order methods are far more accurate at equal model calls (2 per step vs 1).
  if ORDERS[name] == 2:
    assert errors[1] < 0.05


def test_solvers_one_skipping_step_on_gaussian_data(x64):
  # One LCD interval (k = 20) per sample, against the closed-form flow for N(0, c^2) data.
  s = _float64_schedule()
  model_fn = _model_fn(s, jnp.asarray([0.0]), jnp.asarray([1.0]))
  z = np.random.RandomState(2).randn(3, 2, 2, 1)
  t, tn = np.array([999, 759, 259]), np.array([979, 739, 239])
  ac = np.asarray(s.alphas_cumprod)
  std = lambda i: np.sqrt(ac[i] * STD ** 2 + 1 - ac[i])[:, None, None, None]
  exact = z * std(tn) / std(t)
  errors = {}
  for name, solver in SOLVERS.items():
    step = jax.jit(functools.partial(solver, model_fn=model_fn))
    got = np.asarray(step(s, jnp.asarray(z), jnp.asarray(t), jnp.asarray(tn)))
    errors[name] = np.abs(got - exact).reshape(3, -1).max(1)
  # Measured: ddim [2.0e-5, 9.4e-5, 1.4e-3]; both second-order [6e-7, 2.0e-6, 2.6e-5].
  assert np.all(errors["ddim"] < 3e-3), errors
  for name in ("dpm_solver", "dpm_solver_pp"):
    assert np.all(errors[name] < 5e-5) and np.all(errors[name] < errors["ddim"] / 20), errors


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_each_sample_has_its_own_interval(name):
  s = schedule_from_config(SD15)
  model_fn = _model_fn(s, jnp.asarray(MEANS, jnp.float32), jnp.asarray(WEIGHTS, jnp.float32))
  z = jnp.asarray(np.random.RandomState(3).randn(3, 2, 2, 2), jnp.float32)
  t, tn = jnp.asarray([999, 500, 39]), jnp.asarray([979, 480, 19])
  solver = jax.jit(functools.partial(SOLVERS[name], model_fn=model_fn))
  batched = np.asarray(solver(s, z, t, tn))
  for i in range(3):  # the whole batch on sample i's interval (same shapes: no recompile)
    alone = np.asarray(solver(s, z, jnp.full_like(t, t[i]), jnp.full_like(tn, tn[i])))
    np.testing.assert_allclose(batched[i], alone[i], rtol=1e-6, atol=1e-6)
  assert solver._cache_size() == 1
  assert batched.dtype == np.float32 and np.all(np.isfinite(batched))
