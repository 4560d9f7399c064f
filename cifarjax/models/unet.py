"""The paper's class-conditional U-Net, which predicts the noise in a diffused image (section 5).

What the paper says: a U-Net [Ronneberger et al.] conditioned on the label and
the timestep; encoders for both; residual blocks with depthwise-separable
convolutions; u-net blocks of 6 residual blocks; levels at several resolutions
joined by skip connections that concatenate channels and then reduce their
number; conditioning as in TeaPearce's minimal conditional diffusion model,
`h = label_encoding * h + time_encoding`; 996,863 parameters. Its diagram, which
gave the channel counts, is lost; `paper_unet` fixes what the text leaves open.

Normalisation is GroupNorm, not BatchNorm. A diffusion batch mixes every noise
level, so batch statistics describe no single input distribution; with small
per-device shards they are also noisy; and at sampling time every image of a
batch sits at the same timestep, unlike in training. GroupNorm normalises each
example on its own, so the network's output for an image does not depend on the
rest of its batch: a sampler may run one chain per example under `jax.vmap`
(see `cifarjax.diffusion.sample`) and get what a batched call gives.
"""

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cifarjax.models.layer_sets import LayerSet, layer_set

MAX_GROUPS = 8


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
  """The most GroupNorm groups, at most `max_groups`, that divide `channels`."""
  return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def group_norm(channels: int, layers: "str | LayerSet" = "auto"):
  return layer_set(layers).group_norm(num_groups(channels))


class LabelEncoder(nn.Module):
  """Label -> per-channel vector: embedding table -> GELU -> Dense.

  The table has num_classes + 1 rows: row `num_classes` is the "null" label
  that classifier-free guidance trains and samples with. A table row is a
  bias-free dense layer applied to a one-hot label, so this is TeaPearce's
  `EmbedFC` (Linear, GELU, Linear) on one-hot labels.
  """
  num_classes: int
  hidden: int
  features: int

  @nn.compact
  def __call__(self, labels):
    """labels: int (B,) in [0, num_classes]. Returns (B, features)."""
    h = nn.Embed(self.num_classes + 1, self.hidden)(labels)
    return nn.Dense(self.features)(nn.gelu(h))


class TimeEncoder(nn.Module):
  """Timestep -> per-channel vector: t / T -> Dense -> GELU -> Dense (TeaPearce's EmbedFC)."""
  num_timesteps: int
  hidden: int
  features: int

  @nn.compact
  def __call__(self, t):
    """t: int (B,) in [0, num_timesteps). Returns (B, features)."""
    s = (t.astype(jnp.float32) / self.num_timesteps)[:, None]
    h = nn.Dense(self.hidden)(s)
    return nn.Dense(self.features)(nn.gelu(h))


class ResidualBlock(nn.Module):
  """x + two rounds of (GroupNorm, GELU, depthwise 3x3, pointwise 1x1); channels unchanged."""
  layers: "str | LayerSet" = "auto"

  @nn.compact
  def __call__(self, x):
    L = layer_set(self.layers)
    channels = x.shape[-1]
    h = x
    for _ in range(2):
      h = L.gelu(group_norm(channels, L)(h))
      h = L.depthwise(3)(h)
      h = L.conv1x1(channels)(h)
    return x + h


class UNetBlock(nn.Module):
  """One level's stage: h = label_enc * h + time_enc, then `num_blocks` residual blocks.

  residual_block: a module class (or factory) called with no arguments, whose
  instances map h to a tensor of h's shape.
  """
  num_classes: int
  num_timesteps: int
  embed_hidden: int
  num_blocks: int
  residual_block: Callable[[], nn.Module]

  @nn.compact
  def __call__(self, h, t, labels):
    channels = h.shape[-1]
    scale = LabelEncoder(self.num_classes, self.embed_hidden, channels)(labels)
    shift = TimeEncoder(self.num_timesteps, self.embed_hidden, channels)(t)
    h = scale[:, None, None, :] * h + shift[:, None, None, :]
    for _ in range(self.num_blocks):
      h = self.residual_block()(h)
    return h


