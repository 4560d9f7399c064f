"""Denoising diffusion (Ho et al. 2020, DDPM) as pure functions of arrays (Part 2, section 4).

Conventions. Timesteps are 0-based: t in [0, T) is DDPM's step t + 1, so
x_t ~ N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) with alphabar_t the product
of alpha_0..alpha_t, and t = 0 is the least noisy level. The level "t = -1" is
the clean image (alphabar = 1); samplers step down to it last. Below, alpha_t
= sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t), so x_t = alpha_t x_0 +
sigma_t eps and SNR_t = alpha_t^2 / sigma_t^2.

A `model_fn(x, t, labels) -> output` is the network applied to a batch: x float
(B, H, W, C), t int32 (B,), labels int32 (B,). Its output is what the
`prediction` it was trained for names (`PREDICTIONS`): the noise eps (DDPM's
choice, the paper's), or v. Labels lie in [0, num_classes]; the index
num_classes is the "null" label of classifier-free guidance.

Choices by name live in registries, each a plain dict whose contract is a
`Protocol` here: `SCHEDULES` (`ScheduleFn`), `SAMPLERS` (`Sampler`), `PREDICTIONS`
(`Prediction`), `LOSS_WEIGHTINGS` (`LossWeighting`) and `CLIPS`. Adding one is a
function and an entry; its keyword parameters after the contract's are its
settings (`cifarjax.registry`), which configs pass as `schedule_kwargs`,
`loss_weighting_kwargs` and `sample(..., sampler_kwargs=...)`. An unknown name
raises a ValueError (`errors.UserError`) that lists the registered ones.

Everything here traces under `jax.jit`: shapes are static and the reverse
chains run under `jax.lax.scan`, with no Python loop over timesteps.
"""

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import registry
from cifarjax.errors import UserError

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Schedule(NamedTuple):
  """The per-timestep constants of a noise schedule, each float32 (T,).

  A NamedTuple, so it is a pytree: pass it to jitted functions as an argument.
  posterior_* describe q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t,
  posterior_variance) (DDPM eq. 6-7); at t = 0 the posterior variance is 0, so
  its log is clipped to the value at t = 1.
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def schedule_from_betas(betas) -> Schedule:
  """Every Schedule constant from betas (T,), each in [0, 1) (a ValueError otherwise);
  computed in float64, stored as float32."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not (np.isfinite(betas).all() and (betas >= 0).all() and (betas < 1).all()):
    raise ValueError(f"betas must be a vector of numbers in [0, 1), got shape {betas.shape} "
                     f"from {np.min(betas, initial=np.inf)} to {np.max(betas, initial=-np.inf)}")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # The variance is 0 at t = 0; log(0) would be -inf.
  posterior_log_variance_clipped = np.log(
      np.append(posterior_variance[1:2], posterior_variance[1:]))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
      posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
      posterior_mean_coef2=f32(
          (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)),
  )


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
  """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
  return schedule_from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def sigmoid_gamma(s, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  clip_min: float = 1e-9):
  """Jabri, Fleet and Chen (2022)'s sigmoid alphabar at continuous time s in [0, 1].

  gamma(s) = (sigmoid(end/tau) - sigmoid((s (end - start) + start)/tau))
             / (sigmoid(end/tau) - sigmoid(start/tau)), clipped to [clip_min, 1].
  It falls from 1 at s = 0 to 0 at s = 1.
  """
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  s = np.asarray(s, np.float64)
  v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
  gamma = (v_end - sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)
  return np.clip(gamma, clip_min, 1.0)


def sigmoid_schedule(num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0,
                     tau: float = 1.0, clip_min: float = 1e-9) -> Schedule:
  """The sigmoid schedule the paper chose: alphabar_t = gamma((t + 1) / T).

  Betas are the ratios 1 - gamma((t + 1)/T) / gamma(t/T), clipped to <= 0.999
  as in DDPM's cosine schedule, so the products of (1 - beta) telescope back to
  gamma wherever no clipping happened (with the defaults, all but the last
  step, where gamma reaches clip_min).
  """
  gamma = sigmoid_gamma(np.arange(num_timesteps + 1) / num_timesteps, start, end, tau, clip_min)
  betas = np.clip(1.0 - gamma[1:] / gamma[:-1], 0.0, 0.999)
  return schedule_from_betas(betas)


def sigmoid_blog_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 0.02) -> Schedule:
  """The sigmoid schedule of The Annotated Diffusion Model, the blog the paper's code came from.

  betas = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start.
  Not `sigmoid_schedule`: this one puts the sigmoid on the betas, not on
  alphabar, and since sigmoid(-6) = 1 - sigmoid(6) = 0.0025 its betas stop
  short of both beta_start and beta_end. The paper cites Jabri et al. for its
  sigmoid schedule but took its code from this blog, so which of the two its
  FID numbers used is open; both are here.
  """
  z = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return schedule_from_betas(1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start)


class ScheduleFn(Protocol):
  """What `SCHEDULES` holds: schedule(num_timesteps, **settings) -> Schedule.

  Returns the `Schedule` of num_timesteps steps (`schedule_from_betas` makes one from any
  betas, each in [0, 1)). Its settings are its keyword parameters after num_timesteps,
  each with a JSON default (`DiffusionConfig.schedule_kwargs`); it raises ValueError for a
  value it cannot take. Runs once per run, in numpy: no tracing.
  """

  def __call__(self, num_timesteps: int, **settings: Any) -> Schedule: ...


SCHEDULES: dict[str, ScheduleFn] = {
    "sigmoid": sigmoid_schedule,  # the paper's choice (Jabri et al. 2022)
    "linear": linear_schedule,  # DDPM's
    "sigmoid-blog": sigmoid_blog_schedule,
}


def make_schedule(name: str, num_timesteps: int, schedule_kwargs: dict | None = None) -> Schedule:
  """The registered schedule `name` (see SCHEDULES) over num_timesteps steps, with its
  settings; a ValueError where what it returns is no Schedule of num_timesteps steps."""
  schedule = registry.lookup(SCHEDULES, "schedule", name)(num_timesteps, **(schedule_kwargs or {}))
  shape = getattr(getattr(schedule, "betas", None), "shape", None)
  if not isinstance(schedule, Schedule) or shape != (num_timesteps,):
    raise ValueError(f"schedule {name!r} must return a diffusion.Schedule of {num_timesteps} "
                     f"steps, got {type(schedule).__name__} of betas shaped {shape}")
  return schedule


def _expand(v, ndim):
  """v (shaped like t: () or (B,)) reshaped to broadcast against an array of rank ndim."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _at(a, t, ndim):
  """a[t], shaped to broadcast against an array of rank ndim whose leading axes are t's."""
  return _expand(a[t], ndim)


