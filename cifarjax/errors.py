"""What the command line tells its user: mistakes, interruptions, notices and phase messages.

- `UserError`: a mistake in what was asked for or given (a flag, a file, a workdir),
  not a bug. `cifarjax` prints its message as one line, `cifarjax <command>: error:
  ...`, and exits 2; real bugs keep their traceback. It is a ValueError, so code that
  catches ValueError around the library keeps working.
- `Interrupted`: Ctrl-C stopped a training run cleanly (exit 130).
- `Notice`: a warning about a result (e.g. FID from few images), one line on the CLI.
- `note(message)`: a phase message ("loading data ...", "resuming from step N ..."),
  logged at INFO on the "cifarjax" logger; the CLI prints it to stderr, a library
  caller sees it only if it configures logging.
"""

import logging
import pathlib
import re
import sys

log = logging.getLogger("cifarjax")

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
MAX_MESSAGE_CHARS = 2000
_OBJECT_ADDRESS = re.compile(r"\s*<[^<>]*? at 0x[0-9a-fA-F]+>")


class UserError(ValueError):
  """A mistake in the input; its message says what to change."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A named file or folder is missing (a FileNotFoundError too)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped a training run after saving a checkpoint at `step` (of `steps`)."""

  def __init__(self, step: int, steps: int):
    self.step, self.steps = step, steps
    super().__init__(f"interrupted at step {step} of {steps}; checkpoint saved. "
                     f"Run the same command to resume.")


class Notice(UserWarning):
  """A warning about the meaning of a result; the CLI prints it as one line."""


def note(message: str):
  """A phase message for the person waiting (process 0 only where JAX runs many)."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1 and jax.process_index() != 0:
    return
  log.info(message)


def clean_message(e: BaseException) -> str:
  """str(e) without Python object addresses ('<_io.BytesIO object at 0x7f...>')."""
  return _OBJECT_ADDRESS.sub("", str(e))


def one_line(e: BaseException) -> str:
  """The exception's message on one line, at most MAX_MESSAGE_CHARS long."""
  text = " ".join(clean_message(e).split())
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  if len(text) > MAX_MESSAGE_CHARS:
    text = text[:MAX_MESSAGE_CHARS] + " [...]"
  return text


def _raised_in_package(e: BaseException) -> bool:
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  try:
    return pathlib.Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
  except (OSError, ValueError):
    return False


def is_user_facing(e: BaseException) -> bool:
  """Whether the CLI shows `e` as one line instead of a traceback: a UserError; an
  OSError about a named file (missing, unreadable, a folder where a file goes); or a
  ValueError / FileNotFoundError / FloatingPointError that cifarjax's own code raised
  with a message (the innermost frame is in the package, not in a library)."""
  if isinstance(e, UserError):
    return True
  if isinstance(e, OSError) and getattr(e, "filename", None):
    return True
  return isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)) and \
      _raised_in_package(e)
