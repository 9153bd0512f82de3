"""Benchmark: text-to-image throughput, lcm-jax against diffusers, on the SD 2.1 architecture.

Builds full-size Stable Diffusion 2.1 pipelines with random weights and saves them with
diffusers:
  * lcm/: the SD 2.1 UNet plus LCM's guidance input (time_cond_proj_dim 256), the SD VAE, and
    a CLIP text encoder shaped like SD 2.1's (1024 wide, 23 layers, 16 heads, gelu, 77 tokens);
  * teacher/: the same weights without the guidance input (the UNet minus cond_proj; VAE,
    text encoder, tokenizer and scheduler shared by symlink). diffusers' StableDiffusionPipeline
    runs no classifier-free guidance on a guidance-embedded UNet, so the teacher baseline needs
    a UNet without one to run CFG as SD does.
The tokenizer is the tests' tiny CLIP BPE (`tests/helpers/tiny_clip.py`, ~700 tokens instead of
49,408), so the token embedding is smaller than SD's; it is one lookup and changes no timing.
Then, in separate processes (each side holds its own ~5 GB of fp32 weights):
  * lcm-jax loads each folder with `load_pipeline` and runs `TextToImage`;
  * diffusers loads the same folders into LatentConsistencyModelPipeline (LCMScheduler) and
    StableDiffusionPipeline (DPMSolverMultistepScheduler, algorithm_type dpmsolver++).
Both generate from the same prompt and the same initial latents: 4-step LCM on lcm/
(guidance 8.5 embedded, one UNet call per step) and 8-step DPM-Solver++ on teacher/ (guidance
7.5, CFG: a doubled batch per step), each followed by the VAE decode. Prints images/s for
each and the ratio. Times are the median of --repeats calls after one warm-up call; lcm-jax's
compile time is reported apart.

  python -m lcm_jax.bench.sample_speed                       # 512x512 on a GPU, 256x256 on CPU
  python -m lcm_jax.bench.sample_speed --resolution 128 --batch_size 1 --repeats 2   # quick CPU run
  python -m lcm_jax.bench.sample_speed --runs LCM --breakdown --whole_process 3 \
      --compilation_cache /tmp/lcm_xla_cache      # where the time goes; whole processes

--breakdown also times one UNet call and one VAE decode at the same size on each side.
--whole_process N times N interleaved pairs of whole processes, as a user runs them:
`python -m lcm_jax.sample` (4-step LCM, one batch; with --compilation_cache, JAX's persistent
compilation cache in that folder, so runs after the first load their compiled program) against
a diffusers process that imports, loads LatentConsistencyModelPipeline and generates once.

Needs ~9 GB of disk, ~12 GB of host memory, diffusers and torch. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from lcm_jax.bench import run_role
from lcm_jax.bench.load_unet import SD21_UNET

PROMPT = "a photo of a cat on the sea"
# The SD 2.x VAE (the same as SD 1.x's).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu",
              sample_size=768, scaling_factor=0.18215)
# SD 2.1's scheduler config (v-prediction).
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                      timestep_spacing="leading")
# (name, pipeline folder, lcm-jax sampler, steps, guidance scale)
RUNS = (("LCM", "lcm", "lcm", 4, 8.5), ("DPM-Solver++", "teacher", "dpm_solver_pp", 8, 7.5))
SHARED = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")
LATENTS_FILE = "latents_{batch}x{size}.npy"


def save_pipeline(folder: str) -> None:
  """Writes the random full-size pipeline with diffusers."""
  import diffusers
  import torch
  import transformers
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, repo)  # tests/ is not installed with the package
  from tests.helpers import tiny_clip
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**SD21_UNET, time_cond_proj_dim=256)
  vae = diffusers.AutoencoderKL(**SD_VAE)
  text_config = tiny_clip.tiny_clip_text_config(
      hidden_act="gelu", hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
      intermediate_size=4096, max_position_embeddings=77)
  text_encoder = transformers.CLIPTextModel(text_config)
  tok_dir = tiny_clip.write_tiny_tokenizer(os.path.join(folder, "_tokenizer_src"), pad_token="!",
                                           model_max_length=77)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler=diffusers.DDIMScheduler(**SD21_SCHEDULER), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(os.path.join(folder, "lcm"), safe_serialization=True)
  # The teacher: the same UNet weights without cond_proj, the rest shared.
  teacher_unet = diffusers.UNet2DConditionModel(**SD21_UNET)
  state = {k: v for k, v in unet.state_dict().items() if not k.startswith("time_embedding.cond_proj.")}
  teacher_unet.load_state_dict(state, strict=True)
  teacher = os.path.join(folder, "teacher")
  teacher_unet.save_pretrained(os.path.join(teacher, "unet"), safe_serialization=True)
  for name in SHARED:
    os.symlink(os.path.join("..", "lcm", name), os.path.join(teacher, name))


def write_latents(folder: str, batch: int, size: int) -> str:
  import numpy as np
  path = os.path.join(folder, LATENTS_FILE.format(batch=batch, size=size))
  if not os.path.exists(path):
    latents = np.random.default_rng(0).standard_normal((batch, 4, size // 8, size // 8))
    np.save(path, latents.astype(np.float32))
  return path


def _time_calls(call, repeats: int) -> float:
  """Median seconds of `repeats` calls after one warm-up call (repeats 0: the one call's)."""
  t0 = time.perf_counter()
  call()
  if repeats == 0:
    return time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _runs(names: list[str] | None) -> tuple:
  """The entries of RUNS named (all when None)."""
  return tuple(r for r in RUNS if names is None or r[0] in names)


def _best_seconds(call, repeats: int = 2) -> float:
  """Fastest of `repeats` calls after a warm-up call."""
  call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return min(times)


def jax_components(pipe, latents, context) -> dict:
  """Seconds of one UNet call and one VAE decode (compiled apart) on these NHWC latents."""
  import jax

  from lcm_jax.models.vae import AutoencoderKL
  dim = pipe.unet.config.time_cond_proj_dim
  cond = None if dim is None else jax.numpy.zeros((latents.shape[0], dim), latents.dtype)
  unet = jax.jit(lambda p, z, c, g: pipe.unet.apply({"params": p}, z, 500, c, g))
  vae = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method=AutoencoderKL.decode))
  unet_args = (pipe.params["unet"], latents, context, cond)
  return dict(unet_s=_best_seconds(lambda: jax.block_until_ready(unet(*unet_args))),
              vae_decode_s=_best_seconds(lambda: jax.block_until_ready(vae(pipe.params["vae"], latents))))


