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

import os
import re
import sys

from absl import app, flags, logging

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
  """absl flag parsing with every error as one line (config_flags reports an unknown
  `--config.key` with a traceback, and absl a bad value on two lines). Returns the
  arguments left: the program name and any positional arguments."""
  config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_arg is not None and not os.path.isfile(config_arg.split(":")[0]):
    cli.fail(f"config file {config_arg.split(':')[0]} does not exist")
  app.define_help_flags()  # --help, --helpshort, ... (app.run would define them only after this parse)
  try:
    with cli.help_exits_zero():
      rest = flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(f"{e} (see --help)")
  except (AttributeError, KeyError) as e:  # config_flags: a --config.a.b naming no key
    cli.fail(unknown_key_message(str(e), argv))
  except Exception as e:  # noqa: BLE001  config_flags raises TypeError/ValueError for bad values
    cli.fail(f"bad flags: {' '.join(str(e).split())}")
  if flags.FLAGS.workdir is None:
    cli.fail("--workdir is required")
  return rest


def unknown_key_message(error: str, argv: list[str]) -> str:
  """One line naming the `--config.` flag whose key does not exist (from config_flags' error text)."""
  text = error.replace("\\n", " ").replace("\\", "")
  name = re.search(r"'(\w+)'", text)
  name = name.group(1) if name else ""
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and name in a.split("=")[0].split(".")), "a --config. flag")
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  return f"unknown config key {flag}" + (f' (did you mean "{suggestion.group(1)}"?)' if suggestion else "")


if __name__ == "__main__":
  # Flags are parsed here, so that their errors are one line; cli.run (which reports
  # LcmJaxError as one line) gets only the program name and any positional arguments.
  _config_flag = define_flags()
  sys.argv = parse_flags(sys.argv)
  cli.run(lambda argv: main(_config_flag))
