r"""The paper's Table 1 for any teacher and LCM: FID and CLIP score at 1, 2, 4 and 8 steps.

    python -m lcm_jax.evaluate --teacher stabilityai/stable-diffusion-2-1-base --lcm workdirs/sd21 \
        --prompts captions_val2014.json --num_prompts 10000 --images_per_prompt 3 \
        --reference coco_val2014/ --resolution 512 --inception inception.safetensors \
        --clip laion/CLIP-ViT-g-14-laion2B-s12B-b42K --output results/table1

Every sampler (--samplers) at every step count (--steps) draws --images_per_prompt images for
each of --num_prompts prompts (sampled from --prompts by --prompt_seed), image j from the same
initial noise for every sampler, at guidance scale 9 (the paper's w = 8). Images are cached in
<output>/cells (--cache_dir): a rerun skips finished cells and resumes unfinished ones; a cell
whose settings changed is generated again. Metrics (--metrics): `fid` (pytorch-fid's Inception,
--fid_mode, against --reference: a statistics .npz or a folder of images), `clip` (CLIP score
with --clip), `toy` (the toy domain's FID and text alignment: `lcm_jax.toy.metrics:toy_metrics`,
for toy captions) or any plugin `package.module:object` (see lcm_jax/eval/metric.py). Writes
<output>/table.md, table.json, plot.png and samples.png, rewritten after every cell. The
protocol with real weights: docs/evaluation.md.
"""

from __future__ import annotations

import os

from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError

# Kept here, not imported, so that --help and flag errors do not pay for importing JAX.
SAMPLERS = ("lcm", "ddim", "dpm_solver", "dpm_solver_pp")
FID_MODES = ("pytorch_fid", "clean")
PAPER_CLIP = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
# Short names of metric plugins. The toy is named, never imported: it loads only when asked for.
METRIC_ALIASES = {"toy": "lcm_jax.toy.metrics:toy_metrics"}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The program's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("teacher", None, "The teacher (rows ddim, dpm_solver, dpm_solver_pp): a diffusers folder, "
                      "a hub id or a training workdir.")
  flags.DEFINE_string("lcm", None, "The LCM (row lcm): a diffusers folder, a hub id or a training workdir.")
  flags.DEFINE_string("lcm_params", "ema", "With a workdir --lcm: 'ema' (the LCM) or 'online' (the student).")
  flags.DEFINE_integer("lcm_step", None, "With a workdir --lcm: the checkpoint step (default: the latest).")
  flags.DEFINE_string("prompts", None, "coco2014 (TFDS coco_captions), parti, a COCO captions .json, a "
                      "PartiPrompts .tsv or a text file (one prompt a line).")
  flags.DEFINE_integer("num_prompts", None, "Prompts drawn from --prompts (default: all).")
  flags.DEFINE_integer("prompt_seed", 0, "Seed of the prompt draw (and of the caption chosen per COCO image).")
  flags.DEFINE_integer("images_per_prompt", 3, "Images per prompt and cell (paper: 3 x 10K prompts).")
  flags.DEFINE_list("samplers", list(SAMPLERS), "Rows of the table.")
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Columns of the table.")
  flags.DEFINE_float("guidance_scale", 9.0, "diffusers' g = 1 + the paper's w (paper: w = 8).")
  flags.DEFINE_integer("resolution", None, "Image size in pixels (default: the UNet's sample_size x VAE factor).")
  flags.DEFINE_integer("batch_size", 8, "Images per compiled sampler call.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise: image j of every cell starts from key (seed, j).")
  flags.DEFINE_string("dtype", "fp32", "Generation dtype: fp32 or bf16.")
  flags.DEFINE_list("metrics", ["fid", "clip"], "fid, clip, toy (the toy domain's FID and text alignment) "
                    "and/or plugins package.module:object.")
  flags.DEFINE_string("reference", None, "FID reference: a statistics .npz, or a folder of images.")
  flags.DEFINE_string("reference_preprocess", "centre_crop", "For a folder --reference: centre_crop (the "
                      "central square resized to --resolution, PIL bicubic) or none (as pytorch-fid reads a folder).")
  flags.DEFINE_integer("reference_limit", None, "Use only the first N images (sorted) of a folder --reference.")
  flags.DEFINE_string("reference_cache", None, "Where a folder's statistics are cached (default: <output>/"
                      "reference_<mode>_<preprocessing>.npz).")
  flags.DEFINE_string("fid_mode", "pytorch_fid", f"One of {', '.join(FID_MODES)}.")
  flags.DEFINE_string("inception", None, "FID Inception weights converted by python -m lcm_jax.eval."
                      "convert_inception (.safetensors); default: downloaded and converted into ~/.cache/lcm_jax.")
  flags.DEFINE_string("clip", PAPER_CLIP, "CLIP model for the CLIP score: a CLIPModel folder or hub id.")
  flags.DEFINE_integer("metric_batch_size", 50, "Images per Inception / CLIP call.")
  flags.DEFINE_string("output", None, "Folder for table.md, table.json, plot.png and samples.png.")
  flags.DEFINE_string("cache_dir", None, "Folder of the cached cells (default: <output>/cells).")
  flags.DEFINE_integer("grid_prompts", 4, "Prompts shown in samples.png (0: none).")
  flags.DEFINE_bool("progress", True, "Progress bars (images, images/s, ETA) on stderr.")