def run_jax(folder: str, size: int, batch: int, repeats: int, dtype: str, runs=None,
            breakdown: bool = False) -> dict:
  import gc

  import jax
  import jax.numpy as jnp
  import numpy as np

  from lcm_jax.load import load_pipeline
  from lcm_jax.text_to_image import TextToImage
  jdtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  latents = np.load(write_latents(folder, batch, size))
  prompts = [PROMPT] * batch
  result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
  for name, pipeline, sampler, steps, guidance in _runs(runs):
    t0 = time.perf_counter()
    pipe = load_pipeline(os.path.join(folder, pipeline), dtype=jdtype, param_dtype=jdtype)
    load_s = time.perf_counter() - t0
    t2i = TextToImage(pipe)
    t2i.compile(sampler, steps, batch, size, size, guidance)
    call = lambda: t2i(prompts, sampler=sampler, num_steps=steps, guidance_scale=guidance,
                       height=size, width=size, latents=latents)
    result[name] = dict(seconds=_time_calls(call, repeats), compile_s=t2i.compile_seconds, load_s=load_s)
    assert t2i.num_compiled == 1, "a timed call recompiled"
    result["unet_params"] = sum(x.size for x in jax.tree_util.tree_leaves(pipe.params["unet"]))
    if breakdown:
      from lcm_jax.text_to_image import encode_prompts
      nhwc = jnp.asarray(latents.transpose(0, 2, 3, 1), jdtype)
      result[name].update(jax_components(pipe, nhwc, encode_prompts(pipe, prompts)))
    del pipe, t2i, call
    gc.collect()  # one pipeline's weights in memory at a time
  return result


