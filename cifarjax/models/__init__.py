"""The networks, and nothing else."""

import jax

from cifarjax.models.classifier import Classifier, ExpandBlock, ResidualBlock, paper_classifier


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (BatchNorm statistics are not parameters)."""
  return sum(x.size for x in jax.tree.leaves(params))
