import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax import augment
from cifarjax.augment import AugmentConfig

IMAGE = jax.random.uniform(jax.random.PRNGKey(0), (32, 32, 3))


def test_flips_twice_are_identity():
  chex.assert_trees_all_equal(augment.flip_horizontal(augment.flip_horizontal(IMAGE)), IMAGE)
  chex.assert_trees_all_equal(augment.flip_vertical(augment.flip_vertical(IMAGE)), IMAGE)
  assert not jnp.array_equal(augment.flip_horizontal(IMAGE), IMAGE)


def test_hflip_probability_one_and_zero():
  batch = jnp.stack([IMAGE] * 4)
  always = augment.augment(jax.random.PRNGKey(1), batch, AugmentConfig(hflip_prob=1.0))
  never = augment.augment(jax.random.PRNGKey(1), batch, AugmentConfig(hflip_prob=0.0))
  chex.assert_trees_all_equal(always, batch[:, :, ::-1])
  chex.assert_trees_all_equal(never, batch)


def test_hflip_half_of_the_time():
  batch = jnp.stack([IMAGE] * 1000)
  out = augment.augment(jax.random.PRNGKey(2), batch, AugmentConfig(hflip_prob=0.5))
  flipped = np.mean(np.all(np.asarray(out) == np.asarray(batch[:, :, ::-1]), axis=(1, 2, 3)))
  assert 0.45 < flipped < 0.55


def test_random_crop_keeps_size_and_is_a_shifted_window():
  out = augment.random_crop(jax.random.PRNGKey(3), IMAGE, padding=4)
  chex.assert_shape(out, IMAGE.shape)
  padded = np.pad(np.asarray(IMAGE), ((4, 4), (4, 4), (0, 0)))
  windows = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
  assert any(np.array_equal(np.asarray(out), w) for w in windows)


def test_noise_statistics():
  grey = jnp.full((256, 256, 3), 0.5)
  noisy = augment.add_gaussian_noise(jax.random.PRNGKey(4), grey, variance=0.015)
  diff = np.asarray(noisy - grey)
  assert abs(diff.mean()) < 2e-3
  assert abs(diff.var() - 0.015) < 1e-3
  assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1


def test_noise_probability():
  batch = jnp.full((2000, 4, 4, 3), 0.5)
  cfg = AugmentConfig(hflip_prob=0.0, noise_prob=0.7)
  out = np.asarray(augment.augment(jax.random.PRNGKey(5), batch, cfg))
  changed = np.mean(np.any(out != 0.5, axis=(1, 2, 3)))
  assert 0.66 < changed < 0.74


