"""The paper's small CIFAR classifier (Part 1, section 1 and Figs. 1-3).

What the paper says: a 5x5 convolution first; then a mix of channel-expansion
blocks (a convolution that doubles the channels, BatchNorm, ReLU) and residual
bottleneck blocks (1x1 down, depthwise-separable 3x3, 1x1 up, BatchNorm, ReLU,
skip connection); two max-pools; a global average pool over the final 8x8 maps;
one dense layer; 99,703 parameters in all. Its figures, which gave the exact
layout, are lost, so `paper_classifier` fixes what the text leaves open (see its
docstring).

BatchNorm follows PyTorch, the paper's framework: running statistics move by
0.1 of each batch's statistics (flax momentum 0.9), eps 1e-5. With flax's
default momentum 0.99 a short run evaluates far below its training accuracy.

Convolutions carry no bias: each feeds a BatchNorm, which subtracts any
per-channel constant, so a bias there has zero gradient in exact arithmetic.
In floats its gradient is rounding noise, which Adam (dividing by the noise's
own magnitude) turns into full-size steps that differ between 1 and 8 devices.
"""

from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax

from cifarjax.models.layers import (BatchNorm, DepthwiseConv, as_chunks, each, like, max_pool_2x2,
                                    merge_batch, pointwise_conv, spatial_mean, split_batch)

BN_MOMENTUM = 0.9  # PyTorch momentum=0.1
BN_EPSILON = 1e-5


def batch_norm(train: bool, name=None):
  """The classifier's BatchNorm, for blocks of your own too: PyTorch's settings (statistics
  move 0.1 per batch, eps 1e-5), the batch's statistics when train, the running ones
  otherwise. Takes NHWC maps or a tuple of batch chunks of them (`layers.BatchNorm`)."""
  return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                   epsilon=BN_EPSILON, name=name)


class ExpandBlock(nn.Module):
  """Doubles the channels: conv (kernel_size) -> BatchNorm -> ReLU.

  Takes NHWC maps, or a tuple of batch chunks of them (`Classifier.chunk_size`),
  and returns the same kind.
  """
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    chunks = as_chunks(x)
    k, features = self.kernel_size, 2 * chunks[0].shape[-1]
    conv = (pointwise_conv(features, use_bias=False) if k == 1 else
            nn.Conv(features, (k, k), padding="SAME", use_bias=False))
    return like(x, each(nn.relu, batch_norm(train)(each(conv, chunks))))


class ResidualBlock(nn.Module):
  """Bottleneck residual block (Fig. 1).

  1x1 conv down to channels/bottleneck_ratio, BN, ReLU; depthwise 3x3 then
  pointwise 1x1 (a depthwise-separable conv), BN, ReLU; 1x1 conv back up, BN;
  add the input; ReLU. Takes NHWC maps, or a tuple of batch chunks of them, and
  returns the same kind.
  """
  bottleneck_ratio: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    chunks = as_chunks(x)
    channels = chunks[0].shape[-1]
    width = channels // self.bottleneck_ratio
    h = each(pointwise_conv(width, use_bias=False), chunks)
    h = each(nn.relu, batch_norm(train)(h))
    h = each(DepthwiseConv(3, use_bias=False), h)
    h = each(pointwise_conv(width, use_bias=False), h)  # pointwise half of the separable conv
    h = each(nn.relu, batch_norm(train)(h))
    h = each(pointwise_conv(channels, use_bias=False), h)
    h = batch_norm(train)(h)
    return like(x, tuple(nn.relu(c + hc) for c, hc in zip(chunks, h)))


