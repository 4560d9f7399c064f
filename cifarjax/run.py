"""What both trainers do around `loop.run`: open a workdir, write what a run leaves
there, and read a trained run back.

A workdir holds one run: config.json (the config that made it), classes.json,
metrics.jsonl, checkpoints/, summary.json and a plot. Everything about the
inputs is checked before the first file is written, so a rejected start
leaves nothing that would block the corrected command.

An exported folder (`export_weights`) holds one set of a run's weights instead of
checkpoints: config.json, classes.json, summary.json and weights.npz, a few MB
that the sampling and evaluation commands read as they read a workdir.
"""

import pathlib

import jax
import numpy as np

from cifarjax import config as config_lib, loop, mesh as mesh_lib, runlog
from cifarjax.errors import UserError, UserFileNotFoundError, writing


def open_workdir(config, workdir, mesh=None, batch_fields=("batch_size",)):
  """(config, workdir, mesh) once every check passed: the config's values, the workdir
  (empty, or holding this run: another recipe is refused), and each batch-size field
  divisible over the mesh's devices. Writes nothing. The config comes back with its
  data path made absolute, so config.json names the same data from anywhere."""
  config = config_lib.with_absolute_data(config_lib.validate(config))
  workdir = pathlib.Path(workdir)
  if is_export(workdir):
    raise UserError(f"{workdir} holds exported weights, not a run to train or resume; "
                    f"use another --workdir")
  config_lib.check_resumable(workdir, config)
  mesh = mesh or mesh_lib.make_mesh()
  for field in batch_fields:
    config_lib.check_divisible(field, getattr(config, field), mesh.size)
  return config, workdir, mesh


def write_start(workdir: pathlib.Path, config, class_names):
  """Creates the workdir and writes config.json and classes.json (process 0 only). A resume
  keeps config.json's record of the registry entries' code as the run started with it."""
  with writing(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    path = workdir / "config.json"
    record = config_lib.read_saved(path)[2] if path.exists() else None
    config_lib.save_json(config, path, record)
    runlog.write_json(workdir / "classes.json", list(class_names))


def loop_settings(config) -> loop.LoopSettings:
  """The run-control part of a config, as `loop.run` takes it."""
  return loop.LoopSettings(config.steps, config.batch_size, config.log_every,
                           config.eval_every, config.checkpoint_every,
                           config.keep_checkpoints, config.steps_per_call)


def write_summary(workdir: pathlib.Path, summary: dict, mesh, plot) -> dict:
  """summary.json with the devices and JAX version added, and `plot(workdir)`'s figure
  (process 0 only). Returns the summary written."""
  summary = {**summary, "devices": mesh_lib.describe_devices(mesh),
             "jax_version": jax.__version__}
  if jax.process_index() == 0:
    runlog.write_json(workdir / "summary.json", summary)
    plot(workdir)
  return summary


def read_run(workdir, config_cls, train_command: str):
  """(config, class_names) of the trained run in `workdir`, checked to be a `config_cls`
  run with a checkpoint, or an exported folder (before a model is built: that takes
  seconds), its modules imported; a Notice for each registry entry whose code changed
  since it started."""
  from cifarjax import checkpoint
  workdir = pathlib.Path(workdir)
  what = f"{config_lib.RUN_KINDS[config_cls.__name__]} run"
  config = config_lib.load_run_config(workdir, config_cls, what, train_command,
                                      note_changes=True)
  if not is_export(workdir) and checkpoint.latest_step(workdir) is None:
    raise UserFileNotFoundError(
        f"{workdir}/checkpoints holds no checkpoint yet: its run stopped before its first; "
        f"train it with `cifarjax {train_command} --workdir {workdir}` and the settings in "
        f"its config.json")
  return config, tuple(runlog.read_json(workdir / "classes.json"))


def restore_latest(workdir, like, mismatch: str):
  """The latest checkpoint in `workdir`, restored into the structure and shardings of
  `like`; where it does not fit, a UserError `mismatch` (orbax's own message lists the
  whole tree: kilobytes, unreadable)."""
  from cifarjax import checkpoint
  try:
    return checkpoint.load_latest(pathlib.Path(workdir), like)
  except ValueError as e:
    raise UserError(mismatch) from e


WEIGHTS_FILE = "weights.npz"  # an exported folder's weights: one array per parameter path


def is_export(workdir) -> bool:
  return (pathlib.Path(workdir) / WEIGHTS_FILE).is_file()


def exported_weights(workdir) -> str | None:
  """Which weights ("ema" or "raw") an exported folder holds; None for a training workdir."""
  if not is_export(workdir):
    return None
  return runlog.read_json(pathlib.Path(workdir) / "summary.json")["exported_weights"]


def export_weights(workdir, out, params, step: int, weights_from: str):
  """Writes the folder `out`: the run's config.json and classes.json, its summary.json with
  the exported step and weights added, and weights.npz holding `params` as float32 arrays
  named by their paths ("Down_0/Conv_0/kernel"), readable without cifarjax."""
  from flax import traverse_util
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise UserError(f"--out {out} is not empty; name a new folder")
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  summary_path = workdir / "summary.json"
  summary = runlog.read_json(summary_path) if summary_path.exists() else {}
  with writing(out):
    out.mkdir(parents=True, exist_ok=True)
  for name in ("config.json", "classes.json"):
    runlog.write_text(out / name, (workdir / name).read_text())
  runlog.write_json(out / "summary.json", {**summary, "exported_step": step,
                                           "exported_weights": weights_from})
  tmp = out / (WEIGHTS_FILE + ".tmp.npz")
  try:
    with writing(out / WEIGHTS_FILE):
      np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
      tmp.replace(out / WEIGHTS_FILE)
  finally:
    tmp.unlink(missing_ok=True)


def load_exported(workdir, like_params, mismatch: str):
  """(params laid out like `like_params`, the exported step, which weights they are) of an
  exported folder; a UserError `mismatch` where the arrays do not fit."""
  from flax import traverse_util
  workdir = pathlib.Path(workdir)
  want = traverse_util.flatten_dict(like_params, sep="/")
  with np.load(workdir / WEIGHTS_FILE, allow_pickle=False) as npz:
    got = {k: npz[k] for k in npz.files}
  if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
    raise UserError(mismatch)
  params = traverse_util.unflatten_dict(
      {k: jax.device_put(got[k].astype(want[k].dtype), want[k].sharding) for k in want}, sep="/")
  summary = runlog.read_json(workdir / "summary.json")
  return params, summary["exported_step"], summary["exported_weights"]
