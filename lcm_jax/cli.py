"""What every lcm-jax command-line program shares: flag parsing and error reporting.

A user error (`LcmJaxError`) is printed as one line, `error: <message>`, on stderr and the
program exits with status 2, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from absl import app

from lcm_jax.errors import LcmJaxError


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
    app.run(guarded)


@contextlib.contextmanager
def help_exits_zero() -> Iterator[None]:
  """absl exits with status 1 after printing --help; asking for help is not an error."""
  try:
    yield
  except SystemExit as e:
    if e.code == 1 and any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in sys.argv[1:]):
      sys.exit(0)
    raise
