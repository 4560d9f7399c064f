"""The subcommand groups of the `cifarjax` command line, the config flags the trainers make
from config fields, `--set`, and the checks they share."""

import contextlib
import dataclasses
import json
import pathlib
import shutil

from cifarjax import config as config_lib  # imports no JAX: --help stays quick
from cifarjax.errors import UserError

# Files a training run writes into its workdir before its first checkpoint.
_START_FILES = ("config.json", "classes.json", "metrics.jsonl", "summary.json")
DISTRIBUTED_MODES = ("auto", "on", "off")  # cifarjax.mesh.MODES, without importing JAX


def distributed_flag(parser):
  """Adds --distributed, the mode of `cifarjax.mesh.initialize_distributed`."""
  parser.add_argument(
      "--distributed", choices=DISTRIBUTED_MODES, default="auto",
      help="join the other processes of a multi-process run (jax.distributed): auto where "
           "JAX_COORDINATOR_ADDRESS is set or JAX detects the launcher (SLURM, Open MPI, a "
           "Cloud TPU slice), on always, off never. A process that is one of several but "
           "not joined refuses to start")


def import_flag(parser):
  """Adds --import MODULE (repeatable), which `cli.main` imports before the command runs."""
  parser.add_argument(
      "--import", dest="imports", action="append", default=[], metavar="MODULE",
      help="import a module of yours first (repeatable), one that registers variants in "
           "cifarjax's registries (a model, schedule, loss weighting, sampler); looked up in "
           "the current directory, then on PYTHONPATH. A run's config.json records the "
           "modules behind the entries it uses, and later commands on its workdir import "
           "them again")


def registered_help(registry_name: str, about: str):
  """A help text that lists, when --help shows it, the names registered then (after the
  --import modules) in a registry of `plugins.registries()`: `cli.HelpFormatter` calls it."""
  def text():
    from cifarjax import plugins
    return f"{about}; registered: {', '.join(plugins.registries()[registry_name])}"
  return text


def flag_of(field: str) -> str:
  """The flag that sets a config field: batch_size is --batch-size."""
  return "--" + field.replace("_", "-")


def _preset_values(presets: dict, field: str) -> str:
  """The presets' values of a field, as --help shows them: paper's, then those that differ."""
  paper = getattr(presets["paper"], field)
  others = [f"{name}: {getattr(config, field)}" for name, config in presets.items()
            if getattr(config, field) != paper]
  return "; ".join([f"default: {paper}", *others])


def config_flags(parser, presets: dict, helps: dict):
  """Adds a flag for each config field in `helps` ({field: what it does, a text or a
  function returning one}): named after the field (`flag_of`), of its type and with its
  choices where the config lists them; its help ends with the presets' values. A flag left
  out keeps the preset's value (`config_from_args`)."""
  fields = {f.name: f for f in dataclasses.fields(presets["paper"])}
  for name, text in helps.items():
    field = fields[name]
    kind, choices = config_lib.field_type(field), field.metadata.get("choices")
    values = _preset_values(presets, name)
    if callable(text):  # written when --help shows it (`registered_help`)
      shown = lambda text=text, values=values: f"{text()} ({values})"
    else:
      shown = f"{text} ({values})" if text else values
    parser.add_argument(flag_of(name), dest=name, type=kind if kind in (int, float) else None,
                        choices=choices if isinstance(choices, tuple) else None, help=shown)


@contextlib.contextmanager
def flag_names(fields):
  """A `config.ConfigError` raised inside as a UserError that names each of `fields` (the
  command's config flags, `config_flags`) by its flag, other fields as the library does."""
  try:
    yield
  except config_lib.ConfigError as e:
    name = lambda field: flag_of(field) if field in fields else config_lib.field_name(field)
    raise UserError(e.worded(name)) from e


def set_flag(parser, example: str):
  """Adds --set FIELD=VALUE (repeatable): any field of the run's config; `example`, of this
  command's fields, is shown (tests/test_examples.py runs it)."""
  parser.add_argument(
      "--set", action="append", default=[], metavar="FIELD=VALUE",
      help=f"set any config field, e.g. {example} (repeatable; applied after the preset and "
           f"the flags above; the fields are the config's in cifarjax/config.py), or one "
           f"setting of a registry entry the config names: model_kwargs.NAME=VALUE; for the "
           f"generator unet_kwargs, schedule_kwargs and loss_weighting_kwargs")


