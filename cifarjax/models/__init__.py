"""The networks, and the registries that name them in a run's config."""

from typing import Any, Protocol

import flax.linen as nn
import jax

from cifarjax.models.classifier import Classifier, ExpandBlock, ResidualBlock, paper_classifier
from cifarjax.models.layer_sets import FLAX, LAYER_SETS, XLA_CPU, LayerSet, layer_set
from cifarjax.models.unet import UNet, paper_unet, tiny_unet


class ClassifierFactory(Protocol):
  """What `CLASSIFIERS` holds: factory(num_classes, dropout_rate, layers, **settings) -> a
  module, layers the set it builds with (`layer_sets.layer_set` reads a name or a LayerSet).

  The module is called as `Classifier` is: `apply(variables, images, train=...)` on
  normalised float images (B, H, W, 3), with "params" and "batch_stats" collections and a
  "dropout" rng, and returns logits (B, num_classes). Settings: keyword parameters after
  dropout_rate with JSON defaults (`ClassifierConfig.model_kwargs`); a ValueError for a
  value it cannot take is one line on the command line. A block of your own goes into
  `Classifier(blocks={"name": Block}, layout=(..., "name", ...))`.
  """

  def __call__(self, num_classes: int, dropout_rate: float, layers: "str | LayerSet",
               **settings: Any) -> nn.Module: ...


class UNetFactory(Protocol):
  """What `UNETS` holds: factory(num_classes, num_timesteps, layers, **settings) -> a module,
  layers as for `ClassifierFactory`.

  The module is called as `UNet` is: `apply({"params": p}, x, t, labels)` with x float
  (B, H, W, C) in [-1, 1], t int32 (B,) in [0, num_timesteps), labels int32 (B,) in [0,
  num_classes] (num_classes: the null label of guidance), and returns what the run's
  prediction names (the noise, or v), shaped like x. It has a `num_classes` attribute.
  Settings: keyword parameters after num_timesteps with JSON defaults
  (`DiffusionConfig.unet_kwargs`). `UNet(residual_block=...)` takes a block of your own.
  """

  def __call__(self, num_classes: int, num_timesteps: int, layers: "str | LayerSet",
               **settings: Any) -> nn.Module: ...


# ClassifierConfig.model names one. Register another to train and evaluate it from the
# CLI (`--import MODULE --set model=<name>`); config.json then names it and the module
# that registered it, and eval-classifier rebuilds it.
CLASSIFIERS: dict[str, ClassifierFactory] = {"paper": paper_classifier}
# DiffusionConfig.unet names one.
UNETS: dict[str, UNetFactory] = {"paper": paper_unet, "tiny": tiny_unet}


__all__ = ["CLASSIFIERS", "Classifier", "ClassifierFactory", "ExpandBlock", "FLAX",
           "LAYER_SETS", "LayerSet", "ResidualBlock", "UNETS", "UNet", "UNetFactory", "XLA_CPU",
           "count_params", "layer_set", "paper_classifier", "paper_unet", "tiny_unet"]


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (BatchNorm statistics are not parameters)."""
  return sum(x.size for x in jax.tree.leaves(params))