def torch_components(pipe, latents, prompts) -> dict:
  """Seconds of one UNet call and one VAE decode on these NCHW latents (diffusers)."""
  import torch
  with torch.inference_mode():
    context = pipe.encode_prompt(prompts, latents.device, 1, False)[0]
    dim = pipe.unet.config.time_cond_proj_dim
    cond = None if dim is None else torch.zeros(latents.shape[0], dim, dtype=latents.dtype, device=latents.device)
    unet = lambda: pipe.unet(latents, 500, context, timestep_cond=cond)
    return dict(unet_s=_best_seconds(unet), vae_decode_s=_best_seconds(lambda: pipe.vae.decode(latents)))


def run_torch(folder: str, size: int, batch: int, repeats: int, dtype: str, runs=None,
              breakdown: bool = False) -> dict:
  import gc

  import numpy as np
  import torch
  from diffusers import (
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
  )
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
  latents = torch.from_numpy(np.load(write_latents(folder, batch, size))).to(device, tdtype)
  prompts = [PROMPT] * batch
  result = dict(device=torch.cuda.get_device_name() if device == "cuda"
                else f"cpu ({torch.get_num_threads()} threads)")
  for name, pipeline, _, steps, guidance in _runs(runs):
    t0 = time.perf_counter()
    if name == "LCM":
      pipe = LatentConsistencyModelPipeline.from_pretrained(
          os.path.join(folder, pipeline), safety_checker=None, requires_safety_checker=False, torch_dtype=tdtype)
      pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    else:
      pipe = StableDiffusionPipeline.from_pretrained(
          os.path.join(folder, pipeline), safety_checker=None, requires_safety_checker=False, torch_dtype=tdtype)
      pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    load_s = time.perf_counter() - t0
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def call():
      with torch.inference_mode():
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
             latents=latents, output_type="np")
      if device == "cuda":
        torch.cuda.synchronize()

    result[name] = dict(seconds=_time_calls(call, repeats), load_s=load_s)
    if breakdown:
      result[name].update(torch_components(pipe, latents, prompts))
    del pipe, call
    gc.collect()
  return result


def _default_resolution() -> tuple[int, str]:
  import jax
  backend = jax.default_backend()
  return (512, backend) if backend in ("gpu", "tpu") else (256, backend)


def whole_process(workdir: str, size: int, batch: int, dtype: str, pairs: int,
                  cache_dir: str | None) -> dict:
  """Wall seconds of `pairs` interleaved whole processes each: `python -m lcm_jax.sample`
  (LCM, one batch) and a diffusers process (imports, load, one LCM call)."""
  import subprocess
  latents = write_latents(workdir, batch, size)
  out = tempfile.mkdtemp(prefix="lcm_sample_out_")
  name, pipeline, _, steps, guidance = RUNS[0]
  jax_cmd = [sys.executable, "-m", "lcm_jax.sample", "--model", os.path.join(workdir, pipeline),
             "--steps", str(steps), "--guidance_scale", str(guidance), "--height", str(size),
             "--width", str(size), "--batch_size", str(batch), "--latents", latents, "--dtype", dtype,
             "--output", out] + ["--prompt", PROMPT] * batch
  torch_cmd = [sys.executable, "-m", "lcm_jax.bench.sample_speed", "--_role", "torch", "--workdir", workdir,
               "--resolution", str(size), "--batch_size", str(batch), "--repeats", "0", "--dtype", dtype,
               "--runs", name]
  env = dict(os.environ, **({"JAX_COMPILATION_CACHE_DIR": cache_dir} if cache_dir else {}))
  times = {"lcm-jax": [], "diffusers": []}
  for _ in range(pairs):
    for side, cmd in (("lcm-jax", jax_cmd), ("diffusers", torch_cmd)):
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True, capture_output=True, env=env)
      times[side].append(time.perf_counter() - t0)
  return times


