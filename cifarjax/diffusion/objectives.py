"""The training objective: what the network predicts, how timesteps are weighed, the loss.

A network's output is one of `PREDICTIONS` (`Prediction`: eps or v), which says what
it is regressed on and how to read the noise and the clean image off it; a
`LOSS_WEIGHTINGS` entry (`LossWeighting`: none, min-SNR) weighs each example's squared
error by its SNR. `training_loss` is the denoising loss of a batch; `drop_labels`
nulls labels for classifier-free guidance.
"""

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from cifarjax import registry
from cifarjax.diffusion.schedules import Schedule, at_timesteps, expand_to_rank, q_sample, snr

# The network applied to a batch: model_fn(x, t, labels) -> output (see `cifarjax.diffusion`).
ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Prediction(NamedTuple):
  """What a network outputs, as functions of (x_t = alpha x0 + sigma eps, alpha, sigma).

  target(x0, eps, alpha, sigma): what training regresses the output on.
  to_eps / to_x0(output, x_t, alpha, sigma): the noise and the clean image an
    output implies, which is how every sampler reads any model.
  x0_error_scale(snr): its squared error over x0's, ||out - target||^2 =
    scale ||x0_pred - x0||^2, which loss weightings defined on x0 divide by.
  """
  target: Callable
  to_eps: Callable
  to_x0: Callable
  x0_error_scale: Callable


# eps (Ho et al. 2020): x0 = (x_t - sigma eps) / alpha; its error is alpha/sigma times x0's.
EPS_PREDICTION = Prediction(
    target=lambda x0, eps, alpha, sigma: eps,
    to_eps=lambda out, x_t, alpha, sigma: out,
    to_x0=lambda out, x_t, alpha, sigma: (x_t - sigma * out) / alpha,
    x0_error_scale=lambda snr: snr)


# v = alpha eps - sigma x0 (Salimans & Ho 2022). With alpha^2 + sigma^2 = 1, x0 = alpha x_t
# - sigma v and eps = sigma x_t + alpha v, so neither divides by a vanishing alpha or
# sigma; x0's error is -sigma times v's, and 1 / sigma^2 = SNR + 1.
V_PREDICTION = Prediction(
    target=lambda x0, eps, alpha, sigma: alpha * eps - sigma * x0,
    to_eps=lambda out, x_t, alpha, sigma: sigma * x_t + alpha * out,
    to_x0=lambda out, x_t, alpha, sigma: alpha * x_t - sigma * out,
    x0_error_scale=lambda snr: snr + 1.0)


PREDICTIONS: dict[str, Prediction] = {"eps": EPS_PREDICTION, "v": V_PREDICTION}


class LossWeighting(Protocol):
  """What `LOSS_WEIGHTINGS` holds: weigh(snr, x0_error_scale, **settings) -> weights.

  snr: float32 (B,), each example's SNR_t (> 0); x0_error_scale: the prediction's
  `Prediction.x0_error_scale(snr)`, (B,). Returns the weight (B,) of each example's squared
  error in the prediction's own units: a weighting defined on the x0 error w(SNR) returns
  w(SNR) / x0_error_scale. Traced inside the jitted train step, so jnp only. Settings:
  keyword parameters after x0_error_scale with JSON defaults
  (`DiffusionConfig.loss_weighting_kwargs`).
  """

  def __call__(self, snr: jax.Array, x0_error_scale: jax.Array, **settings: Any) -> jax.Array: ...


def no_weighting(snr, x0_error_scale):
  """DDPM's simplified objective: every timestep weighs the same."""
  return jnp.ones_like(snr)


def min_snr_weighting(snr, x0_error_scale, gamma: float = 5.0):
  """Min-SNR-gamma (Hang et al. 2023): the x0 error weighted by min(SNR, gamma).

  In the prediction's own error that is min(SNR, gamma) / x0_error_scale:
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v. It caps
  the weight of the low-noise steps, whose easy targets otherwise dominate
  the gradient.
  """
  if not gamma > 0:
    raise ValueError(f"gamma must be positive, got {gamma}")
  return jnp.minimum(snr, gamma) / x0_error_scale


LOSS_WEIGHTINGS: dict[str, LossWeighting] = {"none": no_weighting, "min-snr": min_snr_weighting}


def loss_weights(schedule: Schedule, t, *, prediction: str = "eps", loss_weighting: str = "none",
                 loss_weighting_kwargs: dict | None = None):
  """The per-example loss weights (shaped like t) of a weighting, with its settings, for a
  prediction."""
  weigh = registry.lookup(LOSS_WEIGHTINGS, "loss weighting", loss_weighting)
  scale = registry.lookup(PREDICTIONS, "prediction", prediction).x0_error_scale
  ratio = snr(schedule, t)
  weights = weigh(ratio, scale(ratio), **(loss_weighting_kwargs or {}))
  if jnp.shape(weights) not in ((), ratio.shape):
    raise ValueError(f"loss weighting {loss_weighting!r} must return one weight per example "
                     f"{ratio.shape}, got shape {jnp.shape(weights)}")
  return jnp.broadcast_to(weights, ratio.shape)


def training_loss(model_fn: ModelFn, schedule: Schedule, x0, labels, rng, *,
                  prediction: str = "eps", loss_weighting: str = "none",
                  loss_weighting_kwargs: dict | None = None):
  """The denoising loss of a batch: noise each image to a uniform random t, regress the target.

  x0: float (B, ...) in the model's range; labels: int32 (B,). rng splits into
  the timestep and the noise keys. The loss is the mean over the batch and the
  pixels of weight_t (output - target)^2 (`loss_weights`, with the weighting's
  settings). With the defaults (eps, unweighted) it is DDPM's simplified
  objective, the paper's: every weight is 1, exactly.
  """
  target_of = registry.lookup(PREDICTIONS, "prediction", prediction).target
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  alpha = at_timesteps(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  sigma = at_timesteps(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  weights = loss_weights(schedule, t, prediction=prediction, loss_weighting=loss_weighting,
                         loss_weighting_kwargs=loss_weighting_kwargs)
  output = model_fn(x_t, t, labels).astype(jnp.float32)
  error = jnp.square(output - target_of(x0, noise, alpha, sigma))
  return jnp.mean(expand_to_rank(weights, error.ndim) * error)


def drop_labels(rng, labels, null_label: int, p: float):
  """Replaces each label by `null_label` with probability p (classifier-free guidance training)."""
  drop = jax.random.bernoulli(rng, p, labels.shape)
  return jnp.where(drop, null_label, labels).astype(labels.dtype)
