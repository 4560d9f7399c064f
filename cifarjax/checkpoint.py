"""Orbax checkpoints of a whole train state, resumed automatically from a workdir."""

import dataclasses
import pathlib

import jax
import orbax.checkpoint as ocp


def manager(workdir, keep: int | None) -> ocp.CheckpointManager:
  """Orbax's manager of `workdir/checkpoints`, keeping the latest `keep` (None: all)."""
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(mngr: ocp.CheckpointManager, like):
  """The latest saved state, laid out (shapes, dtypes, shardings) like `like`; None if none."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError) as e:
    try:
      return _restore_without_unset_fields(mngr, step, like, abstract)
    except (ValueError, KeyError):
      pass
    raise ValueError(
        f"checkpoint {mngr.directory}/{step} does not match this model and config "
        f"(is it a checkpoint of the other model?): {e}") from e


def _restore_without_unset_fields(mngr, step, like, abstract):
  """A state whose optional fields (None in `like`, e.g. a classifier's unused weight
  average) are absent from a checkpoint written before those fields existed. (Whether a
  field is set is part of a run's config, which a resume cannot change, so a checkpoint
  never holds a field that `like` leaves unset.)"""
  if not dataclasses.is_dataclass(like):
    raise ValueError("not a state dataclass")
  present = [f.name for f in dataclasses.fields(like) if getattr(like, f.name) is not None]
  if len(present) == len(dataclasses.fields(like)):
    raise ValueError("no unset fields")
  restored = mngr.restore(step, args=ocp.args.StandardRestore(
      {name: getattr(abstract, name) for name in present}))
  for name in present:
    if jax.tree.structure(restored[name]) != jax.tree.structure(getattr(like, name)):
      raise ValueError(f"{name} is laid out otherwise")
  return like.replace(**{name: restored[name] for name in present})


def load_latest(workdir, like):
  """The latest state in a workdir, laid out like `like`; FileNotFoundError if it has none."""
  mngr = manager(workdir, keep=None)  # reads only: no policy that could delete anything
  try:
    state = restore_latest(mngr, like)
  finally:
    mngr.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet")
  return state


def save(mngr: ocp.CheckpointManager, step: int, state):
  """Saves and waits: a checkpoint is either whole on disk or absent (orbax writes to a
  temporary folder and renames it when complete)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