def report(results: dict, size: int, batch: int, dtype: str, backend: str, runs: tuple) -> None:
  """Prints images/s, ratios, compile and load times (and the breakdown when measured)."""
  j, t = results["jax"], results["torch"]
  print(f"\nSD 2.1 architecture, random weights (UNet {j['unet_params'] / 1e6:.0f}M + time_cond_proj_dim 256, "
        f"SD VAE, CLIP text 1024x23 gelu with a ~700-token test vocabulary), {size}x{size}, "
        f"batch {batch}, {dtype}")
  print(f"lcm-jax on {j['device']} ({j['backend']}); diffusers on {t['device']}")
  if size < 512:
    print(f"NOTE: {size}x{size} is below SD's 512x512 (a {backend.upper()} run): the UNet works on "
          f"{size // 8}x{size // 8} latents, so these numbers say little about 512x512 speed.")
  print(f"{'':26s}{'lcm-jax':>16s}{'diffusers':>16s}{'lcm-jax / diffusers':>22s}   lcm-jax compile")
  for name, _, _, steps, _ in runs:
    jr, tr = j[name], t[name]
    j_ips, t_ips = batch / jr["seconds"], batch / tr["seconds"]
    print(f"{f'{name}, {steps} steps':26s}{j_ips:>11.3f} im/s{t_ips:>11.3f} im/s{j_ips / t_ips:>21.2f}x"
          f"   {jr['compile_s']:.0f}s")
  for name, *_ in runs:
    print(f"load time ({name} pipeline): lcm-jax {j[name]['load_s']:.1f}s, diffusers {t[name]['load_s']:.1f}s")
    for part in ("unet_s", "vae_decode_s"):
      if part in j[name]:
        print(f"  one {part[:-2].replace('_', ' ')} call: lcm-jax {j[name][part]:.2f}s, diffusers "
              f"{t[name][part]:.2f}s, ratio {j[name][part] / t[name][part]:.2f}")
  for side, times in results.get("whole_process", {}).items():
    print(f"whole process ({side}): " + ", ".join(f"{x:.1f}s" for x in times) + " (in run order)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--resolution", type=int, default=None,
                      help="image side in pixels, a multiple of 8 (default: 512 on GPU/TPU, 256 on CPU)")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
  parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both sides' weights and compute")
  parser.add_argument("--workdir", default=None, help="where the random pipeline is saved (default: a temp dir)")
  parser.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], default=None, help="default: all")
  parser.add_argument("--breakdown", action="store_true", help="also time one UNet call and one VAE decode")
  parser.add_argument("--whole_process", type=int, default=0, help="pairs of whole processes to time (LCM)")
  parser.add_argument("--compilation_cache", default=None, help="JAX_COMPILATION_CACHE_DIR of --whole_process")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  parser.add_argument("--_role", choices=["save", "jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._role:
    role_args = (args.workdir, args.resolution, args.batch_size, args.repeats, args.dtype, args.runs, args.breakdown)
    fn = {"save": lambda: save_pipeline(args.workdir), "jax": lambda: run_jax(*role_args),
          "torch": lambda: run_torch(*role_args)}
    print("RESULT " + json.dumps(fn[args._role]() or {}))
    return

  default_size, backend = _default_resolution()
  size = args.resolution or default_size
  if size % 8:
    sys.exit(f"--resolution {size} must be a multiple of 8 (the VAE's factor; diffusers' rule)")
  workdir = args.workdir or tempfile.mkdtemp(prefix="lcm_sample_bench_")
  role_flags = ["--workdir", workdir, "--resolution", str(size), "--batch_size", str(args.batch_size),
                "--repeats", str(args.repeats), "--dtype", args.dtype]
  role_flags += (["--runs", *args.runs] if args.runs else []) + (["--breakdown"] if args.breakdown else [])
  results = {}
  for role in ("save", "jax", "torch"):
    if role == "save" and os.path.exists(os.path.join(workdir, "teacher", "model_index.json")):
      continue
    start = time.perf_counter()
    results[role] = run_role("lcm_jax.bench.sample_speed", role, role_flags)
    print(f"[{role}] done in {time.perf_counter() - start:.0f}s", flush=True)
  if args.whole_process:
    results["whole_process"] = whole_process(workdir, size, args.batch_size, args.dtype, args.whole_process,
                                             args.compilation_cache)
  report(results, size, args.batch_size, args.dtype, backend, _runs(args.runs))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results, resolution=size, batch_size=args.batch_size, dtype=args.dtype), f, indent=1)


if __name__ == "__main__":
  main()
