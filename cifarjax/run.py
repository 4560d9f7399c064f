"""What both trainers do around `loop.run`: open a workdir, write what a run leaves
there; and a trained run read back (`Workdir`, `load_trained`).

A workdir holds one run: config.json (the config that made it), classes.json,
metrics.jsonl, checkpoints/, summary.json and a plot. Everything about the
inputs is checked before the first file is written, so a rejected start
leaves nothing that would block the corrected command.

An exported folder (`export_weights`) holds one set of a run's weights instead of
checkpoints: config.json, classes.json, summary.json and weights.npz, a few MB
that the sampling and evaluation commands read as they read a workdir.
"""

import functools
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


def restore_latest(workdir, like, mismatch: str):
  """The latest checkpoint in `workdir`, restored into the structure and shardings of
  `like`; where it does not fit, a UserError `mismatch` (orbax's own message lists the
  whole tree: kilobytes, unreadable)."""
  from cifarjax import checkpoint
  try:
    return checkpoint.load_latest(pathlib.Path(workdir), like)
  except ValueError as e:
    raise UserError(mismatch) from e


class Workdir:
  """A trained run of one kind (`kinds.CLASSIFIER`, `kinds.GENERATOR`), or a folder its
  weights were exported to, read once: its config and class names when first asked for
  (checked to be a run of that kind, its modules imported, a Notice for each registry
  entry whose code changed since it started), its network and latest weights when first
  asked for (`trained`: a run that holds none is refused before any model is built)."""

  def __init__(self, path, kind):
    self.path = pathlib.Path(path)
    self.kind = kind
    self._trained = {}

  @classmethod
  def of(cls, workdir, kind) -> "Workdir":
    """workdir (a path) as a Workdir of `kind`; a Workdir as it is."""
    return workdir if isinstance(workdir, Workdir) else cls(workdir, kind)

  def __repr__(self):
    return f"Workdir({str(self.path)!r}, {self.kind.name})"

  @functools.cached_property
  def _saved(self):
    what = f"{config_lib.RUN_KINDS[self.kind.config_cls.__name__]} run"
    config = config_lib.load_run_config(self.path, self.kind.config_cls, what,
                                        self.kind.train_command, note_changes=True)
    return config, tuple(runlog.read_json(self.path / "classes.json"))

  def read(self) -> "Workdir":
    """Reads (and checks) the config and class names now rather than at their first use."""
    _ = self._saved
    return self

  @property
  def config(self):
    return self._saved[0]

  @property
  def class_names(self) -> tuple:
    return self._saved[1]

  @property
  def is_export(self) -> bool:
    return is_export(self.path)

  @property
  def exported_weights(self) -> str | None:
    """Which weights ("ema" or "raw") an exported folder holds; None for a training run."""
    return exported_weights(self.path)

  def trained(self, mesh=None, model=None):
    """(model, state): the network the config names (or `model`, where the run trained a
    custom one) and the latest checkpoint's `trainer.TrainState`, on the mesh's devices.
    From an exported folder, params and the average both hold the exported weights, step
    is the exported step and the optimizer state a fresh one. Loaded once per mesh and model."""
    mesh = mesh or mesh_lib.make_mesh()
    key = (mesh, id(model))
    if key not in self._trained:
      self._trained[key] = self._load(mesh, model)
    return self._trained[key]

  def _load(self, mesh, model):
    from cifarjax import checkpoint, optim
    from cifarjax.trainer import variables_of
    kind, config, num_classes = self.kind, self.config, len(self.class_names)
    if not self.is_export and checkpoint.latest_step(self.path) is None:
      raise UserFileNotFoundError(
          f"{self.path}/checkpoints holds no checkpoint yet: its run stopped before its first; "
          f"train it with `cifarjax {kind.train_command} --workdir {self.path}` and the "
          f"settings in its config.json")
    custom = model is not None
    model = model or kind.make_model(config, num_classes)
    tx, _ = optim.make_optimizer(config, 1)
    like = jax.device_put(kind.init_state(model, tx, config.seed, ema=kind.keeps_average(config)),
                          mesh_lib.replicated(mesh))
    held = (f"the weights in {self.path} do not fit" if self.is_export else
            f"the checkpoint in {self.path}/checkpoints does not fit")
    mismatch = f"{held} {self._described(config, num_classes, model, custom)}"
    if self.is_export:
      params, step, _ = load_exported(self.path, like.params, mismatch)
      return model, like.replace(
          params=params, step=jax.device_put(np.int32(step), like.step.sharding),
          ema=None if like.ema is None else variables_of(params, like.batch_stats))
    return model, restore_latest(self.path, like, mismatch)

  def _described(self, config, num_classes, model, custom) -> str:
    """The network the weights were read into, and where a run may have trained another."""
    if custom:
      return f"the model passed ({type(model).__name__})"
    name = getattr(config, self.kind.model_field)
    summary = self.path / "summary.json"
    trained = runlog.read_json(summary).get("model") if summary.is_file() else None
    hint = (f"the run trained a custom model ({trained})" if trained not in
            (None, name, f"{self.kind.model_field}:{name}", "paper_classifier") else
            "was it written by another version of cifarjax, or trained with a custom model?")
    return (f"the {name!r} {self.kind.name} for {num_classes} classes that its config.json "
            f"describes: {hint}; load it from Python with "
            f"{self.kind.trainer_module}.load_trained(workdir, model=<that model>)")


