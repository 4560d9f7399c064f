"""The two kinds of run, and what a run's config builds.

For each kind: its config class, the command that trains it, the network its config
names (from the registries in `models`) and how that network is initialised. Reading a
trained run back (`run.Workdir`) needs only these, not the trainer that wrote it.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import numpy as np

from cifarjax import diffusion, models, registry, trainer
from cifarjax.config import ClassifierConfig, DiffusionConfig

IMAGE_SHAPE = (32, 32, 3)


def make_classifier(config: ClassifierConfig, num_classes: int) -> nn.Module:
  """The network `config.model` names in `models.CLASSIFIERS`, built with the config's layer
  set and the entry's settings (model_kwargs); what the factory raises is a UserError naming it."""
  with registry.entry_errors(f"classifier {config.model!r}"):
    return models.CLASSIFIERS[config.model](num_classes, config.dropout,
                                            models.layer_set(config.layers), **config.model_kwargs)


def make_unet(config: DiffusionConfig, num_classes: int) -> nn.Module:
  """The network `config.unet` names in `models.UNETS`, built with the config's layer set and
  the entry's settings (unet_kwargs)."""
  with registry.entry_errors(f"U-Net {config.unet!r}"):
    return models.UNETS[config.unet](num_classes, config.num_timesteps,
                                     models.layer_set(config.layers), **config.unet_kwargs)


def make_schedule(config: DiffusionConfig) -> diffusion.Schedule:
  """The config's noise schedule (a name in `diffusion.SCHEDULES`), with its settings
  (schedule_kwargs); what the schedule raises is a UserError naming it."""
  with registry.entry_errors(f"schedule {config.schedule!r}"):
    return diffusion.make_schedule(config.schedule, config.num_timesteps,
                                   config.schedule_kwargs)


@dataclasses.dataclass(frozen=True)
class RunKind:
  name: str  # what the run is called in messages ("classifier", "generator")
  config_cls: type
  train_command: str  # the `cifarjax` command that trains one
  trainer_module: str  # where its `load_trained(workdir, model=...)` is, for messages
  make_model: Callable[..., nn.Module]  # (config, num_classes) -> the network it names
  model_field: str  # the config field that names the network
  init_inputs: Callable[[], tuple]  # example inputs of one image for the network's init
  init_kwargs: dict  # and the keyword arguments of its init
  keeps_average: Callable[..., bool]  # config -> whether the state keeps `ema`

  def init_state(self, model: nn.Module, tx, seed: int, ema: bool = False) -> trainer.TrainState:
    """`trainer.init_state` of this kind's network."""
    return trainer.init_state(
        lambda key: model.init(key, *self.init_inputs(), **self.init_kwargs), tx, seed, ema)


CLASSIFIER = RunKind(
    name="classifier", config_cls=ClassifierConfig, train_command="train-classifier",
    trainer_module="cifarjax.train_classifier", make_model=make_classifier, model_field="model",
    init_inputs=lambda: (np.zeros((1, *IMAGE_SHAPE), np.float32),), init_kwargs={"train": False},
    keeps_average=lambda config: config.ema_decay > 0)
GENERATOR = RunKind(
    name="generator", config_cls=DiffusionConfig, train_command="train-diffusion",
    trainer_module="cifarjax.train_diffusion", make_model=make_unet, model_field="unet",
    init_inputs=lambda: (np.zeros((1, *IMAGE_SHAPE), np.float32), np.zeros((1,), np.int32),
                         np.zeros((1,), np.int32)),
    init_kwargs={},
    # Samples come from the average, whatever ema_decay (0: the average is the last weights).
    keeps_average=lambda config: True)