def preset(presets: dict, name: str):
  if name not in presets:
    raise UserError(f"unknown --preset {name!r}; choose from {', '.join(presets)}")
  return presets[name]


def _field_type(cls, path: str, full: str):
  head, _, rest = path.partition(".")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  if head not in fields:
    kind = config_lib.RUN_KINDS.get(cls.__name__, cls.__name__)
    raise UserError(f"--set {full}: {kind} configs have no field {head!r}; "
                    f"fields: {', '.join(fields)}")
  ftype = config_lib.field_type(fields[head])
  if rest and ftype is dict and "." not in rest:
    return object  # a setting: any JSON value (`setting_value`)
  if rest:
    if not dataclasses.is_dataclass(ftype):
      raise UserError(f"--set {full}: {head} is a {getattr(ftype, '__name__', ftype)}, "
                      f"not a group of fields")
    return _field_type(ftype, rest, full)
  if dataclasses.is_dataclass(ftype):
    names = ", ".join(f"{path}.{f.name}" for f in dataclasses.fields(ftype))
    raise UserError(f"--set {full}: {head} is a group of fields; set one of {names}")
  return ftype


def setting_value(text: str):
  """A setting's value as the command line gives it: a JSON value (0.02, 3, true, [1, 2],
  "a b"), else the text itself as a string. Its entry's default's type checks it."""
  try:
    return json.loads(text)
  except ValueError:
    return text


def parse_assignments(cls, texts) -> dict:
  """{field path: value} from `--set FIELD=VALUE` strings, each value converted to its
  field's type (int, float, str, bool, a dict from a JSON object) or rejected with a line
  naming it; `--set schedule_kwargs.s=0.02` sets one setting (`setting_value`)."""
  values = {}
  for text in texts:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
      raise UserError(f"--set wants FIELD=VALUE (e.g. learning_rate=0.001), got {text!r}")
    ftype = _field_type(cls, key, key)
    try:
      if ftype is object:
        value = setting_value(raw)
      elif ftype is dict:
        value = json.loads(raw)
        if not isinstance(value, dict):
          raise ValueError
      elif ftype is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError
        value = raw.lower() in ("true", "1")
      else:
        value = ftype(raw)
    except ValueError:
      kind = ("a JSON object of settings, e.g. {\"s\": 0.02}" if ftype is dict else
              f"{'an' if ftype is int else 'a'} {ftype.__name__}")
      raise UserError(f"--set {key} wants {kind}, got {raw!r}") from None
    values[key] = value
  return values


def config_from_args(presets: dict, args):
  """The run's config: the --preset, then every flag named as a config field, then --set;
  each value validated (a `config.ConfigError` names the first bad one)."""
  config = preset(presets, args.preset)
  flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
           if getattr(args, f.name, None) is not None}
  config = config_lib.override(config, flags)
  config = config_lib.override(config, parse_assignments(type(config), args.set))
  return config_lib.validate(config)


def positive(flag: str, value, allow_none: bool = False):
  """Raises a UserError unless `value` is a positive integer (or None where allowed)."""
  if value is None and allow_none:
    return
  if value is None or value < 1:
    raise UserError(f"{flag} must be positive, got {value}")


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


@contextlib.contextmanager
def fresh_start_guard(workdir):
  """Where a new run (no config.json yet) fails before its first checkpoint, removes what
  it wrote, so that the corrected command starts cleanly instead of meeting "holds a run
  with another config". A workdir that already held a run is left as it is."""
  workdir = pathlib.Path(workdir)
  existed = workdir.exists()
  fresh = not (workdir / "config.json").exists()
  try:
    yield
  except BaseException:
    if fresh and workdir.is_dir() and not _has_checkpoint(workdir):
      for name in _START_FILES:
        (workdir / name).unlink(missing_ok=True)
      checkpoints = workdir / "checkpoints"
      if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        shutil.rmtree(checkpoints, ignore_errors=True)
      if not existed and not any(workdir.iterdir()):
        workdir.rmdir()
    raise
