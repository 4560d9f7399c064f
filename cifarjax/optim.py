"""Optimisers, learning-rate schedules by name, and the weights' moving average.

`make_optimizer(config, steps_per_epoch) -> (tx, lr_fn)`, for both models. The paper's
classifier recipe is Adam with L2 regularisation added to the gradient (PyTorch's
`Adam(weight_decay=...)`), the generator's plain Adam; both multiply the rate by
lr_decay once per epoch.
"""

import jax
import jax.numpy as jnp
import optax


def exponential(config, steps_per_epoch: int):
  """The paper's: lr x lr_decay once per epoch (PyTorch's ExponentialLR stepped each epoch)."""
  return optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch,
                                 decay_rate=config.lr_decay, staircase=True)


def cosine(config, steps_per_epoch: int):
  """Linear warm-up from 0 over warmup_steps, then a half cosine down to 0 at config.steps:
  the run ends annealed, whatever its length."""
  del steps_per_epoch
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                            max(config.steps, config.warmup_steps + 1), 0.0)


LR_SCHEDULES = {"exponential": exponential, "cosine": cosine}


def adam_l2(weight_decay: float, lr):
  """L2 in the gradient, then Adam: the decay is rescaled by Adam's per-weight step size."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(lr))


def adamw(weight_decay: float, lr):
  """Decoupled decay (Loshchilov & Hutter): every weight shrinks by lr * weight_decay per step."""
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(lr))


OPTIMIZERS = {"adam": adam_l2, "adamw": adamw}


def make_optimizer(config, steps_per_epoch: int):
  """(optax transformation, learning-rate schedule) of a run's config: its lr_schedule and its
  optimizer with its weight_decay where it names them (a ClassifierConfig); else (a
  DiffusionConfig) the generator's recipe, plain Adam with the exponential schedule."""
  lr = LR_SCHEDULES[getattr(config, "lr_schedule", "exponential")](config, steps_per_epoch)
  if not hasattr(config, "optimizer"):
    return optax.adam(lr), lr
  return OPTIMIZERS[config.optimizer](config.weight_decay, lr), lr


def ema_decay_at(step, decay: float):
  """The moving average's decay at step t: min(decay, (1 + t) / (10 + t)).

  Without the ramp an average with decay 0.999 still holds ~37% of the initial
  weights after 1,000 steps; with it, the weight of step 0 has fallen below 1%
  by step 1,000, so a short run's average is a trained network.
  """
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(average, new, step, decay: float):
  """One step of a moving average of weights, with the decay `ema_decay_at` gives."""
  d = ema_decay_at(step, decay)
  return jax.tree.map(lambda e, x: e + (1.0 - d) * (x - e), average, new)