class UNet(nn.Module):
  """Conditional U-Net: predicts the noise eps in x_t from (x_t, t, label).

  Levels run at resolutions H, H/2, ..., H/2^(L-1), with base_channels *
  channel_mults[i] channels at level i. Encoder path: a 3x3 stem conv; at each
  level (after the first) a 2x2 max-pool and a 1x1 conv to the level's width;
  then a UNetBlock, whose output is the level's skip. The deepest level's block
  is the bottleneck. Decoder path, from the second deepest level up: a 2x2
  stride-2 transposed conv to the level's width, concatenation with the skip,
  a 1x1 conv back to the level's width (the channel reduction), a UNetBlock.
  Head: GroupNorm, GELU, 3x3 conv to the input's channels.

  Every UNetBlock has its own label and time encoders (hidden width
  embed_hidden), as TeaPearce's model has one pair per injection point.

  Labels lie in [0, num_classes]; the index num_classes is the "null" label for
  classifier-free guidance, so the label tables have num_classes + 1 rows.
  H and W must be divisible by 2^(L-1). residual_block replaces every level's
  residual block (see `UNetBlock`; default the paper's `ResidualBlock`), as
  `Classifier(blocks=...)` replaces its blocks. layers: the layer set
  (`layer_sets`: "auto", "flax", "xla_cpu", or a LayerSet).
  """
  num_classes: int = 100
  num_timesteps: int = 1000
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 2)
  blocks_per_level: int = 6
  embed_hidden: int = 128
  residual_block: Callable[[], nn.Module] | None = None
  layers: "str | LayerSet" = "auto"

  @nn.compact
  def __call__(self, x, t, labels):
    """Predicts the noise in x.

    x: float (B, H, W, C); t: int (B,) in [0, num_timesteps); labels: int (B,)
    in [0, num_classes]. Returns float32 (B, H, W, C).
    """
    L = layer_set(self.layers)
    widths = [self.base_channels * m for m in self.channel_mults]
    residual_block = self.residual_block or functools.partial(ResidualBlock, L)
    block = lambda: UNetBlock(self.num_classes, self.num_timesteps, self.embed_hidden,
                              self.blocks_per_level, residual_block)
    h = L.conv(widths[0], (3, 3))(x)
    skips = []
    for level, width in enumerate(widths):
      if level:
        h = L.conv1x1(width)(L.max_pool_2x2(h))
      h = block()(h, t, labels)
      skips.append(h)
    for i, level in enumerate(reversed(range(len(widths) - 1))):
      width = widths[level]
      # named as flax names an nn.ConvTranspose, whichever layer set makes it
      h = L.conv_transpose2x2(width, name=f"ConvTranspose_{i}")(h)
      h = jnp.concatenate([h, skips[level]], axis=-1)
      h = L.conv1x1(width)(h)  # concatenation doubled the channels; reduce them
      h = block()(h, t, labels)
    h = L.gelu(group_norm(widths[0], L)(h))
    return L.conv(x.shape[-1], (3, 3))(h)


def paper_unet(num_classes: int = 100, num_timesteps: int = 1000,
               layers: "str | LayerSet" = "auto") -> UNet:
  """The paper's generator: 996,859 parameters for 100 classes (the paper: 996,863).

  Read from the paper: label and timestep encoders; conditioning by
  `label_enc * h + time_enc`; residual blocks with depthwise-separable convs;
  6 residual blocks per u-net block; levels at several resolutions; skips that
  concatenate and then reduce the channels; just under a million parameters.
  Chosen here, since the diagram is lost: four levels (32, 16, 8 and 4 pixels)
  of 42, 84, 84 and 84 channels, encoders with 190 hidden units, GELU as in
  TeaPearce's model, max-pool down and transposed-conv up as there, 1x1 convs
  for the channel changes, and flax's default biases.

  The widths come from a search over base channels 8..256, the multiplier
  tuples (1,2), (1,1,2), (1,2,2), (1,2,3), (1,2,4), (1,2,2,2), (1,2,2,4),
  (1,2,3,4), (1,2,4,4), (1,2,4,8) and encoder widths 8..512, keeping the
  count under 1,000,000 and closest to 996,863; this is 4 short of it.
  """
  return UNet(num_classes=num_classes, num_timesteps=num_timesteps, base_channels=42,
              channel_mults=(1, 2, 2, 2), blocks_per_level=6, embed_hidden=190, layers=layers)


def tiny_unet(num_classes: int = 100, num_timesteps: int = 1000,
              layers: "str | LayerSet" = "auto") -> UNet:
  """Every code path of `paper_unet` (two levels, the encoders, a residual block per
  level) at a size tests compile in seconds."""
  return UNet(num_classes=num_classes, num_timesteps=num_timesteps, base_channels=8,
              channel_mults=(1, 2), blocks_per_level=1, embed_hidden=16, layers=layers)
