"""Run configurations: frozen dataclasses whose defaults are the paper's recipe.

A run writes its config to `config.json` beside its checkpoints and metrics, with a
record of the code of the registry entries it names (`plugins.record`), and
`load_run_config` reads it back, so every number traces to the settings that made it.
"""

import dataclasses
import json
import pathlib
from typing import NamedTuple

from cifarjax import diffusion, models, optim, plugins, registry
from cifarjax.augment import AugmentConfig
from cifarjax.errors import UserError, UserFileNotFoundError


def _settings():
  """A config field holding the settings of a registry entry it names (`registry`)."""
  return dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The paper's classifier recipe (Part 1, sections 2-3).

  weight_decay is L2 regularisation added to the gradient before Adam, as
  PyTorch's `Adam(weight_decay=...)` (the paper's optimiser) does; not AdamW's
  decoupled decay. lr_decay multiplies the learning rate once per epoch
  (PyTorch's ExponentialLR stepped each epoch). model names the network in
  `cifarjax.models.CLASSIFIERS` ("paper": `paper_classifier`); model_kwargs holds
  its settings (`models.ClassifierFactory`), completed with their defaults by
  `validate`.

  Beyond the paper (its values are the defaults; `CLASSIFIER_PRESETS["improved"]`
  combines them, see experiments/README.md for what each gave):
  - optimizer: "adam" (the paper's, coupled L2) or "adamw" (decoupled decay),
    `optim.OPTIMIZERS`.
  - lr_schedule: "exponential" (the paper's, lr_decay per epoch) or "cosine"
    (warmup_steps of linear warm-up, then cosine to 0 at `steps`), `optim.LR_SCHEDULES`.
  - label_smoothing: this much of the training target's mass spread evenly over all
    classes (the logged training loss is the smoothed one; evaluation losses are not).
  - ema_decay: > 0 keeps an exponential moving average of the weights and BatchNorm
    statistics (decay min(ema_decay, (1 + t) / (10 + t)) at step t, so early steps
    are not dominated by the initial weights) and evaluates it instead of the raw ones.
  - eval_flip: evaluation averages the class probabilities of each image and its
    mirror image.
  """
  model: str = "paper"
  model_kwargs: dict = _settings()
  data: str = "cifar100"
  holdout: int = 5000  # held-out train images standing in for test where a source has none
  steps: int = 10_000
  batch_size: int = 256
  learning_rate: float = 0.005
  lr_decay: float = 0.98
  weight_decay: float = 5e-5
  dropout: float = 0.0
  augment: AugmentConfig = AugmentConfig()
  optimizer: str = "adam"
  lr_schedule: str = "exponential"
  warmup_steps: int = 0  # used by lr_schedule "cosine"
  label_smoothing: float = 0.0
  ema_decay: float = 0.0
  eval_flip: bool = False
  layers: str = "auto"  # the layer set (models.layer_sets): auto, flax or xla_cpu
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  eval_batch_size: int = 1000
  train_eval_size: int = 10_000  # fixed subset of train scored for train accuracy
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  steps_per_call: int = 1  # steps fused into one jitted call (loop.py); divides the cadences


_NOISE_AUG = AugmentConfig(hflip_prob=0.5, vflip_prob=0.5, noise_prob=0.7, crop_prob=0.7)
_JITTER_AUG = AugmentConfig(hflip_prob=0.5, vflip_prob=0.5, crop_prob=0.7, jitter_prob=0.7)

# The paper's section 1.1 ablations, each a change to the baseline recipe; and
# "improved", beyond the paper at the same size and budget (experiments/classifier_improved.py).
CLASSIFIER_PRESETS = {
    "paper": ClassifierConfig(),
    "strong-wd": ClassifierConfig(weight_decay=1.5e-4),
    "dropout": ClassifierConfig(dropout=0.4),
    "aug-noise": ClassifierConfig(augment=_NOISE_AUG),
    "aug-jitter": ClassifierConfig(augment=_JITTER_AUG),
    "improved": ClassifierConfig(augment=AugmentConfig(hflip_prob=0.5, crop_prob=1.0),
                                 optimizer="adamw", weight_decay=0.05,
                                 lr_schedule="cosine", warmup_steps=100, label_smoothing=0.1,
                                 ema_decay=0.999, eval_flip=True),
}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The paper's generator recipe (Part 2, sections 4-5).

  lr_decay multiplies the learning rate once per epoch (PyTorch's ExponentialLR
  stepped each epoch), as the classifier's does; with batch 256 on CIFAR-100
  (195 steps per epoch) 50,000 steps are 256 epochs, ending at 0.995^256 = 28%
  of the initial rate.

  Beyond the paper (which says nothing of either):
  - ema_decay: samples come from an exponential moving average of the weights.
    A diffusion model's single-step weights jitter from batch to batch, and
    every jitter shows in all ~1000 denoising steps; the average over the last
    ~1/(1 - 0.999) = 1000 steps samples visibly cleaner images at no training
    cost. Training itself uses the raw weights. The decay ramps up as
    min(ema_decay, (1 + t) / (10 + t)) (`optim.ema_update`), so the average of a
    short run is not mostly its initial weights.
  - label_dropout: the probability of replacing a label by the null label in
    training, which classifier-free guidance needs; 0 (the paper's recipe)
    leaves the null label untrained, so sample with guidance 0.
  - prediction: what the U-Net learns to output, "eps" (the noise: DDPM's and
    the paper's) or "v" = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022), whose
    target stays of unit scale at every noise level. Samplers read either
    (`diffusion.PREDICTIONS`).
  - loss_weighting: "none" (DDPM's simplified loss, the paper's) or "min-snr"
    (Hang et al. 2023): each timestep's error in x_0 weighted by
    min(SNR_t, gamma) (loss_weighting_kwargs {"gamma": 5.0}), i.e. min(SNR, gamma) /
    SNR on the eps error and min(SNR, gamma) / (SNR + 1) on the v error; it stops
    the many easy low-noise steps from dominating the gradient.
  The paper allows, and its final model used (section 6, "trained on the
  entire dataset"):
  - train_on: "train", or "train+test": the test split (or, where the source
    has none, the held-out slice of train) added to the training images. Then
    no image is left out of training; FID's reference stays the train split.
  schedule names one in `diffusion.SCHEDULES`: "sigmoid" (Jabri et al., the
  paper's), "linear" (DDPM's) or "sigmoid-blog" (the sigmoid on the betas of
  the Annotated Diffusion blog the paper's code came from).
  unet names the network in `cifarjax.models.UNETS` ("paper": 996,859
  parameters for 100 classes; "tiny": for tests).
  unet_kwargs, schedule_kwargs and loss_weighting_kwargs hold the settings of
  those entries (the keyword parameters of their functions, e.g. the sigmoid
  schedule's tau: `--set schedule_kwargs.tau=0.9`), completed with their
  defaults by `validate`.

  DIFFUSION_PRESETS["improved"] is the paper's recipe with v-prediction,
  min-SNR-5 weighting and label dropout 0.1 (so that guidance can be used);
  sampling with `dpm++2m` is a separate choice. Its FID is not yet measured:
  that needs a GPU run of the full 50,000 steps.
  """
  data: str = "cifar100"
  holdout: int = 5000  # held-out train images where a source has no test split (as the classifier)
  steps: int = 50_000
  batch_size: int = 256
  learning_rate: float = 0.003  # Adam
  lr_decay: float = 0.995
  schedule: str = "sigmoid"  # the paper's choice (FID 75.19 against the linear schedule's 90.52)
  schedule_kwargs: dict = _settings()
  num_timesteps: int = 1000
  hflip_prob: float = 0.5
  ema_decay: float = 0.999
  label_dropout: float = 0.0
  prediction: str = "eps"
  loss_weighting: str = "none"
  loss_weighting_kwargs: dict = _settings()
  train_on: str = "train"
  unet: str = "paper"
  layers: str = "auto"  # the layer set (models.layer_sets): auto, flax or xla_cpu
  unet_kwargs: dict = _settings()
  seed: int = 0
  log_every: int = 100
  eval_every: int = 1000  # loss of the raw and the EMA weights on a fixed noised batch
  eval_batch_size: int = 256
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  steps_per_call: int = 1  # steps fused into one jitted call (loop.py); divides the cadences


# The paper's section 4 schedule comparison. It ran both schedules at batch 128
# (the final model, "paper", used 256), so this preset does too; compare it with
# `dataclasses.replace(DIFFUSION_PRESETS["paper"], batch_size=128)`.
DIFFUSION_PRESETS = {
    "paper": DiffusionConfig(),
    "linear-schedule": DiffusionConfig(schedule="linear", batch_size=128),
    "improved": DiffusionConfig(prediction="v", loss_weighting="min-snr",
                                loss_weighting_kwargs={"gamma": 5.0}, label_dropout=0.1),
}


def preset(presets: dict, name: str):
  if name not in presets:
    raise UserError(f"unknown --preset {name!r}; choose from {', '.join(presets)}")
  return presets[name]


# --- Validation: every value checked before a run touches its workdir ---------------

# Fields the train commands set by a flag; errors name the flag, others the field.
CLI_FLAGS = ("data", "holdout", "steps", "batch_size", "eval_every", "checkpoint_every",
             "log_every", "seed", "label_dropout", "unet", "steps_per_call", "train_on")
DATASET_NAMES = ("cifar100", "cifar10", "synthetic")  # cifarjax.data's names
# What each config's run is called in messages (never the class name).
RUN_KINDS = {"ClassifierConfig": "classifier (train-classifier)",
             "DiffusionConfig": "generator (train-diffusion)"}
# DiffusionConfig.train_on: the splits of the data a generator trains on, concatenated.
TRAINING_SPLITS = {"train": ("train",), "train+test": ("train", "test")}


class EntryField(NamedTuple):
  """A config field that names a registry entry."""
  registry: str  # a key of plugins.registries()
  what: str  # how messages call its entries
  settings: str | None  # the config field that holds the entry's settings
  protocol: type | None  # the registry's contract, whose positional parameters come first


ENTRY_FIELDS = {
    "model": EntryField("CLASSIFIERS", "classifier", "model_kwargs", models.ClassifierFactory),
    "unet": EntryField("UNETS", "U-Net", "unet_kwargs", models.UNetFactory),
    "schedule": EntryField("SCHEDULES", "schedule", "schedule_kwargs", diffusion.ScheduleFn),
    "prediction": EntryField("PREDICTIONS", "prediction", None, None),
    "loss_weighting": EntryField("LOSS_WEIGHTINGS", "loss weighting", "loss_weighting_kwargs",
                                 diffusion.LossWeighting),
}


def entries_used(config) -> list:
  """The registry entries a config names (`plugins.Use`), in ENTRY_FIELDS' order."""
  return [plugins.Use(field, spec.registry, spec.what, getattr(config, field))
          for field, spec in ENTRY_FIELDS.items() if hasattr(config, field)]


def flag_name(field: str) -> str:
  """How a message names a config field: its CLI flag, else "config field <name>"."""
  return "--" + field.replace("_", "-") if field in CLI_FLAGS else f"config field {field}"


def _positive_int(name, v):
  if not isinstance(v, int) or isinstance(v, bool):
    raise UserError(f"{name} must be an integer, got {v!r}")
  if v < 1:
    raise UserError(f"{name} must be positive, got {v}")


def _number(name, v, low, high, low_open=False, high_open=False):
  if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
    raise UserError(f"{name} must be a number, got {v!r}")
  if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
    interval = (f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
    raise UserError(f"{name} must lie in {interval}, got {v}")


def _choice(name, v, choices):
  if v not in choices:
    raise UserError(f"{name} must be one of {', '.join(choices)}, got {v!r}")


def _check_fields(config, prefix=""):
  for field in dataclasses.fields(config):
    v = getattr(config, field.name)
    name = flag_name(prefix + field.name) if not prefix else f"config field {prefix}{field.name}"
    if dataclasses.is_dataclass(v):
      _check_fields(v, prefix=f"{prefix}{field.name}.")
    elif field.name == "data":
      if not isinstance(v, str) or not v.strip():
        raise UserError(f"{name} must name a data source, got {v!r}")
    elif field.name == "seed":
      if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
        raise UserError(f"{name} must be an integer in [0, 2^32), got {v!r}")
    elif field.name in ("learning_rate", "max_rotation_deg", "max_shift", "noise_variance",
                        "max_scale", "brightness", "contrast", "saturation"):
      _number(name, v, 0, float("inf"), low_open=field.name == "learning_rate", high_open=True)
    elif field.name == "weight_decay":
      _number(name, v, 0, float("inf"), high_open=True)
    elif field.name == "lr_decay":
      _number(name, v, 0, 1, low_open=True)
    elif field.name.endswith("_prob"):
      _number(name, v, 0, 1)
    elif field.name in ("dropout", "label_dropout", "ema_decay", "label_smoothing"):
      _number(name, v, 0, 1, high_open=True)
    elif field.name == "optimizer":
      _choice(name, v, optim.OPTIMIZERS)
    elif field.name == "lr_schedule":
      _choice(name, v, optim.LR_SCHEDULES)
    elif field.name == "eval_flip":
      if not isinstance(v, bool):
        raise UserError(f"{name} must be true or false, got {v!r}")
    elif field.name in ("crop_padding", "warmup_steps"):
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise UserError(f"{name} must be a non-negative integer, got {v!r}")
    elif field.name == "num_timesteps":
      _positive_int(name, v)
      if v < 2:
        raise UserError(f"{name} must be at least 2, got {v}")
    elif field.name in ENTRY_FIELDS:
      spec = ENTRY_FIELDS[field.name]
      registry.lookup(plugins.registries()[spec.registry], spec.what, v, flag=name)
    elif field.name == "train_on":
      _choice(name, v, TRAINING_SPLITS)
    elif field.name == "layers":
      _choice(name, v, models.layer_sets.LAYER_CHOICES)
    elif field.type in (int, "int"):
      _positive_int(name, v)  # steps, batch sizes, intervals, holdout, keep_checkpoints


def _with_settings(config):
  """config with the settings of each entry it names checked against the entry's signature
  and completed with its defaults (`registry.check_settings`)."""
  registered = plugins.registries()
  changes = {}
  for field, spec in ENTRY_FIELDS.items():
    if spec.settings and hasattr(config, field):
      name = getattr(config, field)
      changes[spec.settings] = registry.check_settings(
          registered[spec.registry][name], getattr(config, spec.settings), spec.protocol,
          f"{spec.what} {name!r}", f"config field {spec.settings}")
  return dataclasses.replace(config, **changes)


def validate(config):
  """Checks every value of a ClassifierConfig or DiffusionConfig (ranges and types), and
  returns it with the settings of the registry entries it names completed with their
  defaults (so config.json holds them all).

  Raises a UserError naming the CLI flag (or the config field where no flag sets it)
  and the value, e.g. "--batch-size must be positive, got 0". Called by the trainers
  before the workdir is touched, so a rejected run leaves nothing behind. The entries'
  own checks of their settings run when the trainers build them, also before any file
  is written.
  """
  _check_fields(config)
  if getattr(config, "lr_schedule", None) == "cosine" and config.warmup_steps >= config.steps:
    raise UserError(f"{flag_name('warmup_steps')} {config.warmup_steps} must be fewer than "
                    f"{flag_name('steps')} {config.steps}")
  k = getattr(config, "steps_per_call", 1)
  for field in ("log_every", "eval_every", "checkpoint_every"):
    if getattr(config, field) % k:
      raise UserError(f"{flag_name(field)} {getattr(config, field)} must be a multiple of "
                      f"{flag_name('steps_per_call')} {k}, so that fused calls end on it")
  return _with_settings(config)


def override(config, values: dict):
  """`config` with fields replaced. Keys are field names or dotted paths into nested
  configs ("augment.crop_prob") or into an entry's settings ("schedule_kwargs.s"); values
  are used as given (check with `validate`). Naming another entry (a schedule, ...) drops
  the settings of the one it replaces, unless `values` gives its settings whole."""
  direct, nested = {}, {}
  for key, value in values.items():
    head, _, rest = key.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      direct[head] = value
  for field, spec in ENTRY_FIELDS.items():
    if spec.settings and direct.get(field, getattr(config, field, None)) != getattr(
        config, field, None):
      direct.setdefault(spec.settings, {})
  for head, sub in nested.items():
    current = direct.get(head, getattr(config, head))
    direct[head] = {**current, **sub} if isinstance(current, dict) else override(current, sub)
  return dataclasses.replace(config, **direct)


def _field_type(cls, path: str, full: str):
  head, _, rest = path.partition(".")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  if head not in fields:
    raise UserError(f"--set {full}: {_kind(cls.__name__)} configs have no field {head!r}; "
                    f"fields: {', '.join(fields)}")
  ftype = fields[head].type
  ftype = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(ftype, ftype)
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
  """{field path: value} from the CLI's `--set FIELD=VALUE` strings, each value converted
  to its field's type (int, float, str, bool, a dict from a JSON object) or rejected with
  a line naming it; `--set schedule_kwargs.s=0.02` sets one setting (`setting_value`)."""
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


def check_divisible(flag: str, size: int, num_devices: int):
  """A batch is split evenly over the devices: `size` must be a multiple of their number."""
  if size % num_devices:
    raise UserError(f"{flag} {size} must be divisible by the number of devices ({num_devices})")


def with_absolute_data(config):
  """The config with a data path made absolute (dataset names stay as they are), so the
  saved config.json names the same data from any working directory."""
  if config.data in DATASET_NAMES:
    return config
  return dataclasses.replace(config, data=str(pathlib.Path(config.data).expanduser().resolve()))


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def _upgrade(cls, d: dict) -> dict:
  """A saved config's fields as this version names them: DiffusionConfig.min_snr_gamma is
  the setting gamma of the loss weighting "min-snr" now."""
  d = dict(d)
  if cls is DiffusionConfig and "min_snr_gamma" in d:
    gamma = d.pop("min_snr_gamma")
    if d.get("loss_weighting") == "min-snr":
      d.setdefault("loss_weighting_kwargs", {"gamma": gamma})
  return d


def from_dict(cls, d: dict):
  """Rebuilds a (nested) config dataclass from `to_dict`'s output."""
  d = _upgrade(cls, d)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in d:
      continue
    value = d[field.name]
    if dataclasses.is_dataclass(field.default):
      value = from_dict(type(field.default), value)
    kwargs[field.name] = value
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise UserError(f"unknown config fields {sorted(unknown)} for a "
                    f"{RUN_KINDS.get(cls.__name__, cls.__name__)} run (written by another "
                    f"version of cifarjax?)")
  return cls(**kwargs)


def save_json(config, path, record: dict | None = None):
  """Writes config.json (atomically): the run kind, every field, and the record of the
  registry entries the config names (`plugins.record`: theirs now, unless `record` gives
  another)."""
  from cifarjax import runlog
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
      {**json.loads(json.dumps(to_dict(type(config)()))), **_upgrade(type(config), saved)},
      config)
  differ = sorted(k for k in new if k not in RUN_CONTROL and not _same(k, saved.get(k), new[k]))
  if saved.get("lr_schedule") == "cosine" and saved["steps"] != new["steps"] and not differ:
    raise UserError(f"{workdir} holds a run whose learning rate anneals to 0 at --steps "
                    f"{saved['steps']} (lr_schedule cosine); another --steps would bend that "
                    f"curve mid-run: keep --steps {saved['steps']}, or train a new run")
  if differ:
    details = "; ".join(f"{flag_name(k)}: {saved.get(k)!r} there, {new[k]!r} now"
                        for k in differ[:4])
    raise UserError(f"{workdir} holds a run with another config ({', '.join(differ)} differ: "
                    f"{details}); use another --workdir, or the same settings to resume")
  plugins.note_changes(entries_used(config), recorded.get("registry", {}), workdir)


def _completed(saved: dict, config) -> dict:
  """The saved fields with the settings of each entry that `config` names too completed
  with the entry's defaults, as `validate` completes config's (runs saved before
  settings were recorded hold none)."""
  registered = plugins.registries()
  for field, spec in ENTRY_FIELDS.items():
    name = saved.get(field)
    if spec.settings and name == getattr(config, field, None) and name in registered[spec.registry]:
      defaults = registry.settings(registered[spec.registry][name], spec.protocol) or {}
      saved[spec.settings] = json.loads(json.dumps({**defaults, **saved[spec.settings]}))
  return saved
