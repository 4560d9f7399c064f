"""The reverse chain: steps, samplers, classifier-free guidance and clipping.

`SAMPLERS` holds one example's chain from noise to a clean image (contract `Sampler`,
whose model is a `Denoiser`): DDPM's ancestral chain, DDIM, and DPM-Solver++(2M), built
from `ddpm_step`, `ddim_step` and the timestep helpers `sampling_timesteps`,
`log_snr_timesteps` and `next_levels`. `CLIPS` are what each predicted clean image goes
through before a step uses it. `sample` runs a registered sampler over a batch, with
guidance (`guided_model`); `check_sampler` checks a sampler's arguments without a model.
"""

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import registry
from cifarjax.diffusion.objectives import PREDICTIONS, ModelFn, Prediction
from cifarjax.diffusion.schedules import (Schedule, alpha_bar, at_timesteps, expand_to_rank,
                                          log_snr)
from cifarjax.errors import UserError


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
  coef = (at_timesteps(schedule.betas, t, nd)
          / at_timesteps(schedule.sqrt_one_minus_alphas_cumprod, t, nd))
  mean = (x_t - coef * eps) / jnp.sqrt(at_timesteps(schedule.alphas, t, nd))
  sigma = jnp.sqrt(at_timesteps(schedule.posterior_variance, t, nd))
  return mean + jnp.where(expand_to_rank(t, nd) > 0, sigma, 0.0) * noise


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
  a_t = expand_to_rank(alpha_bar(schedule, t), nd)
  a_prev = expand_to_rank(alpha_bar(schedule, t_prev), nd)
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


def make_denoiser(model_one, schedule: Schedule, prediction: Prediction, label, clip=None):
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
    predict = make_denoiser(model_one, schedule, parametrisation, label, clip_fn)
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
