import chex
import jax
import jax.numpy as jnp
import numpy as np

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
