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

from cifarjax.models.layer_sets import LayerSet, layer_set

BN_MOMENTUM = 0.9  # PyTorch momentum=0.1
BN_EPSILON = 1e-5


def batch_norm(train: bool, layers: "str | LayerSet" = "auto"):
  """The classifier's BatchNorm, for blocks of your own too: PyTorch's settings (statistics
  move 0.1 per batch, eps 1e-5), the batch's statistics when train, the running ones
  otherwise; from a layer set (`layer_sets`; the xla_cpu one also takes `xla_cpu.Chunks`)."""
  return layer_set(layers).batch_norm(use_running_average=not train, momentum=BN_MOMENTUM,
                                      epsilon=BN_EPSILON)


class ExpandBlock(nn.Module):
  """Doubles the channels: conv (kernel_size) -> BatchNorm -> ReLU."""
  layers: "str | LayerSet" = "auto"
  kernel_size: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    L = layer_set(self.layers)
    k, features = self.kernel_size, 2 * x.shape[-1]
    conv = L.conv1x1(features, use_bias=False) if k == 1 else L.conv(features, (k, k), False)
    return L.relu(batch_norm(train, L)(conv(x)))


class ResidualBlock(nn.Module):
  """Bottleneck residual block (Fig. 1).

  1x1 conv down to channels/bottleneck_ratio, BN, ReLU; depthwise 3x3 then
  pointwise 1x1 (a depthwise-separable conv), BN, ReLU; 1x1 conv back up, BN;
  add the input; ReLU.
  """
  layers: "str | LayerSet" = "auto"
  bottleneck_ratio: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    L = layer_set(self.layers)
    channels = x.shape[-1]
    width = channels // self.bottleneck_ratio
    h = L.conv1x1(width, use_bias=False)(x)
    h = L.relu(batch_norm(train, L)(h))
    h = L.depthwise(3, use_bias=False)(h)
    h = L.conv1x1(width, use_bias=False)(h)  # pointwise half of the separable conv
    h = L.relu(batch_norm(train, L)(h))
    h = L.conv1x1(channels, use_bias=False)(h)
    h = batch_norm(train, L)(h)
    return L.relu(x + h)


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

  layers: the layer set (`layer_sets`: "auto", "flax", "xla_cpu", or a LayerSet).
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
  layers: "str | LayerSet" = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: float (B, H, W, 3), already normalised. Returns logits (B, num_classes)."""
    L = layer_set(self.layers)
    k = self.stem_kernel
    x = L.split_batch(images, train)
    x = L.relu(batch_norm(train, L)(L.conv(self.stem_channels, (k, k), False)(x)))
    num_expands = sum(token == "expand" for token in self.layout)
    expands_seen = 0
    for token in self.layout:
      if self.blocks and token in self.blocks:
        x = L.split_batch(self.blocks[token]()(L.merge_batch(x), train), train)
      elif token == "expand":
        if self.dropout_rate and expands_seen >= num_expands - self.dropout_before_last_expands:
          x = L.dropout(self.dropout_rate, deterministic=not train)(x)
        expands_seen += 1
        x = ExpandBlock(L, self.expand_kernel)(x, train)
      elif token == "residual":
        x = ResidualBlock(L, self.bottleneck_ratio)(x, train)
      elif token == "pool":
        x = L.max_pool_2x2(x)
      else:
        extra = "".join(f", {k}" for k in self.blocks or ())
        raise ValueError(f"unknown layout token {token!r}; expected expand, residual, pool{extra}")
    return L.merge_batch(L.dense(self.num_classes)(L.spatial_mean(x)))


PAPER_LAYOUT = ("residual", "residual", "expand", "residual", "residual", "pool",
                "expand", "residual", "pool",
                "expand", "residual", "residual", "residual")


def paper_classifier(num_classes: int = 100, dropout_rate: float = 0.0,
                     layers: "str | LayerSet" = "auto") -> Classifier:
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
                    dropout_rate=dropout_rate, layers=layers)