def load_trained(workdir, kind, mesh=None, model=None):
  """(model, state, config, class_names) of a trained run of `kind` (`Workdir.trained`);
  workdir: a path, or a `Workdir` already read."""
  run = Workdir.of(workdir, kind)
  model, state = run.trained(mesh, model)
  return model, state, run.config, run.class_names


WEIGHTS_FILE = "weights.npz"  # an exported folder's weights: one array per parameter path


def is_export(workdir) -> bool:
  return (pathlib.Path(workdir) / WEIGHTS_FILE).is_file()


def exported_weights(workdir) -> str | None:
  """Which weights ("ema" or "raw") an exported folder holds; None for a training workdir."""
  if not is_export(workdir):
    return None
  return runlog.read_json(pathlib.Path(workdir) / "summary.json")["exported_weights"]


def export_weights(run: Workdir, out, weights_from: str = "ema") -> int:
  """Writes the folder `out`: the run's config.json and classes.json, its summary.json with
  the exported step and weights added, and weights.npz holding the latest checkpoint's
  averaged ("ema") or raw params as float32 arrays named by their paths
  ("Down_0/Conv_0/kernel"), readable without cifarjax. `Workdir` reads the folder as it
  reads the run. Returns the step exported."""
  from flax import traverse_util
  out = pathlib.Path(out)
  if weights_from not in ("ema", "raw"):
    raise UserError(f"weights must be ema or raw, got {weights_from!r}")
  if out.exists() and any(out.iterdir()):
    raise UserError(f"--out {out} is not empty; name a new folder")
  _, state = run.trained()
  step = int(jax.device_get(state.step))
  params = state.ema["params"] if weights_from == "ema" else state.params
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  summary_path = run.path / "summary.json"
  summary = runlog.read_json(summary_path) if summary_path.exists() else {}
  with writing(out):
    out.mkdir(parents=True, exist_ok=True)
  for name in ("config.json", "classes.json"):
    runlog.write_text(out / name, (run.path / name).read_text())
  runlog.write_json(out / "summary.json", {**summary, "exported_step": step,
                                           "exported_weights": weights_from})
  tmp = out / (WEIGHTS_FILE + ".tmp.npz")
  try:
    with writing(out / WEIGHTS_FILE):
      np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
      tmp.replace(out / WEIGHTS_FILE)
  finally:
    tmp.unlink(missing_ok=True)
  return step


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
