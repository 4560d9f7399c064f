"""models/xla_cpu: each layer of the xla_cpu set equals the standard flax/lax layer it replaces.

References are computed in float64 with numpy or by the standard layer; a float32
sum of n terms is within n * eps32 of the exact sum relative to the sum of the
terms' magnitudes (the worst case of sequential or pairwise rounding), which
gives each tolerance below.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

from cifarjax.models import layer_sets
from cifarjax.models.xla_cpu import (BatchNorm, Chunks, Conv, ConvTranspose2x2, GroupNorm,
                                     channel_sums, image_channel_sums, max_pool_2x2,
                                     shifted_depthwise_conv, spatial_mean, written_out)

# the xla_cpu set's depthwise convolution: the shared layer, computed by shifted products
DepthwiseConv = functools.partial(layer_sets.DepthwiseConv, conv=shifted_depthwise_conv)

EPS32 = float(np.finfo(np.float32).eps)


def _grouped_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=x.shape[-1],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")


@pytest.mark.parametrize("k", [3, 5])
def test_shifted_products_equal_grouped_convolution_and_its_gradients(k):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 4)).astype(np.float32)
  kernel = rng.normal(size=(k, k, 1, 4)).astype(np.float32)
  np.testing.assert_allclose(shifted_depthwise_conv(x, kernel), _grouped_conv(x, kernel),
                             rtol=1e-5, atol=1e-5)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  grads = [jax.grad(lambda x, w: (f(x, w) * cotangent).sum(), argnums=(0, 1))(x, kernel)
           for f in (shifted_depthwise_conv, _grouped_conv)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_parameters_are_those_of_a_grouped_nn_conv():
  x = np.zeros((1, 8, 8, 6), np.float32)
  ours = DepthwiseConv(3).init(jax.random.PRNGKey(0), x)["params"]
  flax_conv = nn.Conv(6, (3, 3), padding="SAME", feature_group_count=6)
  theirs = flax_conv.init(jax.random.PRNGKey(0), x)["params"]
  chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)
  y = DepthwiseConv(3).apply({"params": theirs}, x + 1.0)  # their weights, our layer
  np.testing.assert_allclose(y, flax_conv.apply({"params": theirs}, x + 1.0), rtol=1e-5,
                             atol=1e-5)
  assert "bias" not in DepthwiseConv(3, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]


def test_depthwise_conv_gradients_are_those_of_a_grouped_nn_conv():
  """Kernel and bias gradients (the bias's is summed inside the layer's own backward)."""
  rng = np.random.default_rng(10)
  x = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  flax_conv = nn.Conv(4, (3, 3), padding="SAME", feature_group_count=4)
  params = jax.tree.map(lambda p: p + 0.1, flax_conv.init(jax.random.PRNGKey(0), x))
  grads = [jax.grad(lambda p, v: (m.apply(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
           for m in (DepthwiseConv(3), flax_conv)]
  # each entry sums at most 3*6*5 = 90 products: within 90 eps of their magnitudes
  magnitude = jax.grad(lambda p, v: (flax_conv.apply(p, v) * np.abs(cotangent)).sum(),
                       argnums=(0, 1))(jax.tree.map(np.abs, params), np.abs(x))
  for got, want, scale in zip(*map(jax.tree.leaves, (grads[0], grads[1], magnitude))):
    assert np.all(np.abs(got - want) <= 2 * 90 * EPS32 * scale)


def test_even_kernel_is_refused():
  with pytest.raises(ValueError, match="odd kernel size"):
    DepthwiseConv(2).init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 2), np.float32))


def test_channel_sums_and_spatial_mean_equal_float64_sums():
  rng = np.random.default_rng(1)
  x = rng.normal(1.0, 2.0, (8, 6, 4, 5)).astype(np.float32)
  y = rng.normal(size=x.shape).astype(np.float32)
  n = x.size // x.shape[-1]
  sum_x, sum_xy = channel_sums(x, x * y)
  for got, terms in ((sum_x, x), (sum_xy, x * y)):
    terms = terms.astype(np.float64)
    bound = n * EPS32 * np.abs(terms).sum((0, 1, 2))
    assert np.all(np.abs(np.asarray(got) - terms.sum((0, 1, 2))) <= bound)
  mean = spatial_mean(x)
  chex.assert_shape(mean, (8, 5))
  exact = x.astype(np.float64).mean((1, 2))
  assert np.all(np.abs(mean - exact) <= 24 * EPS32 * np.abs(x).astype(np.float64).mean((1, 2)))


def test_pointwise_conv_equals_a_1x1_nn_conv_with_the_same_parameters():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
  ours, theirs = Conv(7), nn.Conv(7, (1, 1))
  params = theirs.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.PRNGKey(0), x), params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  bound = 6 * EPS32 * (np.abs(x) @ np.abs(params["params"]["kernel"][0, 0]) + 0.1)
  assert np.all(np.abs(ours.apply(params, x) - theirs.apply(params, x)) <= 2 * bound)
  cotangent = rng.normal(size=(3, 5, 4, 7)).astype(np.float32)
  grads = [jax.grad(lambda p, v: (m.apply(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
           for m in (ours, theirs)]
  # each gradient entry sums at most 3*5*4 = 60 products: within 60 * eps of their magnitudes
  magnitude = [jax.grad(lambda p, v: (theirs.apply(p, v) * np.abs(cotangent)).sum(),
                        argnums=(0, 1))(jax.tree.map(np.abs, params), np.abs(x))]
  for got, want, scale in zip(*map(jax.tree.leaves, (grads[0], grads[1], magnitude[0]))):
    assert np.all(np.abs(got - want) <= 2 * 60 * EPS32 * scale)


def test_max_pool_2x2_equals_nn_max_pool_with_its_gradient():
  x = np.random.default_rng(3).permutation(2 * 6 * 4 * 3).reshape(2, 6, 4, 3).astype(np.float32)
  pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), pool(x))  # maxima are exact
  cotangent = np.arange(2 * 3 * 2 * 3, dtype=np.float32).reshape(2, 3, 2, 3)
  grads = [jax.grad(lambda v: (f(v) * cotangent).sum())(x) for f in (max_pool_2x2, pool)]
  np.testing.assert_array_equal(*grads)  # distinct inputs: each window's gradient goes to its max


def test_chunks_interleave_examples_and_merge_undoes_it():
  x = np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3)
  chunks = Chunks.split(x, 4)
  assert len(chunks.chunks) == 4 and chunks.shape == x.shape
  for j, chunk in enumerate(chunks.chunks):
    # chunk j holds examples j, j + 4: a batch sharded over devices in contiguous
    # blocks is then split within each device
    np.testing.assert_array_equal(chunk, x[j::4])
  np.testing.assert_array_equal(chunks.merge(), x)
  np.testing.assert_array_equal((chunks + chunks).merge(), 2 * x)
  assert len(jax.tree.leaves(chunks)) == 4  # a pytree: jit and grad see its arrays
  with pytest.raises(ValueError, match="cannot split a batch of 8 into 3 equal chunks"):
    Chunks.split(x, 3)


def _batch_norm_reference(x, scale, bias, eps):
  """float64 BatchNorm over all but the last axis, with flax's E[x^2] - E[x]^2 variance."""
  x = x.astype(np.float64)
  mean = x.mean((0, 1, 2))
  var = (x * x).mean((0, 1, 2)) - mean ** 2
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("num_chunks", [None, 1, 4])
def test_batch_norm_matches_flax_batch_norm_in_outputs_running_stats_and_gradients(num_chunks):
  """num_chunks: ours gets the batch as that many chunks (`Chunks`), None: as one array;
  its statistics are those of the whole batch either way."""
  rng = np.random.default_rng(4)
  x = rng.normal(0.5, 2.0, (16, 6, 6, 5)).astype(np.float32)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  variables = {"params": {"scale": np.linspace(0.5, 1.5, 5, dtype=np.float32),
                          "bias": np.linspace(-1, 1, 5, dtype=np.float32)},
               "batch_stats": {"mean": np.full(5, 0.3, np.float32),
                               "var": np.full(5, 2.0, np.float32)}}
  ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.PRNGKey(0), x),
                                                theirs.init(jax.random.PRNGKey(0), x))

  def loss(module, params, x):
    chunked = module is ours and num_chunks
    y, updates = module.apply({**variables, "params": params},
                              Chunks.split(x, num_chunks) if chunked else x, mutable=["batch_stats"])
    if chunked:
      assert isinstance(y, Chunks) and len(y.chunks) == num_chunks
      y = y.merge()
    return (jnp.sin(y) * cotangent).sum(), (y, updates["batch_stats"])

  results = [jax.grad(lambda p, v: loss(m, p, v), argnums=(0, 1), has_aux=True)(
      variables["params"], x) for m in (ours, theirs)]
  # n = 576 terms per channel: outputs and statistics within n * eps relative;
  # gradients sum n products of such outputs, so within twice that of their scale.
  tolerance = 576 * EPS32
  (our_grads, (our_y, our_stats)), (their_grads, (their_y, their_stats)) = results
  want_y, mean, var = _batch_norm_reference(x, variables["params"]["scale"],
                                            variables["params"]["bias"], 1e-5)
  np.testing.assert_allclose(our_y, want_y, rtol=0, atol=tolerance * np.abs(want_y).max())
  np.testing.assert_allclose(our_stats["mean"], 0.9 * 0.3 + 0.1 * mean, rtol=tolerance, atol=0)
  np.testing.assert_allclose(our_stats["var"], 0.9 * 2.0 + 0.1 * var, rtol=tolerance, atol=0)
  for got, want in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * tolerance * np.abs(want).max())
  evaluated = BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  np.testing.assert_allclose(
      evaluated, (x - 0.3) / np.sqrt(2.0 + 1e-5) * variables["params"]["scale"]
      + variables["params"]["bias"], rtol=0, atol=4 * EPS32 * np.abs(x).max() * 2)


