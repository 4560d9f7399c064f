"""A run's workdir: what both trainers do around `loop.run` (open it, write what a run
leaves there), its config.json written, read back and checked for a resume, and a trained
run read back once (`Workdir`, `load_trained`).

A workdir holds one run: config.json (the config that made it), classes.json,
metrics.jsonl, checkpoints/, summary.json and a plot. Everything about the
inputs is checked before the first file is written, so a rejected start
leaves nothing that would block the corrected command.

An exported folder (`export_weights`) holds one set of a run's weights instead of
checkpoints: config.json, classes.json, summary.json and weights.npz, a few MB
that the sampling and evaluation commands read as they read a workdir.
"""

import functools
import json
import pathlib

import jax
import numpy as np

from cifarjax import config as config_lib, loop, mesh as mesh_lib, plugins, registry, runlog
from cifarjax.config import (RUN_KINDS, ConfigError, entries_used, entry_fields, from_dict,
                             to_dict, upgrade_fields)
from cifarjax.data import DATASET_NAMES
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
  check_resumable(workdir, config)
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
    record = read_saved(path)[2] if path.exists() else None
    save_json(config, path, record)
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
    config = load_run_config(self.path, self.kind.config_cls, what,
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
  the exported step and weights added (and its FID only where it is of these weights), and
  weights.npz holding the latest checkpoint's averaged ("ema") or raw params as float32 arrays
  named by their paths ("Down_0/Conv_0/kernel"), readable without cifarjax. `Workdir` reads the folder as it
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
  if (summary.get("fid_step"), summary.get("fid_weights_from")) != (step, weights_from):
    summary = {k: v for k, v in summary.items() if not k.startswith("fid")}  # other weights' FID
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


# --- A run's config in its workdir: written, read back, resumed -----------------------


def save_json(config, path, record: dict | None = None):
  """Writes config.json (atomically): the run kind, every field, and the record of the
  registry entries the config names (`plugins.record`: theirs now, unless `record` gives
  another)."""
  record = record or plugins.record(entries_used(config))
  runlog.write_json(path, {"type": type(config).__name__, **to_dict(config), **record})


def read_saved(path) -> tuple:
  """(run kind, config fields, record of registry entries) of a config.json."""
  saved = json.loads(pathlib.Path(path).read_text())
  kind = saved.pop("type", None)
  return kind, saved, {key: saved.pop(key) for key in plugins.RECORD_KEYS if key in saved}


def _kind(name) -> str:
  return RUN_KINDS.get(name, f"unknown ({name})" if name else "unknown")


def _check_folder(workdir):
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a folder; name a folder for the run")


def _check_empty(workdir):
  """A folder without a run's config.json must hold nothing (hidden files aside, and the
  .tmp of a config.json being written beside this process), or the run would write into
  someone's files."""
  path = pathlib.Path(workdir)
  if not path.is_dir():
    return
  found = sorted(p.name for p in path.iterdir()
                 if not p.name.startswith(".") and not p.name.endswith(".tmp"))
  if found:
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise UserError(f"--workdir {workdir} holds files but no run (no config.json): {shown}; "
                    f"name a new or empty folder for the run")


def load_run_config(workdir, cls, what: str, train_command: str, note_changes: bool = False):
  """The config a run saved in `workdir`, checked to be a `cls` run (`what` names it).

  Imports the modules its config.json records first, and checks that every registry
  entry it names is registered (a UserError naming what is missing and the --import
  that brings it); note_changes: a Notice for each entry whose code changed since the
  run started (`plugins.note_changes`).
  """
  _check_folder(workdir)
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise UserFileNotFoundError(f"{workdir} holds no run (no config.json); train one with "
                                f"`cifarjax {train_command} --workdir {workdir}`")
  kind, saved, recorded = read_saved(path)
  if kind != cls.__name__:
    raise UserError(f"{workdir} holds a {_kind(kind)} run, not a {what}")
  plugins.import_modules(recorded.get("imports", ()), recorded_in=workdir)
  config = from_dict(cls, saved)
  plugins.check_registered(entries_used(config), recorded.get("registry", {}), workdir)
  if note_changes:
    plugins.note_changes(entries_used(config), recorded.get("registry", {}), workdir)
  return config


def _same(key, saved, new) -> bool:
  if saved == new:
    return True
  if key == "data" and isinstance(saved, str) and saved not in DATASET_NAMES:
    # Runs saved before data paths were made absolute: the same file is the same data.
    return pathlib.Path(saved).expanduser().resolve() == pathlib.Path(str(new)).resolve()
  return False


# Fields that say how long, how visibly or with which layer set a run goes, not what it trains:
# a resume may change them.
RUN_CONTROL = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "steps_per_call", "eval_batch_size", "layers")


def check_resumable(workdir, config):
  """A workdir holds one run: resuming with another recipe is an error; the run-control
  fields (RUN_CONTROL: length, cadences, steps per call, layer set) may change between calls.
  Touches nothing: a workdir that is a file, or holds another kind of run or another
  config, raises a UserError before anything is written."""
  _check_folder(workdir)
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    _check_empty(workdir)
    return
  kind, saved, recorded = read_saved(path)
  if kind != type(config).__name__:
    raise UserError(f"{workdir} holds a {_kind(kind)} run, not a "
                    f"{_kind(type(config).__name__)} run; use another --workdir")
  plugins.import_modules(recorded.get("imports", ()), recorded_in=workdir)
  new = json.loads(json.dumps(to_dict(config)))  # tuples as JSON lists, as saved
  # A field newer than the saved run held its default there.
  saved = _completed(
      {**json.loads(json.dumps(to_dict(type(config)()))), **upgrade_fields(type(config), saved)},
      config)
  differ = sorted(k for k in new if k not in RUN_CONTROL and not _same(k, saved.get(k), new[k]))
  if saved.get("lr_schedule") == "cosine" and saved["steps"] != new["steps"] and not differ:
    raise ConfigError(lambda steps: f"{workdir} holds a run whose learning rate anneals to "
                      f"0 at {steps} {saved['steps']} (lr_schedule cosine); another {steps} "
                      f"would bend that curve mid-run: keep {steps} {saved['steps']}, or train "
                      f"a new run", "steps")
  if differ:
    shown = differ[:4]

    def say(*names):
      details = "; ".join(f"{name}: {saved.get(k)!r} there, {new[k]!r} now"
                          for name, k in zip(names, shown))
      return (f"{workdir} holds a run with another config ({', '.join(differ)} differ: "
              f"{details}); use another --workdir, or the same settings to resume")
    raise ConfigError(say, *shown)
  plugins.note_changes(entries_used(config), recorded.get("registry", {}), workdir)


def _completed(saved: dict, config) -> dict:
  """The saved fields with the settings of each entry that `config` names too completed
  with the entry's defaults, as `validate` completes config's (runs saved before
  settings were recorded hold none)."""
  registered = plugins.registries()
  for field, spec in entry_fields(config).items():
    name = saved.get(field)
    if spec.settings and name == getattr(config, field) and name in registered[spec.registry]:
      defaults = registry.settings(registered[spec.registry][name], spec.contract()) or {}
      saved[spec.settings] = json.loads(json.dumps({**defaults, **saved[spec.settings]}))
  return saved
