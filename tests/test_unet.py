"""Parity of `lcm_jax.models.unet.UNet2DConditionModel` with diffusers' UNet2DConditionModel.

Tiny random diffusers UNets are built at test time, every parameter perturbed (norm scales
and biases included, so a swapped or transposed tensor cannot hide behind an initial value
of one or zero), loaded with `lcm_jax.weights.torch_to_flax`, and run on the same inputs.
fp32 bound: max |flax - torch| <= 1e-4 * max(1, max |torch|).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax.errors import UnsupportedConfigError
from lcm_jax.models.layers import timestep_embedding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.sd_pipeline import abstract_params
from lcm_jax.weights import flax_to_torch, torch_to_flax
from tests.helpers import (
  fp32_error,
  perturb_,
  perturbation_std,
  state_dict,
  torch_layout_shapes,
)

diffusers = pytest.importorskip("diffusers")

BATCH, TEXT_LEN, TEXT_DIM, COND_DIM = 2, 7, 32, 256


def unet_kwargs(flavour: str) -> dict:
  """diffusers UNet2DConditionModel kwargs; a "_lcm" suffix adds time_cond_proj_dim=256."""
  base, lcm = flavour.removesuffix("_lcm"), flavour.endswith("_lcm")
  kw = dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
      norm_num_groups=8)
  if base == "sd1":  # int heads, conv proj_in/proj_out
    kw.update(attention_head_dim=4)
  elif base == "sd2":  # per-block heads, linear projections, upcast attention
    kw.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
  elif base == "sd_blocks":  # SD's block list: CrossAttnDownBlock2D x 3 + DownBlock2D
    kw.update(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=4,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
  elif base == "mini":  # one resnet level and no attention: cheap to compile
    kw.update(block_out_channels=(32,), attention_head_dim=4, down_block_types=("DownBlock2D",),
              up_block_types=("UpBlock2D",))
  elif base == "options":  # every supported non-default option at once
    kw.update(attention_head_dim=(4, 2), flip_sin_to_cos=False, freq_shift=1,
              center_input_sample=True, downsample_padding=0, mid_block_scale_factor=1.5,
              norm_eps=1e-3, time_embedding_dim=96, layers_per_block=(1, 2))
  else:
    raise ValueError(flavour)
  if lcm:
    kw["time_cond_proj_dim"] = COND_DIM
  return kw


@functools.lru_cache(maxsize=None)
def build(flavour: str, seed: int = 0):
  """(torch model, flax module, flax params) for a flavour; the config goes through from_dict.

  Cached: tests must not modify what they get."""
  torch.manual_seed(seed)
  torch_model = diffusers.UNet2DConditionModel(**unet_kwargs(flavour)).eval()
  perturb_(torch_model, seed + 1, perturbation_std)
  module = UNet2DConditionModel(UNetConfig.from_dict(dict(torch_model.config)))
  params = torch_to_flax(state_dict(torch_model), abstract_params(module), what=flavour)
  return torch_model, module, params


def inputs(size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((BATCH, size, size, 4)).astype(np.float32)
  timesteps = np.array([3, 981], np.int64)
  text = rng.standard_normal((BATCH, TEXT_LEN, TEXT_DIM)).astype(np.float32)
  cond = rng.standard_normal((BATCH, COND_DIM)).astype(np.float32)
  return sample, timesteps, text, cond


def torch_forward(torch_model, sample, timesteps, text, cond=None) -> np.ndarray:
  """diffusers forward on NHWC numpy inputs -> NHWC numpy output."""
  to_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
  t = timesteps if np.ndim(timesteps) == 0 and not isinstance(timesteps, np.ndarray) else to_t(timesteps)
  with torch.no_grad():
    out = torch_model(to_t(sample).permute(0, 3, 1, 2), t, to_t(text), timestep_cond=to_t(cond))
  return out.sample.permute(0, 2, 3, 1).numpy()


def flax_forward(module, params, sample, timesteps, text, cond=None) -> np.ndarray:
  if cond is None:
    fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    return np.asarray(fn(params, sample, timesteps, text), np.float32)
  fn = jax.jit(lambda p, x, t, c, g: module.apply({"params": p}, x, t, c, g))
  return np.asarray(fn(params, sample, timesteps, text, cond).astype(jnp.float32))


# Measured max abs errors (fp32, CPU): sd1 1.3e-6, sd1_lcm 1.6e-6, sd2 1.4e-6, sd2_lcm 1.9e-6,
# sd_blocks 1.6e-6, options_lcm 1.2e-6 (bounds 1.4e-4 to 1.9e-4).
@pytest.mark.parametrize("flavour", ["sd1", "sd1_lcm", "sd2", "sd2_lcm", "sd_blocks", "options_lcm"])
def test_unet_matches_diffusers(flavour):
  torch_model, module, params = build(flavour)
  # 12x12 is not a multiple of 2^3 for sd_blocks, so the upsamplers are given explicit sizes.
  sample, timesteps, text, cond = inputs(12 if flavour == "sd_blocks" else 16)
  if flavour == "sd_blocks":
    # remat=True must change memory use only; checking it here saves a compilation.
    module = UNet2DConditionModel(module.config, remat=True)
  if not flavour.endswith("_lcm"):
    cond = None
  ref = torch_forward(torch_model, sample, timesteps, text, cond)
  err, bound = fp32_error(flax_forward(module, params, sample, timesteps, text, cond), ref)
  print(f"{flavour}: max abs error {err:.2e} (bound {bound:.2e})")
  assert err <= bound


def test_unet_without_timestep_cond_skips_cond_proj():
  """A model with time_cond_proj_dim called without timestep_cond runs as diffusers does
  (cond_proj skipped) rather than failing."""
  torch_model, module, params = build("sd2_lcm")
  sample, timesteps, text, _ = inputs(16)
  ref = torch_forward(torch_model, sample, timesteps, text, None)
  err, bound = fp32_error(flax_forward(module, params, sample, timesteps, text, None), ref)
  assert err <= bound


@pytest.mark.parametrize("timestep", [999, 499.5, np.array(7, np.int64), np.array([250], np.int64)],
                         ids=["int", "float", "0d", "1-element"])
def test_unet_timestep_forms(timestep):
  """Scalars and 1-element arrays are broadcast over the batch, as in diffusers."""
  torch_model, module, params = build("mini")
  sample, _, text, _ = inputs(16)
  ref = torch_forward(torch_model, sample, timestep, text)
  fn = jax.jit(lambda p, x, c: module.apply({"params": p}, x, timestep, c))
  err, bound = fp32_error(np.asarray(fn(params, sample, text)), ref)
  assert err <= bound


BF16_RTOL = 5e-2


@pytest.mark.parametrize("flavour", ["sd1_lcm", "sd2_lcm"])
def test_unet_bf16_close_to_fp32_reference(flavour):
  """bf16 compute (fp32 parameters) against the fp32 diffusers reference.

  Bound: max abs error <= 5e-2 * max(1, max |reference|). Measured on CPU (seed 0, tested):
  2.4e-2 for sd1_lcm and 2.3e-2 for sd2_lcm, max |reference| about 1.35, so the bound
  (6.8e-2) is about 2.8x the error; seeds 1 and 2 give 2.1e-2 to 2.4e-2 (mean abs error
  3.7e-3 to 3.9e-3). bf16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3) and the
  error compounds over ~25 layers.
  """
  torch_model, module, params = build(flavour)
  sample, timesteps, text, cond = inputs(16)
  ref = torch_forward(torch_model, sample, timesteps, text, cond)
  bf16 = UNet2DConditionModel(module.config, dtype=jnp.bfloat16)
  out = flax_forward(bf16, params, sample, timesteps, text, cond)
  err = float(np.abs(out - ref).max())
  print(f"{flavour} bf16: max abs error {err:.2e}, max |ref| {np.abs(ref).max():.2f}")
  assert err <= BF16_RTOL * max(1.0, float(np.abs(ref).max()))


def test_unet_bf16_params_build_and_run():
  """param_dtype=bf16 stores every parameter in bf16 and still runs."""
  module = UNet2DConditionModel(UNetConfig.from_dict(unet_kwargs("sd2_lcm")), dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16)
  shapes = abstract_params(module)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_unet_remat_traces_gradients():
  """remat=True builds the same tree and traces under differentiation (upsample sizes are
  static arguments of the rematerialised up blocks); its forward values are checked in
  test_unet_matches_diffusers[sd_blocks]."""
  _, module, params = build("sd_blocks")
  sample, timesteps, text, _ = inputs(12)
  remat = UNet2DConditionModel(module.config, remat=True)
  assert jax.tree.structure(abstract_params(remat)) == jax.tree.structure(params)
  grads = jax.eval_shape(jax.grad(lambda p: remat.apply({"params": p}, sample, timesteps, text).sum()),
                         params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("flavour", ["sd1_lcm", "sd2_lcm"])
def test_unet_weights_round_trip_bit_exact(flavour):
  torch_model, _, params = build(flavour)
  sd = state_dict(torch_model)
  back = flax_to_torch(params)
  assert set(back) == set(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  # The converted state dict loads into diffusers with no missing or unexpected key.
  result = torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()},
                                       strict=True)
  assert not result.missing_keys and not result.unexpected_keys


# Real Stable Diffusion configs (as published with the checkpoints, metadata included).
_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": _DOWN,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": _UP,
}
SD21_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "use_linear_projection": True,
    "num_class_embeds": None, "only_cross_attention": False, "upcast_attention": True,
    "class_embed_type": None, "resnet_time_scale_shift": "default", "sample_size": 96,
}
LCM_CONFIG = {  # an LCM student saved by a recent diffusers: every key written out
    **SD15_CONFIG, "_diffusers_version": "0.22.0.dev0", "_name_or_path": "lcm",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None, "attention_type": "default", "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_norm": None, "dropout": 0.0, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "mid_block_only_cross_attention": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
    "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 96,
    "time_cond_proj_dim": 256, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": 1, "upcast_attention": False, "use_linear_projection": False,
}


@pytest.mark.parametrize("config,num_params", [
    (SD15_CONFIG, 859_520_964),
    (SD21_CONFIG, 865_910_724),
    (LCM_CONFIG, 859_520_964 + 256 * 320),  # + cond_proj
], ids=["sd15", "sd21", "lcm"])
def test_full_size_architecture_matches_diffusers(config, num_params):
  """The full-size parameter tree (abstract, nothing allocated) names and shapes every
  tensor exactly as the diffusers model built on the meta device."""
  with torch.device("meta"):
    torch_model = diffusers.UNet2DConditionModel.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")})
  torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  module = UNet2DConditionModel(UNetConfig.from_dict(config))
  assert torch_layout_shapes(abstract_params(module)) == torch_shapes
  assert sum(np.prod(s) for s in torch_shapes.values()) == num_params


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (33, False, 1), (8, True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 19, 500.5, 999], np.float32)
  ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                               downscale_freq_shift=shift).numpy()
  out = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift))
  assert out.shape == ref.shape and out.dtype == np.float32
  # PyTorch's and XLA's float32 exp may differ by an ulp; times t ~ 1000 that moves an
  # angle by ~6e-5 (measured max difference 6.1e-5).
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4)


def test_config_reads_heads_quirk_and_defaults():
  c = UNetConfig.from_dict(SD21_CONFIG)
  assert c.num_attention_heads == (5, 10, 20, 20)  # diffusers' attention_head_dim = heads
  assert c.layers_per_block == (2, 2, 2, 2) and c.cross_attention_dim == 1024
  assert c.time_embed_dim == 1280 and c.time_cond_proj_dim is None
  assert UNetConfig.from_dict(LCM_CONFIG).time_cond_proj_dim == 256
  # Keys listed in _use_default_values take diffusers' default, whatever the file says.
  assert UNetConfig.from_dict({**SD15_CONFIG, "_use_default_values": ["freq_shift"],
                               "freq_shift": 1}).freq_shift == 0


@pytest.mark.parametrize("key,value", [
    ("only_cross_attention", True),
    ("only_cross_attention", [False, True, False, False]),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("addition_embed_type", "text_time"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None),
    ("resnet_time_scale_shift", "scale_shift"),
    ("dual_cross_attention", True),
    ("encoder_hid_dim", 1024),
    ("conv_in_kernel", 7),
    ("time_embedding_type", "fourier"),
    ("act_fn", "gelu"),
    ("transformer_layers_per_block", 2),
    ("num_attention_heads", 8),
    ("dropout", 0.1),
    ("attention_type", "gated"),
    ("class_embeddings_concat", True),
    ("time_embedding_act_fn", "silu"),
    ("down_block_types", ["AttnDownBlock2D"] + _DOWN[1:]),
    ("up_block_types", _UP[:3] + ["SimpleCrossAttnUpBlock2D"]),
    ("attention_head_dim", [8, 8]),
    ("some_future_option", 1),
])
def test_unsupported_config_is_refused_by_name(key, value):
  with pytest.raises(UnsupportedConfigError, match=key):
    UNetConfig.from_dict({**SD15_CONFIG, key: value})
