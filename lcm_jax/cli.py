"""What every lcm-jax command-line program shares: flag parsing and error reporting.

A user error (`LcmJaxError`) is printed as one line, `error: <message>`, on stderr and the
program exits with status 2, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator

from absl import app, flags

from lcm_jax.errors import LcmJaxError


def define_hub_flags(token_use: str = "a gated or private --model") -> None:
  """--variant, --revision and --token: what a Hugging Face Hub --model downloads, and how.
  Defined as the calling program's flags, so that its --help lists them."""
  caller = sys._getframe(1).f_globals["__name__"]
  caller = sys.argv[0] if caller == "__main__" else caller  # how absl names the main module
  define = functools.partial(flags.DEFINE_string, module_name=caller)
  define("variant", None, "Weights variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors); "
                      "for a hub id only that variant's files are downloaded.")
  define("revision", None, "Hub revision of a --model hub id: a branch, tag or commit hash (default main).")
  define("token", None, f"Hub token for {token_use} (default: the HF_TOKEN environment variable or "
                      "the token saved by `hf auth login`).")


def fail(message: str) -> None:
  """Prints `message` as the single error line and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, with user errors reported as one line and exit status 2."""

  def guarded(argv: list[str]) -> None:
    if len(argv) > 1:
      fail(f"unexpected positional arguments: {' '.join(argv[1:])} (flags look like --name=value)")
    try:
      main(argv)
    except LcmJaxError as e:
      fail(str(e).replace("\n", " "))  # one line, even for multi-line messages
    except KeyboardInterrupt:
      fail("interrupted")

  with help_exits_zero():
    app.run(guarded, flags_parser=_parse_or_fail)


def _parse_or_fail(argv: list[str]) -> list[str]:
  """absl's flag parsing with a bad flag or value as one `error:` line and exit 2 (absl
  itself prints two lines and exits 1). Flags already parsed (the config programs parse
  theirs first) are not parsed again."""
  if flags.FLAGS.is_parsed():
    return argv
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --help)")


@contextlib.contextmanager
def help_exits_zero() -> Iterator[None]:
  """absl exits with status 1 after printing --help; asking for help is not an error."""
  try:
    yield
  except SystemExit as e:
    if e.code == 1 and any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in sys.argv[1:]):
      sys.exit(0)
    raise


def parse_flags_with_config(argv: list[str]) -> list[str]:
  """absl flag parsing for programs with a `--config` file flag (ml_collections' config_flags),
  with every error as one line: config_flags reports an unknown `--config.key` with a
  traceback, and absl a bad value on two lines. Returns the arguments left: the program name
  and any positional arguments."""
  config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_arg is not None and not os.path.isfile(config_arg.split(":")[0]):
    fail(f"config file {config_arg.split(':')[0]} does not exist")
  app.define_help_flags()  # --help, --helpshort, ... (app.run would define them only after this parse)
  try:
    with help_exits_zero():
      return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --help)")
  except (AttributeError, KeyError) as e:  # config_flags: a --config.a.b naming no key
    fail(_unknown_config_key_message(str(e), argv))
  except Exception as e:  # noqa: BLE001  config_flags raises TypeError/ValueError for bad values
    fail(f"bad flags: {' '.join(str(e).split())}")


def _unknown_config_key_message(error: str, argv: list[str]) -> str:
  """One line naming the `--config.` flag whose key does not exist (from config_flags' error text)."""
  text = error.replace("\\n", " ").replace("\\", "")
  name = re.search(r"'(\w+)'", text)
  name = name.group(1) if name else ""
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and name in a.split("=")[0].split(".")), "a --config. flag")
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  return f"unknown config key {flag}" + (f' (did you mean "{suggestion.group(1)}"?)' if suggestion else "")
