"""The `cifarjax` command line: a thin layer over the library.

Each group of subcommands lives in `cifarjax/commands/<group>.py` and exposes
`register(subparsers)`; a subcommand's parser sets `func(args) -> int|None`.

Every command takes `--import MODULE` (repeatable) and loads the `cifarjax.plugins` entry
points first (`cifarjax.plugins`), so variants of one's own are registered before the
command checks its options; a command on a workdir imports the modules its config.json
records too. `main(argv)` runs a command in the calling process, changing none of its
settings (a script that registered variants itself can call it); `run()` is the
`cifarjax` command, which restarts its process with malloc settings for XLA's CPU
buffers where JAX will run on the CPU (`reexec_with_huge_pages`).

Mistakes in the input (`errors.UserError`, and the messages cifarjax's own code
raises) print as one line `cifarjax <command>: error: ...` with exit code 2; a
file that cannot be written (`errors.WriteError`: a full disk, a quota) one line
with exit code 1; Ctrl-C (SIGINT) and SIGTERM print one line and exit 130 and 143;
real bugs keep their traceback. Phase messages and notices go to stderr, results
to stdout.
"""

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import signal
import sys
import threading
import warnings

from cifarjax import __version__, errors

# Imported lazily so that `cifarjax --help` does not pay for importing JAX.
COMMAND_MODULES = (
    "cifarjax.commands.classifier",
    "cifarjax.commands.info",
    "cifarjax.commands.fid",
    "cifarjax.commands.diffusion",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each option's default, except where there is none to show (None, False, []), and
  writes a help given as a function when it is shown."""

  def _format_action(self, action):
    if callable(action.help):  # written when shown: `commands.registered_help`
      action = copy.copy(action)
      action.help = action.help()
    return super()._format_action(action)

  def _get_help_string(self, action):
    if action.default is None or action.default is False or action.default == []:
      return action.help or ""
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cifarjax", formatter_class=HelpFormatter,
      description="Efficient CIFAR-100 modelling in JAX: classifier, diffusion generator, FID.")
  parser.add_argument("--version", action="version", version=f"cifarjax {__version__}")
  subparsers = parser.add_subparsers(
      dest="command", required=True, metavar="COMMAND",
      parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
  for name in COMMAND_MODULES:
    importlib.import_module(name).register(subparsers)
  from cifarjax.commands import import_flag
  for subparser in subparsers.choices.values():
    import_flag(subparser)
  return parser


class _StderrHandler(logging.Handler):
  """Phase messages as `cifarjax <command>: ...` lines, written around any progress bar."""

  def __init__(self, prefix: str):
    super().__init__(logging.INFO)
    self.prefix = prefix

  def emit(self, record):
    try:
      from tqdm import tqdm
      level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
      tqdm.write(f"{self.prefix}: {level}{record.getMessage()}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


# Libraries' logs kept out of a command's output: absl's (orbax's progress notes, and the
# traceback of each of its writer threads when a disk is full) and asyncio's (orbax's
# writes that were still pending then, reported as the process exits). What goes wrong
# reaches the command as an exception.
QUIET_LOGGERS = ("absl", "asyncio")


def route_messages(prefix: str):
  """Routes the "cifarjax" logger and `errors.Notice` warnings to stderr as `prefix: ...`
  lines, and keeps QUIET_LOGGERS quiet; returns the function that undoes it. A script
  that imports cifarjax calls it once to show what `cifarjax` commands show."""
  logger, quiet = logging.getLogger("cifarjax"), [logging.getLogger(n) for n in QUIET_LOGGERS]
  handler = _StderrHandler(prefix)
  saved = logger.level, logger.propagate, [q.level for q in quiet]
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  for q in quiet:
    q.setLevel(logging.CRITICAL)
  show = warnings.showwarning

  def show_notice(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, errors.Notice):
      logger.warning(str(message))
    else:
      show(message, category, filename, lineno, file, line)

  warnings.showwarning = show_notice

  def undo():
    warnings.showwarning = show
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    for q, level in zip(quiet, saved[2]):
      q.setLevel(level)
  return undo


@contextlib.contextmanager
def _messages_to_stderr(prefix: str):
  """`route_messages` for one command."""
  undo = route_messages(prefix)
  try:
    yield
  finally:
    undo()


@contextlib.contextmanager
def _sigterm_interrupts():
  """SIGTERM raises `errors.Interrupted` while a command runs, as Ctrl-C raises
  KeyboardInterrupt, so that it stops with one line and what it opened is closed (a
  training loop takes the signal over to stop at a step boundary). Where SIGTERM has a
  handler of the caller's, that one stays."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
    yield
    return
  signal.signal(signal.SIGTERM, errors.raise_interrupted)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _imports_named(argv) -> list[str]:
  """The modules `--import MODULE` / `--import=MODULE` name in argv."""
  named = [b for a, b in zip(argv, argv[1:]) if a == "--import"]
  return named + [a.split("=", 1)[1] for a in argv if a.startswith("--import=")]


def _run(argv) -> int | None:
  from cifarjax import plugins
  plugins.load_entry_points()
  if "-h" in argv or "--help" in argv:  # the help lists what the imports register
    plugins.import_modules(_imports_named(argv))
  args = build_parser().parse_args(argv)
  plugins.import_modules(args.imports)
  if getattr(args, "workdir", None):
    plugins.import_recorded(args.workdir)
  return args.func(args)


def main(argv=None) -> int:
  """Runs `cifarjax argv...` in this process and returns its exit code."""
  argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
  command = argv[0] if argv and not argv[0].startswith("-") else ""
  return run_reporting(f"cifarjax {command}".strip(), lambda: _run(argv),
                       resumable=command.startswith("train-"))


def run_reporting(prefix: str, call, resumable: bool) -> int:
  """Runs `call()` as every cifarjax command runs and returns its exit code: messages on
  stderr as `prefix: ...` lines, SIGTERM stopping it as Ctrl-C does, and a stop, a failed
  write or a mistake in the input reported in one line (exit 130/143, 1, 2); a bug keeps
  its traceback. resumable: a stop that saved no checkpoint says that the same command
  resumes from the latest one."""
  with _messages_to_stderr(prefix), _sigterm_interrupts():
    try:
      return call() or 0
    except KeyboardInterrupt as e:
      stopped = e if isinstance(e, errors.Interrupted) else errors.Interrupted()
      resume = (" Run the same command to resume from the latest checkpoint."
                if stopped.step is None and resumable else "")
      print(f"{prefix}: {stopped}{resume}", file=sys.stderr)
      return stopped.exit_code
    except errors.WriteError as e:
      print(f"{prefix}: error: {e}", file=sys.stderr)
      return 1
    except Exception as e:
      if not errors.is_user_facing(e):
        raise  # a bug: its traceback is what a report needs
      print(f"{prefix}: error: {errors.one_line(e)}", file=sys.stderr)
      return 2


# XLA:CPU takes all of a call's buffers as one large block from malloc. glibc serves it
# in fresh 4 KiB pages unless asked for huge pages. And as a worker thread allocates it,
# glibc maps it afresh and unmaps it after every call, so each step faults in and zeroes
# it again; run on the main thread instead (`keep_call_buffers`), it comes from the main
# heap, which these settings never unmap or shrink (docs/benchmarks.md). glibc reads them
# only at process start. On a GPU or TPU the step's buffers live on the device: there the
# settings would only hold on to host memory.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0"
                   ":glibc.malloc.trim_threshold=4294967295")
