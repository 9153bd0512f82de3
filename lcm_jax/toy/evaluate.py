r"""The paper's Table 1 on the toy domain: FID and text alignment of the teacher's DDIM,
DPM-Solver and DPM-Solver++ against the LCM, at 1, 2, 4 and 8 steps.

    python -m lcm_jax.toy.evaluate --lcm workdirs/toy --output results/table1
    python -m lcm_jax.toy.evaluate --lcm workdirs/toy_lcf --output results/lcf \
        --domain shifted --samplers lcm --steps 4

A thin layer over `python -m lcm_jax.evaluate` (its checks, models and run loop; the engine
`lcm_jax.eval.table`) with the toy's prompt set, metrics and reference rows. Every sampler draws one
image per prompt of a fixed, balanced prompt set of the toy domain (`--num_samples`), from
the same initial latents (image i is seeded by (--seed, i)), with guidance omega = 8
(guidance_scale 9) as the paper: the teacher samplers run classifier-free guidance against
the empty prompt, the LCM embeds omega. Scores (`lcm_jax.toy.metrics`, plugged into the
engine's metric protocol, `lcm_jax.eval.metric`, by `lcm_jax.toy.metrics.make_toy_metrics`):
* FID against real domain images drawn for the same prompts (another jitter of each), in the
  features of the attribute network trained on real images only;
* text alignment: the fraction of images whose shape colour, shape and position the attribute
  network reads back equal to the prompt's (our stand-in for the CLIP score).
Reference rows, for scale: real images (a second real draw: the FID floor of this many
samples), the teacher's VAE reconstructions of the real images (the autoencoder's floor) and
the teacher with DDIM at `--reference_steps` steps (the guided ODE's solution that the LCM is
distilled towards).

Images are cached in --cache_dir (default <output>/cells): a rerun skips finished cells.
Writes <output>/table.md, table.json, plot.png (FID and alignment against steps) and
samples.png (the first prompts under every sampler), and prints the table.

The same metrics plug into the general command as `--metrics toy` (with a text file of toy
captions as --prompts; docs/evaluation.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError
from lcm_jax.toy import METRIC_DIR, TEACHER_DIR, display_path

FLAGS = flags.FLAGS


def define_flags() -> None:
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
  flags.DEFINE_string("guided_distill", None, "A Guided-Distill workdir (configs/toy.py:guided_distill): "
                      "adds its row; the N-step cell uses the checkpoint at the end of the round that made "
                      "the N-step student, sampled with its own deterministic sampler.")
  flags.DEFINE_list("samplers", ["ddim", "dpm_solver", "dpm_solver_pp", "lcm"], "Rows of the table "
                    "(guided_distill: the --guided_distill workdir's row).")
  flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Columns of the table.")
  flags.DEFINE_float("guidance_scale", 9.0, "diffusers' g = 1 + the paper's omega (paper: omega = 8).")
  flags.DEFINE_integer("reference_steps", 50, "Steps of the teacher-DDIM reference row (what the LCM is "
                       "distilled towards); 0 leaves it out.")
  flags.DEFINE_integer("batch_size", 250, "Images per compiled sampler call.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial latents and LCM noise (image i: (seed, i)).")
  flags.DEFINE_integer("prompt_seed", 1234, "Seed of the prompt set.")
  flags.DEFINE_integer("grid_prompts", 8, "Prompts shown in samples.png.")
  flags.DEFINE_string("cache_dir", None, "Folder of the cached cells (default: <output>/cells).")
  flags.DEFINE_bool("progress", True, "Progress bars (images, images/s, ETA) on stderr.")


GUIDED_DISTILL = "guided_distill"  # the row of a Guided-Distill workdir (--guided_distill)
SECOND_REAL_SEED = 778  # a second real draw, for the FID floor
SCORE_BATCH = 500  # images per chunk fed to the attribute network


# ---------------------------------------------------------------------------------------
# Image sources of the reference rows


class GuidedDistillSource:
  """Images of a Guided-Distill workdir's N-step student (its checkpoint at the end of the
  round that made it, online parameters) with `lcm_jax.guided_distill.sample`, from the same
  initial latents as every other row."""

  def __init__(self, workdir: str, steps: int, *, guidance_scale: float, seed: int):
    from lcm_jax import workdir as workdir_lib
    from lcm_jax.config import guided_distill_config
    from lcm_jax.eval.table import Model, model_identity
    import ml_collections
    config = ml_collections.ConfigDict(workdir_lib.saved_config(workdir))
    self.step = guided_distill_config(config, config.loss.guidance_embedding_dim).checkpoint_step(steps)
    if not os.path.isdir(os.path.join(workdir_lib.checkpoint_dir(workdir), str(self.step))):
      raise LcmJaxError(f"{workdir} has no checkpoint {self.step}, where its {steps}-step student is final")
    self.steps, self.guidance_scale, self.seed = steps, guidance_scale, seed
    identity = model_identity(workdir, "online", self.step)
    self.model = Model(identity, lambda: workdir_lib.load_pipeline_from_workdir(workdir, "online", self.step))
    self._images = None

  def settings(self) -> dict:
    return {"guided_distill": self.model.identity, "steps": self.steps, "guidance_scale": self.guidance_scale,
            "seed": self.seed}

  def prepare(self, batch_size: int) -> None:
    from lcm_jax.guided_distill import GuidedDistillImages
    if self._images is None:
      self._images = GuidedDistillImages(self.model._load())
    self([""] * batch_size, np.arange(batch_size))  # compiles for this batch size

  def __call__(self, prompts: Sequence[str], indices: np.ndarray) -> np.ndarray:
    return self._images(prompts, num_steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed,
                        indices=indices)


class RealImages:
  """Real domain images of the prompts' attributes (jitter seed, image index), or the
  teacher VAE's reconstructions of them (posterior mean) when `vae_of` is a teacher `Model`."""

  def __init__(self, seed: int, vae_of=None):
    self.seed, self.vae_of, self._roundtrip = seed, vae_of, None

  def settings(self) -> dict:
    return {"toy_real_images": self.seed, "vae_of": self.vae_of.identity if self.vae_of else None}

  def prepare(self, batch_size: int) -> None:
    if self.vae_of is not None and self._roundtrip is None:
      from lcm_jax.toy import domain
      self._roundtrip = vae_roundtrip(self.vae_of.text_to_image.pipe)
      self._roundtrip(np.zeros((batch_size, domain.SIZE, domain.SIZE, 3), np.uint8))  # compiled here, not timed

  def __call__(self, prompts: Sequence[str], indices: np.ndarray) -> np.ndarray:
    from lcm_jax.toy import domain
    images = np.stack([domain.draw(domain.parse_caption(p), self.seed, int(i)) for p, i in zip(prompts, indices)])
    return images if self._roundtrip is None else self._roundtrip(images)