# ---------------------------------------------------------------------------------------
# Checks: every flag and path before any work


def _positive(name: str, value, minimum: int = 1) -> None:
  if value is not None and value < minimum:
    raise LcmJaxError(f"--{name} must be at least {minimum}, got {value}")


def check_model(name: str, value: str) -> None:
  """A local folder, or something shaped like a hub id (owner/name); flag --name."""
  expanded = os.path.expanduser(value)
  if os.path.exists(expanded):
    if not os.path.isdir(expanded):
      raise LcmJaxError(f"--{name} {value} is a file; give a pipeline folder, a hub id or a workdir")
    return
  if value.count("/") != 1 or value.startswith((".", "/", "~")):
    raise LcmJaxError(f"--{name} {value} does not exist (and is not a hub id owner/name)")


def check_grid(samplers: list[str], steps: list[str], teacher: str | None, lcm: str | None,
               lcm_step: int | None = None) -> tuple[list[str], list[int]]:
  """(samplers, steps as ints) of a table; the models its rows need are given and exist.
  Shared by this command and `python -m lcm_jax.toy.evaluate`."""
  unknown = [s for s in samplers if s not in SAMPLERS]
  if unknown or not samplers:
    raise LcmJaxError(f"unknown --samplers {unknown}; choose from {', '.join(SAMPLERS)}")
  try:
    steps = [int(s) for s in steps]
  except ValueError:
    raise LcmJaxError(f"--steps must be integers, got {','.join(steps)}") from None
  if not steps or min(steps) < 1:
    raise LcmJaxError(f"--steps must be positive integers, got {','.join(map(str, steps))}")
  for name, path, needed in (("lcm", lcm, "lcm" in samplers), ("teacher", teacher, any(s != "lcm" for s in samplers))):
    if needed and not path:
      raise LcmJaxError(f"--{name} is required for the rows {','.join(samplers)} (a pipeline folder, a hub id "
                        f"or a workdir)" + ("; or leave lcm out of --samplers" if name == "lcm" else ""))
    if needed:
      check_model(name, path)
  if lcm_step is not None and "lcm" in samplers:
    from lcm_jax import workdir
    if not workdir.is_workdir(os.path.expanduser(lcm)):
      raise LcmJaxError(f"--lcm_step needs a training workdir as --lcm; {lcm} is not one")
    if not os.path.isdir(os.path.join(workdir.checkpoint_dir(os.path.expanduser(lcm)), str(lcm_step))):
      raise LcmJaxError(f"--lcm_step {lcm_step}: {lcm} has no checkpoint of that step")
  return samplers, steps


