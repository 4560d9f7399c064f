import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax.models import (FLAX, XLA_CPU, Classifier, ExpandBlock, ResidualBlock, count_params,
                             layer_set, paper_classifier)
from cifarjax.models.layer_sets import xla_cpu_layers
from cifarjax.models.xla_cpu import Chunks


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


def test_batch_norm_running_statistics_move_a_tenth_per_batch():
  """PyTorch's momentum 0.1: running = 0.9 * running + 0.1 * batch statistic, with the batch
  statistics computed here from the stem convolution's output (flax's BatchNorm keeps the
  biased variance; PyTorch keeps the unbiased one, n / (n - 1) = 1 + 1/2047 larger here)."""
  model = Classifier(num_classes=10, stem_channels=8, layout=())
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  kernel = variables["params"]["Conv_0"]["kernel"]
  h = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")),
                 np.float64)
  old = variables["batch_stats"]["BatchNorm_0"]
  new = updates["batch_stats"]["BatchNorm_0"]
  np.testing.assert_array_equal(old["mean"], 0.0)
  np.testing.assert_array_equal(old["var"], 1.0)
  np.testing.assert_allclose(new["mean"], 0.9 * 0.0 + 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * 1.0 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-5)
  # Inference uses the running statistics and eps 1e-5.
  scale = variables["params"]["BatchNorm_0"]["scale"]
  y = (h - np.asarray(new["mean"])) / np.sqrt(np.asarray(new["var"]) + 1e-5) * np.asarray(scale)
  features = np.maximum(y, 0).mean(axis=(1, 2))
  dense = variables["params"]["Dense_0"]
  want = features @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  got = model.apply({"params": variables["params"], "batch_stats": updates["batch_stats"]}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_sits_before_the_last_two_expansion_blocks():
  """The paper's ablation: dropout before the last two of the three expansion blocks. Outputs
  of blocks before the first dropout do not depend on the dropout key; later ones do."""
  model = paper_classifier(num_classes=10, dropout_rate=0.4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)

  def blocks(key):
    _, state = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(key)},
                           mutable=["batch_stats", "intermediates"], capture_intermediates=True)
    return {name: np.asarray(v["__call__"][0]) for name, v in state["intermediates"].items()
            if name != "__call__"}

  a, b = blocks(0), blocks(1)
  # Layout R R E R R pool E R pool E R R R: the second expansion block comes after
  # ResidualBlock_3; everything up to it sees no dropout.
  for name in ("ResidualBlock_0", "ResidualBlock_1", "ExpandBlock_0", "ResidualBlock_2",
               "ResidualBlock_3"):
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  for name in ("ExpandBlock_1", "ResidualBlock_4", "ExpandBlock_2", "ResidualBlock_7"):
    assert not np.allclose(a[name], b[name]), name


def test_the_xla_cpu_layers_train_batches_in_chunks_of_chunk_size():
  """Training batches of a multiple of chunk_size (64), larger than it, run as interleaved
  chunks; inference, other sizes and the flax layers run whole batches."""
  x = jnp.zeros((256, 4, 4, 3))
  chunks = XLA_CPU.split_batch(x, True)
  assert isinstance(chunks, Chunks) and len(chunks.chunks) == 4 and chunks.shape == x.shape
  assert XLA_CPU.split_batch(x, False) is x  # inference: the whole batch
  assert XLA_CPU.split_batch(x[:100], True).shape == (100, 4, 4, 3)  # not a multiple
  assert not isinstance(XLA_CPU.split_batch(x[:100], True), Chunks)
  assert not isinstance(XLA_CPU.split_batch(x[:64], True), Chunks)
  assert not isinstance(xla_cpu_layers(0).split_batch(x, True), Chunks)
  assert FLAX.split_batch(x, True) is x
  with pytest.raises(ValueError, match="chunk_size must be 0"):
    xla_cpu_layers(-64)
  assert paper_classifier().layers == "auto"
  assert layer_set("auto") is XLA_CPU  # the tests run on the CPU


def test_chunks_train_the_same_model_and_custom_blocks_see_the_whole_batch():
  """Chunked, every block gets the chunks but BatchNorm's statistics are the whole batch's
  and dropout's masks are drawn for the whole batch: the same logits and running statistics
  as unchunked, up to the rounding of reordered sums (float32 over 16 * 32 * 32 terms per
  channel; 9 normalisations in series, as in tests/_step_agreement.py: 9 * sqrt(16384) * eps
  = 1.4e-4 relative; per-chunk statistics or masks would differ by ~10%). A block from
  `blocks` gets the whole batch."""
  seen, chunks_in = [], []

  class Recorder(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      seen.append(x.shape[0])
      return x * self.param("gain", nn.initializers.ones, (x.shape[-1],))

  def count_chunks(next_fun, args, kwargs, context):
    if isinstance(context.module, ExpandBlock) and context.method_name == "__call__":
      chunks_in.append(len(args[0].chunks) if isinstance(args[0], Chunks) else 1)
    return next_fun(*args, **kwargs)

  model = Classifier(num_classes=10, stem_channels=8, bottleneck_ratio=2,
                     layout=("residual", "pool", "expand", "record", "residual", "expand"),
                     blocks={"record": Recorder}, dropout_rate=0.3, layers=xla_cpu_layers(4))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  seen.clear()
  outputs = {}
  for size in (4, 0):
    with nn.intercept_methods(count_chunks):
      logits, updates = model.clone(layers=xla_cpu_layers(size)).apply(
          variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
          mutable=["batch_stats"])
    chex.assert_shape(logits, (16, 10))
    outputs[size] = (logits, updates["batch_stats"])
  assert seen == [16, 16]
  assert chunks_in == [4, 4, 1, 1]  # both expansion blocks, chunked then not
  eps = float(np.finfo(np.float32).eps)
  rtol = 9 * np.sqrt(16 * 32 * 32) * eps
  (chunked, chunked_stats), (whole, whole_stats) = outputs[4], outputs[0]
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=rtol * np.abs(whole).max())
  for got, want in zip(jax.tree.leaves(chunked_stats), jax.tree.leaves(whole_stats)):
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


def test_blocks_take_an_array_or_chunks_and_return_the_same_kind():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 6))
  for block, channels in ((ResidualBlock(XLA_CPU, bottleneck_ratio=2), 6),
                          (ExpandBlock(XLA_CPU), 12)):
    variables = block.init(jax.random.PRNGKey(0), x, train=False)
    y = block.apply(variables, x, train=False)
    chunks = block.apply(variables, Chunks((x[:2], x[2:])), train=False)
    assert isinstance(y, jax.Array) and isinstance(chunks, Chunks) and len(chunks.chunks) == 2
    chex.assert_shape(y, (4, 8, 8, channels))
    # inference: running statistics, so a chunk's result is that of its examples alone
    # (same shapes, same program: exactly)
    for chunk, alone in zip(chunks.chunks, (x[:2], x[2:])):
      np.testing.assert_array_equal(chunk, block.apply(variables, alone, train=False))
