"""Attention backends (`lcm_jax.models.attention`) against the materialised "xla" reference.

Bounds: fp32 forward and gradients (w.r.t. q, k and v) within 1e-5 relative (max abs error
over max |reference|); measured errors are 2e-7 to 9e-7, and the bugs these tests guard
against (a wrong online-softmax rescale, padded keys left unmasked, a dropped block, a
transposed gradient) give errors of 1e-2 or more. The UNet test reuses test_unet's
diffusers parity harness and bound.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.errors import LcmJaxError
from lcm_jax.models import attention as attention_lib
from lcm_jax.models.attention import attention, xla_attention
from lcm_jax.models.unet import UNet2DConditionModel
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.sd_pipeline import build_module
from tests.helpers import fp32_error
from tests.test_unet import build, flax_forward, inputs, torch_forward, unet_kwargs

RTOL = 1e-5


def qkv(batch, lq, lk, heads, dim, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = ((batch, lq, heads, dim), (batch, lk, heads, dim), (batch, lk, heads, dim))
  # Scaled so the softmax is peaked (logits of a few units), as trained attention is.
  return [jnp.asarray(2 * rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


def relative(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def value_and_grads(fn, q, k, v, seed=1):
  """fn's output and the gradients of <fn(q, k, v), w> w.r.t. q, k, v for a random w
  (one compilation)."""
  shape = jax.eval_shape(fn, q, k, v).shape
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)

  def both(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(w.astype(out.dtype))
  return jax.jit(both)(q, k, v)


# (batch, Lq, Lk, heads, head dim, query_chunk, key_chunk): lengths that are not multiples
# of the blocks (5 query blocks, 2 rows padded; 5 key blocks, 3 padded keys masked: online
# softmax); cross-attention on 77 text tokens with the CPU default blocks (one key block);
# a head wider than 128 (keys-major logits) over several padded blocks.
CASES = {
    "multi_block_padded": (2, 37, 37, 3, 16, 8, 8),
    "cross_77_keys_default_chunks": (2, 300, 77, 2, 64, None, None),
    "wide_head_keys_major": (1, 100, 90, 1, 256, 32, 40),
}


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_xla_forward_and_gradients(case):
  batch, lq, lk, heads, dim, qc, kc = CASES[case]
  q, k, v = qkv(batch, lq, lk, heads, dim)
  chunked = lambda *a: attention(*a, backend="chunked", query_chunk=qc, key_chunk=kc)
  out, grads = value_and_grads(chunked, q, k, v)
  ref, ref_grads = value_and_grads(xla_attention, q, k, v)
  errors = [relative(out, ref)] + [relative(g, r) for g, r in zip(grads, ref_grads)]
  print(f"{case}: relative errors out, dq, dk, dv = " + ", ".join(f"{e:.1e}" for e in errors))
  assert max(errors) <= RTOL


def test_chunked_upcast_bf16_close_to_fp32():
  """bf16 inputs with upcast (SD 2.1's upcast_attention): output in bf16, forward and
  gradients as close to the fp32 result on the same (bf16-rounded) inputs as xla's are.

  Bound: 2x xla's own error plus 2^-9 (half a bf16 step); measured 0.6-1x xla's error.
  """
  q, k, v = qkv(2, 70, 77, 2, 32, dtype=jnp.bfloat16)
  exact = value_and_grads(xla_attention, *(x.astype(jnp.float32) for x in (q, k, v)))
  backends = {b: value_and_grads(lambda *a, b=b: attention(*a, upcast=True, backend=b,
                                                            query_chunk=16), q, k, v)
              for b in ("xla", "chunked")}
  assert backends["chunked"][0].dtype == jnp.bfloat16
  flat = lambda result: [result[0], *result[1]]
  for ours, ref, exact_ in zip(flat(backends["chunked"]), flat(backends["xla"]), flat(exact)):
    assert relative(ours, exact_) <= 2 * relative(ref, exact_) + 2 ** -9


def test_chunked_backward_memory_is_bounded():
  """The compiled gradient's temporaries stay far below one [Lq, Lk] fp32 logits matrix
  (16 MiB here), where the reference's need several of them."""
  q, k, v = (jax.ShapeDtypeStruct((1, 2048, 1, 16), jnp.float32),) * 3

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda *a: fn(*a).sum(), (0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 2048 * 2048 * 4
  chunked = temp_bytes(lambda *a: attention(*a, backend="chunked", query_chunk=128, key_chunk=512))
  reference = temp_bytes(xla_attention)
  print(f"backward temp bytes: chunked {chunked / 2**20:.2f} MiB, xla {reference / 2**20:.1f} MiB, "
        f"logits {logits_bytes / 2**20:.0f} MiB")
  assert reference >= logits_bytes  # the measure sees a materialised matrix
  assert chunked <= logits_bytes / 8


@pytest.mark.parametrize("lq,lk,grads", [(200, 77, False), (128, 77, True)])
def test_splash_interpret_matches_xla(lq, lk, grads):
  """The Pallas TPU splash kernel in interpret mode (what runs off TPU): padding of both
  lengths to 128 and masking of the padded keys, forward and (one block) gradients."""
  q, k, v = qkv(1, lq, lk, 2, 64)
  splash = lambda *a: attention(*a, backend="splash")
  if grads:
    (out, g), (ref, rg) = value_and_grads(splash, q, k, v), value_and_grads(xla_attention, q, k, v)
    errors = [relative(out, ref)] + [relative(a, b) for a, b in zip(g, rg)]
  else:
    errors = [relative(jax.jit(splash)(q, k, v), xla_attention(q, k, v))]
  print(f"splash {lq}x{lk}: relative errors " + ", ".join(f"{e:.1e}" for e in errors))
  assert max(errors) <= RTOL


def test_splash_block_sizes_for_sd_lengths():
  """Blocks divide the padded lengths: 512 x 1024 where SD's lengths allow, 128 for text."""
  def sizes(lq, lk):
    blocks = attention_lib.splash_block_sizes(lq, lk)
    return blocks.block_q, blocks.block_kv
  assert sizes(4096, 4096) == (512, 1024)
  assert sizes(9216, 9216) == (512, 1024)
  assert sizes(9216, 128) == (512, 128)
  assert sizes(2304, 2304) == (256, 256)
  assert sizes(640, 640) == (128, 128)


def test_backend_choice_and_fallback(caplog):
  q = jnp.zeros((1, 4, 1, 8))
  assert attention_lib.resolve_backend("auto", q) == "chunked"  # this suite runs on CPU
  assert attention_lib.resolve_backend("xla", q) == "xla"
  # cuDNN needs a GPU: chunked instead, said once.
  attention_lib._logged.clear()
  assert attention_lib.resolve_backend("cudnn", q) == "chunked"
  assert attention_lib.resolve_backend("cudnn", q) == "chunked"
  assert sum("cudnn needs a GPU" in m for m in attention_lib._logged) == 1
  with pytest.raises(LcmJaxError, match="unknown attention backend"):
    attention_lib.resolve_backend("flash", q)


def _backends_used(module, *args, method=None) -> list[str]:
  """The backend every attention call of module.init asked for (shapes only)."""
  seen = []
  real = attention_lib.attention

  def spy(*a, backend="auto", **kw):
    seen.append(backend)
    return real(*a, backend=backend, **kw)

  attention_lib.attention = spy
  try:
    jax.eval_shape(lambda: module.init(jax.random.key(0), *args, method=method))
  finally:
    attention_lib.attention = real
  return seen


def test_attention_attribute_reaches_every_layer():
  """build_module's `attention` keyword reaches every UNet and VAE attention call."""
  unet = build_module("unet", unet_kwargs("sd2_lcm"), attention="xla")
  assert unet.attention == "xla"
  # sd2: one cross-attention down block, one up block, the mid block; self + cross each.
  assert _backends_used(unet, *unet.dummy_inputs()) == ["xla"] * 8
  vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8),
                      attention="chunked")
  assert _backends_used(vae, *vae.dummy_inputs()) == ["chunked"] * 2  # encoder and decoder


