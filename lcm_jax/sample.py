"""Text-to-image from the command line: LCM (1-8 steps) or the teacher's DDIM / DPM-Solver.

Examples:
  python -m lcm_jax.sample --model path/to/lcm-pipeline --prompt "a photo of a cat" \\
      --output out/                              # 4-step LCM, guidance 8.5 (w = 7.5)
  python -m lcm_jax.sample --model path/to/sd --prompts_file prompts.txt --sampler dpm_solver_pp \\
      --steps 25 --guidance_scale 7.5 --batch_size 4 --output out/

Writes <output>/000.png, 001.png, ... in prompt order and grid.png (all images). Prompts are
generated in batches of --batch_size (the last batch is padded, the padding dropped). Image i
is seeded by (--seed, i), so it does not change with --batch_size. Prints the compile time and
the time per image after compilation.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError, check_can_be_folder

# Kept here, not imported from text_to_image, so that --help and flag errors do not pay for
# importing JAX; main() checks that the two agree.
SAMPLERS = ("lcm", "ddim", "dpm_solver", "dpm_solver_pp")
DTYPES = ("fp32", "bf16", "fp16")

FLAGS = flags.FLAGS
def define_flags() -> None:
  """The program's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("model", None, "A diffusers Stable Diffusion / LCM pipeline folder, a Hugging Face Hub repo id, "
                      "or a `python -m lcm_jax.train` workdir (its latest checkpoint).")
  flags.DEFINE_string("params", "ema", "For a workdir: the EMA target ('ema', default) or the student ('online').")
  flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for several.")
  flags.DEFINE_string("prompts_file", None, "A text file with one prompt a line (blank lines are skipped).")
  flags.DEFINE_string("negative_prompt", "", "Unconditional prompt of the teacher samplers' classifier-free guidance "
                      "(LCM ignores it: LCD distils guidance against the empty prompt).")
  flags.DEFINE_string("sampler", "lcm", f"One of {', '.join(SAMPLERS)}. dpm_solver / dpm_solver_pp are diffusers' "
                      "DPMSolverMultistepScheduler with algorithm_type dpmsolver / dpmsolver++.")
  flags.DEFINE_integer("steps", 4, "Sampler steps (LCM: at most the scheduler's original_inference_steps, 50).")
  flags.DEFINE_float("guidance_scale", 8.5, "diffusers' guidance scale g. LCM embeds w = g - 1 (needs a UNet with "
                     "time_cond_proj_dim); the teacher samplers run classifier-free guidance when g > 1.")
  flags.DEFINE_integer("seed", 0, "Random seed of the initial latents and of LCM's re-noising noise.")
  flags.DEFINE_integer("height", None, "Image height in pixels, a multiple of the VAE factor (8 for SD); "
                       "default: the UNet's sample_size times that factor.")
  flags.DEFINE_integer("width", None, "Image width in pixels (as --height).")
  flags.DEFINE_integer("batch_size", 1, "Images per batch (one compiled function per batch size).")
  flags.DEFINE_string("latents", None, "A .npy of float32 initial latents [num_prompts, C, H/f, W/f] (diffusers' "
                      "NCHW layout), instead of drawing them from --seed.")
  flags.DEFINE_string("dtype", "fp32", f"Compute and weight dtype: {', '.join(DTYPES)}. bf16 for TPUs and recent "
                      "GPUs (A100, H100, L4); fp16 for GPUs without fast bf16 (Colab's T4, V100). The parity "
                      "bounds against fp32 are in the README (section Precision).")
  cli.define_hub_flags()
  flags.DEFINE_string("output", None, "Folder for the PNGs (created if missing; files are overwritten).")
  flags.DEFINE_multi_string("lora", None, "A LoRA to add to the UNet, DIR[:SCALE] (a folder with "
                            "pytorch_lora_weights.safetensors, or a .safetensors file; diffusers, PEFT or kohya "
                            "naming; SCALE default 1). Repeat for several, e.g. an LCM-LoRA and a style LoRA.")
  flags.DEFINE_enum("attention", "auto", ["auto", "xla", "chunked", "cudnn", "splash"],
                    "Attention backend of the UNet and VAE (auto: chunked on CPU, cudnn on GPU where it applies, "
                    "splash on TPU; xla: the materialised reference).")
  flags.DEFINE_bool("fuse_lora", True, "Fuse the LoRAs into the UNet weights once; --nofuse_lora keeps them apart "
                    "and adds them inside the compiled sampler.")


