"""The subcommand groups of the `cifarjax` command line, and the checks they share."""

import contextlib
import pathlib
import shutil

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


def set_flag(parser, example: str):
  """Adds --set FIELD=VALUE (repeatable): any field of the run's config; `example`, of this
  command's fields, is shown (tests/test_examples.py runs it)."""
  parser.add_argument(
      "--set", action="append", default=[], metavar="FIELD=VALUE",
      help=f"set any config field, e.g. {example} (repeatable; applied after the preset and "
           f"the flags above; the fields are the config's in cifarjax/config.py), or one "
           f"setting of a registry entry the config names: model_kwargs.NAME=VALUE; for the "
           f"generator unet_kwargs, schedule_kwargs and loss_weighting_kwargs")


def config_from_args(presets: dict, args):
  """The run's config: the --preset, then every flag named as a config field, then --set;
  each value validated (a UserError names the first bad one)."""
  import dataclasses
  from cifarjax import config as config_lib
  config = config_lib.preset(presets, args.preset)
  flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
           if getattr(args, f.name, None) is not None}
  config = config_lib.override(config, flags)
  config = config_lib.override(config, config_lib.parse_assignments(type(config), args.set))
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