def test_unet_chunked_matches_diffusers():
  """The UNet with the chunked backend (blocks smaller than its 256 tokens, so the online
  softmax runs) equals diffusers within test_unet's fp32 bound."""
  torch_model, module, params = build("sd2_lcm")
  sample, timesteps, text, cond = inputs(16)
  chunked = UNet2DConditionModel(module.config, attention="chunked")
  # 256 tokens: 6 query blocks of 43 (2 padded), 3 key blocks of 86 (2 padded and masked).
  with mock.patch.object(attention_lib, "default_chunks", lambda key_length: (48, 100)):
    out = flax_forward(chunked, params, sample, timesteps, text, cond)
  err, bound = fp32_error(out, torch_forward(torch_model, sample, timesteps, text, cond))
  print(f"UNet chunked: max abs error {err:.2e} (bound {bound:.2e})")
  assert err <= bound


def test_config_attention_reaches_the_student_teacher_and_vae(tiny_pipeline):
  """config.attention is the backend of the run's student, teacher and VAE; an unknown name is
  refused by check_config before anything loads."""
  from lcm_jax import config as config_lib
  from lcm_jax.sharding import make_mesh
  from lcm_jax.training.frozen import abstract_frozen_models
  from lcm_jax.training.sources import resolve_sources
  from lcm_jax.training.state import build_student
  config = config_lib.base_config()
  config.teacher, config.data.path, config.attention = tiny_pipeline("sd1"), "unused", "chunked"
  config_lib.check_config(config)
  sources, mesh = resolve_sources(config), make_mesh(devices=jax.devices()[:1])
  student = build_student(config, sources, mesh)
  frozen = abstract_frozen_models(config, sources, mesh, latents_format=False, context_length=16)
  assert (student.module.attention, frozen.teacher.attention, frozen.vae.attention) == ("chunked",) * 3
  assert _backends_used(student.module, *student.module.dummy_inputs()) == ["chunked"] * 8
  config.attention = "flash"
  with pytest.raises(LcmJaxError, match="attention"):
    config_lib.check_config(config)