class Classifier(nn.Module):
  """Stem, then `layout` read left to right, then global average pool and dense head.

  layout tokens: "expand" (ExpandBlock), "residual" (ResidualBlock), "pool"
  (2x2 max-pool), or any key of `blocks`. Dropout of `dropout_rate` (the paper's
  ablation) goes before each of the last `dropout_before_last_expands` expansion
  blocks.

  blocks: extra (or replacement) layout tokens, each mapped to a module class
  (or any zero-argument factory, such as a `functools.partial`) whose instances
  are called `block(x, train)` on the whole batch; e.g. `blocks={"fire": FireBlock}`
  with "fire" in the layout. Parameters are named after the class (FireBlock_0, ...).

  chunk_size: training on a CPU runs a batch of a multiple of chunk_size images
  as chunks of that many, layer by layer, BatchNorm's statistics taken over all
  of them (`layers.split_batch`): XLA:CPU runs independent chunks on different
  cores, where one op at a time used them poorly (docs/benchmarks.md); the
  train step then takes about twice as long to compile. The same model up to
  float rounding; 0 runs the whole batch at once. Other backends, and
  inference, always run the whole batch.
  """
  num_classes: int = 100
  stem_channels: int = 32
  stem_kernel: int = 5
  layout: Sequence[str] = ()
  expand_kernel: int = 1
  bottleneck_ratio: int = 4
  dropout_rate: float = 0.0
  dropout_before_last_expands: int = 2
  blocks: Mapping[str, Callable[[], nn.Module]] | None = None
  chunk_size: int = 64

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: float (B, H, W, 3), already normalised. Returns logits (B, num_classes)."""
    num_chunks = self.num_chunks(images.shape[0], train)
    k = self.stem_kernel
    stem = nn.Conv(self.stem_channels, (k, k), padding="SAME", use_bias=False)
    x = each(nn.relu, batch_norm(train)(each(stem, split_batch(images, num_chunks))))
    num_expands = sum(token == "expand" for token in self.layout)
    expands_seen = 0
    for token in self.layout:
      if self.blocks and token in self.blocks:
        x = split_batch(self.blocks[token]()(merge_batch(x), train), num_chunks)
      elif token == "expand":
        if self.dropout_rate and expands_seen >= num_expands - self.dropout_before_last_expands:
          # on the whole batch: the same masks, chunked or not
          dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
          x = split_batch(dropout(merge_batch(x)), num_chunks)
        expands_seen += 1
        x = ExpandBlock(self.expand_kernel)(x, train)
      elif token == "residual":
        x = ResidualBlock(self.bottleneck_ratio)(x, train)
      elif token == "pool":
        x = each(max_pool_2x2, x)
      else:
        extra = "".join(f", {k}" for k in self.blocks or ())
        raise ValueError(f"unknown layout token {token!r}; expected expand, residual, pool{extra}")
    head = nn.Dense(self.num_classes)
    return merge_batch(each(lambda c: head(spatial_mean(c)), x))

  def num_chunks(self, batch_size: int, train: bool) -> int:
    """How many chunks a batch runs as (see chunk_size)."""
    if self.chunk_size < 0:
      raise ValueError(f"chunk_size must be 0 (no chunks) or positive, got {self.chunk_size}")
    if (not train or not self.chunk_size or batch_size % self.chunk_size
        or jax.default_backend() != "cpu"):
      return 1
    return batch_size // self.chunk_size


PAPER_LAYOUT = ("residual", "residual", "expand", "residual", "residual", "pool",
                "expand", "residual", "pool",
                "expand", "residual", "residual", "residual")


def paper_classifier(num_classes: int = 100, dropout_rate: float = 0.0) -> Classifier:
  """The paper's model: 99,716 parameters for 100 classes (the paper: 99,703).

  Read from the paper: 5x5 stem; expansion blocks double the channels; residual
  blocks are 1x1 down / depthwise 3x3 + pointwise 1x1 / 1x1 up with BN and ReLU
  and a skip; two max-pools; the average pool sees 8x8 maps; one dense layer.
  Chosen here, since the figures are lost: 16 stem channels, three 1x1
  expansion blocks (16->32->64->128), bottleneck width channels/2, and the
  layout R R E R R | pool | E R | pool | E R R R (8 residual blocks: the paper
  prioritises depth). Of the layouts of this family (residual blocks before,
  between and after the expansions) under 100,000 parameters, it is the closest
  to the paper's 99,703, which is odd and so out of reach of any layout with
  even channel counts.
  """
  return Classifier(num_classes=num_classes, stem_channels=16, stem_kernel=5,
                    layout=PAPER_LAYOUT, expand_kernel=1, bottleneck_ratio=2,
                    dropout_rate=dropout_rate)
