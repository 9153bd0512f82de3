"""Writes a model as a diffusers pipeline folder that PyTorch diffusers loads.

Example:
  python -m lcm_jax.export --model path/to/sd-pipeline --output exported/ --dtype fp16
"""

from __future__ import annotations

import time

from absl import flags

from lcm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Source: a diffusers pipeline folder or a Hugging Face Hub repo id.")
flags.DEFINE_string("output", None, "Destination folder (created; existing files are overwritten).")
flags.DEFINE_enum("dtype", "fp32", ["fp32", "fp16", "bf16"], "Dtype of the written weights.")
flags.DEFINE_string("variant", None, "Weights variant of the source, e.g. fp16.")
flags.mark_flags_as_required(["model", "output"])


def main(argv: list[str]) -> None:
  del argv
  from lcm_jax.pipeline import load_pipeline, save_pipeline
  start = time.perf_counter()
  print(f"loading {FLAGS.model} ...", flush=True)
  pipe = load_pipeline(FLAGS.model, variant=FLAGS.variant)
  print(f"writing {FLAGS.output} ({FLAGS.dtype}) ...", flush=True)
  save_pipeline(pipe, FLAGS.output, dtype=FLAGS.dtype)
  print(f"exported {', '.join(sorted(pipe.params))} to {FLAGS.output} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  cli.run(main)
