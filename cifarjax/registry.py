"""Entries of the registries that configs and commands name: lookup, settings, fingerprints.

A registry is a plain dict from a name to an entry: `models.CLASSIFIERS`, `models.UNETS`,
`diffusion.SCHEDULES`, `diffusion.SAMPLERS`, `diffusion.PREDICTIONS`,
`diffusion.LOSS_WEIGHTINGS`, `diffusion.CLIPS`. Each registry's contract is a `Protocol`
beside it (`diffusion.Sampler`, ...): the positional parameters every entry takes. An
entry's further keyword parameters whose defaults are JSON values (numbers, strings,
booleans, None, lists of them) are its settings: `cosine(num_timesteps, *, s=0.008)` has
the setting `s`. A config passes settings as a dict (`DiffusionConfig.schedule_kwargs`,
`--set schedule_kwargs.s=0.02`); `check_settings` checks their names and types against
the entry's signature and completes them with its defaults, so config.json holds every
setting a run used. An entry checks its own values by raising ValueError, which
`entry_errors` turns into a one-line UserError naming the entry.

`fingerprint(entry)` identifies an entry's code: config.json records it, so that a later
command on the run can say where a definition changed.
"""

import contextlib
import functools
import hashlib
import inspect
import json
import re
import sys

from cifarjax.errors import UserError, one_line

IMPORT_HINT = "one of your own is registered by importing its module: --import MODULE"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def lookup(registry: dict, what: str, name: str, flag: str | None = None):
  """registry[name], or a UserError (a ValueError) listing the registered names; flag names
  the option or config field that gave the name, where there is one."""
  if name not in registry:
    listed = ", ".join(registry)
    raise UserError(f"{flag} must be one of {listed}, got {name!r} ({IMPORT_HINT})" if flag else
                    f"unknown {what} {name!r}; registered: {listed} ({IMPORT_HINT})")
  return registry[name]


def contract(protocol) -> tuple[str, ...]:
  """The positional parameters a registry's Protocol passes every entry, in order."""
  params = list(inspect.signature(protocol.__call__).parameters.values())[1:]  # less self
  return tuple(p.name for p in params
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _json_value(v) -> bool:
  if v is None or isinstance(v, (bool, int, float, str)):
    return True
  return isinstance(v, (list, tuple)) and all(_json_value(x) for x in v)


def settings(entry, protocol) -> dict | None:
  """{name: default} of an entry's settings; None where it takes any (a **kwargs)."""
  fixed = contract(protocol)
  try:
    params = list(inspect.signature(entry).parameters.values())
  except (TypeError, ValueError):  # no signature to read (built in C)
    return {}
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if len(positional) < len(fixed) and not any(p.kind == p.VAR_POSITIONAL for p in params):
    raise UserError(f"{_name(entry)} takes {len(positional)} positional parameters; its "
                    f"registry passes {len(fixed)} ({', '.join(fixed)})")
  found = {}
  for p in params[len(fixed):]:
    if p.kind == p.VAR_KEYWORD:
      return None
    if p.default is p.empty and p.kind != p.VAR_POSITIONAL:
      raise UserError(f"{_name(entry)}'s parameter {p.name} needs a default: its registry "
                      f"passes only {', '.join(fixed)}, and settings are optional")
    if (p.kind == p.VAR_POSITIONAL or not _json_value(p.default)
        or inspect.isclass(entry) and p.name in ("parent", "name")):  # a flax Module's own
      continue  # not a setting: left at its default
    found[p.name] = json.loads(json.dumps(p.default))  # tuples as the lists config.json holds
  return found


def _typed(value, default, where: str):
  """value, converted to the type of the setting's default (an int where a float goes)."""
  if default is None:
    return value
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, float):
    ok, value = number, float(value) if number else value
  elif isinstance(default, int):
    ok = number and isinstance(value, int)
  else:
    ok = isinstance(value, type(default))
  if not ok:
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list"}[type(default)]
    raise UserError(f"{where} must be {kind}, as its default {default!r} is, got {value!r}")
  return value


def check_settings(entry, values: dict, protocol, what: str, field: str) -> dict:
  """The entry's settings: its defaults, updated with `values` checked against them.

  what names the entry in messages ("schedule 'cosine'"), field the dict that holds the
  values ("config field schedule_kwargs"). A name the entry has no setting of, or a value
  of another type than the default's, is a UserError listing what the entry takes.
  """
  if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
    raise UserError(f"{field} must map setting names to values, got {values!r}")
  defaults = settings(entry, protocol)
  if defaults is None:
    return dict(values)
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    takes = (f"its settings: {', '.join(defaults)}" if defaults else "it takes no settings")
    raise UserError(f"{field}.{unknown[0]}: {what} has no setting {unknown[0]!r}; {takes}")
  return {**defaults, **{k: _typed(v, defaults[k], f"{field}.{k}")
                         for k, v in values.items()}}


@contextlib.contextmanager
def entry_errors(what: str):
  """A ValueError an entry raises (its own check of its settings) as a UserError naming it."""
  try:
    yield
  except UserError:
    raise
  except ValueError as e:
    message = one_line(e)
    raise UserError(message if message.startswith(what) else f"{what}: {message}") from e


def _name(entry) -> str:
  entry = getattr(entry, "func", entry)  # functools.partial
  return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


def _code_names(code) -> set[str]:
  names = set(code.co_names)
  for const in code.co_consts:
    if inspect.iscode(const):
      names |= _code_names(const)
  return names


def _named(obj) -> set[str]:
  """The global names a function's or a class's code reads."""
  if inspect.isfunction(obj):
    return _code_names(obj.__code__)
  names = {base.__name__ for base in obj.__bases__}
  for member in vars(obj).values():
    member = getattr(member, "__func__", member)  # staticmethod, classmethod
    if inspect.isfunction(member):
      names |= _code_names(member.__code__)
  return names


def _sources(obj, texts: list, seen: set) -> bool:
  """Appends the source of obj, and of the functions and classes of its own module that it
  names (recursively), to texts. False where obj's own source cannot be read."""
  if isinstance(obj, functools.partial):
    texts.append(_ADDRESS.sub("", repr((obj.args, sorted(obj.keywords.items())))))
    return _sources(obj.func, texts, seen)
  if isinstance(obj, tuple):  # a NamedTuple of functions, such as a diffusion.Prediction
    return all([_sources(x, texts, seen) for x in obj if callable(x)])
  if not (inspect.isfunction(obj) or inspect.isclass(obj)):
    return obj is None
  if id(obj) in seen:
    return True
  seen.add(id(obj))
  try:
    texts.append(inspect.getsource(obj))
  except (OSError, TypeError):
    return False
  scope = vars(sys.modules[obj.__module__]) if obj.__module__ in sys.modules else {}
  for name in sorted(_named(obj)):
    value = scope.get(name)
    if ((inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == obj.__module__):
      _sources(value, texts, seen)
  return True


def fingerprint(entry) -> str | None:
  """sha256 (16 hex digits) of the entry's source and of the functions and classes of its
  module that it names, so that editing a helper shows too; None where Python keeps no
  source of it (built in C, or typed at a prompt)."""
  texts = []
  if not _sources(entry, texts, set()):
    return None
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