def vae_roundtrip(pipe):
  """A function uint8 images [B, H, W, 3] -> the VAE's reconstructions through the posterior
  mean, uint8 (jitted once per batch shape)."""
  import jax
  import jax.numpy as jnp

  from lcm_jax.models.vae import AutoencoderKL
  from lcm_jax.text_to_image import to_uint8_images

  @jax.jit
  def roundtrip(params, x):
    mean, _ = pipe.vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return to_uint8_images(pipe.vae.apply({"params": params}, mean, method=AutoencoderKL.decode))

  return lambda images: np.asarray(roundtrip(pipe.params["vae"], jnp.asarray(images, jnp.float32) / 127.5 - 1.0))


# ---------------------------------------------------------------------------------------
# The program


def checked_flags() -> tuple[list[str], list[int]]:
  """(samplers, steps) from the flags; every flag error before any work."""
  from lcm_jax import workdir as workdir_lib
  from lcm_jax.evaluate import check_grid, check_model
  if FLAGS.output is None:
    raise LcmJaxError("--output is required (a folder for the table, plot and samples)")
  check_model("teacher", FLAGS.teacher)  # its VAE makes a reference row whatever the samplers
  samplers = list(FLAGS.samplers)
  others = [s for s in samplers if s != GUIDED_DISTILL]
  if GUIDED_DISTILL in samplers and not (FLAGS.guided_distill and workdir_lib.is_workdir(FLAGS.guided_distill)):
    raise LcmJaxError(f"the guided_distill row needs --guided_distill, a training workdir; got {FLAGS.guided_distill}")
  # (the steps are checked with the other rows, or as the teacher's rows would be)
  _, steps = check_grid(others or ["ddim"], list(FLAGS.steps), FLAGS.teacher, FLAGS.lcm, FLAGS.lcm_step)
  if FLAGS.reference_steps < 0:
    raise LcmJaxError(f"--reference_steps must be >= 0 (0: no teacher reference row), got {FLAGS.reference_steps}")
  if FLAGS.num_samples < 2:
    raise LcmJaxError("--num_samples must be at least 2 (an FID needs a covariance)")
  if FLAGS.batch_size < 1:
    raise LcmJaxError(f"--batch_size must be at least 1, got {FLAGS.batch_size}")
  if FLAGS.grid_prompts < 0:
    raise LcmJaxError(f"--grid_prompts must be >= 0, got {FLAGS.grid_prompts}")
  if not os.path.isdir(FLAGS.metric):
    raise LcmJaxError(f"--metric {FLAGS.metric} does not exist (build it: python -m lcm_jax.toy.metrics)")
  return samplers, steps


