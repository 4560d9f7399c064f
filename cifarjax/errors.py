"""What the command line tells its user: mistakes, interruptions, notices and phase messages.

- `UserError`: a mistake in what was asked for or given (a flag, a file, a workdir),
  not a bug. `cifarjax` prints its message as one line, `cifarjax <command>: error:
  ...`, and exits 2; real bugs keep their traceback. It is a ValueError, so code that
  catches ValueError around the library keeps working.
- `Interrupted`: a signal stopped a command: Ctrl-C (SIGINT, exit 130) or SIGTERM (exit
  143), which schedulers, `timeout` and preempted VMs send; training stops at a step
  boundary with a checkpoint.
- `WriteError`: a file could not be written (a full disk, a quota, a permission): neither
  a mistake in the input nor a bug; the CLI prints its one line and exits 1.
- `Notice`: a warning about a result (e.g. FID from few images), one line on the CLI.
- `note(message)`: a phase message ("loading data ...", "resuming from step N ..."),
  logged at INFO on the "cifarjax" logger; the CLI prints it to stderr, a library
  caller sees it only if it configures logging.
"""

import contextlib
import logging
import os
import pathlib
import re
import signal
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
  """A command stopped before its end on request: by the signal `signum` (SIGINT: Ctrl-C;
  SIGTERM: a scheduler's time limit, `timeout`, a preempted VM) or, where signum is None,
  by a training time limit. Where `step` is set, training saved a checkpoint there (of
  `steps`). `exit_code` is the shell's for a process the signal ended: 128 + signum."""

  def __init__(self, step: int | None = None, steps: int | None = None,
               signum: int | None = signal.SIGINT):
    self.step, self.steps, self.signum = step, steps, signum
    what = ("interrupted" if signum == signal.SIGINT else "time limit reached" if signum is None
            else f"stopped by {signal.Signals(signum).name}")
    if step is None:
      super().__init__(f"{what}.")
    else:
      super().__init__(f"{what} at step {step} of {steps}; checkpoint saved. "
                       f"Run the same command to resume.")

  @property
  def exit_code(self) -> int:
    return 128 + (self.signum or signal.SIGINT)


def raise_interrupted(signum, frame=None):
  """A signal handler: raises `Interrupted` for the signal (as Python's own SIGINT handler
  raises KeyboardInterrupt), so that what a command opened is closed on the way out."""
  del frame
  raise Interrupted(signum=signum)


class WriteError(Exception):
  """`path` could not be written: `reason` is the system's (e.g. "No space left on device").
  `then` says what was kept and what to do."""

  def __init__(self, path, reason: str, then: str = ""):
    self.path, self.reason, self.then = pathlib.Path(path), reason, then
    super().__init__(f"cannot write {path}: {reason}" + (f"; {then}" if then else ""))


@contextlib.contextmanager
def writing(path):
  """Turns an OSError raised inside into a `WriteError` naming `path`, the file or folder
  being written (an error from a `write` call names no file)."""
  try:
    yield
  except OSError as e:
    if e.errno is None:
      raise
    raise WriteError(path, os.strerror(e.errno)) from e


class Notice(UserWarning):
  """A warning about the meaning of a result; the CLI prints it as one line."""


def main_process() -> bool:
  """Whether this is the process that speaks for a run (process 0 where JAX runs many;
  read without importing JAX)."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_count() == 1 or jax.process_index() == 0


def note(message: str):
  """A phase message for the person waiting (process 0 only where JAX runs many)."""
  if main_process():
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
