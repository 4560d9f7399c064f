"""Variants of one's own in every cifarjax command, and what a run records of them.

A module registers its variants when it is imported (`diffusion.SAMPLERS["euler-a"] =
...`). The commands bring such modules in two ways: `--import MODULE` (repeatable; looked
up in the current directory, then on sys.path, as `python -m` does), and the entry points
of installed packages in the group `cifarjax.plugins` (each names a module to import or a
function to call), loaded as every command starts. `import_modules` and
`load_entry_points` do the same for a Python caller.

A run's config.json records, for each registry entry the run uses (its model, schedule,
...), the entry's name, the module that registered it and `registry.fingerprint` of its
code ("registry"), and the modules to import again ("imports"). What reads a run back
imports them first; then a module that is not there, or an entry no module registers
any more, is one line naming it and the `--import` that would bring it
(`check_registered`), and an entry whose code changed since the run started is a
one-line notice (`note_changes`).
"""

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import pathlib
import sys
import warnings
from typing import NamedTuple

from cifarjax import registry
from cifarjax.errors import Notice, UserError, one_line

ENTRY_POINT_GROUP = "cifarjax.plugins"
RECORD_KEYS = ("imports", "registry")  # what config.json holds besides the config's fields

# (registry name, entry name) -> (the entry, the module whose import registered it).
_registrars: dict[tuple[str, str], tuple[object, str]] = {}


class Use(NamedTuple):
  """A registry entry a run uses: the config field naming it, its registry (a key of
  `registries()`), how messages call such entries, and its name."""
  field: str
  registry: str
  what: str
  name: str


def registries() -> dict[str, dict]:
  """Every registry, as its module holds it now (imports JAX)."""
  from cifarjax import diffusion, models
  return {"CLASSIFIERS": models.CLASSIFIERS, "UNETS": models.UNETS,
          "SCHEDULES": diffusion.SCHEDULES, "SAMPLERS": diffusion.SAMPLERS,
          "PREDICTIONS": diffusion.PREDICTIONS, "LOSS_WEIGHTINGS": diffusion.LOSS_WEIGHTINGS,
          "CLIPS": diffusion.CLIPS}


@contextlib.contextmanager
def _registering(module: str):
  """Notes the registry entries that `module` adds or replaces while the block runs."""
  before = {key: dict(entries) for key, entries in registries().items()}
  yield
  for key, entries in registries().items():
    for name, entry in entries.items():
      if before[key].get(name, _registrars) is not entry:
        _registrars[key, name] = (entry, module)


@contextlib.contextmanager
def _current_directory_first():
  """The current directory at the front of sys.path while importing, as `python -m` has it."""
  cwd = os.getcwd()
  added = "" not in sys.path and cwd not in sys.path
  if added:
    sys.path.insert(0, cwd)
  importlib.invalidate_caches()  # a module written since the last import is found
  try:
    yield
  finally:
    if added:
      sys.path.remove(cwd)


def import_modules(names, recorded_in=None):
  """Imports each module named (from the current directory, then sys.path), noting the
  registry entries it registers. A module that is not there, or that fails for want of
  another module, is a UserError naming it; recorded_in: the workdir whose config.json
  asks for them, for that message."""
  for name in names:
    if name in sys.modules:
      continue
    why = (f"the run in {recorded_in} imports {name} (its config.json records it)"
           if recorded_in is not None else f"--import {name}")
    with _current_directory_first(), _registering(name):
      try:
        importlib.import_module(name)
      except ModuleNotFoundError as e:
        if e.name is not None and (name + ".").startswith(e.name + "."):
          raise UserError(f"{why}, but there is no module {name} here (the current directory "
                          f"or sys.path): run from the folder that holds it, or put it on "
                          f"PYTHONPATH") from None
        raise UserError(f"{why}, which failed: {one_line(e)}") from e


