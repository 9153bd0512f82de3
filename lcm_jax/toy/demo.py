"""`make demo`: the quick-start job. Distils the shipped toy teacher into an LCM and compares them.

    python -m lcm_jax.toy.demo [--workdir workdirs/toy] [--num_images 8000]

1. writes the toy training data: 32x32 captioned shapes in the Hugging Face imagefolder
   layout (`workdirs/toy_data/teacher`, from `lcm_jax.toy.domain`);
2. runs `python -m lcm_jax.train --config=configs/toy.py --workdir=workdirs/toy` (a
   subprocess: exactly what a user would type), which distils the shipped toy teacher
   (`lcm_jax/toy/weights/teacher`) with LCD;
3. samples the same prompts with the teacher (DDIM, 50 steps, guidance scale 9) and with the
   LCM (1, 2 and 4 steps, omega = 8 embedded) from the same initial latents, and writes the
   comparison grid to `workdirs/toy/demo_grid.png`.

Rerunning resumes: the data is not rewritten and training continues from the workdir's last
checkpoint (nothing to do once it is finished).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import flags, logging

from lcm_jax import cli
from lcm_jax.errors import LcmJaxError
from lcm_jax.toy import TEACHER_DIR, display_path

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when run as a program only, so that importing DEMO_PROMPTS defines no flags."""
  flags.DEFINE_string("teacher", display_path(TEACHER_DIR), "The toy teacher (a diffusers pipeline folder).")
  flags.DEFINE_string("workdir", "workdirs/toy", "Training workdir of the LCM.")
  flags.DEFINE_string("data", "workdirs/toy_data/teacher", "Where the toy training images are written.")
  flags.DEFINE_integer("num_images", 8000, "Training images to write.")
  flags.DEFINE_string("config", "configs/toy.py", "Training config.")
  flags.DEFINE_enum("attention", "auto", ["auto", "xla", "chunked"], "Attention backend of training and of the "
                    "grid's sampling (xla: the materialised reference; auto: chunked on CPU).")
  flags.DEFINE_multi_string("train_flag", [], "Extra flags for lcm_jax.train, e.g. "
                            "--train_flag=--config.num_train_steps=50.")


DEMO_PROMPTS = (
    "a red circle on the left on a blue background",
    "a yellow triangle at the top on a black background",
    "a white cross in the center on a green background",
    "a blue square at the bottom on a yellow background",
    "a green triangle on the right on a white background",
    "a black circle at the bottom on a red background",
    "a yellow cross on the left on a blue background",
    "a red square in the center on a white background",
)
GUIDANCE_SCALE = 9.0  # omega = 8, the paper's evaluation setting
TEACHER_STEPS = 50
LCM_STEPS = (1, 2, 4)


def write_data(path: str, n: int) -> None:
  from lcm_jax.toy.domain import write_imagefolder
  metadata = os.path.join(path, "metadata.jsonl")
  if os.path.isfile(metadata):
    with open(metadata) as f:
      if sum(1 for _ in f) == n:
        print(f"[demo] 1/3 training data: {path} exists ({n} images)", flush=True)
        return
  start = time.perf_counter()
  write_imagefolder(path, n, seed=0)
  print(f"[demo] 1/3 training data: wrote {n} images to {path} in {time.perf_counter() - start:.0f}s", flush=True)


def distil() -> None:
  command = [sys.executable, "-m", "lcm_jax.train", f"--config={FLAGS.config}", f"--workdir={FLAGS.workdir}",
             f"--config.teacher={FLAGS.teacher}", f"--config.data.path={FLAGS.data}",
             f"--config.attention={FLAGS.attention}", *FLAGS.train_flag]
  print("[demo] 2/3 distilling:", " ".join(command[1:]), flush=True)
  start = time.perf_counter()
  if subprocess.call(command) != 0:
    raise LcmJaxError("training failed (see its output above)")
  print(f"[demo] 2/3 distilled in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def comparison_grid() -> str:
  from lcm_jax import figures
  from lcm_jax.load import load_pipeline
  from lcm_jax.text_to_image import TextToImage

  start = time.perf_counter()
  prompts = list(DEMO_PROMPTS)
  teacher = TextToImage(load_pipeline(FLAGS.teacher, attention=FLAGS.attention))
  lcm = TextToImage(load_pipeline(FLAGS.workdir, attention=FLAGS.attention))
  rows = [teacher(prompts, sampler="ddim", num_steps=TEACHER_STEPS, guidance_scale=GUIDANCE_SCALE)]
  labels = [f"teacher DDIM {TEACHER_STEPS}"]
  for steps in LCM_STEPS:
    rows.append(lcm(prompts, sampler="lcm", num_steps=steps, guidance_scale=GUIDANCE_SCALE))
    labels.append(f"LCM {steps} step" + ("s" if steps > 1 else ""))
  path = os.path.join(FLAGS.workdir, "demo_grid.png")
  figures.save_png(path, figures.labelled_grid(rows, labels, prompts))
  print(f"[demo] 3/3 wrote {path} in {time.perf_counter() - start:.0f}s", flush=True)
  return path


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not os.path.isfile(os.path.join(FLAGS.teacher, "model_index.json")):
    raise LcmJaxError(f"the toy teacher {FLAGS.teacher} is missing; rebuild it with "
                      f"`python -m lcm_jax.toy.teacher --output {FLAGS.teacher}` (under an hour on 2 cores)")
  start = time.perf_counter()
  write_data(FLAGS.data, FLAGS.num_images)
  distil()
  grid = comparison_grid()
  print(f"\nlcm-jax demo done in {(time.perf_counter() - start) / 60:.1f} min.\n"
        f"  comparison grid (teacher DDIM {TEACHER_STEPS} steps vs LCM {', '.join(map(str, LCM_STEPS))} steps): {grid}\n"
        f"  training workdir (checkpoints, TensorBoard logs, samples/): {FLAGS.workdir}\n"
        f"  export it for diffusers: python -m lcm_jax.export --model {FLAGS.workdir} --output exported/\n"
        f"  score it (the paper's Table 1): python -m lcm_jax.toy.evaluate --teacher {FLAGS.teacher} "
        f"--lcm {FLAGS.workdir} --output results/table1", flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