def test_target_platform_chooses_for_the_device_compiled_for():
  """Compiling ahead of time for TPU on a CPU host (the memory plan) chooses TPU's backend and
  block sizes, not the host's; None goes back to JAX's backend."""
  q = jnp.zeros((1, 4096, 5, 64), jnp.bfloat16)
  assert attention_lib.resolve_backend("auto", q) == "chunked"
  try:
    attention_lib.set_target_platform("tpu")
    assert attention_lib.resolve_backend("auto", q) == "splash"
    assert attention_lib.default_chunks(4096) == attention_lib._ACCELERATOR_CHUNKS
  finally:
    attention_lib.set_target_platform(None)
  assert attention_lib.default_chunks(4096)[1] == attention_lib._CPU_KEY_CHUNK
  with pytest.raises(ValueError, match="unknown platform"):
    attention_lib.set_target_platform("ipu")


_SPLASH_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lcm_jax.models.attention import attention, xla_attention
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "fsdp"))
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.device_put(jax.random.normal(key, (4, 128, 2, 64)), NamedSharding(mesh, P(("data", "fsdp"))))
           for key in keys)
def f(q, k, v):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return attention(q, k, v, backend="splash")
step = jax.jit(f)
text = step.lower(q, k, v).as_text()
err = float(jnp.max(jnp.abs(step(q, k, v) - xla_attention(q, k, v))) / jnp.max(jnp.abs(xla_attention(q, k, v))))
print("manual" in text or "shard_map" in text, err)
"""


def test_splash_under_a_mesh_runs_per_device():
  """XLA cannot partition a Pallas kernel (a TPU compile of a sharded step fails with "Mosaic
  kernels cannot be automatically partitioned"): under the trainer's mesh the splash call is a
  shard_map over the batch, and its result equals the materialised reference."""
  import os
  import subprocess
  import sys

  from tests.helpers import REPO
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _SPLASH_ON_A_MESH], capture_output=True, text=True, cwd=REPO,
                     env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  manual, error = r.stdout.split()[-2:]
  assert manual == "True"
  assert float(error) <= RTOL


def test_load_pipeline_attention_reaches_the_unet_and_vae(tiny_pipeline):
  """load_pipeline(..., attention=) (and so `lcm_jax.sample --attention`) sets the backend of
  the UNet's and the VAE's attention layers; an unknown name is one LcmJaxError."""
  from lcm_jax.load import load_pipeline
  pipe = load_pipeline(tiny_pipeline("sd1"), attention="xla")
  assert (pipe.unet.attention, pipe.vae.attention) == ("xla", "xla")
  assert _backends_used(pipe.unet, *pipe.unet.dummy_inputs()) == ["xla"] * 8
  default = load_pipeline(tiny_pipeline("sd1"))
  assert _backends_used(default.unet, *default.unet.dummy_inputs()) == ["auto"] * 8
  with pytest.raises(LcmJaxError, match="unknown attention backend 'flash'"):
    load_pipeline(tiny_pipeline("sd1"), attention="flash")
