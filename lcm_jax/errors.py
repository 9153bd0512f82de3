"""User-facing errors.

Every error a user can cause (a bad flag, a missing file, an unsupported model option) is
raised as a subclass of `LcmJaxError`. The command-line programs print its message as one
line on stderr and exit with status 2, with no traceback.
"""

import os


class LcmJaxError(Exception):
  """An error caused by the user's input, with a message that says what to do."""


class UnsupportedConfigError(LcmJaxError):
  """A model `config.json` asks for an option this implementation does not have."""


class WeightsError(LcmJaxError):
  """Weights that do not match the model they are loaded into, or cannot be read."""


def check_can_be_folder(path: str, name: str = "") -> None:
  """Raises LcmJaxError unless `path` is a folder or can be made one: neither it nor its
  nearest existing parent is a file. `name` (e.g. "--output") starts the message."""
  label = f"{name} {path}" if name else path
  if os.path.exists(path) and not os.path.isdir(path):
    raise LcmJaxError(f"{label} is a file, not a folder")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise LcmJaxError(f"{label} cannot be created: {parent} is a file")
