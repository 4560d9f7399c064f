"""DepthwiseConv: the CPU's shifted multiply-adds equal XLA's grouped convolution."""

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from cifarjax.models.depthwise import DepthwiseConv, shifted_depthwise_conv


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


def test_even_kernel_is_refused():
  with pytest.raises(ValueError, match="odd kernel size"):
    DepthwiseConv(2).init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 2), np.float32))