def _check_metric_flags(metrics: list[str]) -> None:
  for m in metrics:
    if m not in ("fid", "clip"):
      from lcm_jax.eval.metric import load_plugin
      load_plugin(METRIC_ALIASES.get(m, m))  # a bad plugin path fails here, before any work
  if "fid" in metrics:
    if FLAGS.fid_mode not in FID_MODES:
      raise LcmJaxError(f"unknown --fid_mode {FLAGS.fid_mode!r}; choose from {', '.join(FID_MODES)}")
    if not FLAGS.reference:
      raise LcmJaxError("--reference is required for FID (a statistics .npz or a folder of images)")
    if not os.path.exists(FLAGS.reference):
      raise LcmJaxError(f"--reference {FLAGS.reference} does not exist")
    folder = os.path.isdir(FLAGS.reference)
    if not folder and not FLAGS.reference.endswith(".npz"):
      raise LcmJaxError(f"--reference {FLAGS.reference} must be a .npz of statistics or a folder of images")
    if FLAGS.reference_preprocess not in ("centre_crop", "none"):
      raise LcmJaxError(f"--reference_preprocess must be centre_crop or none, got {FLAGS.reference_preprocess!r}")
    if folder and FLAGS.reference_preprocess == "centre_crop" and not FLAGS.resolution:
      raise LcmJaxError("--reference_preprocess=centre_crop crops the reference images to the samples' size: "
                        "give --resolution (or --reference_preprocess=none)")
    if FLAGS.inception is not None and not os.path.isfile(FLAGS.inception):
      raise LcmJaxError(f"--inception {FLAGS.inception} does not exist")
  if "clip" in metrics:
    check_model("clip", FLAGS.clip)


def check_flags() -> tuple[list[str], list[int], list[str]]:
  """(samplers, steps, metrics); raises LcmJaxError for the first bad flag or path."""
  if not FLAGS.output:
    raise LcmJaxError("--output is required (a folder for the table, plot and samples)")
  samplers, steps = check_grid(list(FLAGS.samplers), list(FLAGS.steps), FLAGS.teacher, FLAGS.lcm, FLAGS.lcm_step)
  if not FLAGS.prompts:
    raise LcmJaxError("--prompts is required: coco2014, parti, a captions .json, a .tsv or a text file")
  if FLAGS.prompts not in ("coco2014", "parti") and not os.path.isfile(FLAGS.prompts):
    raise LcmJaxError(f"--prompts {FLAGS.prompts} does not exist")
  for name in ("num_prompts", "images_per_prompt", "batch_size", "resolution", "metric_batch_size",
               "reference_limit"):
    _positive(name, FLAGS[name].value)
  _positive("grid_prompts", FLAGS.grid_prompts, 0)
  if (FLAGS.num_prompts or 2) * FLAGS.images_per_prompt < 2:
    raise LcmJaxError("a cell needs at least 2 images (an FID needs a covariance): raise --num_prompts")
  if FLAGS.dtype not in ("fp32", "bf16"):
    raise LcmJaxError(f"--dtype must be fp32 or bf16, got {FLAGS.dtype!r}")
  if FLAGS.lcm_params not in ("ema", "online"):
    raise LcmJaxError(f"--lcm_params must be ema or online, got {FLAGS.lcm_params!r}")
  metrics = [m.strip() for m in FLAGS.metrics if m.strip()]
  if not metrics:
    raise LcmJaxError("--metrics is empty")
  _check_metric_flags(metrics)
  return samplers, steps, metrics


# ---------------------------------------------------------------------------------------
# The run


def build_metrics(names: list[str], prompts: list[str]) -> list:
  """The metrics in --metrics order (FID loads Inception and the reference statistics)."""
  from lcm_jax.eval import metric
  out = []
  for name in names:
    if name == "fid":
      inception = FLAGS.inception or _fetch_inception()
      crop = FLAGS.resolution if FLAGS.reference_preprocess == "centre_crop" else None
      cache = FLAGS.reference_cache or os.path.join(
          FLAGS.output, f"reference_{FLAGS.fid_mode}_{f'crop{crop}' if crop else 'asis'}"
          f"{f'_first{FLAGS.reference_limit}' if FLAGS.reference_limit else ''}.npz")
      out.append(metric.fid_metric(inception, FLAGS.reference, mode=FLAGS.fid_mode, resolution=crop,
                                   reference_cache=cache, reference_limit=FLAGS.reference_limit,
                                   batch_size=FLAGS.metric_batch_size))
    elif name == "clip":
      out.append(metric.clip_metric(FLAGS.clip, batch_size=FLAGS.metric_batch_size))
    else:
      context = metric.MetricContext(tuple(prompts), FLAGS.images_per_prompt, FLAGS.resolution, FLAGS.output)
      out += metric.metrics_from_plugin(METRIC_ALIASES.get(name, name), context)
  return out


