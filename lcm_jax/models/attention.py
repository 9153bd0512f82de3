"""Scaled dot-product attention with interchangeable backends, for the UNet and the VAE.

    out = attention(q, k, v, upcast=False, backend="auto")   # q [B, Lq, N, D], k, v [B, Lk, N, D]

is softmax(q k^T / sqrt(D)) v per head, [B, Lq, N, D], in v's dtype. The logits are
accumulated and the softmax taken in float32 always. Backends (`BACKENDS`):

* "xla": the reference. Materialises the float32 logits [B, N, Lq, Lk]: at 768 px and 5
  heads that is 1.7 GB per image per self-attention call, so it does not scale.
* "chunked": pure JAX, memory-bounded (flash style): a scan over query blocks, and within
  each an online softmax over key blocks (a single block when the keys fit in one, e.g.
  the 77 text tokens of cross-attention). The largest intermediate is one
  [query_chunk, key_chunk] logits block per head (per batch x heads on accelerators). Its
  backward is a custom VJP that recomputes the blocks from the saved log-sum-exp, so it is
  memory-bounded too. On CPU it loops over heads with plain 2-D matmuls, because XLA:CPU
  runs batched dots much slower than 2-D ones; elsewhere the heads are vmapped (batched).
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16,
  head dim <= 128.
* "splash": JAX's Pallas TPU splash-attention kernel, block sizes set for SD's sequence
  lengths (keys padded to a multiple of 128 and masked with segment ids). Off TPU it runs in
  Pallas interpret mode (slow: for tests).
* "auto": chunked on CPU, cudnn on GPU when it applies, splash on TPU, chunked otherwise.
A backend that does not apply to the inputs (cudnn with fp32 or head dim 160, say) falls back
to chunked; each choice and fallback is logged once.

`upcast` is diffusers' `upcast_attention` (its classic AttnProcessor casts q and k to float32
before q k^T; its SDPA processor ignores the flag). xla and chunked cast as diffusers does.
cudnn and splash take bf16/fp16 q and k and accumulate q k^T in float32: products of two
bf16 (8-bit mantissa) or fp16 (11-bit) numbers are exact in float32, so that is the same sum
as the upcast one, without the fp16 overflow upcasting guards against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from lcm_jax.errors import LcmJaxError

BACKENDS = ("auto", "xla", "chunked", "cudnn", "splash")

# Default block sizes of "chunked". On CPU: keys in one block up to 16384 (SD's longest is
# 9216 tokens at 768 px), and query blocks of 2^19 logits / keys, at least 128: XLA:CPU's
# loop and fusion overheads grow with the number of blocks, and a 2 MB fp32 block stays in
# cache (measured fastest at 4096 and 9216 keys; 77 text keys take all 4096 queries at once).
# On accelerators the blocks are batched over batch x heads, so they are smaller in keys:
# 160 (batch x heads) x 512 x 1024 fp32 is 335 MB.
_CPU_KEY_CHUNK, _CPU_BLOCK_ELEMENTS, _CPU_MIN_QUERY_CHUNK = 16384, 2 ** 19, 128
_ACCELERATOR_CHUNKS = (512, 1024)


_target_platform: str | None = None


def set_target_platform(platform: str | None) -> None:
  """Choose backends and block sizes for `platform` ("tpu", "gpu", "cpu") instead of JAX's
  default backend: for compiling ahead of time for devices this process does not have
  (`lcm_jax.bench.memory_plan` compiles for TPU topologies on a CPU host). None resets."""
  global _target_platform
  if platform not in (None, "cpu", "gpu", "tpu"):
    raise ValueError(f"unknown platform {platform!r}; choose cpu, gpu or tpu")
  _target_platform = platform


def target_platform() -> str:
  """The platform attention is chosen for: `set_target_platform`'s, else JAX's default backend."""
  return _target_platform or jax.default_backend()


def default_chunks(key_length: int) -> tuple[int, int]:
  """(query_chunk, key_chunk) of "chunked" on this platform for this many keys."""
  if target_platform() != "cpu":
    return _ACCELERATOR_CHUNKS
  key_block = min(key_length, _CPU_KEY_CHUNK)
  return max(_CPU_MIN_QUERY_CHUNK, _CPU_BLOCK_ELEMENTS // key_block), _CPU_KEY_CHUNK


_logged: set[str] = set()


def _log_once(message: str, warning: bool = False) -> None:
  """Logs a backend choice or fallback the first time it happens in this process."""
  if message not in _logged:
    _logged.add(message)
    (logging.warning if warning else logging.info)("attention: %s", message)


# --------------------------------------------------------------------------------------
# Backend choice


def _cudnn_reason(q: jax.Array, platform: str) -> str | None:
  """Why cuDNN cannot run these inputs, or None when it can."""
  if platform != "gpu":
    return f"cudnn needs a GPU (platform is {platform})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cudnn needs bf16 or fp16 inputs, got {q.dtype}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"cudnn needs a head dim <= 128 and a multiple of 8, got {q.shape[-1]}"
  return None


def check_backend(backend: str) -> None:
  """Raises LcmJaxError unless `backend` is one of BACKENDS."""
  if backend not in BACKENDS:
    raise LcmJaxError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")


def resolve_backend(backend: str, q: jax.Array) -> str:
  """The backend that will run q [B, Lq, N, D]: `backend` itself, or what "auto" or a
  fallback picks for this platform, dtype and head dim (logged once per distinct choice)."""
  check_backend(backend)
  platform = target_platform()
  what = f"{q.dtype} head dim {q.shape[-1]} on {platform}"
  if backend == "auto":
    choice = {"gpu": "cudnn", "tpu": "splash"}.get(platform, "chunked")
    if choice == "cudnn" and _cudnn_reason(q, platform):
      choice = "chunked"
    _log_once(f"auto chose {choice} for {what}")
    return choice
  if backend == "cudnn" and (reason := _cudnn_reason(q, platform)):
    _log_once(f"{reason}; using chunked for {what}", warning=True)
    return "chunked"
  if backend == "splash" and platform != "tpu":
    _log_once(f"splash on {platform} runs in Pallas interpret mode (slow; for tests)", warning=True)
  return backend


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False,
              backend: str = "auto", query_chunk: int | None = None,
              key_chunk: int | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, by the chosen backend (see the module docstring).

  Args:
    q: [B, Lq, N, D]. k, v: [B, Lk, N, D].
    upcast: diffusers' upcast_attention (q and k in float32 for their product).
    backend: one of `BACKENDS`.
    query_chunk, key_chunk: block sizes of "chunked" (default: `default_chunks`).
  Returns:
    [B, Lq, N, D] in v's dtype.
  """
  backend = resolve_backend(backend, q)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(v.dtype)
  if backend == "splash":
    return splash_attention(q, k, v).astype(v.dtype)
  # XLA:CPU has no float16 product with float32 accumulation; float16 products are exact in
  # float32, so upcasting q and k there is the same arithmetic.
  if upcast or (q.dtype == jnp.float16 and target_platform() == "cpu"):
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  if backend == "xla":
    return xla_attention(q, k, v)
  return chunked_attention(q, k, v, query_chunk=query_chunk, key_chunk=key_chunk)