def test_jitter_keeps_shape_and_range_and_zero_jitter_is_identity():
  out = augment.colour_jitter(jax.random.PRNGKey(6), IMAGE, 0.2, 0.2, 0.2)
  chex.assert_shape(out, IMAGE.shape)
  assert float(out.min()) >= 0 and float(out.max()) <= 1
  same = augment.spatial_jitter(jax.random.PRNGKey(7), IMAGE, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(same, IMAGE, atol=1e-5)
  moved = augment.spatial_jitter(jax.random.PRNGKey(7), IMAGE, 10.0, 2.0, 0.1)
  assert not np.allclose(moved, IMAGE, atol=1e-3)


def test_ablation_pipeline_is_deterministic_per_key():
  from cifarjax.config import CLASSIFIER_PRESETS
  batch = jnp.stack([IMAGE] * 8)
  for name in ("aug-noise", "aug-jitter"):
    cfg = CLASSIFIER_PRESETS[name].augment
    a = augment.augment(jax.random.PRNGKey(8), batch, cfg)
    b = augment.augment(jax.random.PRNGKey(8), batch, cfg)
    chex.assert_trees_all_equal(a, b)
    chex.assert_shape(a, batch.shape)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def _crop_offsets(outputs, padding):
  """(dy, dx) of each crop of an all-ones image: zero rows on top mean a window from above."""
  offsets = []
  for out in np.asarray(outputs):
    ones_rows = np.flatnonzero(out[:, :, 0].any(axis=1))
    ones_cols = np.flatnonzero(out[:, :, 0].any(axis=0))
    # Rows padding - dy .. of the window hold image rows; zeros come first where dy < padding.
    dy = padding - ones_rows[0] if ones_rows[0] else padding + (out.shape[0] - 1 - ones_rows[-1])
    dx = padding - ones_cols[0] if ones_cols[0] else padding + (out.shape[1] - 1 - ones_cols[-1])
    offsets.append((int(dy), int(dx)))
  return offsets


def test_random_crop_moves_a_constant_image_to_every_offset():
  """Cropping an all-ones image shows the zero padding at the border: all 9 x 9 offsets of
  padding 4 turn up, about equally often, and each crop is exactly its window."""
  ones = jnp.ones((32, 32, 3))
  keys = jax.random.split(jax.random.PRNGKey(9), 810)
  outs = np.asarray(jax.vmap(lambda k: augment.random_crop(k, ones, 4))(keys))
  padded = np.pad(np.ones((32, 32, 3), np.float32), ((4, 4), (4, 4), (0, 0)))
  offsets = _crop_offsets(outs, 4)
  for out, (dy, dx) in zip(outs, offsets):
    np.testing.assert_array_equal(out, padded[dy:dy + 32, dx:dx + 32])
  counts = np.zeros((9, 9))
  for dy, dx in offsets:
    counts[dy, dx] += 1
  assert (counts > 0).all(), counts  # 10 expected per offset; P(some offset absent) ~ 81 e^-10
  assert counts[4, 4] < 30  # the identity window is one offset among 81


def test_crop_probability_through_the_pipeline():
  batch = jnp.ones((1000, 32, 32, 3))
  cfg = AugmentConfig(hflip_prob=0.0, crop_prob=0.7)
  out = np.asarray(augment.augment(jax.random.PRNGKey(10), batch, cfg))
  moved = np.mean((out == 0).any(axis=(1, 2, 3)))
  # Cropped with p 0.7, and then 80 of 81 offsets show padding: 0.7 * 80 / 81 = 0.691.
  assert 0.64 < moved < 0.74, moved


COLOURFUL = jnp.asarray(np.random.default_rng(11).uniform(0.3, 0.7, (8, 8, 3)), jnp.float32)


def _grey(image):
  return np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])


def _jitter_factors(brightness, contrast, saturation, num=200):
  """The factor each key applied, read off the output of one jitter kind at a time
  (inputs in [0.3, 0.7] so that factors in [0.8, 1.2] never clip)."""
  keys = jax.random.split(jax.random.PRNGKey(12), num)
  outs = np.asarray(jax.vmap(lambda k: augment.colour_jitter(k, COLOURFUL, brightness, contrast,
                                                             saturation))(keys), np.float64)
  x = np.asarray(COLOURFUL, np.float64)
  if brightness:  # out = b * x
    ref = x
  elif contrast:  # out = m + c (x - m), m the mean grey level
    m = _grey(x).mean()
    outs, ref = outs - m, x - m
  else:  # out = grey + s (x - grey), grey per pixel (unchanged by the blend)
    g = _grey(x)[..., None]
    outs, ref = outs - g, x - g
  factors = (outs * ref).sum(axis=(1, 2, 3)) / (ref * ref).sum()
  # Each output is exactly factor * ref: one factor per image, to float32 rounding.
  np.testing.assert_allclose(outs, factors[:, None, None, None] * ref, atol=2e-6)
  return factors


@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation"])
def test_colour_jitter_applies_a_uniform_factor(kind):
  """torchvision's rule: each factor uniform in [1 - 0.2, 1 + 0.2], a fresh one per image."""
  factors = _jitter_factors(**{k: 0.2 if k == kind else 0.0
                               for k in ("brightness", "contrast", "saturation")})
  assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
  # Uniform on [0.8, 1.2]: mean 1, std 0.4 / sqrt(12) = 0.115 (200 draws: +-0.008 for the mean).
  assert abs(factors.mean() - 1.0) < 0.03
  assert 0.09 < factors.std() < 0.14, factors.std()