def test_batch_norm_gradient_through_its_statistics():
  # The mean and variance it returns are differentiable too (not only y).
  from cifarjax.models.xla_cpu import batch_norm_train
  rng = np.random.default_rng(5)
  x = rng.normal(1.0, 1.5, (4, 3, 3, 2)).astype(np.float32)
  scale, bias = np.float32([1.5, 0.5]), np.float32([0.1, -0.2])

  def via_stats(ours):
    def f(v):
      if ours:
        _, mean, var = batch_norm_train(v, scale, bias, 1e-5)
      else:
        mean = v.mean((0, 1, 2))
        var = (v * v).mean((0, 1, 2)) - mean ** 2
      return (jnp.cos(mean) + jnp.sqrt(var)).sum()
    return jax.grad(f)(x)

  want = via_stats(False)
  np.testing.assert_allclose(via_stats(True), want, rtol=0, atol=36 * 4 * EPS32 * np.abs(want).max())


def test_image_channel_sums_equal_float64_sums_per_image():
  rng = np.random.default_rng(6)
  x = rng.normal(1.0, 2.0, (3, 6, 4, 5)).astype(np.float32)
  (got,) = image_channel_sums(x)
  chex.assert_shape(got, (3, 5))
  terms = x.astype(np.float64)
  bound = 24 * EPS32 * np.abs(terms).sum((1, 2))  # 6 * 4 terms per sum
  assert np.all(np.abs(np.asarray(got) - terms.sum((1, 2))) <= bound)


