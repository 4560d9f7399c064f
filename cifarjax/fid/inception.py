"""pytorch-fid's FID Inception-v3 (TF "inception-2015-12-05") in flax.linen, NHWC.

Module and branch names follow pytorch-fid's state dict (`Mixed_5b.branch1x1.conv`
...), so weights map one to one. What differs from torchvision's Inception-v3,
and must be copied for pytorch-fid's numbers:
  - FIDInceptionA/C/E_1 average pools exclude padding (count_include_pad=False);
  - FIDInceptionE_2 (Mixed_7c) pools with a 3x3 max pool;
  - BatchNorm eps is 1e-3, always in inference mode; convolutions have no bias.
The output is the global average pool of Mixed_7c: 2048-d "pool3" features.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from cifarjax.fid.preprocessing import INPUT_SIZE, preprocess

BN_EPSILON = 1e-3
FEATURE_DIM = 2048
# Full float32 convolutions: GPUs would otherwise use TF32 and TPUs bf16 passes,
# which move FID away from pytorch-fid's float32 number.
DEFAULT_PRECISION = lax.Precision.HIGHEST


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Module):
  """Bias-free 2-D convolution, symmetric zero padding, HWIO `kernel` (nn.Conv's layout)."""
  features: int
  kernel_size: Any = 1
  strides: Any = 1
  padding: Any = 0
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    ph, pw = _pair(self.padding)
    return lax.conv_general_dilated(x, kernel, _pair(self.strides), ((ph, ph), (pw, pw)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=self.precision)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Any = 1
  strides: int = 1
  padding: Any = 0
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    x = Conv(self.features, self.kernel_size, self.strides, self.padding, self.precision,
             name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def avg_pool_3x3(x):
  """3x3, stride 1, padding 1, padding not counted (pytorch-fid's FID blocks)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride=2, padding=0):
  p = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (3, 3), (stride, stride), p)


class FIDInceptionA(nn.Module):
  """Mixed_5b..5d."""
  pool_features: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, 1, p, self.precision, name=name)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, 5, 2, name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, 1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, 1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid 35 -> 17."""
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=1, s=1, p=0, name=None: BasicConv2d(f, k, s, p, self.precision, name=name)
    b3 = conv(384, 3, 2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, 1, 1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, 2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 convolutions."""
  channels_7x7: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, 1, p, self.precision, name=name)
    c7 = self.channels_7x7
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid 17 -> 8."""
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=1, s=1, p=0, name=None: BasicConv2d(f, k, s, p, self.precision, name=name)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, 3, 2, name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, 2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2)."""
  pool: str
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, 1, p, self.precision, name=name)
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, 1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = avg_pool_3x3(x)
    elif self.pool == "max":  # pytorch-fid's (and TF-FID's) quirk in the last block
      pooled = max_pool_3x3(x, stride=1, padding=1)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """uint8 NHWC images (any size) -> float32 (N, 2048) pool3 features.

  Set `preprocessed=True` to feed images already through `preprocess`.
  """
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x, preprocessed: bool = False):
    if not preprocessed:
      x = preprocess(x, INPUT_SIZE, self.precision)
    conv = lambda f, k=1, s=1, p=0, name=None: BasicConv2d(f, k, s, p, self.precision, name=name)
    x = conv(32, 3, 2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, p=1, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3(x)
    x = FIDInceptionA(32, self.precision, name="Mixed_5b")(x)
    x = FIDInceptionA(64, self.precision, name="Mixed_5c")(x)
    x = FIDInceptionA(64, self.precision, name="Mixed_5d")(x)
    x = InceptionB(self.precision, name="Mixed_6a")(x)
    x = FIDInceptionC(128, self.precision, name="Mixed_6b")(x)
    x = FIDInceptionC(160, self.precision, name="Mixed_6c")(x)
    x = FIDInceptionC(160, self.precision, name="Mixed_6d")(x)
    x = FIDInceptionC(192, self.precision, name="Mixed_6e")(x)
    x = InceptionD(self.precision, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", self.precision, name="Mixed_7b")(x)
    x = FIDInceptionE("max", self.precision, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))
