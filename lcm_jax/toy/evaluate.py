r"""The paper's Table 1 on the toy domain: FID and text alignment of the teacher's DDIM,
DPM-Solver and DPM-Solver++ against the LCM, at 1, 2, 4 and 8 steps.

    python -m lcm_jax.toy.evaluate --lcm workdirs/toy --output results/table1
    python -m lcm_jax.toy.evaluate --lcm workdirs/toy_lcf --output results/lcf \
        --domain shifted --samplers lcm --steps 4

Every sampler draws one image per prompt of a fixed, balanced prompt set of the toy domain
(`--num_samples`), from the same initial latents (image i is seeded by (--seed, i)), with
guidance omega = 8 (guidance_scale 9) as the paper: the teacher samplers run classifier-free
guidance against the empty prompt, the LCM embeds omega. Scores (`lcm_jax.toy.metrics`):
* FID against real domain images drawn for the same prompts (another jitter of each), in the
  features of the attribute network trained on real images only;
* text alignment: the fraction of images whose shape colour, shape and position the attribute
  network reads back equal to the prompt's (our stand-in for the CLIP score).
Reference rows, for scale: real images (a second real draw: the FID floor of this many
samples), the teacher's VAE reconstructions of the real images (the autoencoder's floor) and
the teacher with DDIM at `--reference_steps` steps (the guided ODE's solution that the LCM is
distilled towards).

Writes <output>/table.md, table.json, plot.png (FID and alignment against steps) and
samples.png (the first prompts under every sampler), and prints the table.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError
from lcm_jax.toy import METRIC_DIR, TEACHER_DIR, display_path

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when run as a program only (importing this module defines no flags)."""
  flags.DEFINE_string("teacher", display_path(TEACHER_DIR), "The teacher: a diffusers pipeline folder.")
  flags.DEFINE_string("lcm", None, "The LCM: a training workdir (its latest checkpoint's EMA "
                      "parameters) or an LCM pipeline folder.")
  flags.DEFINE_integer("lcm_step", None, "With a workdir --lcm: the checkpoint step to score (default: the latest).")
  flags.DEFINE_enum("lcm_params", "ema", ["ema", "online"], "With a workdir --lcm: the EMA target (the LCM, "
                    "default) or the online student.")
  flags.DEFINE_string("output", None, "Folder for table.md, table.json, plot.png and samples.png.")
  flags.DEFINE_integer("num_samples", 2000, "Prompts (= images per sampler and step count).")
  flags.DEFINE_string("metric", display_path(METRIC_DIR), "Folder of the attribute network "
                      "(built by `python -m lcm_jax.toy.metrics`).")
  flags.DEFINE_enum("domain", "teacher", ["teacher", "shifted"], "Prompt set: the teacher's colours, or "
                    "the shifted colours the teacher never saw (LCF).")
  flags.DEFINE_list("samplers", ["ddim", "dpm_solver", "dpm_solver_pp", "lcm"], "Rows of the table.")
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Columns of the table.")
  flags.DEFINE_float("guidance_scale", 9.0, "diffusers' g = 1 + the paper's omega (paper: omega = 8).")
  flags.DEFINE_integer("reference_steps", 50, "Steps of the teacher-DDIM reference row (what the LCM is "
                       "distilled towards); 0 leaves it out.")
  flags.DEFINE_integer("batch_size", 250, "Images per compiled sampler call.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial latents and LCM noise (image i: (seed, i)).")
  flags.DEFINE_integer("prompt_seed", 1234, "Seed of the prompt set.")
  flags.DEFINE_integer("grid_prompts", 8, "Prompts shown in samples.png.")


ROW_NAMES = {"ddim": "DDIM", "dpm_solver": "DPM-Solver", "dpm_solver_pp": "DPM-Solver++", "lcm": "LCM"}
REFERENCE_SEED = 777  # the jitter of the real reference images
SECOND_REAL_SEED = 778  # a second real draw, for the FID floor


def load_model(path: str, params: str = "ema", step: int | None = None):
  """A `Pipeline` from a diffusers folder or a training workdir (its `params` at `step`)."""
  from lcm_jax import workdir
  from lcm_jax.load import load_pipeline
  if not os.path.exists(path):
    raise LcmJaxError(f"{path} does not exist")
  if step is None:
    return load_pipeline(path, params=params)
  if not workdir.is_workdir(path):
    raise LcmJaxError(f"--lcm_step needs a training workdir; {path} is a pipeline folder")
  return workdir.load_pipeline_from_workdir(path, params, step)


