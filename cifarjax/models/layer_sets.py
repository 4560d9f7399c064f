"""The layers the networks are built from, as sets to choose between: `FLAX` (plain flax and lax)
and `XLA_CPU` (`xla_cpu`'s layers, which XLA:CPU compiles into faster train steps).

The networks take a `LayerSet` (`Classifier(layers=...)`, `UNet(layers=...)`), as
flax's ResNet example takes its `conv` and `norm`, and a run's config names one
(`layers`: "auto", "flax" or "xla_cpu"; "auto" is `XLA_CPU` where JAX's default
backend is the CPU and `FLAX` elsewhere). Both sets create the same parameters
under the same paths, so a checkpoint trained with one loads into the other, and
they compute the same functions up to float rounding (tests/test_layer_sets.py).

Each entry is a factory called inside a network's `nn.compact` method (so flax
names the layers it makes after their class, Conv_0, BatchNorm_1, ..., as it
would name the plain ones), or a function of arrays.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
from jax import lax

from cifarjax.models import xla_cpu


@dataclasses.dataclass(frozen=True)
class LayerSet:
  """What a network calls, by role.

  conv(features, kernel_size, use_bias=True): a SAME-padded convolution, nn.Conv's
    parameters; conv1x1(features, use_bias=True): the same with a 1x1 kernel.
  depthwise(kernel_size, use_bias=True): a depthwise SAME convolution, kernel (k, k, 1, C).
  conv_transpose2x2(features, name): a 2x2 stride-2 transposed convolution.
  batch_norm(use_running_average, momentum, epsilon), group_norm(num_groups, epsilon):
    nn.BatchNorm's and nn.GroupNorm's parameters and statistics.
  dense(features), dropout(rate, deterministic): nn.Dense's and nn.Dropout's.
  max_pool_2x2, spatial_mean, relu, gelu: functions of arrays.
  split_batch(x, train) / merge_batch(x): where a set runs a training batch in
    pieces (`xla_cpu.Chunks`), the network's input split and its output merged;
    identity functions elsewhere.
  """
  name: str
  conv: Callable
  conv1x1: Callable
  depthwise: Callable
  conv_transpose2x2: Callable
  batch_norm: Callable
  group_norm: Callable
  dense: Callable
  dropout: Callable
  max_pool_2x2: Callable
  spatial_mean: Callable
  relu: Callable
  gelu: Callable
  split_batch: Callable
  merge_batch: Callable


def grouped_depthwise_conv(x, kernel, bias=None):
  """x (N, H, W, C) * kernel (k, k, 1, C) (+ bias (C,)), SAME zero padding, as a grouped
  lax convolution."""
  y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=x.shape[-1],
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
  """A depthwise k x k convolution (odd k, SAME zero padding): kernel (k, k, 1, C) and bias
  (C,), computed by `conv(x, kernel, bias)` (`grouped_depthwise_conv`, or the xla_cpu set's
  `xla_cpu.shifted_depthwise_conv`)."""
  kernel_size: int = 3
  use_bias: bool = True
  conv: Callable = grouped_depthwise_conv

  @nn.compact
  def __call__(self, x):
    channels, k = x.shape[-1], self.kernel_size
    if k % 2 != 1:
      raise ValueError(f"DepthwiseConv needs an odd kernel size for SAME padding, got {k}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels))
    bias = self.param("bias", nn.initializers.zeros, (channels,)) if self.use_bias else None
    return self.conv(x, kernel, bias)


def _identity(x, *_):
  return x


FLAX = LayerSet(
    name="flax",
    conv=lambda features, kernel_size, use_bias=True: nn.Conv(
        features, kernel_size, padding="SAME", use_bias=use_bias),
    conv1x1=lambda features, use_bias=True: nn.Conv(features, (1, 1), use_bias=use_bias),
    depthwise=DepthwiseConv,
    conv_transpose2x2=lambda features, name=None: nn.ConvTranspose(
        features, (2, 2), strides=(2, 2), name=name),
    batch_norm=lambda use_running_average, momentum=0.99, epsilon=1e-5: nn.BatchNorm(
        use_running_average=use_running_average, momentum=momentum, epsilon=epsilon),
    group_norm=lambda num_groups, epsilon=1e-6: nn.GroupNorm(num_groups=num_groups,
                                                             epsilon=epsilon),
    dense=nn.Dense,
    dropout=nn.Dropout,
    max_pool_2x2=lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)),
    spatial_mean=lambda x: x.mean(axis=(1, 2)),
    relu=nn.relu,
    gelu=nn.gelu,
    split_batch=_identity,
    merge_batch=_identity,
)


def _dropout_on_whole_batch(rate, deterministic):
  """Dropout of the whole batch, merged from its chunks and split again: the same masks as
  an unchunked batch draws."""
  dropout = nn.Dropout(rate, deterministic=deterministic)

  def apply(x):
    if not isinstance(x, xla_cpu.Chunks):
      return dropout(x)
    return xla_cpu.Chunks.split(dropout(x.merge()), len(x.chunks))
  return apply


def xla_cpu_layers(chunk_size: int = 64) -> LayerSet:
  """The `xla_cpu` layers; a training batch of a multiple of chunk_size images runs as chunks
  of that many (0: whole batches). XLA:CPU runs the chunks' ops side by side, where one op
  at a time leaves cores idle; smaller chunks compile longer and gain nothing more
  (docs/benchmarks.md)."""
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be 0 (no chunks) or positive, got {chunk_size}")
  chunkwise = xla_cpu.chunkwise

  def split_batch(x, train: bool):
    if not train or not chunk_size or x.shape[0] % chunk_size or x.shape[0] == chunk_size:
      return x
    return xla_cpu.Chunks.split(x, x.shape[0] // chunk_size)

  def merge_batch(x):
    return x.merge() if isinstance(x, xla_cpu.Chunks) else x

  return LayerSet(
      name="xla_cpu",
      conv=lambda features, kernel_size, use_bias=True: (
          chunkwise(xla_cpu.Conv(features, use_bias)) if tuple(kernel_size) == (1, 1) else
          chunkwise(nn.Conv(features, kernel_size, padding="SAME", use_bias=use_bias))),
      conv1x1=lambda features, use_bias=True: chunkwise(xla_cpu.Conv(features, use_bias)),
      depthwise=lambda kernel_size=3, use_bias=True: chunkwise(
          DepthwiseConv(kernel_size, use_bias, xla_cpu.shifted_depthwise_conv)),
      conv_transpose2x2=lambda features, name=None: chunkwise(
          xla_cpu.ConvTranspose2x2(features, name=name)),
      batch_norm=lambda use_running_average, momentum=0.99, epsilon=1e-5: xla_cpu.BatchNorm(
          use_running_average=use_running_average, momentum=momentum, epsilon=epsilon),
      group_norm=lambda num_groups, epsilon=1e-6: chunkwise(
          xla_cpu.GroupNorm(num_groups=num_groups, epsilon=epsilon)),
      dense=lambda features: chunkwise(nn.Dense(features)),
      dropout=_dropout_on_whole_batch,
      max_pool_2x2=chunkwise(xla_cpu.max_pool_2x2),
      spatial_mean=chunkwise(xla_cpu.spatial_mean),
      relu=chunkwise(nn.relu),
      gelu=chunkwise(nn.gelu),
      split_batch=split_batch,
      merge_batch=merge_batch,
  )


XLA_CPU = xla_cpu_layers()

LAYER_SETS = {"flax": FLAX, "xla_cpu": XLA_CPU}
LAYER_CHOICES = ("auto", *LAYER_SETS)  # what a config's `layers` field may say


def layer_set(name: "str | LayerSet" = "auto") -> LayerSet:
  """The set a config's `layers` names; "auto" is `XLA_CPU` on JAX's CPU backend, else `FLAX`.
  A LayerSet is returned as it is."""
  if isinstance(name, LayerSet):
    return name
  if name == "auto":
    name = "xla_cpu" if jax.default_backend() == "cpu" else "flax"
  if name not in LAYER_SETS:
    raise ValueError(f"unknown layer set {name!r}; choose from {', '.join(LAYER_CHOICES)}")
  return LAYER_SETS[name]
