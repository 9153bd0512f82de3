"""lcm_jax.schedule: alphas_cumprod bit-equal to diffusers, config handling, conversions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from lcm_jax.errors import UnsupportedConfigError
from lcm_jax.schedule import (
  alpha_sigma,
  alpha_sigma_from_lambda,
  from_x0_eps,
  inverse_lambda,
  lambda_t,
  schedule_from_config,
  to_x0_eps,
)

# Stable Diffusion 1.5's scheduler_config.json and SD 2.1 (768)'s.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}

BETA_CONFIGS = [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 777},
]


@pytest.mark.parametrize("cfg", BETA_CONFIGS, ids=lambda c: f"{c['beta_schedule']}")
@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler])
def test_alphas_cumprod_bit_equal_to_diffusers(cfg, cls):
  ref = cls.from_config(cfg)
  s = schedule_from_config(cfg)
  assert s.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(s.betas), ref.betas.numpy())
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy())


def test_trained_betas():
  betas = list(np.linspace(1e-4, 0.03, 1000) ** 1.5)
  cfg = {"trained_betas": betas}
  ref = DDIMScheduler.from_config(cfg)
  np.testing.assert_array_equal(np.asarray(schedule_from_config(cfg).alphas_cumprod),
                                ref.alphas_cumprod.numpy())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers'
@pytest.mark.parametrize("cls", ["DDIMScheduler", "PNDMScheduler", "LCMScheduler", "DDPMScheduler",
                                 "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                 "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_default_configs_of_other_schedulers_load(cls):
  # A model folder may ship any of these; DPMSolverMultistepScheduler.from_config accepts them.
  # (The in-memory config lists defaulted keys in _use_default_values, which both drop.)
  import diffusers
  cfg = dict(getattr(diffusers, cls)(beta_schedule="scaled_linear").config)
  s = schedule_from_config(cfg)
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod),
                                DPMSolverMultistepScheduler.from_config(cfg).alphas_cumprod.numpy())
  assert s.algorithm_type in (None, "dpmsolver++")


def test_sd_configs_read():
  s = schedule_from_config(SD15)
  assert (s.prediction_type, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == (
      "epsilon", 1, False, False)
  assert s.timestep_spacing is None  # absent: each sampler applies its class default
  assert schedule_from_config(SD21).prediction_type == "v_prediction"


@pytest.mark.parametrize("key,value", [
    ("thresholding", True), ("use_karras_sigmas", True), ("rescale_betas_zero_snr", True),
    ("beta_schedule", "sigmoid"), ("prediction_type", "flow_prediction"),
    ("timestep_spacing", "karras"), ("solver_order", 3), ("solver_type", "heun"),
    ("algorithm_type", "sde-dpmsolver++"), ("variance_type", "learned_range"),
    ("lambda_min_clipped", -5.1), ("use_flow_sigmas", True),
])
def test_unsupported_values_raise_naming_the_key(key, value):
  with pytest.raises(UnsupportedConfigError, match=key):
    schedule_from_config(dict(SD15, **{key: value}))


def test_alpha_sigma_integer_and_clean():
  s = schedule_from_config(SD15)
  ac = DDIMScheduler.from_config(SD15).alphas_cumprod
  t = np.array([0, 1, 499, 999])
  alpha, sigma = alpha_sigma(s, jnp.asarray(t))
  # Correctly rounded float32 square roots; torch's vectorised CPU sqrt is off by an ulp in
  # about a fifth of the entries, hence allclose against diffusers.
  np.testing.assert_array_equal(np.asarray(alpha), np.sqrt(ac[t].numpy()))
  np.testing.assert_array_equal(np.asarray(sigma), np.sqrt((1 - ac[t]).numpy()))
  np.testing.assert_allclose(np.asarray(alpha), (ac[t] ** 0.5).numpy(), rtol=1.2e-7, atol=0)
  np.testing.assert_allclose(np.asarray(sigma), ((1 - ac[t]) ** 0.5).numpy(), rtol=1.2e-7, atol=0)
  a, sg = alpha_sigma(s, jnp.asarray([-1]))
  assert (float(a[0]), float(sg[0])) == (1.0, 0.0)
  assert np.isinf(float(lambda_t(s, jnp.asarray([-1]))[0]))


def test_alpha_sigma_continuous_interpolates_log_alpha():
  s = schedule_from_config(SD15)
  ac = np.asarray(s.alphas_cumprod, np.float64)
  t = np.array([0.0, 3.0, 10.25, 500.5, 998.75, 999.0])

  @jax.jit  # one compilation instead of one per eager op
  def evaluate(sched, t_float, t_int):
    lam = lambda_t(sched, t_float)
    return (alpha_sigma(sched, t_float), alpha_sigma(sched, t_int)[0],
            inverse_lambda(sched, lam), alpha_sigma_from_lambda(lam))

  (alpha, sigma), a_int, back, (a2, s2) = jax.tree.map(np.asarray, evaluate(
      s, jnp.asarray(t, jnp.float32), jnp.asarray([0, 3, 999])))
  expected = np.exp(np.interp(t, np.arange(1000), 0.5 * np.log(ac)))
  np.testing.assert_allclose(alpha, expected, rtol=2e-6)
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
  # At integer points it agrees with the lookup; lambda inverts exactly.
  np.testing.assert_allclose(alpha[[0, 1, 5]], a_int, rtol=1e-6)
  np.testing.assert_allclose(back, t, atol=2e-3)
  np.testing.assert_allclose(a2, alpha, rtol=1e-5)
  np.testing.assert_allclose(s2, sigma, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_table_and_round_trip(prediction_type):
  rs = np.random.RandomState(0)
  x0, eps = rs.randn(2, 3, 3, 4), rs.randn(2, 3, 3, 4)
  alpha = np.array([0.3, 0.9])
  sigma = np.sqrt(1 - alpha ** 2)
  a, s = alpha[:, None, None, None], sigma[:, None, None, None]
  z = a * x0 + s * eps
  # The table of docs/conventions.md (section 3), written out in NumPy.
  out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
  table = {"epsilon": ((z - s * out) / a, out),
           "sample": (out, (z - a * out) / s),
           "v_prediction": (a * z - s * out, a * out + s * z)}[prediction_type]
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  got_out = from_x0_eps(f32(x0), f32(eps), f32(alpha), f32(sigma), prediction_type)
  np.testing.assert_allclose(np.asarray(got_out), out, atol=1e-6)
  got_x0, got_eps = to_x0_eps(f32(out), f32(z), f32(alpha), f32(sigma), prediction_type)
  for got, want, ref in ((got_x0, x0, table[0]), (got_eps, eps, table[1])):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_schedule_is_a_jit_argument():
  s = schedule_from_config(SD21)
  f = jax.jit(lambda sched, t: alpha_sigma(sched, t)[0] * (sched.prediction_type == "v_prediction"))
  np.testing.assert_allclose(np.asarray(f(s, jnp.asarray([10]))), np.sqrt(np.asarray(s.alphas_cumprod)[10]))
  f(schedule_from_config(dict(SD21, beta_end=0.013)), jnp.asarray([11]))
  assert f._cache_size() == 1  # same metadata, new arrays: no recompilation
