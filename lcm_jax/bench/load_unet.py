"""Benchmark: load a full-size SD 2.1 UNet saved by diffusers and run one forward pass.

Saves a randomly initialised SD 2.1 (768, v-prediction) UNet with diffusers, then, in
separate processes so that peak memory is measured cleanly:
  * lcm-jax loads it with the same code as `load_pipeline` and runs one forward pass at
    64x64 latents (batch 1): parameter count, load time, peak host memory, compile time
    and forward time;
  * diffusers loads the same weights and runs the same forward pass.
Prints both and the ratio. Not a test: needs ~4 GB of disk and ~10 GB of memory.

  python -m lcm_jax.bench.load_unet [--workdir /tmp/lcm_bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from lcm_jax.bench import run_role
from lcm_jax.bench.architectures import SD21_UNET

TEXT_LEN, LATENT = 77, 64


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _inputs(seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32), np.array([500]),
          rng.standard_normal((1, TEXT_LEN, 1024)).astype(np.float32))


def run_jax(folder: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lcm_jax.sd_pipeline import load_component
  base = _peak_rss_gib()
  t0 = time.perf_counter()
  module, params, _ = load_component(os.path.join(folder, "unet"), "unet")
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t0
  load_peak = _peak_rss_gib()
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  latents, t, text = _inputs()
  fwd = jax.jit(lambda p, z, t, c: module.apply({"params": p}, z, t, c))
  args = (params, jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(text))
  t0 = time.perf_counter()
  compiled = fwd.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  np.save(os.path.join(folder, "jax_out.npy"), np.asarray(out).transpose(0, 3, 1, 2))
  return dict(params=n, load_s=load_s, base_rss_gib=base, load_peak_rss_gib=load_peak, compile_s=compile_s,
              forward_s=min(times), device=str(jax.devices()[0].device_kind))


def run_torch(folder: str, repeats: int) -> dict:
  import numpy as np
  import torch
  from diffusers import UNet2DConditionModel
  t0 = time.perf_counter()
  unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
  load_s = time.perf_counter() - t0
  load_peak = _peak_rss_gib()
  latents, t, text = (torch.tensor(a) for a in _inputs())
  times = []
  with torch.no_grad():
    for _ in range(repeats + 1):  # the first call warms up
      t0 = time.perf_counter()
      out = unet(latents, t, text).sample
      times.append(time.perf_counter() - t0)
  ref = out.numpy()
  jax_out = np.load(os.path.join(folder, "jax_out.npy"))
  return dict(load_s=load_s, load_peak_rss_gib=load_peak, forward_s=min(times[1:]),
              max_abs_diff=float(np.abs(jax_out - ref).max()), max_abs_ref=float(np.abs(ref).max()))


def save_unet(folder: str) -> None:
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  UNet2DConditionModel(**SD21_UNET).save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=None, help="where to save the random UNet (default: a temp dir)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--_role", choices=["save", "jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._role:
    result = {"save": lambda: save_unet(args.workdir), "jax": lambda: run_jax(args.workdir, args.repeats),
              "torch": lambda: run_torch(args.workdir, args.repeats)}[args._role]()
    print("RESULT " + json.dumps(result or {}))
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="lcm_bench_")
  results = {}
  for role in ("save", "jax", "torch"):
    if role == "save" and os.path.exists(os.path.join(workdir, "unet", "diffusion_pytorch_model.safetensors")):
      continue
    results[role] = run_role("lcm_jax.bench.load_unet", role, ["--workdir", workdir, "--repeats", str(args.repeats)])
  j, t = results["jax"], results["torch"]
  fp32_gib = j["params"] * 4 / 2**30
  print(f"\nSD 2.1 UNet, random weights, one forward at {LATENT}x{LATENT} latents, batch 1, fp32, on {j['device']}")
  print(f"  parameters                 {j['params'] / 1e6:.1f} M ({fp32_gib:.2f} GiB in fp32)")
  print(f"  lcm-jax load time          {j['load_s']:.1f} s   (diffusers {t['load_s']:.1f} s)")
  print(f"  lcm-jax peak host memory   {j['load_peak_rss_gib']:.2f} GiB after load "
        f"({j['load_peak_rss_gib'] / fp32_gib:.2f}x the fp32 size; {j['base_rss_gib']:.2f} GiB before loading)"
        f"   (diffusers {t['load_peak_rss_gib']:.2f} GiB)")
  print(f"  lcm-jax compile time       {j['compile_s']:.1f} s")
  print(f"  forward time               lcm-jax {j['forward_s']:.2f} s, diffusers {t['forward_s']:.2f} s, "
        f"ratio diffusers/lcm-jax {t['forward_s'] / j['forward_s']:.2f}x")
  print(f"  max |jax - diffusers|      {t['max_abs_diff']:.2e} (max |ref| {t['max_abs_ref']:.2f})")


if __name__ == "__main__":
  main()
