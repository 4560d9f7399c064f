"""The conditional U-Net: parameter count, shapes, per-example independence, learning."""

import hashlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifarjax import diffusion
from cifarjax.models import count_params
from cifarjax.models.unet import UNet, num_groups, paper_unet

NUM_CLASSES = 10
NUM_TIMESTEPS = 20


def tiny_unet():
  return UNet(num_classes=NUM_CLASSES, num_timesteps=NUM_TIMESTEPS, base_channels=8,
              channel_mults=(1, 2), blocks_per_level=1, embed_hidden=16)


def inputs(batch, size=16, seed=0):
  rng = np.random.default_rng(seed)  # numpy: no random-number programs to compile
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(0, NUM_TIMESTEPS, batch), jnp.int32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES + 1, batch), jnp.int32)
  return x, t, labels


def quick_init(model, *args, seed=0):
  """Parameters shaped as model.init makes them, drawn with numpy.

  Kernels ~ N(0, 1/fan_in) (LeCun, as flax's default), embeddings ~ N(0, 1/width),
  norm scales 1, biases 0. Compiling model.init costs tens of seconds on a
  busy CPU (one truncated-normal sampler per parameter); this costs none.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      std = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "embedding":
      std = 1 / np.sqrt(leaf.shape[-1])
    elif name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    else:
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(scale=std, size=leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
  """(model, params, jitted apply) for a U-Net small enough to train in seconds."""
  model = tiny_unet()
  return model, quick_init(model, *inputs(1)), jax.jit(model.apply)


def test_paper_unet_parameter_count_and_output_shape():
  model = paper_unet(num_classes=100)
  x, t, labels = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32), jnp.full((2,), 100)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)
  assert count_params(params) == 996_859  # the paper: 996,863
  assert count_params(params) < 1_000_000
  # num_classes + 1 label rows: the last is the classifier-free guidance "null" label.
  tables = [v for k, v in jax.tree_util.tree_leaves_with_path(params) if k[-1].key == "embedding"]
  assert len(tables) == 7 and all(v.shape[0] == 101 for v in tables)
  eps = jax.eval_shape(model.apply, params, x, t, labels)
  assert (eps.shape, eps.dtype) == ((2, 32, 32, 3), jnp.float32)


def parameter_tree_digest(params) -> str:
  rows = sorted(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}"
                for path, leaf in jax.tree_util.tree_leaves_with_path(params))
  return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def test_parameter_paths_are_those_checkpoints_were_written_with():
  """The paper U-Net's and classifier's parameter paths and shapes, as of 641c333 (before the
  1x1 layers became `layers.Conv`): a renamed layer would leave checkpoints unreadable."""
  from cifarjax.models import paper_classifier
  x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
  unet = jax.eval_shape(paper_unet().init, jax.random.key(0), x, t, t)
  classifier = jax.eval_shape(paper_classifier().init, jax.random.key(0), x)
  assert parameter_tree_digest(unet) == "5202ec36fcb2fd40"
  assert parameter_tree_digest(classifier) == "066cae3a952cf6cd"


def test_num_groups_divides_channels():
  assert num_groups(64) == 8
  assert num_groups(42) == 7
  assert num_groups(84) == 7
  assert num_groups(5) == 5
  assert num_groups(11) == 1


def test_count_params():
  assert count_params({"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros(5)}}) == 17


def test_output_shape_and_dtype(tiny):
  _, params, apply = tiny
  x, t, labels = inputs(4)
  labels = labels.at[0].set(NUM_CLASSES)  # the null label is a valid input
  eps = apply(params, x, t, labels)
  chex.assert_shape(eps, x.shape)
  chex.assert_type(eps, jnp.float32)
  chex.assert_tree_all_finite(eps)


def test_conditioning_changes_output(tiny):
  _, params, apply = tiny
  x, t, labels = inputs(4)
  base = apply(params, x, t, labels)
  assert not np.allclose(base, apply(params, x, t, (labels + 1) % NUM_CLASSES))
  assert not np.allclose(base, apply(params, x, (t + 7) % NUM_TIMESTEPS, labels))


def test_examples_do_not_interact(tiny):
  """GroupNorm, not BatchNorm: an example's output does not depend on the rest of its batch."""
  _, params, apply = tiny
  x, t, labels = inputs(4)
  other_x, other_t, other_labels = inputs(4, seed=1)
  mixed = apply(params, x.at[1:].set(other_x[1:]), t.at[1:].set(other_t[1:]),
                labels.at[1:].set(other_labels[1:]))
  # Only float rounding differs (XLA may pick other conv algorithms per batch).
  np.testing.assert_allclose(mixed[0], apply(params, x, t, labels)[0], atol=1e-4)


def test_tiny_unet_overfits_a_small_batch(tiny):
  model, params, _ = tiny
  schedule = diffusion.linear_schedule(NUM_TIMESTEPS)
  x0, _, labels = inputs(4, size=8)
  x0 = jnp.tanh(x0)
  key = jax.random.PRNGKey(1)  # the same timesteps and noise at every step
  # One flat parameter vector: one update kernel to compile instead of one per leaf.
  optimizer = optax.flatten(optax.adam(1e-2))

  def loss_fn(params):
    return diffusion.training_loss(lambda x, t, y: model.apply(params, x, t, y), schedule, x0,
                                   labels, key)

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses


def test_residual_block_is_an_argument():
  """UNet(residual_block=...) swaps every level's residual block, as Classifier(blocks=...)
  swaps its blocks; the default is the paper's."""
  import flax.linen as nn

  class Scaled(nn.Module):  # h * a learned per-channel scale: C parameters per block
    @nn.compact
    def __call__(self, h):
      return h * self.param("scale", nn.initializers.ones, (h.shape[-1],))

  x, t, y = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)

  def count(model):
    return count_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)["params"])

  default = UNet(base_channels=8, channel_mults=(1, 2), blocks_per_level=2, embed_hidden=16)
  swapped = UNet(base_channels=8, channel_mults=(1, 2), blocks_per_level=2, embed_hidden=16,
                 residual_block=Scaled)
  # 3 UNetBlocks (8, 16, 8 channels) of 2 residual blocks each; the paper's block holds two
  # GroupNorms (2C), two depthwise 3x3 (9C + C bias each) and two pointwise (C*C + C each).
  paper_block = lambda c: 2 * (2 * c + 10 * c + c * c + c)
  removed = sum(2 * (paper_block(c) - c) for c in (8, 16, 8))
  assert count(default) - count(swapped) == removed
  out = swapped.apply(swapped.init(jax.random.PRNGKey(0), x, t, y), x, t, y)
  chex.assert_shape(out, x.shape)
  assert count(UNet(num_classes=100, base_channels=42, channel_mults=(1, 2, 2, 2),
                    blocks_per_level=6, embed_hidden=190)) == count(paper_unet()) == 996_859
