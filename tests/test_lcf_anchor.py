"""LCF with data-anchored targets (`ConsistencyLossConfig.lcf_data_anchor`, configs/toy.py:lcf,lcf_anchor=P):
anchored samples take the data latent z itself as their target, the others keep Algorithm 4's
f_theta-(z_{t_n}); checked against the torch reference of tests/test_losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax import losses
from tests.test_losses import K, Reference, Setup, _nchw, _nhwc


@pytest.fixture(scope="module")
def st():
  return Setup("epsilon")


def test_anchored_rows_target_the_data_others_algorithm_4(st):
  config = losses.ConsistencyLossConfig(skipping_step=K)
  ref = Reference(st).lcf()
  anchor = jnp.asarray([True, False])
  ours = losses.lcf_terms(st.student_apply, st.schedule, config, st.student_params, st.target_params,
                          jnp.asarray(_nhwc(st.latents)), jnp.asarray(st.context), jnp.asarray(st.uncond), st.draws(),
                          anchor)
  target = _nchw(ours["target"])
  np.testing.assert_allclose(target[0], st.latents[0], rtol=0, atol=0)
  scale = float(ref["target"].abs().max())
  assert np.abs(target[1] - ref["target"][1].numpy()).max() <= 1e-4 * scale
  assert np.abs(target[0] - ref["target"][0].numpy()).max() > 1e-2  # the anchor changed row 0


def test_loss_with_every_sample_anchored_is_the_regression_onto_the_data(st):
  config = losses.ConsistencyLossConfig(skipping_step=K, lcf_data_anchor=1.0)
  loss_fn = losses.make_loss_fn("lcf", st.student_apply, st.schedule, config)
  batch = {"latents": jnp.asarray(_nhwc(st.latents)), "context": jnp.asarray(st.context)}
  rng = jax.random.key(11)
  loss, _ = loss_fn(st.student_params, st.target_params, {"uncond_context": jnp.asarray(st.uncond)}, batch, rng)
  draws = losses.draw(rng, batch["latents"], st.schedule, config)
  st2 = Setup.__new__(Setup)
  st2.__dict__.update(st.__dict__)
  st2.index, st2.omega = np.asarray(draws.index), np.asarray(draws.omega)
  st2.noise = _nchw(np.asarray(draws.noise))
  pred = Reference(st2).lcf()["prediction"]
  expected = torch.mean((pred - torch.tensor(st.latents, dtype=torch.float64)) ** 2)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)


def test_anchor_share_is_checked():
  with pytest.raises(Exception, match="lcf_data_anchor"):
    losses.ConsistencyLossConfig(lcf_data_anchor=1.5)