# The TPU runtime, which JAX loads without a plugin entry point.
TPU_RUNTIME_MODULE = "libtpu"


def accelerator_plugins() -> list[str]:
  """The GPU and TPU runtimes installed for JAX to find, without importing JAX: its PJRT
  plugins (entry points of the group "jax_plugins" and modules of the namespace package
  jax_plugins, as jax_cuda12_plugin installs) and libtpu."""
  found = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and namespace.submodule_search_locations:
    found += [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
  if importlib.util.find_spec(TPU_RUNTIME_MODULE) is not None:
    found.append(TPU_RUNTIME_MODULE)
  return found


def cpu_backend_expected(environ=None, plugins=accelerator_plugins) -> bool:
  """Whether JAX's default backend in a process with the environment `environ` (default:
  this one's) will be the CPU, decided without starting a backend: where JAX_PLATFORMS (or
  the older JAX_PLATFORM_NAME) is set, whether the first platform it lists is cpu; else
  whether no GPU or TPU runtime is installed (`plugins()` lists none)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not plugins()


def reexec_with_huge_pages(python_args):
  """Replaces this process by `python python_args...` with MALLOC_TUNABLES.

  Does so on Linux with glibc where JAX's backend will be the CPU (`cpu_backend_expected`),
  unless GLIBC_TUNABLES is already set (then it is left as the user set it) or
  CIFARJAX_HUGE_PAGES=0; else returns and nothing changes. Call it first thing, before any
  work a second start would repeat.
  """
  if (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
      and "GLIBC_TUNABLES" not in os.environ and os.environ.get("CIFARJAX_HUGE_PAGES") != "0"
      and cpu_backend_expected()):
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, *python_args], env)


def keep_call_buffers():
  """In a process started with MALLOC_TUNABLES, runs single-device CPU computations
  on the calling thread, so that glibc reuses their buffers from call to call.

  Python then waits for each call instead of queueing the next; the training loops
  do no host work worth overlapping. Must run before JAX's CPU backend starts.
  """
  if os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES:
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def run():
  """The `cifarjax` command: `main()` in a process started with MALLOC_TUNABLES where JAX
  runs on the CPU, its CPU calls then on the main thread (`keep_call_buffers`), and its
  QUIET_LOGGERS quiet to its end (orbax's pending writes are reported as it exits)."""
  reexec_with_huge_pages(["-m", "cifarjax", *sys.argv[1:]])
  keep_call_buffers()
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  sys.exit(main())


if __name__ == "__main__":
  run()