def test_conv_transpose_2x2_equals_nn_conv_transpose_with_the_same_parameters():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  ours, theirs = ConvTranspose2x2(6), nn.ConvTranspose(6, (2, 2), strides=(2, 2))
  params = theirs.init(jax.random.PRNGKey(0), x)
  # same names, shapes and initial values: a run's parameters do not change with the layer
  chex.assert_trees_all_equal(ours.init(jax.random.PRNGKey(0), x), params)
  params = {"params": {"kernel": rng.normal(size=(2, 2, 5, 6)).astype(np.float32),
                       "bias": rng.normal(size=6).astype(np.float32)}}
  y = ours.apply(params, x)
  chex.assert_shape(y, (2, 6, 8, 6))
  # each output is 5 products plus the bias: within 6 eps of their magnitudes
  magnitude = theirs.apply(jax.tree.map(np.abs, params), np.abs(x))
  assert np.all(np.abs(y - theirs.apply(params, x)) <= 6 * EPS32 * magnitude)
  # the kernel is flipped: output pixel (2i + a, 2j + b) is x[i, j] @ kernel[1 - a, 1 - b]
  k, b = params["params"]["kernel"], params["params"]["bias"]
  np.testing.assert_allclose(y[1, 2 * 2 + 0, 2 * 3 + 1], x[1, 2, 3] @ k[1, 0] + b, rtol=1e-5)
  cotangent = rng.normal(size=y.shape).astype(np.float32)
  grads = [jax.grad(lambda p, v: (m.apply(p, v) * cotangent).sum(), argnums=(0, 1))(params, x)
           for m in (ours, theirs)]
  # kernel gradients sum 2*3*4 = 24 products, input gradients 4 * 6 = 24, the bias's 2*6*8 = 96
  scale = jax.grad(lambda p, v: (theirs.apply(p, v) * np.abs(cotangent)).sum(), argnums=(0, 1))(
      jax.tree.map(np.abs, params), np.abs(x))
  for got, want, s in zip(*map(jax.tree.leaves, (grads[0], grads[1], scale))):
    assert np.all(np.abs(got - want) <= 2 * 96 * EPS32 * s)