def read_prompts() -> list[str]:
  """The prompts from --prompt or --prompts_file (not both), in order."""
  if FLAGS.prompt and FLAGS.prompts_file:
    raise LcmJaxError("give --prompt or --prompts_file, not both")
  if FLAGS.prompts_file:
    try:
      with open(FLAGS.prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
      raise LcmJaxError(f"cannot read --prompts_file {FLAGS.prompts_file}: "
                        f"{e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    prompts = [p for p in prompts if p]
    if not prompts:
      raise LcmJaxError(f"--prompts_file {FLAGS.prompts_file} has no prompts")
    return prompts
  if not FLAGS.prompt:
    raise LcmJaxError("no prompts: give --prompt (repeatable) or --prompts_file")
  return list(FLAGS.prompt)


def read_latents(path: str):
  """The --latents array as stored (checked against the model later)."""
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise LcmJaxError(f"cannot read --latents {path} as a .npy array: {e}") from None


def check_flags() -> None:
  """The checks that need no model, made before loading it."""
  if FLAGS.model is None:
    raise LcmJaxError("--model is required (a diffusers pipeline folder or hub repo id)")
  if FLAGS.output is None:
    raise LcmJaxError("--output is required (a folder for the PNGs)")
  if FLAGS.sampler not in SAMPLERS:
    raise LcmJaxError(f"unknown --sampler {FLAGS.sampler!r}; choose from {', '.join(SAMPLERS)}")
  if FLAGS.params not in ("ema", "online"):
    raise LcmJaxError(f"--params must be ema or online, got {FLAGS.params!r}")
  if FLAGS.dtype not in DTYPES:
    raise LcmJaxError(f"unknown --dtype {FLAGS.dtype!r}; choose from {', '.join(DTYPES)}")
  if FLAGS.steps < 1:
    raise LcmJaxError(f"--steps must be at least 1, got {FLAGS.steps}")
  if FLAGS.batch_size < 1:
    raise LcmJaxError(f"--batch_size must be at least 1, got {FLAGS.batch_size}")
  from lcm_jax.lora import lora_file, parse_lora_arg
  for arg in FLAGS.lora or ():
    lora_file(parse_lora_arg(arg)[0])  # a missing LoRA fails before the model loads


def image_names(n: int) -> list[str]:
  """The PNG names of n images: 000.png, 001.png, ... (wider past 1000)."""
  width_digits = max(3, len(str(n - 1)))
  return [f"{i:0{width_digits}d}.png" for i in range(n)]


def check_output(output: str, names: list[str]) -> None:
  """Raises LcmJaxError unless `output` is a folder (or can be made one) where `names` and
  grid.png can be written: checked before any work, so a mistake costs no sampling."""
  check_can_be_folder(output, "--output")
  for name in names + ["grid.png"]:
    if os.path.isdir(os.path.join(output, name)):
      raise LcmJaxError(f"--output {output} holds a folder named {name}, where an image would be written")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    # absl logs INFO to stderr by default (JAX's backend probing included); keep stderr for
    # progress and errors.
    logging.set_verbosity(logging.WARNING)
  check_flags()
  prompts = read_prompts()
  check_output(FLAGS.output, image_names(len(prompts)))
  latents = read_latents(FLAGS.latents) if FLAGS.latents else None

  # Imported after the cheap checks: JAX and the models take seconds to import.
  import jax.numpy as jnp
  from tqdm import tqdm

  from lcm_jax import text_to_image
  from lcm_jax.figures import image_grid, save_png
  from lcm_jax.load import load_pipeline
  assert SAMPLERS == text_to_image.SAMPLERS

  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[FLAGS.dtype]
  start = time.perf_counter()
  pipe = load_pipeline(FLAGS.model, dtype=dtype, param_dtype=dtype, params=FLAGS.params, variant=FLAGS.variant,
                       revision=FLAGS.revision, token=FLAGS.token, loras=FLAGS.lora or (), fuse=FLAGS.fuse_lora,
                       attention=FLAGS.attention)
  print(f"loaded {FLAGS.model} in {time.perf_counter() - start:.1f}s", flush=True)
  t2i = text_to_image.TextToImage(pipe)
  height, width = t2i.resolve_size(FLAGS.height, FLAGS.width)
  text_to_image.check_sampler(pipe, t2i.schedule, FLAGS.sampler, FLAGS.steps)
  n, batch = len(prompts), min(FLAGS.batch_size, len(prompts))
  if latents is not None:
    text_to_image.check_latents(latents, n, text_to_image.latent_shape(pipe, height, width))
  try:
    os.makedirs(FLAGS.output, exist_ok=True)
  except OSError as e:
    raise LcmJaxError(f"cannot create --output {FLAGS.output}: {e.strerror or e}") from None

  embeds_guidance = pipe.unet.config.time_cond_proj_dim is not None
  if FLAGS.sampler == "lcm" and not embeds_guidance:
    print("note: this UNet has no guidance input (time_cond_proj_dim): --guidance_scale is unused")
  if FLAGS.negative_prompt and (FLAGS.sampler == "lcm" or embeds_guidance):
    print("note: --negative_prompt is unused: the guidance is distilled into this model "
          "(no classifier-free guidance)")
  kwargs = dict(sampler=FLAGS.sampler, num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale,
                negative_prompt=FLAGS.negative_prompt, height=height, width=width, seed=FLAGS.seed)
  print(f"{FLAGS.sampler}, {FLAGS.steps} steps, guidance {FLAGS.guidance_scale}, {height}x{width}, "
        f"{n} prompt(s) in batches of {batch}, {FLAGS.dtype}; compiling ...", flush=True)
  t2i.compile(FLAGS.sampler, FLAGS.steps, batch, height, width, FLAGS.guidance_scale)
  print(f"compiled in {t2i.compile_seconds:.1f}s", flush=True)

  images, run_seconds = [], 0.0
  for first in tqdm(range(0, n, batch), desc="batches", unit="batch", file=sys.stderr):
    indices = np.arange(first, first + batch)
    real = indices < n
    # Pad the last batch with copies of the last prompt (and latents); dropped below.
    take = np.minimum(indices, n - 1)
    batch_latents = None if latents is None else latents[take]
    t0 = time.perf_counter()
    out = t2i([prompts[i] for i in take], latents=batch_latents, indices=indices, **kwargs)
    run_seconds += time.perf_counter() - t0
    images.extend(out[real])
  if t2i.num_compiled != 1:  # a bug, not a user error: every batch has the same shape
    raise RuntimeError(f"expected one compiled function, got {t2i.num_compiled}")

  images = np.stack(images)
  for name, image in zip(image_names(n), images):
    save_png(os.path.join(FLAGS.output, name), image)
  save_png(os.path.join(FLAGS.output, "grid.png"), image_grid(images))
  batches = math.ceil(n / batch)
  print(f"compile time {t2i.compile_seconds:.2f}s; after compilation {run_seconds / n:.3f}s per image "
        f"({run_seconds / batches:.3f}s per batch of {batch}, padding included)")
  print(f"wrote {n} image(s) and grid.png to {FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
