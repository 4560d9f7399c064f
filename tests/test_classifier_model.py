import chex
import jax
import jax.numpy as jnp
import pytest

from cifarjax.models import Classifier, count_params, paper_classifier


def _init(model, batch=2):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, 32, 32, 3))))


def test_paper_classifier_has_exactly_99716_params():
  variables = _init(paper_classifier())
  assert count_params(variables["params"]) == 99_716
  assert count_params(variables["params"]) < 100_000


def test_parameter_count_by_hand():
  # Stem 5x5 3->24 and BN, one 1x1 expansion 24->48 and BN, dense 48->10 (+bias).
  model = Classifier(num_classes=10, stem_channels=24, layout=("expand",))
  expected = 5 * 5 * 3 * 24 + 2 * 24 + 24 * 48 + 2 * 48 + (48 * 10 + 10)
  assert count_params(_init(model)["params"]) == expected


def test_residual_block_parameter_count():
  # Residual block on 48 channels, bottleneck 12: 1x1 down, depthwise 3x3, pointwise, 1x1 up, 3 BNs.
  base = Classifier(num_classes=10, stem_channels=48, layout=())
  with_block = Classifier(num_classes=10, stem_channels=48, layout=("residual",))
  block = 48 * 12 + 9 * 12 + 12 * 12 + 12 * 48 + 2 * (12 + 12 + 48)
  assert count_params(_init(with_block)["params"]) - count_params(_init(base)["params"]) == block


def test_forward_shapes_and_batch_stats():
  model = paper_classifier(num_classes=100)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  logits = model.apply(variables, x)
  chex.assert_shape(logits, (4, 100))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # Running statistics move by 0.1 of the batch statistics (PyTorch's momentum).
  old = jax.tree.leaves(variables["batch_stats"])[0]
  new = jax.tree.leaves(updates["batch_stats"])[0]
  assert not jnp.allclose(old, new)


def test_dropout_only_in_training():
  model = paper_classifier(num_classes=10, dropout_rate=0.4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal(model.apply(variables, x), model.apply(variables, x))
  run = lambda k: model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)},
                              mutable=["batch_stats"])[0]
  assert not jnp.allclose(run(0), run(1))


def test_unknown_layout_token():
  with pytest.raises(ValueError, match="unknown layout token 'conv'"):
    _init(Classifier(layout=("conv",)))
