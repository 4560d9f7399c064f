"""The networks, and the registries that name them in a run's config."""

import jax

from cifarjax.models.classifier import Classifier, ExpandBlock, ResidualBlock, paper_classifier
from cifarjax.models.layer_sets import FLAX, LAYER_SETS, XLA_CPU, LayerSet, layer_set
from cifarjax.models.unet import UNet, paper_unet, tiny_unet

# ClassifierConfig.model names one: factory(num_classes, dropout_rate=..., layers=...) -> a
# flax module called as `Classifier` is, layers a LayerSet (`layer_sets`). Register another
# to train and evaluate it from the CLI (`--set model=<name>`); config.json then names it,
# and eval-classifier rebuilds it.
CLASSIFIERS = {"paper": paper_classifier}
# DiffusionConfig.unet names one: factory(num_classes, num_timesteps, layers=...) -> a module
# called as `UNet` is (x, t, labels) -> predicted noise (or v).
UNETS = {"paper": paper_unet, "tiny": tiny_unet}


__all__ = ["CLASSIFIERS", "Classifier", "ExpandBlock", "FLAX", "LAYER_SETS", "LayerSet",
           "ResidualBlock", "UNETS", "UNet", "XLA_CPU", "count_params", "layer_set",
           "paper_classifier", "paper_unet", "tiny_unet"]


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (BatchNorm statistics are not parameters)."""
  return sum(x.size for x in jax.tree.leaves(params))