# --------------------------------------------------------------------------------------
# xla: the reference


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The materialised reference. q [B, Lq, N, D], k, v [B, Lk, N, D] -> [B, Lq, N, D] (v's dtype).

  Logits [B, N, Lq, Lk] accumulated in float32, softmax in float32, probabilities cast to
  v's dtype for the second product (as diffusers' AttnProcessor does).
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", probs, v)


# --------------------------------------------------------------------------------------
# chunked: blocks, online softmax, custom VJP


def _blocks(length: int, chunk: int) -> tuple[int, int]:
  """(number of blocks, block size) covering `length` with blocks of at most `chunk`,
  balanced so that the padding (n * size - length) is below n and no block is all padding."""
  n = -(-length // max(1, chunk))
  return n, -(-length // n)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D a @ b contracting a's axis contract[0] with b's axis contract[1], float32 result."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _logits(qi: jax.Array, kj: jax.Array, bias: jax.Array | None, scale: float,
            key_axis: int = 1) -> jax.Array:
  """qi [bq, D], kj [bk, D], bias [bk] (0 or -inf for padded keys) or None -> float32 logits
  [bq, bk] (key_axis 1) or [bk, bq] (key_axis 0)."""
  s = _dot(kj, qi, (1, 1)) if key_axis == 0 else _dot(qi, kj, (1, 1))
  s = s * scale
  return s if bias is None else s + jnp.expand_dims(bias, 1 - key_axis)


def _block_stats(qi, kj, vj, bias, scale):
  """One key block's (row max [bq], row sum of exp [bq], unnormalised output [bq, D]).

  For wide heads (D > 128: the VAE's single 512-dim head) the logits are laid out keys-major,
  [bk, bq]: measured 1.5x faster on XLA:CPU there (the reductions run down columns and the
  second matmul contracts the leading axis), and 1.6x slower for SD's 64-dim heads.
  """
  key_axis = 0 if qi.shape[-1] > 128 else 1
  s = _logits(qi, kj, bias, scale, key_axis)
  m = s.max(axis=key_axis)
  p = jnp.exp(s - jnp.expand_dims(m, key_axis))
  return m, p.sum(axis=key_axis), _dot(p.astype(vj.dtype), vj, (key_axis, 0))


def _merge(a, b):
  """Online softmax: the stats of two key ranges -> the stats of their union."""
  m = jnp.maximum(a[0], b[0])
  wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
  return m, a[1] * wa + b[1] * wb, a[2] * wa[:, None] + b[2] * wb[:, None]


def _forward_head(qb, kb, vb, bias, scale):
  """One head. qb [nq, bq, D], kb, vb [nk, bk, D], bias [nk, bk] or None ->
  (out [nq, bq, D] float32, log-sum-exp [nq, bq] float32)."""
  def query_block(_, qi):
    stats = _block_stats(qi, kb[0], vb[0], None if bias is None else bias[0], scale)
    if kb.shape[0] > 1:  # the first block starts the running stats: no rescaling of zeros
      rest = (kb[1:], vb[1:], None if bias is None else bias[1:])
      stats, _ = jax.lax.scan(
          lambda acc, x: (_merge(acc, _block_stats(qi, *x, scale)), None), stats, rest)
    m, l, out = stats
    return None, (out / l[:, None], m + jnp.log(l))
  return jax.lax.scan(query_block, None, qb)[1]


def _backward_head(qb, kb, vb, bias, lse, dob, delta, scale):
  """One head's gradients from the saved log-sum-exp (flash attention's backward).

  qb, dob [nq, bq, D]; kb, vb [nk, bk, D]; lse, delta (rowsum(dout * out)) [nq, bq] ->
  (dq [nq, bq, D], dk [nk, bk, D], dv [nk, bk, D]), all float32.
  """
  def query_block(dkv, x):
    qi, doi, lsei, deltai = x

    def key_block(dq, y):
      kj, vj, bj, dkj, dvj = y
      p = jnp.exp(_logits(qi, kj, bj, scale) - lsei[:, None])      # [bq, bk]
      ds = p * (_dot(doi, vj.astype(doi.dtype), (1, 1)) - deltai[:, None])
      dq = dq + _dot(ds, kj.astype(jnp.float32), (1, 0)) * scale
      dkj = dkj + _dot(ds, qi.astype(jnp.float32), (0, 0)) * scale
      dvj = dvj + _dot(p.astype(doi.dtype), doi, (0, 0))
      return dq, (dkj, dvj)

    dq0 = jnp.zeros(qi.shape, jnp.float32)
    dq, dkv = jax.lax.scan(key_block, dq0, (kb, vb, bias, *dkv))
    return dkv, dq

  zeros = jnp.zeros(kb.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (qb, dob, lse, delta))
  return dq, dk, dv


def _over_heads(fn, *args):
  """Maps fn over the leading (batch x heads) axis: a loop of 2-D matmuls on CPU, where
  XLA's batched dots are slow (measured 1.4x slower at 4096 tokens), vmap elsewhere."""
  if target_platform() == "cpu":
    return jax.lax.map(lambda a: fn(*a), args)
  return jax.vmap(fn)(*args)


def _key_bias(nk: int, bk: int, valid: int) -> jax.Array | None:
  """[nk, bk] float32: 0 for the first `valid` keys, -inf for the padding; None without padding."""
  if nk * bk == valid:
    return None
  return jnp.where(jnp.arange(nk * bk) < valid, 0.0, -jnp.inf).astype(jnp.float32).reshape(nk, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_core(qb, kb, vb, valid_keys):
  """Heads-major blocks: qb [H, nq, bq, D], kb, vb [H, nk, bk, D] of which the first
  `valid_keys` keys are real -> out [H, nq, bq, D] float32."""
  return _chunked_fwd(qb, kb, vb, valid_keys)[0]


def _chunked_fwd(qb, kb, vb, valid_keys):
  scale = qb.shape[-1] ** -0.5
  bias = _key_bias(*kb.shape[1:3], valid_keys)
  out, lse = _over_heads(lambda q, k, v: _forward_head(q, k, v, bias, scale), qb, kb, vb)
  return out, (qb, kb, vb, out, lse)


def _chunked_bwd(valid_keys, res, dout):
  qb, kb, vb, out, lse = res
  scale = qb.shape[-1] ** -0.5
  bias = _key_bias(*kb.shape[1:3], valid_keys)
  dout = dout.astype(jnp.float32)
  delta = jnp.sum(dout * out, axis=-1)  # rowsum(dout * out) = rowsum(p * dp), [H, nq, bq]
  dq, dk, dv = _over_heads(
      lambda *a: _backward_head(a[0], a[1], a[2], bias, *a[3:], scale), qb, kb, vb, lse, dout, delta)
  return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype)


_chunked_core.defvjp(_chunked_fwd, _chunked_bwd)


def _to_blocks(x: jax.Array, n: int, size: int) -> jax.Array:
  """[B, L, N, D] -> heads-major blocks [B * N, n, size, D], zero-padded to n * size rows."""
  b, length, heads, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, n * size - length), (0, 0), (0, 0)))
  return x.reshape(b, n, size, heads, d).transpose(0, 3, 1, 2, 4).reshape(b * heads, n, size, d)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_chunk: int | None = None,
                      key_chunk: int | None = None) -> jax.Array:
  """Memory-bounded attention (see the module docstring). q [B, Lq, N, D], k, v [B, Lk, N, D]
  -> [B, Lq, N, D] in v's dtype. Differentiable (custom VJP); the chunks default per platform."""
  (b, lq, heads, d), lk = q.shape, k.shape[1]
  default_q, default_k = default_chunks(lk)
  nq, bq = _blocks(lq, query_chunk or default_q)
  nk, bk = _blocks(lk, key_chunk or default_k)
  # Padded keys get -inf logits; `_blocks` leaves at least one real key in every block.
  out = _chunked_core(_to_blocks(q, nq, bq), _to_blocks(k, nk, bk), _to_blocks(v, nk, bk), lk)
  out = out.reshape(b, heads, nq * bq, d)[:, :, :lq].transpose(0, 2, 1, 3)
  return out.astype(v.dtype)


