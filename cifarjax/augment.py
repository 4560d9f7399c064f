"""Image augmentations as pure functions of (rng, image), run on the device inside jit.

Each function takes one float32 HWC image in [0, 1] and returns one; `augment`
applies a configured set to a batch with `jax.vmap`. The values are the paper's
(section 1.1): horizontal flip p=0.5 (its default), and for the ablations
vertical flip p=0.5, Gaussian noise of variance 0.015 with p=0.7, random crop
with p=0.7, and spatial and colour jitter.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax.config import AugmentConfig  # defined with the other configs

# Per-channel statistics of the CIFAR-100 training set, in [0, 1].
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


def _with_prob(rng, prob, fn, image):
  """fn(image) with probability prob, else image (both computed: branch-free under vmap)."""
  return jnp.where(jax.random.bernoulli(rng, prob), fn(image), image)


def flip_horizontal(image):
  return image[:, ::-1, :]


def flip_vertical(image):
  return image[::-1, :, :]


def add_gaussian_noise(rng, image, variance):
  noisy = image + jnp.sqrt(variance) * jax.random.normal(rng, image.shape, image.dtype)
  return jnp.clip(noisy, 0.0, 1.0)


def random_crop(rng, image, padding):
  """Zero-pads by `padding` and crops back to the original size at a random offset."""
  h, w, c = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  dy, dx = jax.random.randint(rng, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def spatial_jitter(rng, image, max_rotation_deg, max_shift, max_scale):
  """A small random rotation, scale and shift about the centre (bilinear, edge pixels repeat)."""
  h, w, _ = image.shape
  k_rot, k_scale, k_shift = jax.random.split(rng, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-1, maxval=1) * max_rotation_deg)
  scale = 1 + jax.random.uniform(k_scale, (), minval=-1, maxval=1) * max_scale
  shift = jax.random.uniform(k_shift, (2,), minval=-1, maxval=1) * max_shift
  yy, xx = jnp.mgrid[:h, :w].astype(jnp.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  # Inverse map: where in the source each output pixel comes from.
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  src_y = cos * (yy - cy) - sin * (xx - cx) + cy - shift[0]
  src_x = sin * (yy - cy) + cos * (xx - cx) + cx - shift[1]
  channels = [jax.scipy.ndimage.map_coordinates(image[..., i], [src_y, src_x], order=1, mode="nearest")
              for i in range(image.shape[-1])]
  return jnp.stack(channels, axis=-1)


def colour_jitter(rng, image, brightness, contrast, saturation):
  """Random brightness, contrast and saturation factors in [1-x, 1+x], like torchvision's."""
  kb, kc, ks = jax.random.split(rng, 3)
  factor = lambda k, x: jax.random.uniform(k, (), minval=1 - x, maxval=1 + x)
  grey = lambda im: jnp.dot(im, jnp.array([0.299, 0.587, 0.114], im.dtype))[..., None]
  image = jnp.clip(image * factor(kb, brightness), 0, 1)
  image = jnp.clip(jnp.mean(grey(image)) + factor(kc, contrast) * (image - jnp.mean(grey(image))), 0, 1)
  return jnp.clip(grey(image) + factor(ks, saturation) * (image - grey(image)), 0, 1)


def augment_image(rng, image, config: AugmentConfig):
  c = config
  k = jax.random.split(rng, 9)
  if c.hflip_prob:
    image = _with_prob(k[0], c.hflip_prob, flip_horizontal, image)
  if c.vflip_prob:
    image = _with_prob(k[1], c.vflip_prob, flip_vertical, image)
  if c.crop_prob:
    image = _with_prob(k[2], c.crop_prob, lambda im: random_crop(k[3], im, c.crop_padding), image)
  if c.noise_prob:
    image = _with_prob(k[4], c.noise_prob, lambda im: add_gaussian_noise(k[5], im, c.noise_variance), image)
  if c.jitter_prob:
    jitter = lambda im: colour_jitter(k[8], spatial_jitter(k[7], im, c.max_rotation_deg, c.max_shift, c.max_scale),
                                      c.brightness, c.contrast, c.saturation)
    image = _with_prob(k[6], c.jitter_prob, jitter, image)
  return image


def augment(rng, images, config: AugmentConfig):
  """Augments a float batch (B, H, W, C) in [0, 1], each image with its own key."""
  return jax.vmap(augment_image, in_axes=(0, 0, None))(
      jax.random.split(rng, images.shape[0]), images, config)


def to_float(images_uint8):
  return images_uint8.astype(jnp.float32) / 255.0


def normalize(images):
  """[0, 1] images to zero mean and unit variance per channel (the classifier's input)."""
  return (images - jnp.array(CIFAR_MEAN)) / jnp.array(CIFAR_STD)


def to_model_range(images_uint8):
  """uint8 images to float32 in [-1, 1], the range the generator's noise schedule assumes."""
  return to_float(images_uint8) * 2.0 - 1.0


def to_uint8(images):
  """Model-range float images (any values) to uint8 (a NumPy array), clipped to [-1, 1] first."""
  return np.asarray(jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5), np.uint8)
