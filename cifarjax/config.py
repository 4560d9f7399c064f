"""Run configurations: frozen dataclasses whose defaults are the paper's recipe, and one
check of a config against what each of its fields may hold.

Each field's range or choices are in its metadata (a `Range`; names, or a function that
returns them; the registry entry it names, an `EntryField`); `validate` reads them, so a
field and what it may hold are written side by side. Importing this module imports no JAX,
so that the command line can build its flags from these fields.

`to_dict` and `from_dict` turn a config into the JSON a run's config.json holds and back
(`run.save_json`, `run.load_run_config`).
"""

import dataclasses
import math
import pathlib
from typing import Callable, NamedTuple

from cifarjax import plugins, registry
from cifarjax.data import DATASET_NAMES
from cifarjax.errors import UserError


class Range(NamedTuple):
  """The numbers a field may hold: from low to high, each end included unless open."""
  low: float
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False

  def holds(self, v) -> bool:
    above = v > self.low if self.low_open else v >= self.low
    below = v < self.high if self.high_open or self.high == math.inf else v <= self.high
    return above and below

  def __str__(self):
    closing = ")" if self.high_open or self.high == math.inf else "]"
    return f"{'(' if self.low_open else '['}{self.low}, {self.high}{closing}"

  def requirement(self, integer: bool) -> str:
    """What a value out of the range is told it must be."""
    if integer and self.high == math.inf and not self.low_open:
      return {0: "be non-negative", 1: "be positive"}.get(self.low, f"be at least {self.low}")
    return f"lie in {self}"


POSITIVE = Range(1)  # of an int: 1, 2, ...
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, high_open=True)  # a share that must leave something: dropout, decay
SEEDS = Range(0, 2**32, high_open=True)


class EntryField(NamedTuple):
  """What a config field that names a registry entry refers to."""
  registry: str  # a key of plugins.registries()
  what: str  # how messages call its entries
  settings: str | None = None  # the config field that holds the entry's settings

  def contract(self):
    """The registry's Protocol, whose positional parameters come first; None where its
    entries take no settings. Imports JAX."""
    from cifarjax import diffusion, models
    return {"CLASSIFIERS": models.ClassifierFactory, "UNETS": models.UNetFactory,
            "SCHEDULES": diffusion.ScheduleFn,
            "LOSS_WEIGHTINGS": diffusion.LossWeighting}.get(self.registry)


# Choices read from the modules that define them when a config is checked (they import JAX).
def _optimizers() -> tuple:
  from cifarjax import optim
  return tuple(optim.OPTIMIZERS)


def _lr_schedules() -> tuple:
  from cifarjax import optim
  return tuple(optim.LR_SCHEDULES)


def _layer_sets() -> tuple:
  from cifarjax.models import layer_sets
  return layer_sets.LAYER_CHOICES