def _fetch_inception() -> str:
  from lcm_jax.eval.convert_inception import fetch_inception_weights
  return fetch_inception_weights(os.path.expanduser("~/.cache/lcm_jax"))


def build_models(teacher: str | None, lcm: str | None, *, lcm_params: str = "ema", lcm_step: int | None = None,
                 dtype: str = "fp32") -> dict:
  """{"teacher", "lcm"} -> `Model` (for the paths given), each loaded on first use: a
  diffusers folder, a hub id, or a workdir (its `lcm_params` at `lcm_step`, default the
  latest checkpoint). Shared by this command and `python -m lcm_jax.toy.evaluate`."""
  import jax.numpy as jnp

  from lcm_jax import workdir
  from lcm_jax.eval.table import Model, model_identity
  from lcm_jax.load import load_pipeline
  jnp_dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]

  def load(path, params, step):
    if step is not None:
      return workdir.load_pipeline_from_workdir(os.path.expanduser(path), params, step, dtype=jnp_dtype,
                                                param_dtype=jnp_dtype)
    return load_pipeline(path, dtype=jnp_dtype, param_dtype=jnp_dtype, params=params)

  models = {}
  for role, path, params, step in (("teacher", teacher, "ema", None), ("lcm", lcm, lcm_params, lcm_step)):
    if path:
      identity = dict(model_identity(path, params, step), dtype=dtype)
      models[role] = Model(identity, lambda path=path, params=params, step=step: load(path, params, step))
  return models


def settings_line(num_prompts: int) -> str:
  size = f"{FLAGS.resolution}x{FLAGS.resolution}" if FLAGS.resolution else "the model's default size"
  return (f"{num_prompts} prompts of {FLAGS.prompts} (seed {FLAGS.prompt_seed}) x {FLAGS.images_per_prompt} images "
          f"per cell = {num_prompts * FLAGS.images_per_prompt} images; guidance scale {FLAGS.guidance_scale:g} "
          f"(w = {FLAGS.guidance_scale - 1:g}); {size}; {FLAGS.dtype}; image j of every cell starts from the noise "
          f"of key ({FLAGS.seed}, j).")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  samplers, steps, metric_names = check_flags()

  from lcm_jax.eval import report, table
  from lcm_jax.eval.prompts import load_prompt_set

  prompts = load_prompt_set(FLAGS.prompts, seed=FLAGS.prompt_seed).sample(FLAGS.num_prompts, FLAGS.prompt_seed)
  metrics = build_metrics(metric_names, list(prompts.prompts))
  models = build_models(FLAGS.teacher, FLAGS.lcm, lcm_params=FLAGS.lcm_params, lcm_step=FLAGS.lcm_step,
                        dtype=FLAGS.dtype)
  cells = table.sampler_cells(models, samplers, steps, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed,
                              resolution=FLAGS.resolution)
  evaluation = table.Evaluation(prompts.prompts, metrics, FLAGS.cache_dir or os.path.join(FLAGS.output, "cells"),
                                images_per_prompt=FLAGS.images_per_prompt, batch_size=FLAGS.batch_size,
                                progress=FLAGS.progress)
  settings = {k: FLAGS[k].value for k in ("teacher", "lcm", "lcm_params", "lcm_step", "prompts", "num_prompts",
                                          "prompt_seed", "images_per_prompt", "guidance_scale", "resolution", "seed",
                                          "dtype")}
  settings.update(prompt_set=prompts.name, prompt_ids=list(prompts.ids), samplers=samplers, steps=steps)
  report.run_and_report(evaluation, cells, metrics, FLAGS.output, settings, [settings_line(len(prompts))],
                        grid_prompts=FLAGS.grid_prompts)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
