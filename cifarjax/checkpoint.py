"""Orbax checkpoints of a whole train state, resumed automatically from a workdir."""

import dataclasses
import os
import pathlib
import re
import sys

import jax
import orbax.checkpoint as ocp

from cifarjax.errors import WriteError

# How tensorstore's errors (which orbax raises as ValueErrors) carry the system's error.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, minus its own look at JAX's preemption sync, which `loop.run` keeps
  (with call counters, where orbax would pass step numbers)."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def manager(workdir, keep: int | None, cleanup: bool = False) -> ocp.CheckpointManager:
  """Orbax's manager of `workdir/checkpoints`, keeping the latest `keep` (None: all).
  cleanup: remove the partial checkpoints of runs that were stopped mid-write (only a
  trainer, which no other process writes beside, may)."""
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  return _Manager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup))


def restore_latest(mngr: ocp.CheckpointManager, like):
  """The latest saved state, laid out (shapes, dtypes, shardings) like `like`; None if none.
  A checkpoint of an earlier layout (`_restore_earlier_layout`) restores too."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError) as e:
    for renamed in (False, True):
      try:
        return _restore_earlier_layout(mngr, step, like, abstract, renamed)
      except (ValueError, KeyError):
        pass
    raise ValueError(
        f"checkpoint {mngr.directory}/{step} does not match this model and config "
        f"(is it a checkpoint of the other model?): {e}") from e


# The generator's state kept the average of its parameters as `ema_params` (the params
# alone), where `ema` now holds it as the model's variables, {"params": ...}.
_EMA_PARAMS = "ema_params"


def _restore_earlier_layout(mngr, step, like, abstract, renamed: bool):
  """A state as an earlier version wrote it: without the optional fields that `like` leaves
  unset (None, e.g. a classifier's unused weight average, absent from checkpoints written
  before those fields existed), and where `renamed`, with the average as `ema_params`.
  (Whether a field is set is part of a run's config, which a resume cannot change, so a
  checkpoint never holds a field that `like` leaves unset.)"""
  if not dataclasses.is_dataclass(like):
    raise ValueError("not a state dataclass")
  present = [f.name for f in dataclasses.fields(like) if getattr(like, f.name) is not None]
  saved = {name: getattr(abstract, name) for name in present}
  if renamed:
    if set(saved.get("ema") or ()) != {"params"}:
      raise ValueError("no average of the params alone")
    saved[_EMA_PARAMS] = saved.pop("ema")["params"]
  elif len(present) == len(dataclasses.fields(like)):
    raise ValueError("no unset fields")
  restored = dict(mngr.restore(step, args=ocp.args.StandardRestore(saved)))
  if renamed:
    restored["ema"] = {"params": restored.pop(_EMA_PARAMS)}
  for name in present:
    if jax.tree.structure(restored[name]) != jax.tree.structure(getattr(like, name)):
      raise ValueError(f"{name} is laid out otherwise")
  return like.replace(**{name: restored[name] for name in present})


def _reader(workdir) -> ocp.CheckpointManager:
  """Orbax's manager of `workdir/checkpoints` for reading: it creates, deletes and cleans
  nothing (a trainer may be writing beside it)."""
  return _Manager(pathlib.Path(workdir).resolve() / "checkpoints",
                  options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def latest_step(workdir) -> int | None:
  """The step of the latest complete checkpoint in a workdir (None: none yet), read
  without building any state."""
  mngr = _reader(workdir)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def load_latest(workdir, like):
  """The latest state in a workdir, laid out like `like`; FileNotFoundError if it has none."""
  mngr = _reader(workdir)
  try:
    state = restore_latest(mngr, like)
  finally:
    mngr.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet")
  return state


def write_failure(e: BaseException) -> str | None:
  """The system's reason (e.g. "No space left on device") where `e`, or an error behind it,
  is a failed write: an OSError, or tensorstore's error that carries one; else None."""
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return os.strerror(e.errno)
    code = _OS_ERROR_CODE.search(str(e))
    if code:
      return os.strerror(int(code.group(1)))
    e = e.__cause__ or e.__context__
  return None


class _DropClosedLoopReports:
  """A sys.unraisablehook that drops what tensorstore reports of each write that ends
  after orbax closed the event loop waiting for it (orbax stops at the first failed
  write: a full disk gave one "Event loop is closed" traceback per array), and passes
  anything else on to the hook it replaced."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      self.previous(report)


def save(mngr: ocp.CheckpointManager, step: int, state):
  """Saves and waits: a checkpoint is either whole on disk or absent (orbax writes to a
  temporary folder and renames it when complete). A write that fails (a full disk, a
  quota, a permission) raises `errors.WriteError` naming the checkpoint and the cause;
  the latest complete checkpoint stays as it was."""
  if not isinstance(sys.unraisablehook, _DropClosedLoopReports):
    sys.unraisablehook = _DropClosedLoopReports(sys.unraisablehook)
  kept = mngr.latest_step()
  try:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()
  except Exception as e:
    reason = write_failure(e)
    if reason is None:
      raise
    then = (f"the checkpoint of step {kept} is intact" if kept is not None
            else "no checkpoint was saved")
    raise WriteError(mngr.directory / str(step), reason,
                     f"{then}; make room (or fix the cause), then run the same command to "
                     f"resume") from e


def close(mngr: ocp.CheckpointManager):
  """Waits for orbax's background work and closes the manager; a save that failed was
  reported by `save`, and is not raised again here."""
  try:
    mngr.wait_until_finished()
    mngr.close()
  except Exception as e:
    if write_failure(e) is None:
      raise
