"""What both trainers do around `loop.run`: open a workdir, write what a run leaves
there, and read a trained run back.

A workdir holds one run: config.json (the config that made it), classes.json,
metrics.jsonl, checkpoints/, summary.json and a plot. Everything about the
inputs is checked before the first file is written, so a rejected start
leaves nothing that would block the corrected command.
"""

import pathlib

import jax

from cifarjax import config as config_lib, loop, mesh as mesh_lib, runlog
from cifarjax.errors import UserError


def open_workdir(config, workdir, mesh=None, batch_fields=("batch_size",)):
  """(config, workdir, mesh) once every check passed: the config's values, the workdir
  (empty, or holding this run: another recipe is refused), and each batch-size field
  divisible over the mesh's devices. Writes nothing. The config comes back with its
  data path made absolute, so config.json names the same data from anywhere."""
  config = config_lib.with_absolute_data(config_lib.validate(config))
  workdir = pathlib.Path(workdir)
  config_lib.check_resumable(workdir, config)
  mesh = mesh or mesh_lib.make_mesh()
  for field in batch_fields:
    config_lib.check_divisible(config_lib.flag_name(field), getattr(config, field), mesh.size)
  return config, workdir, mesh


def write_start(workdir: pathlib.Path, config, class_names):
  """Creates the workdir and writes config.json and classes.json (process 0 only)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save_json(config, workdir / "config.json")
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
  """(config, class_names) of the run in `workdir`, checked to be a `config_cls` run."""
  workdir = pathlib.Path(workdir)
  what = f"{config_lib.RUN_KINDS[config_cls.__name__]} run"
  config = config_lib.load_run_config(workdir, config_cls, what, train_command)
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
