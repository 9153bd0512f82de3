"""User-facing errors.

Every error a user can cause (a bad flag, a missing file, an unsupported model option) is
raised as a subclass of `LcmJaxError`. The command-line programs print its message as one
line on stderr and exit with status 2, with no traceback.
"""


class LcmJaxError(Exception):
  """An error caused by the user's input, with a message that says what to do."""


class UnsupportedConfigError(LcmJaxError):
  """A model `config.json` asks for an option this implementation does not have."""


class WeightsError(LcmJaxError):
  """Weights that do not match the model they are loaded into, or cannot be read."""
