"""Run configurations: frozen dataclasses whose defaults are the paper's recipe.

A run writes its config to `config.json` beside its checkpoints and metrics, and
`from_dict` reads it back, so every number traces to the settings that made it.
"""

import dataclasses
import json

from cifarjax.augment import AugmentConfig


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The paper's classifier recipe (Part 1, sections 2-3).

  weight_decay is L2 regularisation added to the gradient before Adam, as
  PyTorch's `Adam(weight_decay=...)` (the paper's optimiser) does; not AdamW's
  decoupled decay. lr_decay multiplies the learning rate once per epoch
  (PyTorch's ExponentialLR stepped each epoch).
  """
  data: str = "cifar100"
  holdout: int = 5000  # held-out train images standing in for test where a source has none
  steps: int = 10_000
  batch_size: int = 256
  learning_rate: float = 0.005
  lr_decay: float = 0.98
  weight_decay: float = 5e-5
  dropout: float = 0.0
  augment: AugmentConfig = AugmentConfig()
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  eval_batch_size: int = 1000
  train_eval_size: int = 10_000  # fixed subset of train scored for train accuracy
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3


_NOISE_AUG = AugmentConfig(hflip_prob=0.5, vflip_prob=0.5, noise_prob=0.7, crop_prob=0.7)
_JITTER_AUG = AugmentConfig(hflip_prob=0.5, vflip_prob=0.5, crop_prob=0.7, jitter_prob=0.7)

# The paper's section 1.1 ablations, each a change to the baseline recipe.
CLASSIFIER_PRESETS = {
    "paper": ClassifierConfig(),
    "strong-wd": ClassifierConfig(weight_decay=1.5e-4),
    "dropout": ClassifierConfig(dropout=0.4),
    "aug-noise": ClassifierConfig(augment=_NOISE_AUG),
    "aug-jitter": ClassifierConfig(augment=_JITTER_AUG),
}


def preset(presets: dict, name: str):
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
  return presets[name]


def to_dict(config) -> dict:
  return dataclasses.asdict(config)


def from_dict(cls, d: dict):
  """Rebuilds a (nested) config dataclass from `to_dict`'s output."""
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
    raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
  return cls(**kwargs)


def save_json(config, path):
  with open(path, "w") as f:
    json.dump({"type": type(config).__name__, **to_dict(config)}, f, indent=2)
