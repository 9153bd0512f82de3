"""Benchmark: lcm-jax's attention backends against PyTorch's fused SDPA, on SD 2.1's shapes.

For each resolution, the UNet's self-attention at every level (latent side r/8, r/16, r/32,
r/64 tokens squared; 5, 10, 20, 20 heads of 64), its cross-attention on the 77 text tokens at
the first level, and the VAE decoder's mid-block self-attention (r/8 squared tokens, one
512-dim head). Each shape runs `lcm_jax.models.attention.attention` with every backend
available here and `torch.nn.functional.scaled_dot_product_attention` on the same inputs,
in one process, calls interleaved (ours, torch, ours, ...) so that both see the same load;
prints the fastest of --repeats calls after a warm-up call (wall clock and process CPU time)
and the ratio ours / torch (below 1: ours is faster).

  python -m lcm_jax.bench.attention                        # 256, 512, 768 px, fp32
  python -m lcm_jax.bench.attention --resolutions 512 --backends chunked --repeats 3

On a shared machine the CPU-time column is the steadier one: wall time moves with other
processes' load, CPU time much less. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import time

# SD 2.1's UNet: heads per level (64 dims each) and the text length; the VAE's mid-block width.
UNET_HEADS, HEAD_DIM, TEXT_LEN, VAE_WIDTH = (5, 10, 20, 20), 64, 77, 512


def shapes(resolution: int) -> list[tuple[str, int, int, int, int]]:
  """(name, query tokens, key tokens, heads, head dim) of SD 2.1 at this many pixels."""
  side = resolution // 8
  out = [(f"UNet self, level {i + 1}", (side >> i) ** 2, (side >> i) ** 2, heads, HEAD_DIM)
         for i, heads in enumerate(UNET_HEADS)]
  out.insert(1, ("UNet cross, level 1", side * side, TEXT_LEN, UNET_HEADS[0], HEAD_DIM))
  out.append(("VAE mid self", side * side, side * side, 1, VAE_WIDTH))
  return out


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _interleaved(calls: dict, repeats: int) -> dict[str, tuple[float, float]]:
  """name -> (fastest wall seconds, fastest CPU seconds) over `repeats` rounds, each round
  calling every function once in turn, after one warm-up call each."""
  for call in calls.values():
    call()
  best = {name: (float("inf"), float("inf")) for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      cpu, wall = _cpu_seconds(), time.perf_counter()
      call()
      wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
  return best


def _calls(shape, batch: int, backends: list[str], dtype: str) -> dict:
  """name -> zero-argument blocking call, for ours (one per backend) and torch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from lcm_jax.models.attention import attention
  _, lq, lk, heads, dim = shape
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((batch, n, heads, dim)).astype(np.float32) for n in (lq, lk, lk)]
  jdtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  q, k, v = (jnp.asarray(a, jdtype) for a in arrays)
  calls = {}
  for backend in backends:
    fn = jax.jit(lambda q, k, v, b=backend: attention(q, k, v, backend=b))
    calls[backend] = lambda fn=fn: jax.block_until_ready(fn(q, k, v))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
  tq, tk, tv = (torch.from_numpy(a).to(device, tdtype).transpose(1, 2).contiguous() for a in arrays)

  def torch_call():
    with torch.inference_mode():
      torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    if device == "cuda":
      torch.cuda.synchronize()
  calls["torch"] = torch_call
  return calls


def _default_backends() -> list[str]:
  import jax
  return {"gpu": ["cudnn", "chunked", "xla"], "tpu": ["splash", "chunked", "xla"]}.get(
      jax.default_backend(), ["chunked", "xla"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 768])
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--backends", nargs="+", default=None,
                      help="lcm-jax backends to time (default: those that run here, xla last)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
  args = parser.parse_args()
  import jax
  import torch
  backends = args.backends or _default_backends()
  print(f"SD 2.1 attention, {args.dtype}, batch {args.batch_size}; lcm-jax on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"fastest of {args.repeats} interleaved calls; ratio = ours / torch")
  head = f"{'px':>4s}  {'layer':20s} {'q x k tokens':>13s} {'heads':>8s}  {'torch ms':>17s}"
  print(head + "".join(f"  {b + ' ms':>17s} {'ratio':>11s}" for b in backends))
  units = f"  {'wall / cpu':>17s} {'wall / cpu':>11s}"
  print(f"{'':4s}  {'':20s} {'':13s} {'':8s}  {'wall / cpu':>17s}" + units * len(backends))
  for resolution in args.resolutions:
    for shape in shapes(resolution):
      best = _interleaved(_calls(shape, args.batch_size, backends, args.dtype), args.repeats)
      name, lq, lk, heads, dim = shape
      ms = lambda b: f"{best[b][0] * 1e3:8.1f} /{best[b][1] * 1e3:7.1f}"
      ratio = lambda b: f"{best[b][0] / best['torch'][0]:5.2f} /{best[b][1] / best['torch'][1]:4.2f}"
      print(f"{resolution:4d}  {name:20s} {f'{lq} x {lk}':>13s} {f'{heads} x {dim}':>8s}  {ms('torch')}"
            + "".join(f"  {ms(b)} {ratio(b)}" for b in backends), flush=True)


if __name__ == "__main__":
  main()
