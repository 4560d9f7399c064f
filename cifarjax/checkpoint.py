"""Orbax checkpoints of a whole train state, resumed automatically from a workdir."""

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
    raise ValueError(
        f"checkpoint {mngr.directory}/{step} does not match this model and config "
        f"(is it a checkpoint of the other model?): {e}") from e


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