def generate(t2i, prompts: list[str], sampler: str, steps: int, guidance_scale: float, seed: int,
             batch_size: int) -> tuple[np.ndarray, float]:
  """Images uint8 [N, H, W, 3] for prompts (image i seeded by (seed, i)) and the seconds they
  took after compilation."""
  n = len(prompts)
  batch = min(batch_size, n)
  t2i.compile(sampler, steps, batch, guidance_scale=guidance_scale)
  start, out = time.perf_counter(), []
  for i in range(0, n, batch):
    indices = np.arange(i, i + batch)
    chunk = [prompts[min(j, n - 1)] for j in indices]  # the last batch is padded, then cut
    out.append(t2i(chunk, sampler=sampler, num_steps=steps, guidance_scale=guidance_scale, seed=seed,
                   indices=indices)[: n - i])
  return np.concatenate(out), time.perf_counter() - start


def vae_reconstructions(pipe, images: np.ndarray, batch: int = 500) -> np.ndarray:
  """uint8 images -> the VAE's reconstructions through the posterior mean, uint8."""
  import jax
  import jax.numpy as jnp

  from lcm_jax.models.vae import AutoencoderKL
  from lcm_jax.text_to_image import to_uint8_images

  @jax.jit
  def roundtrip(params, x):
    mean, _ = pipe.vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return to_uint8_images(pipe.vae.apply({"params": params}, mean, method=AutoencoderKL.decode))

  return np.concatenate([np.asarray(roundtrip(pipe.params["vae"], jnp.asarray(images[i:i + batch], jnp.float32)
                                              / 127.5 - 1.0)) for i in range(0, len(images), batch)])


def markdown_table(results: dict, samplers: list[str], steps: list[int], references: dict) -> str:
  """The paper's layout: one row per sampler, FID then alignment columns per step count."""
  head = ("| Method | " + " | ".join(f"FID ↓ {s}-step" for s in steps) + " | "
          + " | ".join(f"Align ↑ {s}-step" for s in steps) + " |")
  lines = [head, "|" + "---|" * (1 + 2 * len(steps))]
  for sampler in samplers:
    row = results[sampler]
    lines.append(f"| {ROW_NAMES[sampler]} | " + " | ".join(f"{row[str(s)]['fid']:.2f}" for s in steps) + " | "
                 + " | ".join(f"{100 * row[str(s)]['alignment']:.1f}%" for s in steps) + " |")
  refs = "; ".join(f"{name}: FID {r['fid']:.2f}, align {100 * r['alignment']:.1f}%" for name, r in references.items())
  return "\n".join(lines) + f"\n\nReferences (same prompts): {refs}.\n"


def checked_flags() -> tuple[list[str], list[int]]:
  """(samplers, steps) from the flags; every flag error before any work."""
  if FLAGS.output is None:
    raise LcmJaxError("--output is required (a folder for the table, plot and samples)")
  samplers = list(FLAGS.samplers)
  unknown = [s for s in samplers if s not in ROW_NAMES]
  if unknown:
    raise LcmJaxError(f"unknown --samplers {unknown}; choose from {', '.join(ROW_NAMES)}")
  if "lcm" in samplers and not FLAGS.lcm:
    raise LcmJaxError("--lcm is required for the LCM row (a workdir or an LCM pipeline folder); "
                      "or leave lcm out of --samplers")
  try:
    steps = [int(s) for s in FLAGS.steps]
  except ValueError:
    raise LcmJaxError(f"--steps must be integers, got {FLAGS.steps}") from None
  if not steps or min(steps) < 1:
    raise LcmJaxError(f"--steps must be positive integers, got {FLAGS.steps}")
  if FLAGS.reference_steps < 0:
    raise LcmJaxError(f"--reference_steps must be >= 0 (0: no teacher reference row), got {FLAGS.reference_steps}")
  if FLAGS.num_samples < 2:
    raise LcmJaxError("--num_samples must be at least 2 (an FID needs a covariance)")
  return samplers, steps


def reference_rows(teacher_t2i, teacher, attrs, prompts, score) -> dict:
  """Scores of real images (a second draw), the teacher VAE's reconstructions of them, and
  the teacher's DDIM at --reference_steps (when asked)."""
  from lcm_jax.toy import domain
  # The second real draw has the jitter of no reference image, as a sampler's images do; its
  # reconstructions show what the autoencoder alone costs.
  second_real = domain.draw_all(attrs, SECOND_REAL_SEED)
  references = {"real images": score(second_real),
                "teacher VAE reconstructions": score(vae_reconstructions(teacher, second_real))}
  if FLAGS.reference_steps:
    images, _ = generate(teacher_t2i, prompts, "ddim", FLAGS.reference_steps, FLAGS.guidance_scale,
                         FLAGS.seed, FLAGS.batch_size)
    references[f"teacher DDIM {FLAGS.reference_steps} steps"] = score(images)
  return references


