"""Writes a model as a diffusers pipeline folder that PyTorch diffusers loads.

Examples:
  python -m lcm_jax.export --model path/to/sd-pipeline --output exported/ --dtype fp16
  python -m lcm_jax.export --model runs/sd21_768 --output lcm-sd21/     # a training workdir
  python -m lcm_jax.export --model runs/sd21_768 --output lcm-sd21/ --overwrite   # replace it
"""

from __future__ import annotations

import time

from absl import flags

from lcm_jax import cli

FLAGS = flags.FLAGS
def define_flags() -> None:
  """The program's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("model", None, "Source: a diffusers pipeline folder, a Hugging Face Hub repo id, or a "
                      "training workdir (its latest checkpoint, written for LatentConsistencyModelPipeline).")
  flags.DEFINE_string("output", None, "Destination folder (created). A non-empty folder needs --overwrite.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output folder whole (written beside it, then "
                    "swapped in: no old file survives next to the new ones).")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "fp16", "bf16"], "Dtype of the written weights.")
  flags.DEFINE_string("variant", None, "Weights variant of the source, e.g. fp16.")
  flags.DEFINE_enum("params", "ema", ["ema", "online"], "For a workdir: the EMA target (default) or the student.")
  flags.mark_flags_as_required(["model", "output"])


def main(argv: list[str]) -> None:
  del argv
  from lcm_jax.load import load_pipeline
  from lcm_jax.sd_pipeline import check_output_folder, save_pipeline
  check_output_folder(FLAGS.output, FLAGS.overwrite)  # before the (slow) load
  start = time.perf_counter()
  print(f"loading {FLAGS.model} ...", flush=True)
  pipe = load_pipeline(FLAGS.model, variant=FLAGS.variant, params=FLAGS.params)
  print(f"writing {FLAGS.output} ({FLAGS.dtype}) ...", flush=True)
  save_pipeline(pipe, FLAGS.output, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)
  print(f"exported {', '.join(sorted(pipe.params))} to {FLAGS.output} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