def alpha_bar(schedule: Schedule, t):
  """alphabar_t, with alphabar = 1 (the clean image) at t = -1."""
  t = jnp.asarray(t)
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def q_sample(schedule: Schedule, x0, t, noise):
  """Samples x_t ~ q(x_t | x_0) = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise.

  x0, noise: (B, ...); t: int (B,), or a scalar for one example.
  """
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def snr(schedule: Schedule, t):
  """The signal-to-noise ratio alpha_t^2 / sigma_t^2 = alphabar_t / (1 - alphabar_t), t >= 0."""
  return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])


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
  alpha = _at(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  sigma = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  weights = loss_weights(schedule, t, prediction=prediction, loss_weighting=loss_weighting,
                         loss_weighting_kwargs=loss_weighting_kwargs)
  output = model_fn(x_t, t, labels).astype(jnp.float32)
  error = jnp.square(output - target_of(x0, noise, alpha, sigma))
  return jnp.mean(_expand(weights, error.ndim) * error)


def drop_labels(rng, labels, null_label: int, p: float):
  """Replaces each label by `null_label` with probability p (classifier-free guidance training)."""
  drop = jax.random.bernoulli(rng, p, labels.shape)
  return jnp.where(drop, null_label, labels).astype(labels.dtype)


def ddpm_step(schedule: Schedule, eps, x_t, t, noise):
  """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2; the paper's section 4).

  x_{t-1} = (x_t - beta_t / sqrt(1 - alphabar_t) eps) / sqrt(alpha_t) + sigma_t z
  with sigma_t^2 the posterior variance beta~_t = beta_t (1 - alphabar_{t-1}) /
  (1 - alphabar_t). DDPM found beta~_t and beta_t to sample equally well;
  beta~_t is the exact variance of q(x_{t-1} | x_t, x_0), it is 0 at t = 0 (no
  noise is added on the last step), and with it this step is DDIM's step with
  eta = 1. With eps recomputed from a clipped x_0 prediction (`sample`'s
  clip, the default) this is the official DDPM sampler's clipped step: its
  posterior mean coef1 clip(x_0) + coef2 x_t written in eps.

  eps, x_t, noise: (B, ...) or one example; t: int (B,) or a scalar.
  """
  nd = x_t.ndim
  coef = _at(schedule.betas, t, nd) / _at(schedule.sqrt_one_minus_alphas_cumprod, t, nd)
  mean = (x_t - coef * eps) / jnp.sqrt(_at(schedule.alphas, t, nd))
  sigma = jnp.sqrt(_at(schedule.posterior_variance, t, nd))
  return mean + jnp.where(_expand(t, nd) > 0, sigma, 0.0) * noise


def ddim_step(schedule: Schedule, eps, x_t, t, t_prev, eta: float = 0.0, noise=None):
  """One DDIM step (Song et al. 2021, eq. 12) from level t to level t_prev.

  x0_pred = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)
  x_prev = sqrt(alphabar_prev) x0_pred + sqrt(1 - alphabar_prev - sigma^2) eps + sigma z
  sigma = eta sqrt((1 - alphabar_prev) / (1 - alphabar_t)) sqrt(1 - alphabar_t / alphabar_prev).

  t_prev = -1 is the clean image. eta = 0 is deterministic; eta = 1 with
  t_prev = t - 1 is `ddpm_step`. With eta = 0 the step is also valid upwards
  (t_prev > t), which is how `ddim_invert` uses it. noise=None means z = 0.
  Clipping x0_pred happens before, in the eps passed (`sample`'s clip).
  """
  nd = x_t.ndim
  a_t = _expand(alpha_bar(schedule, t), nd)
  a_prev = _expand(alpha_bar(schedule, t_prev), nd)
  x0_pred = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
  # Upwards (a_prev < a_t) there is no noise to add; from the clean image
  # (a_t = 1) the denominator vanishes, and so does the numerator.
  sigma = eta * jnp.sqrt((1.0 - a_prev) * jnp.maximum(1.0 - a_t / a_prev, 0.0)
                         / jnp.maximum(1.0 - a_t, 1e-12))
  x_prev = jnp.sqrt(a_prev) * x0_pred + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
  if noise is not None:
    x_prev = x_prev + sigma * noise
  return x_prev


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` timesteps spaced evenly over [0, T - 1], both ends included, descending."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps}")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def guided_model(model_fn: ModelFn, guidance, null_label):
  """The per-example model x (H, W, C), t (), label () -> output, with classifier-free guidance.

  output = (1 + w) model(x, t, label) - w model(x, t, null). Every prediction
  in PREDICTIONS maps outputs to eps affinely with coefficients of (x, t)
  alone, so guiding the outputs is guiding the noise, as Ho & Salimans do.
  With guidance a Python 0 the unconditional pass is skipped; a traced w runs
  both. Each call is model_fn on a batch of 1 (or 2 with guidance); under
  `jax.vmap` over examples XLA batches these into one call per step.
  """
  if isinstance(guidance, (int, float)) and guidance == 0:
    return lambda x, t, label: model_fn(x[None], t[None], label[None])[0]
  if null_label is None:
    raise ValueError("classifier-free guidance needs null_label (the model's num_classes)")

  def guided(x, t, label):
    both = model_fn(jnp.stack([x, x]), jnp.stack([t, t]),
                    jnp.stack([label, jnp.asarray(null_label, label.dtype)]))
    return (1.0 + guidance) * both[0] - guidance * both[1]
  return guided


def static_clip(x0):
  """The data range: x0 clipped to [-1, 1], as DDPM's official sampler does."""
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_clip(x0, percentile: float = 99.5):
  """Imagen's dynamic thresholding (Saharia et al. 2022): s = max(1, the percentile of |x0|),
  x0 clipped to [-s, s] and divided by s. x0 is one example (`sample` vmaps the chain)."""
  s = jnp.maximum(jnp.percentile(jnp.abs(x0), percentile), 1.0)
  return jnp.clip(x0, -s, s) / s


# What samplers do to each predicted clean image before they use it. An eps model's x0 =
# (x_t - sigma eps) / alpha multiplies its error by sigma / alpha, ~1,800 at the sigmoid
# schedule's last timestep: unclipped, a trained network's small errors there send samples
# to |x| in the hundreds. "off" keeps the samplers' exact maths (and DDIM inversion uses it).
CLIPS: dict[str, Callable | None] = {"static": static_clip, "dynamic": dynamic_clip, "off": None}


def _denoiser(model_one, schedule: Schedule, prediction: Prediction, label, clip=None):
  """predict(x, t) -> (eps, x0) of one example's chain at level t >= 0, from one model call.

  With clip (a function in CLIPS) x0 is clipped and eps recomputed from it, eps = (x -
  alpha x0) / sigma, so that every sampler's step reads a consistent pair. Samplers take
  what they need; XLA drops the other.
  """
  def predict(x, t):
    output = model_one(x, t, label)
    alpha, sigma = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    x0 = prediction.to_x0(output, x, alpha, sigma)
    if clip is None:
      return prediction.to_eps(output, x, alpha, sigma), x0
    x0 = clip(x0)
    return (x - alpha * x0) / sigma, x0
  return predict


def _is_zero(eta) -> bool:
  return isinstance(eta, (int, float)) and eta == 0


class Denoiser(Protocol):
  """The model as a sampler sees it: predict(x, t) -> (eps, x0), one example at level t.

  x: float32 image (H, W, C), no batch axis; t: int32 scalar in [0, T). Returns the noise
  and the clean image the network's output implies (`Prediction.to_eps`/`to_x0`), as a
  consistent pair: with `sample`'s clip, x0 is clipped and eps recomputed from it, so x =
  alpha_t x0 + sigma_t eps holds either way. Guidance is already applied. One network
  call per call: a sampler's cost is its number of predict calls.
  """

  def __call__(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]: ...


class Sampler(Protocol):
  """What `SAMPLERS` holds: one example's reverse chain, from noise x_T to a clean image.

  sampler(predict, schedule, x, key, num_steps, eta, **settings) -> x at the clean level,
  float32, shaped like x.
  - predict: a `Denoiser`, the model at a level t >= 0.
  - schedule: the run's `Schedule` (traced: read it with jnp, e.g. `alpha_bar`, `log_snr`).
  - x: x_T, float32 (H, W, C): one example, since `sample` vmaps the chain over the batch.
  - key: a PRNG key of the sampler's own noise (this example's).
  - num_steps: the model calls to take (a Python int, static), or None for the sampler's
    default; raise ValueError for a number it cannot take.
  - eta: the noise to add, a Python float as `sample`'s caller gave it (DDIM's eta: 0 is
    deterministic, 1 ancestral); raise ValueError where the sampler takes no eta.
  - settings: keyword parameters after eta with JSON defaults (`sample`'s sampler_kwargs,
    `--sampler-arg NAME=VALUE`).
  Run the steps under `jax.lax.scan`, so that the chain compiles once whatever its
  length. Public helpers for the steps: `sampling_timesteps` (evenly spaced timesteps),
  `log_snr_timesteps` (evenly in log-SNR), `next_levels` (the level each step lands on,
  -1 = the clean image), `alpha_bar`, `log_snr`, `ddim_step`, `ddpm_step`.
  `check_sampler` traces a sampler without a model, so a sampler's errors come before
  any work.
  """

  def __call__(self, predict: Denoiser, schedule: Schedule, x: jax.Array, key: jax.Array,
               num_steps: int | None, eta: float, **settings: Any) -> jax.Array: ...


def ddpm_sampler(predict, schedule: Schedule, x, key, num_steps, eta):
  """DDPM's ancestral chain: all T `ddpm_step`s, x_{T-1} -> ... -> x_0 -> the clean image.

  Its noise is the posterior's (eta must be 0; DDIM's eta = 1 over all T steps is this chain).
  """
  T = schedule.num_timesteps
  if num_steps not in (None, T):
    raise ValueError(
        f"ddpm runs all {T} steps; for fewer use sampler='ddim' (eta=1 is ancestral)")
  if not _is_zero(eta):
    raise ValueError(f"ddpm adds its posterior's noise: eta must be 0, got {eta} "
                     f"(sampler='ddim' takes eta)")

  def step(x, inputs):
    t, step_key = inputs
    eps, _ = predict(x, t)
    return ddpm_step(schedule, eps, x, t, jax.random.normal(step_key, x.shape, x.dtype)), None

  ts = np.arange(T - 1, -1, -1, dtype=np.int32)
  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jax.random.split(key, T)))
  return x


def next_levels(ts) -> np.ndarray:
  """The level each step of a descending `ts` lands on: the next timestep, the clean -1 last."""
  return np.append(ts[1:], -1).astype(np.int32)


def log_snr(schedule: Schedule) -> jax.Array:
  """lambda_t = log(alpha_t / sigma_t), half the log-SNR, float32 (T,); it falls as t grows."""
  return jnp.log(schedule.sqrt_alphas_cumprod) - jnp.log(schedule.sqrt_one_minus_alphas_cumprod)


def log_snr_timesteps(schedule: Schedule, num_steps: int) -> jax.Array:
  """`num_steps` descending timesteps from T - 1 to 0, evenly spaced in lambda (`log_snr`).

  Each step after the first takes the timestep nearest to an equal share of the lambda
  left to go, and at least one timestep (so there are num_steps distinct ones). Where a
  schedule jumps (the sigmoid's last beta, clipped to 0.999, spans 3.4 of its 11.5 in
  lambda), the steps after the jump share the rest evenly instead of crowding into it.
  DPM-Solver(++) takes its steps evenly in lambda (Lu et al. 2022): evenly in t, the
  last steps of a 20-step chain span lambda jumps of 1.5-3.6 and lose its second order.
  int32 (num_steps,); traces under `jax.jit` with the schedule an argument.
  """
  T = schedule.num_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must lie in [1, {T}], got {num_steps}")
  lam = log_snr(schedule)

  def pick(previous, k):
    target = lam[previous] + (lam[0] - lam[previous]) / (num_steps - k)
    nearest = jnp.argmin(jnp.abs(lam - target)).astype(jnp.int32)
    t = jnp.maximum(jnp.minimum(nearest, previous - 1), num_steps - 1 - k)
    return t, t

  _, rest = jax.lax.scan(pick, jnp.int32(T - 1), jnp.arange(1, num_steps, dtype=jnp.int32))
  return jnp.concatenate([jnp.full((1,), T - 1, jnp.int32), rest])


def ddim_sampler(predict, schedule: Schedule, x, key, num_steps, eta):
  """DDIM's chain: `ddim_step` over `sampling_timesteps(T, num_steps)` (default T) with eta."""
  T = schedule.num_timesteps
  ts = sampling_timesteps(T, T if num_steps is None else num_steps)
  # eta = 0 adds no noise; drawing none saves a random generator per step.
  stochastic = not _is_zero(eta)

  def step(x, inputs):
    t, t_prev, step_key = inputs
    eps, _ = predict(x, t)
    z = jax.random.normal(step_key, x.shape, x.dtype) if stochastic else None
    return ddim_step(schedule, eps, x, t, t_prev, eta, z), None

  step_keys = jax.random.split(key, len(ts)) if stochastic else jnp.zeros(len(ts))
  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(next_levels(ts)), step_keys))
  return x


# Below this many steps DPM-Solver++(2M)'s last step between timesteps is first order too,
# as Lu et al. recommend for few steps (their code's lower_order_final): it keeps a chain
# stable where the network's errors, not the solver's, dominate.
LOWER_ORDER_FINAL_BELOW = 15


def dpmpp_2m_coefficients(schedule: Schedule, ts, lower_order_final: bool = False):
  """(sigma_ratio, data_coef, correction), each float32 (len(ts),), of DPM-Solver++(2M).

  Step i goes from level ts[i] (call it s) to the next level (t, the clean
  image after ts[-1]) by
    D = x0_i + correction_i (x0_i - x0_{i-1})
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,  h = lambda_t - lambda_s,
  lambda = log(alpha / sigma) (Lu et al. 2022, "DPM-Solver++", Algorithm 2). The
  second-order term is correction_i = 1 / (2 r_i), r_i = h_{i-1} / h_i: x0 taken
  as linear in lambda through the last two predictions. Step 0 has no earlier
  prediction, and the step to the clean image has h = infinity (sigma_t = 0),
  where only the first-order step is finite: it lands on x0_i. Those two use
  correction 0, which makes them DDIM steps; lower_order_final makes the step
  into ts[-1] one too. alpha_t (1 - e^{-h}) is written alpha_t - alpha_s sigma_t /
  sigma_s, which is finite at the clean level too.
  """
  ts = jnp.asarray(ts)
  alpha = schedule.sqrt_alphas_cumprod[ts]
  sigma = schedule.sqrt_one_minus_alphas_cumprod[ts]
  alpha_next = jnp.append(alpha[1:], 1.0)
  sigma_ratio = jnp.append(sigma[1:], 0.0) / sigma
  data_coef = alpha_next - alpha * sigma_ratio
  lam = jnp.log(alpha) - jnp.log(sigma)
  h = lam[1:] - lam[:-1]  # the steps between sampled timesteps (not to the clean image)
  correction = jnp.concatenate([jnp.zeros(1), 0.5 * h[1:] / h[:-1], jnp.zeros(1)])[:len(ts)]
  if lower_order_final and len(ts) > 2:
    correction = correction.at[len(ts) - 2].set(0.0)
  return sigma_ratio, data_coef, correction


def dpmpp_2m_sampler(predict, schedule: Schedule, x, key, num_steps, eta):
  """DPM-Solver++(2M), the multistep second-order solver of the probability-flow ODE in its
  data-prediction form (Lu et al. 2022), over `log_snr_timesteps(schedule, num_steps)`
  (default all T) and then to the clean image; see `dpmpp_2m_coefficients`. One model call
  per step, as DDIM. With the exact predictor of Gaussian data its error at 20 steps is
  ~1e-3 on the sigmoid and linear schedules, against DDIM's 3-6e-2.

  Deterministic: eta must be 0 and key is not used.
  """
  if not _is_zero(eta):
    raise ValueError(f"dpm++2m is deterministic: eta must be 0, got {eta}")
  T = schedule.num_timesteps
  n = T if num_steps is None else num_steps
  ts = log_snr_timesteps(schedule, n)

  def step(carry, inputs):
    x, x0_prev = carry
    t, sigma_ratio, data_coef, correction = inputs
    _, x0 = predict(x, t)
    d = x0 + correction * (x0 - x0_prev)
    return (sigma_ratio * x + data_coef * d, x0), None

  coefficients = dpmpp_2m_coefficients(schedule, ts, n < LOWER_ORDER_FINAL_BELOW)
  (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), (ts, *coefficients))
  return x


SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm_sampler,  # the paper's
    "ddim": ddim_sampler,
    "dpm++2m": dpmpp_2m_sampler,
}


def sample(model_fn: ModelFn, schedule: Schedule, rng, labels, *, image_shape=(32, 32, 3),
           sampler: str = "ddpm", num_steps: int | None = None, eta: float = 0.0,
           guidance=0.0, null_label: int | None = None, x_T=None, prediction: str = "eps",
           clip: str = "static", sampler_kwargs: dict | None = None):
  """Runs the reverse chain from noise to images, one chain per label.

  labels: int32 (B,), one image per label (pass null_label for unconditional
  samples). sampler names one in SAMPLERS: 'ddpm', T ancestral steps
  (`ddpm_step`), num_steps None or T; 'ddim', `ddim_step` over
  `sampling_timesteps(T, num_steps)` (default T) with the given eta;
  'dpm++2m', DPM-Solver++(2M) over `log_snr_timesteps` (eta 0). guidance:
  classifier-free guidance weight w (0 = off; a Python number or a traced
  scalar); it needs null_label. x_T: optional (B, ...) starting noise, e.g.
  slerped DDIM latents, which then sets the image shape; by default drawn from
  rng. prediction: what model_fn outputs (PREDICTIONS: 'eps' or 'v'). clip: what
  each predicted clean image goes through before a step uses it (CLIPS: 'static',
  the data range [-1, 1], as DDPM's official sampler; 'dynamic', Imagen's
  thresholding; 'off', the exact maths). sampler_kwargs: the sampler's settings
  (see `Sampler`). eta is passed to the sampler as given. sampler, num_steps, eta,
  image_shape, null_label, prediction, clip and sampler_kwargs are static under
  `jax.jit`.

  The chain for one example is a `lax.scan` over timesteps, and it is
  `jax.vmap`ped over the batch: each example has its own key, so an image
  depends only on (rng, its index, its label), and the per-example batch-of-1
  model calls become one batched call per step. Returns float32 (B,
  *image_shape); the chain's last step lands on a (clipped) x0 prediction.
  """
  run_chain = registry.lookup(SAMPLERS, "sampler", sampler)
  parametrisation = registry.lookup(PREDICTIONS, "prediction", prediction)
  clip_fn = registry.lookup(CLIPS, "clip", clip)
  settings = sampler_kwargs or {}
  model_one = guided_model(model_fn, guidance, null_label)
  image_shape = tuple(image_shape) if x_T is None else x_T.shape[1:]

  def chain(key, label, x):
    init_key, steps_key = jax.random.split(key)
    if x is None:
      x = jax.random.normal(init_key, image_shape, jnp.float32)
    predict = _denoiser(model_one, schedule, parametrisation, label, clip_fn)
    return run_chain(predict, schedule, x, steps_key, num_steps, eta, **settings)

  labels = jnp.asarray(labels, jnp.int32)
  keys = jax.random.split(rng, labels.shape[0])
  return jax.vmap(chain)(keys, labels, x_T)


def check_sampler(sampler: str, schedule: Schedule, num_steps: int | None = None,
                  eta: float = 0.0, sampler_kwargs: dict | None = None,
                  image_shape=(32, 32, 3)) -> dict:
  """The sampler's settings (sampler_kwargs completed with its defaults), once a trace of
  its chain with a stand-in model has taken num_steps, eta and them.

  Nothing is computed (`jax.eval_shape`), so it takes milliseconds: call it before loading
  a model. What the sampler raises (a ValueError: too many steps, an eta it takes none
  of, a setting out of range), a setting it does not have, or a result of another shape
  than x_T's, is a UserError naming the sampler.
  """
  run_chain = registry.lookup(SAMPLERS, "sampler", sampler)
  what = f"sampler {sampler!r}"
  settings = registry.check_settings(run_chain, sampler_kwargs or {}, Sampler, what,
                                     "sampler_kwargs")
  x = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  stand_in = lambda x, t: (x, x)
  with registry.entry_errors(what):
    out = jax.eval_shape(
        lambda schedule, x, key: run_chain(stand_in, schedule, x, key, num_steps, eta, **settings),
        schedule, x, key)
  if getattr(out, "shape", None) != x.shape:
    raise UserError(f"{what} must return an image shaped like x_T {x.shape}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
  return settings


def ddim_invert(model_fn: ModelFn, schedule: Schedule, x0, labels, *,
                num_steps: int | None = None, guidance=0.0, null_label: int | None = None,
                prediction: str = "eps"):
  """Encodes images into DDIM latents x_T: the deterministic DDIM chain run upwards.

  x0: float (B, *image_shape); labels: int32 (B,). Uses the timesteps of
  `sample(..., sampler='ddim', num_steps=num_steps)` in ascending order; each
  step is `ddim_step` with eta = 0 from level t to the next level, with eps
  evaluated at the current point and level (an explicit Euler step of the
  probability-flow ODE, exact where eps is constant along the path; from the
  clean image the model is asked at t = 0). Sampling the result with the same
  steps and eta = 0 approximately returns x0. prediction: as `sample`'s.

  Why this and not adding noise: DDPM's ancestral chain is stochastic, so an
  image has no single latent; DDIM with eta = 0 is a deterministic map between
  images and noise, so the latent of a real image is well defined, and nearby
  latents decode to related images. This is what makes interpolating between
  two images' latents (see `slerp`) meaningful.
  """
  T = schedule.num_timesteps
  ts_up = sampling_timesteps(T, T if num_steps is None else num_steps)[::-1]
  ts_from = np.insert(ts_up[:-1], 0, -1).astype(np.int32)
  parametrisation = registry.lookup(PREDICTIONS, "prediction", prediction)
  model_one = guided_model(model_fn, guidance, null_label)

  def chain(x, label):
    predict = _denoiser(model_one, schedule, parametrisation, label)

    def step(x, inputs):
      t_from, t_to = inputs
      eps, _ = predict(x, jnp.maximum(t_from, 0))
      return ddim_step(schedule, eps, x, t_from, t_to, 0.0), None

    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts_from), jnp.asarray(ts_up)))
    return x

  return jax.vmap(chain)(x0.astype(jnp.float32), jnp.asarray(labels, jnp.int32))


def slerp(a, b, alpha):
  """Spherical interpolation between latents a and b (any shape, one vector each), alpha in [0, 1].

  A Gaussian latent in d dimensions has norm close to sqrt(d); the straight
  line between two such latents passes much closer to the origin (midpoint
  norm about sqrt(d / 2) for independent ones), where the sampler never saw
  its inputs, and decodes to washed-out images. Slerp moves along the great
  circle and keeps the norm. Falls back to linear interpolation where a and b
  are (nearly) parallel or opposite. For batches, `jax.vmap` it.

  The paper's interpolants: encode two images with `ddim_invert`, slerp their
  latents, and decode each with `sample(..., sampler='ddim', x_T=...)`,
  conditioned on the label of the closer end (alpha < 0.5: a's label).
  """
  af, bf = a.reshape(-1), b.reshape(-1)
  cos = jnp.dot(af, bf) / (jnp.linalg.norm(af) * jnp.linalg.norm(bf))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(theta)
  parallel = sin < 1e-6
  safe_sin = jnp.where(parallel, 1.0, sin)
  wa = jnp.where(parallel, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / safe_sin)
  wb = jnp.where(parallel, alpha, jnp.sin(alpha * theta) / safe_sin)
  return wa * a + wb * b
