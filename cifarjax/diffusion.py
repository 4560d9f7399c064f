"""Denoising diffusion (Ho et al. 2020, DDPM) as pure functions of arrays (Part 2, section 4).

Conventions. Timesteps are 0-based: t in [0, T) is DDPM's step t + 1, so
x_t ~ N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) with alphabar_t the product
of alpha_0..alpha_t, and t = 0 is the least noisy level. The level "t = -1" is
the clean image (alphabar = 1); samplers step down to it last.

An `eps_fn(x, t, labels) -> eps` is the noise model applied to a batch: x float
(B, H, W, C), t int32 (B,), labels int32 (B,). Labels lie in [0, num_classes];
the index num_classes is the "null" label of classifier-free guidance.

Everything here traces under `jax.jit`: shapes are static and the reverse
chains run under `jax.lax.scan`, with no Python loop over timesteps.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


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
  """Every Schedule constant from betas (T,); computed in float64, stored as float32."""
  betas = np.asarray(betas, np.float64)
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


def diffusion_loss(eps_pred, noise):
  """DDPM's simplified objective: mean squared error between predicted and true noise."""
  return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - noise))


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
  eta = 1. The noise prediction is used as is, without clipping the implied
  x_0 to [-1, 1]: the paper's update has no x_0 in it, and its sources do not
  clip. Callers clip the final images.

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
  x0_pred is not clipped, for the reasons in `ddpm_step` and so that the
  deterministic step stays invertible.
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


def guided_eps(eps_fn: EpsFn, guidance, null_label):
  """The per-example noise model x (H, W, C), t (), label () -> eps, with classifier-free guidance.

  eps = (1 + w) eps(x, t, label) - w eps(x, t, null). With guidance a Python 0
  the unconditional pass is skipped; a traced w runs both. Each call is eps_fn
  on a batch of 1 (or 2 with guidance); under `jax.vmap` over examples XLA
  batches these into one call per step.
  """
  if isinstance(guidance, (int, float)) and guidance == 0:
    return lambda x, t, label: eps_fn(x[None], t[None], label[None])[0]
  if null_label is None:
    raise ValueError("classifier-free guidance needs null_label (the model's num_classes)")

  def eps(x, t, label):
    both = eps_fn(jnp.stack([x, x]), jnp.stack([t, t]),
                  jnp.stack([label, jnp.asarray(null_label, label.dtype)]))
    return (1.0 + guidance) * both[0] - guidance * both[1]
  return eps


def sample(eps_fn: EpsFn, schedule: Schedule, rng, labels, *, image_shape=(32, 32, 3),
           sampler: str = "ddpm", num_steps: int | None = None, eta: float = 0.0,
           guidance=0.0, null_label: int | None = None, x_T=None):
  """Runs the reverse chain from noise to images, one chain per label.

  labels: int32 (B,), one image per label (pass null_label for unconditional
  samples). sampler 'ddpm': T ancestral steps (`ddpm_step`); num_steps must be
  None or T. sampler 'ddim': `ddim_step` over `sampling_timesteps(T,
  num_steps)` (default T) with the given eta. guidance: classifier-free
  guidance weight w (0 = off; a Python number or a traced scalar); it needs
  null_label. x_T: optional (B, ...) starting noise, e.g. slerped DDIM
  latents, which then sets the image shape; by default drawn from rng.
  sampler, num_steps, image_shape and null_label are static under `jax.jit`.

  The chain for one example is a `lax.scan` over timesteps, and it is
  `jax.vmap`ped over the batch: each example has its own key, so an image
  depends only on (rng, its index, its label), and the per-example batch-of-1
  model calls become one batched call per step. Returns float32 (B,
  *image_shape), not clipped.
  """
  T = schedule.num_timesteps
  if sampler == "ddpm":
    if num_steps not in (None, T):
      raise ValueError(
          f"ddpm runs all {T} steps; for fewer use sampler='ddim' (eta=1 is ancestral)")
    ts = np.arange(T - 1, -1, -1, dtype=np.int32)
  elif sampler == "ddim":
    ts = sampling_timesteps(T, T if num_steps is None else num_steps)
  else:
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
  ts_prev = np.append(ts[1:], -1).astype(np.int32)
  eps_one = guided_eps(eps_fn, guidance, null_label)
  image_shape = tuple(image_shape) if x_T is None else x_T.shape[1:]

  # DDIM with eta = 0 adds no noise; drawing none saves a sampler per step.
  stochastic = sampler == "ddpm" or not (isinstance(eta, (int, float)) and eta == 0)

  def chain(key, label, x):
    init_key, steps_key = jax.random.split(key)
    if x is None:
      x = jax.random.normal(init_key, image_shape, jnp.float32)

    def step(x, inputs):
      t, t_prev, step_key = inputs
      eps = eps_one(x, t, label)
      z = jax.random.normal(step_key, x.shape, x.dtype) if stochastic else None
      if sampler == "ddpm":
        return ddpm_step(schedule, eps, x, t, z), None
      return ddim_step(schedule, eps, x, t, t_prev, eta, z), None

    step_keys = jax.random.split(steps_key, len(ts)) if stochastic else jnp.zeros(len(ts))
    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(ts_prev), step_keys))
    return x

  labels = jnp.asarray(labels, jnp.int32)
  keys = jax.random.split(rng, labels.shape[0])
  return jax.vmap(chain)(keys, labels, x_T)


def ddim_invert(eps_fn: EpsFn, schedule: Schedule, x0, labels, *, num_steps: int | None = None,
                guidance=0.0, null_label: int | None = None):
  """Encodes images into DDIM latents x_T: the deterministic DDIM chain run upwards.

  x0: float (B, *image_shape); labels: int32 (B,). Uses the timesteps of
  `sample(..., sampler='ddim', num_steps=num_steps)` in ascending order; each
  step is `ddim_step` with eta = 0 from level t to the next level, with eps
  evaluated at the current point and level (an explicit Euler step of the
  probability-flow ODE, exact where eps is constant along the path; from the
  clean image the model is asked at t = 0). Sampling the result with the same
  steps and eta = 0 approximately returns x0.

  Why this and not adding noise: DDPM's ancestral chain is stochastic, so an
  image has no single latent; DDIM with eta = 0 is a deterministic map between
  images and noise, so the latent of a real image is well defined, and nearby
  latents decode to related images. This is what makes interpolating between
  two images' latents (see `slerp`) meaningful.
  """
  T = schedule.num_timesteps
  ts_up = sampling_timesteps(T, T if num_steps is None else num_steps)[::-1]
  ts_from = np.insert(ts_up[:-1], 0, -1).astype(np.int32)
  eps_one = guided_eps(eps_fn, guidance, null_label)

  def chain(x, label):
    def step(x, inputs):
      t_from, t_to = inputs
      eps = eps_one(x, jnp.maximum(t_from, 0), label)
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
