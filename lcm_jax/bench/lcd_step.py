"""Benchmark: one LCD training step on the SD 2.1-base UNet architecture, JAX vs PyTorch.

Both sides run the same algorithm on the same random weights' architecture (SD 2.1-base,
epsilon prediction, guidance input of 256): teacher on cond and uncond, DDIM solver, student
forward and backward, EMA-target forward, MSE, gradient clipping, AdamW, EMA update.
  * lcm-jax: `losses.make_loss_fn("lcd", ...)` in `train_step.make_train_step` (one jit,
    cond/uncond batched in one teacher call, state donated).
  * PyTorch: the step written the way diffusers' `train_lcm_distill_sd_wds.py` runs it
    (teacher in `weight_dtype`, separate cond and uncond teacher calls, student under
    autocast, target in fp32, `torch.optim.AdamW`, `clip_grad_norm_`, in-place EMA).
Each runs in its own process, one after the other, so peak memory is measured cleanly.
Prints step time, samples/s, peak memory, XLA's FLOP count and the model-FLOPs utilisation
(for known accelerators), and the ratios.

  python -m lcm_jax.bench.lcd_step                      # 512x512 on a GPU
  python -m lcm_jax.bench.lcd_step --resolution 256     # what a 2-core CPU can do
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from lcm_jax.bench import run_role
from lcm_jax.bench.load_unet import SD21_UNET

# SD 2.1-base: the 768 model's UNet without upcast_attention, epsilon prediction.
SD21_BASE_UNET = dict(SD21_UNET, sample_size=64, upcast_attention=False)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
TEXT_LEN, TEXT_DIM, K = 77, 1024, 20

# Dense bf16 peak FLOP/s by device kind, for the MFU column.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "TPU v4": 275e12, "TPU v5": 459e12,
              "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


def _peak_flops(kind: str) -> float | None:
  best = None
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower() and (best is None or len(name) > len(best[0])):
      best = (name, flops)
  return best[1] if best else None


def _unet_config(width_scale: float) -> dict:
  cfg = dict(SD21_BASE_UNET)
  if width_scale != 1.0:
    cfg["block_out_channels"] = [int(c * width_scale) // 32 * 32 for c in cfg["block_out_channels"]]
  return cfg


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lcm_jax import losses, train_step
  from lcm_jax.schedule import schedule_from_config
  from lcm_jax.sd_pipeline import abstract_params, build_module

  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.compute_dtype]
  cfg = _unet_config(args.width_scale)
  teacher = build_module("unet", cfg, dtype=dtype, param_dtype=jnp.bfloat16 if args.teacher_bf16 else jnp.float32)
  student = build_module("unet", dict(cfg, time_cond_proj_dim=256), dtype=dtype, remat=args.remat)
  schedule = schedule_from_config(SCHEDULER)
  loss_fn = losses.make_loss_fn(
      "lcd", lambda p, z, t, c, tc: student.apply({"params": p}, z, t, c, tc), schedule,
      losses.ConsistencyLossConfig(skipping_step=K),
      lambda p, z, t, c, tc: teacher.apply({"params": p}, z, t, c, tc))
  optimizer = train_step.make_optimizer(1e-5)

  @jax.jit
  def init(rng):
    t_params = teacher.init(rng, *teacher.dummy_inputs())["params"]
    s_params = losses.student_params_from_teacher(
        jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t_params), abstract_params(student), rng)
    state = train_step.create_train_state(s_params, optimizer, rng,
                                          target_dtype=jnp.bfloat16 if args.target_bf16 else None)
    return state, t_params

  state, teacher_params = init(jax.random.key(0))
  h = args.resolution // 8
  rng = np.random.default_rng(0)
  frozen = {"teacher": teacher_params,
            "uncond_context": jnp.asarray(rng.standard_normal((1, TEXT_LEN, TEXT_DIM)), jnp.float32)}
  batch = {"latents": jnp.asarray(rng.standard_normal((args.batch_size, h, h, 4)), jnp.float32),
           "context": jnp.asarray(rng.standard_normal((args.batch_size, TEXT_LEN, TEXT_DIM)), jnp.float32)}
  step = train_step.make_train_step(loss_fn, optimizer, 0.95)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times = []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  times = times[args.warmup:]
  dev = jax.devices()[0]
  mem = dev.memory_stats() or {}
  peak = mem.get("peak_bytes_in_use")
  peak_gib = peak / 2**30 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return dict(step_s=float(np.median(times)), compile_s=compile_s, flops=flops, peak_gib=peak_gib,
              peak_kind="device" if peak else "host RSS", device=dev.device_kind, loss=float(metrics["loss"]),
              n_params=sum(x.size for x in jax.tree_util.tree_leaves(state.params)))


def run_torch(args) -> dict:
  import copy

  import diffusers
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  weight_dtype = torch.bfloat16 if args.teacher_bf16 else torch.float32
  autocast_dtype = torch.bfloat16 if args.compute_dtype == "bf16" else None
  cfg = _unet_config(args.width_scale)
  torch.manual_seed(0)
  teacher = diffusers.UNet2DConditionModel(**cfg).to(device, weight_dtype).eval().requires_grad_(False)
  unet = diffusers.UNet2DConditionModel(**dict(cfg, time_cond_proj_dim=256))
  unet.load_state_dict(teacher.state_dict(), strict=False)
  unet = unet.to(device).train()
  if args.remat:
    unet.enable_gradient_checkpointing()
  target = copy.deepcopy(unet).requires_grad_(False)
  if args.target_bf16:
    target = target.to(torch.bfloat16)
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
  sched = diffusers.DDIMScheduler(**SCHEDULER)
  ac = sched.alphas_cumprod.to(device)
  grid = torch.arange(1, 1000 // K + 1, device=device) * K - 1
  ac_prev = torch.cat([ac[:1], ac[grid[:-1]]])
  h = args.resolution // 8
  g = torch.Generator().manual_seed(0)
  latents = torch.randn(args.batch_size, 4, h, h, generator=g).to(device)
  text = torch.randn(args.batch_size, TEXT_LEN, TEXT_DIM, generator=g).to(device)
  uncond = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g).to(device).expand_as(text)
  w_min, w_max = 2.0, 14.0
  bc, scalings, embed = _torch_bc, _torch_scalings, _torch_guidance_embedding

  def step():
    b = latents.shape[0]
    index = torch.randint(0, len(grid), (b,), device=device)
    start = grid[index]
    tn = torch.clamp(start - K, min=0)
    noise = torch.randn_like(latents)
    z = bc(ac[start].sqrt()) * latents + bc((1 - ac[start]).sqrt()) * noise
    w = (w_max - w_min) * torch.rand(b, device=device) + w_min
    w_emb = embed(w)
    c_skip_s, c_out_s = scalings(start)
    c_skip, c_out = scalings(tn)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
      out = unet(z, start, text, timestep_cond=w_emb).sample
    x0 = (z - bc((1 - ac[start]).sqrt()) * out) / bc(ac[start].sqrt())
    pred = bc(c_skip_s) * z + bc(c_out_s) * x0
    with torch.no_grad():
      with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        e_c = teacher(z.to(weight_dtype), start, text.to(weight_dtype)).sample.float()
        e_u = teacher(z.to(weight_dtype), start, uncond.to(weight_dtype)).sample.float()
      a, s = bc(ac[start].sqrt()), bc((1 - ac[start]).sqrt())
      x_c, x_u = (z - s * e_c) / a, (z - s * e_u) / a
      x0_g = x_c + bc(w) * (x_c - x_u)
      e_g = e_c + bc(w) * (e_c - e_u)
      z_prev = bc(ac_prev[index].sqrt()) * x0_g + bc((1 - ac_prev[index]).sqrt()) * e_g
      with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        t_out = target(z_prev.to(target.dtype), tn, text.to(target.dtype),
                       timestep_cond=w_emb.to(target.dtype)).sample.float()
      t_x0 = (z_prev - bc((1 - ac[tn]).sqrt()) * t_out) / bc(ac[tn].sqrt())
      tgt = bc(c_skip) * z_prev + bc(c_out) * t_x0
    loss = torch.nn.functional.mse_loss(pred.float(), tgt.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      for tp, p in zip(target.parameters(), unet.parameters()):
        tp.mul_(0.95).add_(p.to(tp.dtype), alpha=0.05)
    return loss

  return _time_torch_steps(step, args, device)


# The diffusers-style step's pieces, written in torch as diffusers' training script has them.

def _torch_bc(x):
  return x[:, None, None, None]


def _torch_scalings(t):
  """(c_skip, c_out) at s = 10 t, sigma_data = 0.5."""
  s = t.float() * 10.0
  return 0.25 / (s ** 2 + 0.25), s / (s ** 2 + 0.25) ** 0.5


def _torch_guidance_embedding(w, dim=256):
  import torch
  w = w * 1000.0
  half = dim // 2
  f = torch.exp(torch.arange(half, device=w.device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
  a = w[:, None] * f[None]
  return torch.cat([torch.sin(a), torch.cos(a)], 1)


def _time_torch_steps(step, args, device: str) -> dict:
  """Median seconds per step after warm-up, peak memory and the last loss."""
  import numpy as np
  import torch
  times = []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    loss = step()
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  times = times[args.warmup:]
  if device == "cuda":
    peak, kind = torch.cuda.max_memory_allocated() / 2**30, "device"
  else:
    peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"
  return dict(step_s=float(np.median(times)), peak_gib=peak, peak_kind=kind, loss=float(loss))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--resolution", type=int, default=512, help="image size; latents are resolution/8")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--compute_dtype", choices=["fp32", "bf16"], default="bf16")
  parser.add_argument("--teacher_bf16", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--target_bf16", action=argparse.BooleanOptionalAction, default=False)
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False)
  parser.add_argument("--width_scale", type=float, default=1.0,
                      help="scale the UNet's channel widths (1.0 = the real SD 2.1-base UNet)")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--_role", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._role:
    print("RESULT " + json.dumps(run_jax(args) if args._role == "jax" else run_torch(args)))
    return
  results = {}
  for role in ("jax",) + (() if args.skip_torch else ("torch",)):
    results[role] = run_role("lcm_jax.bench.lcd_step", role, sys.argv[1:])
  j = results["jax"]
  peak = _peak_flops(j["device"])
  arch = "SD 2.1-base UNet" + (f" at width x{args.width_scale}" if args.width_scale != 1.0 else "")
  print(f"\nLCD step, {arch} ({j['n_params'] / 1e6:.0f} M params per UNet), {args.resolution}x{args.resolution} "
        f"({args.resolution // 8}x{args.resolution // 8} latents), batch {args.batch_size}, compute {args.compute_dtype}, "
        f"teacher {'bf16' if args.teacher_bf16 else 'fp32'}, target {'bf16' if args.target_bf16 else 'fp32'}, "
        f"remat {args.remat}, on {j['device']}")
  if args.resolution < 512:
    print(f"  (resolution {args.resolution}, below the paper's 512, to fit this device's time budget)")
  print(f"  {'':10s} {'step s':>8s} {'samples/s':>10s} {'peak GiB':>9s}")
  for name, r in results.items():
    print(f"  {name:10s} {r['step_s']:8.3f} {args.batch_size / r['step_s']:10.3f} {r['peak_gib']:9.2f} ({r['peak_kind']})")
  print(f"  lcm-jax compile time {j['compile_s']:.1f} s; XLA FLOPs per step {j['flops'] / 1e12:.2f} TFLOP "
        f"({j['flops'] / 1e12 / args.batch_size:.2f} per sample)")
  if peak:
    print(f"  model-FLOPs utilisation {j['flops'] / j['step_s'] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 peak")
  else:
    print(f"  model-FLOPs utilisation: no peak FLOP/s known for {j['device']!r} "
          f"(achieved {j['flops'] / j['step_s'] / 1e9:.1f} GFLOP/s)")
  if "torch" in results:
    t = results["torch"]
    print(f"  speed-up lcm-jax over PyTorch: {t['step_s'] / j['step_s']:.2f}x; "
          f"memory ratio lcm-jax/PyTorch: {j['peak_gib'] / t['peak_gib']:.2f}")


if __name__ == "__main__":
  main()
