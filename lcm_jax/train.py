r"""Trains a latent consistency model: distillation (LCD) or fine-tuning (LCF).

    python -m lcm_jax.train --config=configs/sd21_768.py --workdir=runs/sd21_768 \
        --config.data.path='/data/laion/{00000..01210}.tar' [--config.a.b=value ...]
    python -m lcm_jax.train --config=configs/sd21_768.py:runlocal --workdir=/tmp/run \
        --config.teacher=path/to/tiny-pipeline --config.data.path=path/to/images   # CPU-sized

The same command runs on one CPU, one GPU or every host of a TPU pod (see launch/). A
restart with the same workdir resumes from its latest checkpoint (parameters, EMA target,
optimiser, step, random key and data position), and SIGTERM (preemption) saves a checkpoint
at the next step boundary and exits cleanly. Everything lands in the workdir (layout in
`lcm_jax.workdir`). This module only parses the command line; the run is
`lcm_jax.training.train(config, workdir)`.
"""

from __future__ import annotations

import sys

from absl import flags, logging

from lcm_jax import cli


def define_flags():
  """The program's flags (defined when it runs, not when it is imported). Returns the config flag."""
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      "config", None, "Training config: a Python file with get_config(arg), e.g. configs/sd21_768.py, "
      "configs/sd21_768.py:runlocal (a CPU-sized run) or configs/toy.py:lcf. Override any key with "
      "--config.a.b=value.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard events, samples and the "
                      "model's configs. Re-running with the same workdir resumes the run.")
  return config


def main(config_flag) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from lcm_jax.errors import LcmJaxError
  try:
    config = config_flag.value
    config.keys()  # a config file that failed to load raises here
  except (IOError, AttributeError, ValueError) as e:
    raise LcmJaxError(f"cannot load --config: {e}") from None
  if config is None:
    raise LcmJaxError("--config is required, e.g. --config=configs/tiny.py")
  from lcm_jax.training import train
  train(config, flags.FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """The flags, every error as one line; returns the program name and positional arguments."""
  rest = cli.parse_flags_with_config(argv)
  if flags.FLAGS.workdir is None:
    cli.fail("--workdir is required")
  return rest


if __name__ == "__main__":
  # Flags are parsed here, so that their errors are one line; cli.run (which reports
  # LcmJaxError as one line) gets only the program name and any positional arguments.
  _config_flag = define_flags()
  sys.argv = parse_flags(sys.argv)
  cli.run(lambda argv: main(_config_flag))