# --------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel

_LANES = 128  # TPU lane width: the kernel's sequence blocks are multiples of it


def _splash_lib():
  """JAX's splash-attention kernel and mask modules, imported on first use (Pallas TPU code
  that CPU and GPU runs never need)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel,
    splash_attention_mask,
  )
  return splash_attention_kernel, splash_attention_mask


def _largest_dividing(length: int, candidates: tuple[int, ...]) -> int:
  return next(c for c in candidates if length % c == 0)


def splash_block_sizes(lq: int, lk: int):
  """Splash block sizes for padded lengths (multiples of 128).

  SD's self-attention lengths (4096, 9216 = 72 x 128, 1024, 2304, 256, 576) take 512-row
  query blocks and 1024-key blocks where they divide (fewer grid steps, and a 512 x 1024
  fp32 logits block is 2 MB of the 16+ MB VMEM), else 256 or 128; the 77 text tokens pad to
  one 128-key block. The backward uses the same blocks.
  """
  sk, _ = _splash_lib()
  bq = _largest_dividing(lq, (512, 256, 128))
  bkv = _largest_dividing(lk, (1024, 512, 256, 128))
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=min(bkv, 512),
                       block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=min(bkv, 512),
                       block_q_dq=bq, block_kv_dq=bkv)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
  sk, sm = _splash_lib()
  mask = sm.MultiHeadMask([sm.FullMask((lq, lk))] * heads)
  # The kernel holds its block-mask arrays; made concrete, not traced, so the cache can
  # hand them to any later trace.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha_single_device(mask, block_sizes=splash_block_sizes(lq, lk),
                                            interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The splash kernel on q [B, Lq, N, D], k, v [B, Lk, N, D] -> [B, Lq, N, D].

  XLA cannot partition a Pallas kernel, so under a mesh (`jax.sharding.use_abstract_mesh`,
  which `lcm_jax.train_step.make_train_step` sets while tracing) the kernel runs per device
  in a `shard_map` over the batch, split over every mesh axis as the trainer splits batches.
  A batch the mesh does not divide (e.g. one image) runs as one partition.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or q.shape[0] % mesh.size:
    return _splash_local(q, k, v)
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  return jax.shard_map(_splash_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`splash_attention` on one device's arrays.

  Lengths are padded to multiples of 128; padded keys are masked out with segment ids
  (query segment 0 everywhere, padded keys segment 1). The kernel applies no scale, so q is
  scaled by 1/sqrt(D) first (exact in bf16 for D = 64).
  """
  sk, _ = _splash_lib()
  (_, lq, heads, d), lk = q.shape, k.shape[1]
  plq, plk = (-(-n // _LANES) * _LANES for n in (lq, lk))
  kernel = _splash_kernel(heads, plq, plk, target_platform() != "tpu")
  heads_major = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh = heads_major((q * d ** -0.5).astype(q.dtype), plq)
  kh, vh = heads_major(k, plk), heads_major(v, plk)
  segments = sk.SegmentIds(q=jnp.zeros((plq,), jnp.int32),
                           kv=(jnp.arange(plk) >= lk).astype(jnp.int32))
  out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segments))(qh, kh, vh)
  return out[:, :, :lq].transpose(0, 2, 1, 3)