def score_samplers(models: dict, samplers: list[str], steps: list[int], prompts: list[str], score):
  """(results[sampler][steps] -> scores and timings, the first images of each cell, their labels)."""
  results: dict = {}
  grid_rows, grid_labels = [], []
  for sampler in samplers:
    t2i = models["lcm" if sampler == "lcm" else "teacher"]
    results[sampler] = {}
    for s in steps:
      compile_before = t2i.compile_seconds
      images, seconds = generate(t2i, prompts, sampler, s, FLAGS.guidance_scale, FLAGS.seed, FLAGS.batch_size)
      results[sampler][str(s)] = dict(score(images), sample_seconds=round(seconds, 2),
                                      compile_seconds=round(t2i.compile_seconds - compile_before, 2))
      grid_rows.append(images[:FLAGS.grid_prompts])
      grid_labels.append(f"{ROW_NAMES[sampler]} {s}")
      r = results[sampler][str(s)]
      print(f"[evaluate] {ROW_NAMES[sampler]:13s} {s} steps: FID {r['fid']:8.3f}  alignment "
            f"{100 * r['alignment']:5.1f}%  ({seconds:.0f}s sampling, {r['compile_seconds']:.0f}s compiling)",
            flush=True)
  return results, grid_rows, grid_labels


def write_outputs(results, references, samplers, steps, attrs, prompts, grid_rows, grid_labels, total: float) -> str:
  """table.md, table.json, plot.png and samples.png in --output; returns the table."""
  from lcm_jax import figures
  from lcm_jax.toy import domain
  os.makedirs(FLAGS.output, exist_ok=True)
  table = markdown_table(results, samplers, steps, references)
  with open(os.path.join(FLAGS.output, "table.md"), "w") as f:
    f.write(table)
  report = {"results": results, "references": references, "settings": {
      "teacher": FLAGS.teacher, "lcm": FLAGS.lcm, "lcm_step": FLAGS.lcm_step,
      "lcm_params": FLAGS.lcm_params, "num_samples": FLAGS.num_samples, "domain": FLAGS.domain,
      "guidance_scale": FLAGS.guidance_scale, "omega": FLAGS.guidance_scale - 1, "seed": FLAGS.seed,
      "prompt_seed": FLAGS.prompt_seed, "metric": FLAGS.metric, "steps": steps, "samplers": samplers},
      "total_seconds": round(total, 1)}
  with open(os.path.join(FLAGS.output, "table.json"), "w") as f:
    json.dump(report, f, indent=2)
  panels = [(title, {ROW_NAMES[s]: {k: results[s][str(k)][key] for k in steps} for s in samplers})
            for title, key in (("FID, log scale (lower is better)", "fid"),
                               ("text alignment (higher is better)", "alignment"))]
  figures.save_png(os.path.join(FLAGS.output, "plot.png"), figures.line_plot(panels, log_y=(True, False)))
  real_row = domain.draw_all(attrs[:FLAGS.grid_prompts], REFERENCE_SEED)
  figures.save_png(os.path.join(FLAGS.output, "samples.png"), figures.labelled_grid(
      [real_row] + grid_rows, ["real"] + grid_labels, prompts[:FLAGS.grid_prompts]))
  return table


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  samplers, steps = checked_flags()

  from lcm_jax.text_to_image import TextToImage
  from lcm_jax.toy import domain
  from lcm_jax.toy.metrics import DomainMetrics, feature_statistics

  t_start = time.perf_counter()
  metrics = DomainMetrics.load(FLAGS.metric)
  colours = domain.TRAIN_COLOURS if FLAGS.domain == "teacher" else domain.SHIFTED_COLOURS
  attrs = domain.prompt_set(FLAGS.num_samples, FLAGS.prompt_seed, colours=colours)
  prompts = [a.caption for a in attrs]
  reference = feature_statistics(metrics.features(domain.draw_all(attrs, REFERENCE_SEED)))

  def score(images: np.ndarray) -> dict:
    return {"fid": metrics.fid(images, reference), **metrics.alignment(images, attrs)}

  teacher = load_model(FLAGS.teacher)
  models = {}
  if any(s != "lcm" for s in samplers) or FLAGS.reference_steps:
    models["teacher"] = TextToImage(teacher)
  references = reference_rows(models.get("teacher"), teacher, attrs, prompts, score)
  print(f"[evaluate] {FLAGS.num_samples} prompts ({FLAGS.domain} colours); references: "
        + json.dumps({k: {"fid": round(v["fid"], 3), "alignment": round(v["alignment"], 4)}
                      for k, v in references.items()}), flush=True)
  if "lcm" in samplers:
    models["lcm"] = TextToImage(load_model(FLAGS.lcm, FLAGS.lcm_params, FLAGS.lcm_step))
  results, grid_rows, grid_labels = score_samplers(models, samplers, steps, prompts, score)
  total = time.perf_counter() - t_start
  table = write_outputs(results, references, samplers, steps, attrs, prompts, grid_rows, grid_labels, total)
  print(table)
  print(f"[evaluate] wrote {FLAGS.output}/table.md, table.json, plot.png, samples.png in {total / 60:.1f} min")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
