"""The two layer sets build the same networks: the same parameter paths and initial values, and
the same functions and gradients; a run's config picks one, and either trains."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cifarjax import config as config_lib
from cifarjax.config import ClassifierConfig, DiffusionConfig
from cifarjax.errors import UserError
from cifarjax.models import FLAX, XLA_CPU, layer_set, paper_classifier, tiny_unet
from cifarjax.models.layer_sets import xla_cpu_layers
from cifarjax.models.xla_cpu import Chunks

BATCH = 16
CHUNKED = xla_cpu_layers(8)  # 2 chunks of the batch, as the xla_cpu set trains on CPUs


def _networks():
  """(name, build(layers), loss(model, params, x)) of the paper classifier in training mode
  and a tiny U-Net; each loss weighs the outputs unevenly so that every gradient is used."""
  t = jnp.arange(BATCH) % 100
  labels = jnp.arange(BATCH) % 10

  def classifier_loss(model, variables, params, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return (out * jnp.arange(10, dtype=x.dtype)).sum() / BATCH

  def unet_loss(model, variables, params, x):
    return (model.apply({"params": params}, x, t, labels) * x).sum() / BATCH

  return [("classifier", lambda layers: paper_classifier(10, layers=layers),
           lambda m, k, x: m.init(k, x), classifier_loss),
          ("unet", lambda layers: tiny_unet(10, 100, layers=layers),
           lambda m, k, x: m.init(k, x, t, labels), unet_loss)]


@pytest.mark.parametrize("name,build,init,loss", _networks(), ids=lambda v: v if isinstance(v, str) else "")
def test_both_sets_make_the_same_parameters(name, build, init, loss):
  """Same paths, shapes and initial values: a checkpoint of one set loads into the other."""
  x = jnp.zeros((BATCH, 32, 32, 3))
  chex.assert_trees_all_equal(init(build(FLAX), jax.random.PRNGKey(0), x),
                              init(build(CHUNKED), jax.random.PRNGKey(0), x))


@pytest.mark.integration
@pytest.mark.parametrize("name,build,init,loss", _networks(), ids=lambda v: v if isinstance(v, str) else "")
def test_both_sets_compute_the_same_function_and_gradient(name, build, init, loss):
  """In float64, where rounding is 1e-16, the outputs' loss and every gradient agree to
  1e-9 of the largest gradient (seen: 1e-13 classifier, 1e-11 U-Net): the same
  mathematics. (In float32 both differ from each other as from any reordering of their
  sums; the layers' own float32 bounds are in tests/test_xla_cpu_layers.py.) Gradients
  that are zero in exact arithmetic (a constant shift before a normalisation) are rounding
  noise in both, hence the global scale."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 32, 32, 3), jnp.float64)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             init(build(FLAX), jax.random.PRNGKey(0), x))
    results = [jax.value_and_grad(lambda p: loss(build(layers), variables, p, x))(
        variables["params"]) for layers in (FLAX, CHUNKED)]
    (flax_loss, flax_grads), (cpu_loss, cpu_grads) = results
    assert jax.tree.leaves(cpu_grads)[0].dtype == jnp.float64
    assert float(jnp.abs(flax_loss - cpu_loss)) <= 1e-9 * float(jnp.abs(flax_loss))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(flax_grads))
    flat_flax = traverse_util.flatten_dict(flax_grads, sep="/")
    flat_cpu = traverse_util.flatten_dict(cpu_grads, sep="/")
    for path, g in flat_flax.items():
      assert float(jnp.abs(g - flat_cpu[path]).max()) <= 1e-9 * scale, path


def test_the_chunked_classifier_sees_chunks():
  """The xla_cpu set really runs the training batch in chunks (else the test above would
  compare unchunked with unchunked)."""
  seen = []
  L = dataclasses.replace(CHUNKED, relu=lambda x: seen.append(type(x)) or CHUNKED.relu(x))
  model = paper_classifier(10, layers=L)
  x = jnp.zeros((BATCH, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  seen.clear()
  model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert seen and all(kind is Chunks for kind in seen)


def test_layer_set_names():
  assert layer_set("flax") is FLAX and layer_set("xla_cpu") is XLA_CPU
  assert layer_set("auto") is (XLA_CPU if jax.default_backend() == "cpu" else FLAX)
  assert layer_set(CHUNKED) is CHUNKED
  with pytest.raises(ValueError, match="unknown layer set 'cuda'; choose from auto, flax, xla_cpu"):
    layer_set("cuda")
  for cls in (ClassifierConfig, DiffusionConfig):
    assert cls().layers == "auto"
    with pytest.raises(UserError, match="layers must be one of auto, flax, xla_cpu"):
      config_lib.validate(cls(layers="cuda"))


@pytest.mark.integration
def test_a_generator_trains_with_the_flax_layers_and_resumes_with_the_cpu_ones(tmp_path):
  """A whole run with layers=flax; its checkpoint resumes under xla_cpu (the layer set may
  change between calls, as on a move from an accelerator to a CPU)."""
  from cifarjax import train_diffusion as td
  config = DiffusionConfig(data="synthetic", unet="tiny", num_timesteps=100, steps=2,
                           batch_size=8, log_every=1, eval_every=2, eval_batch_size=8,
                           checkpoint_every=2, layers="flax")
  summary = td.train(config, tmp_path)
  assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
  model, state, _, _ = td.load_trained(tmp_path)
  assert layer_set(model.layers) is FLAX
  summary = td.train(dataclasses.replace(config, steps=4, layers="xla_cpu"), tmp_path)
  assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])


@pytest.mark.integration
def test_a_classifier_trains_with_the_flax_layers(tmp_path):
  from cifarjax import train_classifier as tc
  config = ClassifierConfig(data="synthetic", steps=2, batch_size=16, log_every=1, eval_every=2,
                            eval_batch_size=32, train_eval_size=32, layers="flax")
  summary = tc.train(config, tmp_path)
  assert summary["steps"] == 2 and 0 <= summary["final_test_accuracy"] <= 1