@pytest.mark.parametrize("groups", [1, 3, 12])
def test_group_norm_matches_flax_group_norm_in_outputs_and_gradients(groups):
  rng = np.random.default_rng(8)
  x = rng.normal(0.5, 2.0, (3, 6, 4, 12)).astype(np.float32)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  ours, theirs = GroupNorm(groups), nn.GroupNorm(num_groups=groups)
  chex.assert_trees_all_equal(ours.init(jax.random.PRNGKey(0), x),
                              theirs.init(jax.random.PRNGKey(0), x))
  params = {"params": {"scale": np.linspace(0.5, 1.5, 12, dtype=np.float32),
                       "bias": np.linspace(-1, 1, 12, dtype=np.float32)}}
  n = 6 * 4 * 12 // groups  # terms per group statistic
  # x * 1e-3: a variance near epsilon, where a wrong epsilon shows; x + 20: a mean
  # large next to the spread, where E[x^2] - E[x]^2 loses digits
  for data in (x, x * 1e-3, x + 20):
    # float64 reference with flax's E[x^2] - E[x]^2 variance and epsilon 1e-6
    grouped = data.astype(np.float64).reshape(3, 6, 4, groups, 12 // groups)
    mean = grouped.mean((1, 2, 4), keepdims=True)
    mean_sq = (grouped ** 2).mean((1, 2, 4), keepdims=True)
    var = mean_sq - mean ** 2
    want = (((grouped - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
            * params["params"]["scale"] + params["params"]["bias"])
    # the sums are within n eps of E[x^2]: var within n eps E[x^2], i.e. relative
    # n eps E[x^2] / var, and so the output
    condition = (mean_sq / (var + 1e-6)).max()
    tolerance = n * EPS32 * condition
    np.testing.assert_allclose(ours.apply(params, data), want, rtol=0,
                               atol=tolerance * np.abs(want).max())
    grads = [jax.grad(lambda p, v: (jnp.sin(m.apply(p, v)) * cotangent).sum(), argnums=(0, 1))(
        params, data) for m in (ours, theirs)]
    # each gradient entry sums at most 3 * 6 * 4 = 72 (scale, bias) or n (x) products of
    # terms that carry the output's error: both implementations within that of the truth
    for got, want in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_allclose(got, want, rtol=0,
                                 atol=2 * (max(72, n) * EPS32 + tolerance) * np.abs(want).max())


def test_written_out_is_its_input_exactly_under_jit_and_grad():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * np.float32(1e30)
  x.flat[:4] = [np.inf, -np.inf, np.nan, np.finfo(np.float32).tiny / 4]  # and a subnormal
  # what any arithmetic under jit gives: on CPUs, XLA flushes subnormals to zero
  same = jax.jit(lambda v, one: v * one)(x, np.ones_like(x))
  np.testing.assert_array_equal(jax.jit(written_out)(x), same)
  g = jax.grad(lambda v: (written_out(v) * v).sum())(x[1:])
  np.testing.assert_array_equal(g, 2 * x[1:])


def test_group_norm_and_conv_transpose_refuse_what_they_cannot_take():
  with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
    GroupNorm(5).init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 12), np.float32))
  for layer in (GroupNorm(2), ConvTranspose2x2(4)):
    with pytest.raises(ValueError, match=r"takes NHWC maps, got shape \(2, 12\)"):
      layer.init(jax.random.PRNGKey(0), np.zeros((2, 12), np.float32))