def import_recorded(workdir):
  """Imports the modules that the run in `workdir` records in its config.json; nothing where
  it holds no run or an unreadable one (reading the run back says what is wrong)."""
  try:
    imports = json.loads((pathlib.Path(workdir) / "config.json").read_text()).get("imports", [])
  except (OSError, ValueError, AttributeError):
    return
  import_modules(imports, recorded_in=workdir)


def load_entry_points():
  """Loads the entry points of the group `cifarjax.plugins` that installed packages declare:
  each names a module, imported, or a function, called with no arguments, to register
  variants (in pyproject.toml: `[project.entry-points."cifarjax.plugins"]`, `my_variants =
  "my_package.variants"`). One that cannot be imported is a UserError naming it."""
  for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    with _registering(point.module):
      try:
        loaded = point.load()
      except ModuleNotFoundError as e:
        package = point.dist.name if getattr(point, "dist", None) else "a package"
        raise UserError(f"the {ENTRY_POINT_GROUP} entry point {point.name} = {point.value} of "
                        f"{package} cannot be imported: {one_line(e)}") from e
      if callable(loaded) and not inspect.ismodule(loaded):
        loaded()


def registered_by(registry_name: str, name: str, entry) -> str:
  """The module that registered `entry` under `name`: the one whose import (through
  `import_modules` or an entry point) did, else the module that defines it."""
  found = _registrars.get((registry_name, name))
  if found is not None and found[0] is entry:
    return found[1]
  return getattr(getattr(entry, "func", entry), "__module__", None) or "?"


def _importable(module: str) -> bool:
  """Whether a later process can import `module` to bring an entry back: neither cifarjax's
  own nor a script's (__main__), and found on the path."""
  if module == "__main__" or module == "cifarjax" or module.startswith("cifarjax."):
    return False
  with _current_directory_first():
    try:
      return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
      return False


def record(uses) -> dict:
  """What config.json holds of the entries a run uses: {"imports": the modules to import
  again, "registry": {field: {"name", "module", "source_sha256"}}}."""
  registered = registries()
  entries = {}
  for use in uses:
    entry = registered[use.registry][use.name]
    entries[use.field] = {"name": use.name,
                          "module": registered_by(use.registry, use.name, entry),
                          "source_sha256": registry.fingerprint(entry)}
  imports = sorted({e["module"] for e in entries.values() if _importable(e["module"])})
  return {"imports": imports, "registry": entries}


def check_registered(uses, recorded: dict, where):
  """A UserError for the first entry the run uses that is not registered, naming the module
  that registered it when the run started and the --import that would bring it back."""
  registered = registries()
  for use in uses:
    if use.name in registered[use.registry]:
      continue
    module = (recorded.get(use.field) or {}).get("module")
    if module is None or module == "?":
      hint = "import the module that registers it: --import MODULE"
    elif module == "__main__" or not _importable(module) and module not in sys.modules:
      hint = (f"it was registered by {module}, which cifarjax cannot import: register it in "
              f"a module of its own and pass --import MODULE")
    elif module in sys.modules:
      hint = f"{module} was imported but no longer registers it"
    else:
      hint = f"it was registered by {module}: --import {module}"
    raise UserError(f"the run in {where} uses the {use.what} {use.name!r}, which is not "
                    f"registered (registered: {', '.join(registered[use.registry])}); {hint}")


def note_changes(uses, recorded: dict, where):
  """A Notice for each entry whose code differs from the fingerprint recorded when the run
  in `where` started (entries recorded without one, or not recorded, are not compared)."""
  registered = registries()
  for use in uses:
    saved = recorded.get(use.field) or {}
    then = saved.get("source_sha256")
    if saved.get("name") != use.name or then is None:
      continue
    now = registry.fingerprint(registered[use.registry][use.name])
    if now is not None and now != then:
      warnings.warn(Notice(
          f"the {use.what} {use.name!r} ({saved.get('module')}) is not the code the run in "
          f"{where} started with (source sha256 {then} then, {now} now); it runs as it is "
          f"now"))