def toy_cells(samplers: list[str], steps: list[int]) -> list:
  """The reference rows (real, VAE, teacher DDIM) then the sampler grid, as engine cells."""
  from lcm_jax.eval.table import Cell, SamplerSource, sampler_cells
  from lcm_jax.evaluate import build_models
  models = build_models(FLAGS.teacher, FLAGS.lcm if "lcm" in samplers else None, lcm_params=FLAGS.lcm_params,
                       
                        lcm_step=FLAGS.lcm_step)
  teacher = models["teacher"]
  cells = [Cell("real_images", "real images", None, RealImages(SECOND_REAL_SEED)),
           Cell("teacher_vae", "teacher VAE reconstructions", None, RealImages(SECOND_REAL_SEED, teacher))]
  if FLAGS.reference_steps:
    n = FLAGS.reference_steps
    cells.append(Cell(f"teacher_ddim_{n}", f"teacher DDIM {n} steps", None,
                      SamplerSource(teacher, "ddim", n, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed)))
  for sampler in samplers:  # in the order given (the paper's: DDIM, DPM, DPM++, Guided-Distill, LCM)
    if sampler == GUIDED_DISTILL:
      cells += [Cell(f"{GUIDED_DISTILL}_{k}", "Guided-Distill", k,
                     GuidedDistillSource(FLAGS.guided_distill, k, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed))
                for k in steps]
    else:
      cells += sampler_cells(models, [sampler], steps, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed)
  return cells


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  samplers, steps = checked_flags()

  from lcm_jax.eval import report
  from lcm_jax.eval.table import Evaluation
  from lcm_jax.toy import domain
  from lcm_jax.toy.metrics import REFERENCE_SEED, make_toy_metrics

  colours = domain.TRAIN_COLOURS if FLAGS.domain == "teacher" else domain.SHIFTED_COLOURS
  attrs = domain.prompt_set(FLAGS.num_samples, FLAGS.prompt_seed, colours=colours)
  metrics = make_toy_metrics(attrs, FLAGS.metric)
  cells = toy_cells(samplers, steps)
  evaluation = Evaluation([a.caption for a in attrs], metrics, FLAGS.cache_dir or os.path.join(FLAGS.output, "cells"),
                          batch_size=FLAGS.batch_size, score_batch=SCORE_BATCH, progress=FLAGS.progress)
  names = ("teacher", "lcm", "guided_distill", "lcm_step", "lcm_params", "num_samples", "domain", "guidance_scale", "seed",
           "prompt_seed", "metric")
  settings = dict({k: FLAGS[k].value for k in names}, omega=FLAGS.guidance_scale - 1, steps=steps, samplers=samplers)
  notes = [f"{FLAGS.num_samples} prompts ({FLAGS.domain} colours, seed {FLAGS.prompt_seed}), one image each; "
           f"guidance scale {FLAGS.guidance_scale:g}; image i of every row starts from key ({FLAGS.seed}, i)."]
  lead = [("real", domain.draw_all(attrs[:FLAGS.grid_prompts], REFERENCE_SEED))] if FLAGS.grid_prompts else []
  report.run_and_report(evaluation, cells, metrics, FLAGS.output, settings, notes, grid_prompts=FLAGS.grid_prompts,
                        lead=lead)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
