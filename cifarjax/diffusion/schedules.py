"""Noise schedules: the per-timestep constants of the forward process, and reading them.

A `Schedule` holds DDPM's constants for T timesteps (`schedule_from_betas`); the
registered schedules (`SCHEDULES`, contract `ScheduleFn`) make one from their settings,
in numpy, once per run. The rest reads a schedule at timesteps under `jax.jit`:
alphabar (`alpha_bar`), the SNR (`snr`, `log_snr`), and noising x_0 to level t
(`q_sample`). Timestep conventions: `cifarjax.diffusion`.
"""

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import registry


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


def expand_to_rank(v, ndim):
  """v (shaped like t: () or (B,)) reshaped to broadcast against an array of rank ndim."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def at_timesteps(a, t, ndim):
  """a[t], shaped to broadcast against an array of rank ndim whose leading axes are t's."""
  return expand_to_rank(a[t], ndim)


def alpha_bar(schedule: Schedule, t):
  """alphabar_t, with alphabar = 1 (the clean image) at t = -1."""
  t = jnp.asarray(t)
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def q_sample(schedule: Schedule, x0, t, noise):
  """Samples x_t ~ q(x_t | x_0) = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise.

  x0, noise: (B, ...); t: int (B,), or a scalar for one example.
  """
  return (at_timesteps(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + at_timesteps(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def snr(schedule: Schedule, t):
  """The signal-to-noise ratio alpha_t^2 / sigma_t^2 = alphabar_t / (1 - alphabar_t), t >= 0."""
  return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])


def log_snr(schedule: Schedule) -> jax.Array:
  """lambda_t = log(alpha_t / sigma_t), half the log-SNR, float32 (T,); it falls as t grows."""
  return jnp.log(schedule.sqrt_alphas_cumprod) - jnp.log(schedule.sqrt_one_minus_alphas_cumprod)
