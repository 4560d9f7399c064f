"""pytorch-fid's input pipeline: uint8 -> /255 -> bilinear resize to 299 -> 2x-1.

The resize is torch's `F.interpolate(mode='bilinear', align_corners=False)`:
half-pixel centres, source coordinates below 0 clamped to 0, and no
antialiasing, also when shrinking. `jax.image.resize` antialiases on downscale,
so the resize is written out as one interpolation matrix per axis.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

INPUT_SIZE = 299


def check_uint8_images(images, what="images"):
  """Raises a ValueError naming the problem unless images is uint8 (N, H, W, 3).

  Works on numpy and jax arrays (shape and dtype only, plus the value range for
  numpy arrays of another integer type, which are refused either way).
  """
  shape, dtype = tuple(images.shape), np.dtype(images.dtype)
  if len(shape) != 4:
    raise ValueError(f"{what} must have shape (N, H, W, 3) (NHWC), got shape {shape}")
  if shape[-1] != 3:
    raise ValueError(
        f"{what} must have 3 (RGB) channels in the last axis (NHWC), got {shape[-1]} "
        f"(shape {shape}); convert grayscale or RGBA images to RGB first")
  if dtype != np.uint8:
    if np.issubdtype(dtype, np.floating):
      raise ValueError(
          f"{what} must be uint8 in 0..255, got floating point ({dtype}); FID is defined on "
          f"8-bit images: quantise first, e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8)")
    if isinstance(images, np.ndarray) and np.issubdtype(dtype, np.integer) and images.size:
      lo, hi = int(images.min()), int(images.max())
      if lo < 0 or hi > 255:
        raise ValueError(f"{what} must lie in 0..255, got values in [{lo}, {hi}] ({dtype})")
    raise ValueError(f"{what} must be uint8 in 0..255, got dtype {dtype}")


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of torch's bilinear, align_corners=False."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x, size, precision=lax.Precision.HIGHEST):
  """Resizes float NHWC `x` to `size` = (height, width) like torch's bilinear."""
  mh = jnp.asarray(bilinear_matrix(x.shape[1], size[0]))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], size[1]))
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=precision)


def preprocess(images, size=INPUT_SIZE, precision=lax.Precision.HIGHEST):
  """uint8 NHWC images of any size -> float32 (N, size, size, 3) in [-1, 1]."""
  check_uint8_images(images)
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  x = resize_bilinear(x, (size, size), precision)
  return 2.0 * x - 1.0