def _field(default, doc: str = "", **metadata):
  """A config field whose metadata says what it may hold: range (a `Range`), choices (names,
  or a function returning them), entry (an `EntryField`), names (what a string names: it
  must not be empty); doc says what it means."""
  metadata = dict(metadata, doc=doc) if doc else metadata
  if isinstance(default, dict):
    return dataclasses.field(default_factory=dict, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


class ConfigError(UserError):
  """A config value its field may not hold, or fields that do not fit together.

  fields: the config fields the message names (dotted paths into nested configs);
  say(*names) words the message for names of them: the library calls a field
  "config field NAME" (`field_name`), the command line by the flag that sets it.
  """

  def __init__(self, say: Callable[..., str], *fields: str):
    self.say, self.fields = say, fields
    super().__init__(self.worded(field_name))

  def worded(self, name: Callable[[str], str]) -> str:
    return self.say(*(name(f) for f in self.fields))

  def __reduce__(self):  # `say` may be a closure: a pickled copy keeps the message
    return UserError, (str(self),)


def field_name(field: str) -> str:
  """How the library's messages name a config field."""
  return f"config field {field}"


# --- The configs and their presets ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The training images' augmentations (`cifarjax.augment`): each applied with its
  probability; the paper's baseline flips horizontally only."""
  hflip_prob: float = _field(0.5, range=PROBABILITY)
  vflip_prob: float = _field(0.0, range=PROBABILITY)
  noise_prob: float = _field(0.0, range=PROBABILITY)
  noise_variance: float = _field(0.015, range=NON_NEGATIVE)
  crop_prob: float = _field(0.0, range=PROBABILITY)
  crop_padding: int = _field(4, "pixels of zeros around the image before the crop",
                             range=NON_NEGATIVE)
  jitter_prob: float = _field(0.0, "spatial and colour jitter", range=PROBABILITY)
  max_rotation_deg: float = _field(10.0, range=NON_NEGATIVE)
  max_shift: float = _field(2.0, "pixels", range=NON_NEGATIVE)
  max_scale: float = _field(0.1, range=NON_NEGATIVE)
  brightness: float = _field(0.2, "factors drawn from [1 - x, 1 + x]", range=NON_NEGATIVE)
  contrast: float = _field(0.2, range=NON_NEGATIVE)
  saturation: float = _field(0.2, range=NON_NEGATIVE)


_LEARNING_RATE = Range(0, low_open=True)
_LR_DECAY = Range(0, 1, low_open=True)
_LAYERS_DOC = "the layer set (models.layer_sets): auto, flax or xla_cpu"
_DATA_DOC = "a dataset name or a path (cifarjax.data.load_split)"
_HOLDOUT_DOC = "held-out train images standing in for test where a source has none"
_FUSED_DOC = "steps fused into one jitted call (loop.py); divides the cadences"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The paper's classifier recipe (Part 1, sections 2-3); fields beyond the paper default
  to its values (`CLASSIFIER_PRESETS["improved"]` combines them).

  weight_decay is L2 regularisation added to the gradient before Adam, as PyTorch's
  `Adam(weight_decay=...)` (the paper's optimiser) does; optimizer "adamw" decouples it.
  lr_decay multiplies the learning rate once per epoch (PyTorch's ExponentialLR stepped
  each epoch); lr_schedule "cosine" instead warms up linearly for warmup_steps, then
  anneals to 0 at `steps`. ema_decay > 0 keeps an exponential moving average of the
  weights and BatchNorm statistics (decay min(ema_decay, (1 + t) / (10 + t)) at step t)
  and evaluates it instead of the raw ones.
  """
  model: str = _field("paper", "the network, a name in models.CLASSIFIERS",
                      entry=EntryField("CLASSIFIERS", "classifier", "model_kwargs"))
  model_kwargs: dict = _field({}, "the network's settings (models.ClassifierFactory)")
  data: str = _field("cifar100", _DATA_DOC, names="a data source")
  holdout: int = _field(5000, _HOLDOUT_DOC, range=POSITIVE)
  steps: int = _field(10_000, range=POSITIVE)
  batch_size: int = _field(256, range=POSITIVE)
  learning_rate: float = _field(0.005, range=_LEARNING_RATE)
  lr_decay: float = _field(0.98, range=_LR_DECAY)
  weight_decay: float = _field(5e-5, range=NON_NEGATIVE)
  dropout: float = _field(0.0, range=FRACTION)
  augment: AugmentConfig = AugmentConfig()
  optimizer: str = _field("adam", "optim.OPTIMIZERS", choices=_optimizers)
  lr_schedule: str = _field("exponential", "optim.LR_SCHEDULES",
                            choices=_lr_schedules)
  warmup_steps: int = _field(0, "used by lr_schedule cosine", range=NON_NEGATIVE)
  label_smoothing: float = _field(
      0.0, "the training target's mass spread evenly over all classes (evaluation losses are "
      "unsmoothed)", range=FRACTION)
  ema_decay: float = _field(0.0, range=FRACTION)
  eval_flip: bool = _field(False, "evaluation averages the class probabilities of each image "
                           "and its mirror image")
  layers: str = _field("auto", _LAYERS_DOC, choices=_layer_sets)
  seed: int = _field(0, range=SEEDS)
  log_every: int = _field(50, range=POSITIVE)
  eval_every: int = _field(500, range=POSITIVE)
  eval_batch_size: int = _field(1000, range=POSITIVE)
  train_eval_size: int = _field(10_000, "fixed subset of train scored for train accuracy",
                                range=POSITIVE)
  checkpoint_every: int = _field(1000, range=POSITIVE)
  keep_checkpoints: int = _field(3, range=POSITIVE)
  steps_per_call: int = _field(1, _FUSED_DOC, range=POSITIVE)


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

# DiffusionConfig.train_on: the splits of the data a generator trains on, concatenated.
TRAINING_SPLITS = {"train": ("train",), "train+test": ("train", "test")}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The paper's generator recipe (Part 2, sections 4-5).

  lr_decay multiplies the learning rate once per epoch (PyTorch's ExponentialLR stepped
  each epoch), as the classifier's does. Samples come from an exponential moving average
  of the weights (ema_decay, ramped up as min(ema_decay, (1 + t) / (10 + t))); training
  uses the raw ones. The entries a field names take their settings from its `_kwargs`
  field (the keyword parameters of their functions, e.g. the sigmoid schedule's tau),
  completed with their defaults by `validate`.
  """
  data: str = _field("cifar100", _DATA_DOC, names="a data source")
  holdout: int = _field(5000, _HOLDOUT_DOC, range=POSITIVE)
  steps: int = _field(50_000, range=POSITIVE)
  batch_size: int = _field(256, range=POSITIVE)
  learning_rate: float = _field(0.003, "Adam's", range=_LEARNING_RATE)
  lr_decay: float = _field(0.995, range=_LR_DECAY)
  schedule: str = _field("sigmoid", "the noise schedule, a name in diffusion.SCHEDULES: "
                         "sigmoid (the paper's), linear (DDPM's), sigmoid-blog, ...",
                         entry=EntryField("SCHEDULES", "schedule", "schedule_kwargs"))
  schedule_kwargs: dict = _field({})
  num_timesteps: int = _field(1000, range=Range(2))
  hflip_prob: float = _field(0.5, range=PROBABILITY)
  ema_decay: float = _field(0.999, range=FRACTION)
  label_dropout: float = _field(
      0.0, "the probability of training a label as the null label, which classifier-free "
      "guidance samples from; 0 leaves it untrained", range=FRACTION)
  prediction: str = _field("eps", "what the U-Net outputs: eps (the noise) or v "
                           "(alpha_t eps - sigma_t x_0), diffusion.PREDICTIONS",
                           entry=EntryField("PREDICTIONS", "prediction"))
  loss_weighting: str = _field("none", "each timestep's weight in the loss: none or min-snr "
                               "(min(SNR_t, gamma) on the error in x_0), "
                               "diffusion.LOSS_WEIGHTINGS",
                               entry=EntryField("LOSS_WEIGHTINGS", "loss weighting",
                                                "loss_weighting_kwargs"))
  loss_weighting_kwargs: dict = _field({})
  train_on: str = _field("train", "the splits trained on: train+test adds the test split "
                         "(or the held-out slice); FID's reference stays train",
                         choices=tuple(TRAINING_SPLITS))
  unet: str = _field("paper", "the network, a name in models.UNETS",
                     entry=EntryField("UNETS", "U-Net", "unet_kwargs"))
  layers: str = _field("auto", _LAYERS_DOC, choices=_layer_sets)
  unet_kwargs: dict = _field({})
  seed: int = _field(0, range=SEEDS)
  log_every: int = _field(100, range=POSITIVE)
  eval_every: int = _field(1000, "loss of the raw and the EMA weights on a fixed noised batch",
                           range=POSITIVE)
  eval_batch_size: int = _field(256, range=POSITIVE)
  checkpoint_every: int = _field(1000, range=POSITIVE)
  keep_checkpoints: int = _field(3, range=POSITIVE)
  steps_per_call: int = _field(1, _FUSED_DOC, range=POSITIVE)


# "linear-schedule" is the paper's section 4 comparison, which ran both schedules at batch
# 128 (its final model, "paper", used 256). "improved" is beyond the paper: v-prediction,
# min-SNR-5 weighting, and label dropout so that guidance can be used.
DIFFUSION_PRESETS = {
    "paper": DiffusionConfig(),
    "linear-schedule": DiffusionConfig(schedule="linear", batch_size=128),
    "improved": DiffusionConfig(prediction="v", loss_weighting="min-snr",
                                loss_weighting_kwargs={"gamma": 5.0}, label_dropout=0.1),
}

# What each config's run is called in messages (never the class name).
RUN_KINDS = {"ClassifierConfig": "classifier (train-classifier)",
             "DiffusionConfig": "generator (train-diffusion)"}


# --- Validation: every value checked before a run touches its workdir ---------------


def field_type(f: dataclasses.Field) -> type:
  """A field's annotation as a type (int, float, str, bool, dict or a config class)."""
  return {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(f.type, f.type)


def entry_fields(config_or_class) -> dict[str, EntryField]:
  """{field: EntryField} of the fields that name registry entries, in field order."""
  return {f.name: f.metadata["entry"] for f in dataclasses.fields(config_or_class)
          if "entry" in f.metadata}


def entries_used(config) -> list:
  """The registry entries a config names (`plugins.Use`), in field order."""
  return [plugins.Use(field, spec.registry, spec.what, getattr(config, field))
          for field, spec in entry_fields(config).items()]


def problem(f: dataclasses.Field, v) -> str | None:
  """What is wrong with the value v for the field f (its type and metadata), as the end of
  a sentence whose subject is the field ("must be positive, got 0"); None if nothing."""
  kind, meta = field_type(f), f.metadata
  if kind is bool and not isinstance(v, bool):
    return f"must be true or false, got {v!r}"
  if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
    return f"must be an integer, got {v!r}"
  if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or v != v):
    return f"must be a number, got {v!r}"
  if kind is str and not isinstance(v, str):
    return f"must be a string, got {v!r}"
  if "names" in meta and (not isinstance(v, str) or not v.strip()):
    return f"must name {meta['names']}, got {v!r}"
  if "range" in meta and not meta["range"].holds(v):
    return f"must {meta['range'].requirement(kind is int)}, got {v}"
  choices = meta.get("choices")
  if "entry" in meta:
    choices = plugins.registries()[meta["entry"].registry]
  elif callable(choices):
    choices = choices()
  if choices is not None and v not in choices:
    hint = f" ({registry.IMPORT_HINT})" if "entry" in meta else ""
    return f"must be one of {', '.join(choices)}, got {v!r}{hint}"
  return None


def _check_fields(config, prefix=""):
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if dataclasses.is_dataclass(v):
      _check_fields(v, prefix=f"{prefix}{f.name}.")
    elif (wrong := problem(f, v)) is not None:
      raise ConfigError(lambda name: f"{name} {wrong}", prefix + f.name)


def _with_settings(config):
  """config with the settings of each entry it names checked against the entry's signature
  and completed with its defaults (`registry.check_settings`)."""
  registered = plugins.registries()
  changes = {}
  for field, spec in entry_fields(config).items():
    if spec.settings:
      name = getattr(config, field)
      changes[spec.settings] = registry.check_settings(
          registered[spec.registry][name], getattr(config, spec.settings), spec.contract(),
          f"{spec.what} {name!r}", field_name(spec.settings))
  return dataclasses.replace(config, **changes)


def validate(config):
  """Checks every value of a ClassifierConfig or DiffusionConfig against its field's type
  and metadata, and the fields that must fit together; returns the config with the
  settings of the registry entries it names completed with their defaults (so config.json
  holds them all).

  Raises a ConfigError naming the field and the value, e.g. "config field batch_size must
  be positive, got 0". The trainers call it before the workdir is touched, so a rejected
  run leaves nothing behind; the entries' own checks of their settings run when the
  trainers build them, also before any file is written.
  """
  _check_fields(config)
  if getattr(config, "lr_schedule", None) == "cosine" and config.warmup_steps >= config.steps:
    raise ConfigError(lambda warmup, steps: f"{warmup} {config.warmup_steps} must be fewer "
                      f"than {steps} {config.steps}", "warmup_steps", "steps")
  k = config.steps_per_call
  for field in ("log_every", "eval_every", "checkpoint_every"):
    every = getattr(config, field)
    if every % k:
      raise ConfigError(lambda name, fused: f"{name} {every} must be a multiple of {fused} "
                        f"{k}, so that fused calls end on it", field, "steps_per_call")
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
  for field, spec in entry_fields(config).items():
    if spec.settings and direct.get(field, getattr(config, field)) != getattr(config, field):
      direct.setdefault(spec.settings, {})
  for head, sub in nested.items():
    current = direct.get(head, getattr(config, head))
    direct[head] = {**current, **sub} if isinstance(current, dict) else override(current, sub)
  return dataclasses.replace(config, **direct)


def check_divisible(field: str, size: int, num_devices: int):
  """A batch is split evenly over the devices: `size`, the config field `field`'s value,
  must be a multiple of their number."""
  if size % num_devices:
    raise ConfigError(lambda name: f"{name} {size} must be divisible by the number of "
                      f"devices ({num_devices})", field)


def with_absolute_data(config):
  """The config with a data path made absolute (dataset names stay as they are), so the
  saved config.json names the same data from any working directory."""
  if config.data in DATASET_NAMES:
    return config
  return dataclasses.replace(config, data=str(pathlib.Path(config.data).expanduser().resolve()))


# --- A run's config in its workdir: written, read back, resumed -----------------------


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def upgrade_fields(cls, d: dict) -> dict:
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
  d = upgrade_fields(cls, d)
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
