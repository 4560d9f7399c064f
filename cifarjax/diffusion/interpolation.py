"""Interpolation between images through their DDIM latents: inversion and slerp.

`ddim_invert` encodes images into the latents x_T that DDIM with eta = 0 decodes back
to them; `slerp` interpolates two latents along the sphere they lie near. Decoding the
interpolants is `sample(..., sampler='ddim', x_T=...)`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cifarjax import registry
from cifarjax.diffusion.objectives import PREDICTIONS, ModelFn
from cifarjax.diffusion.samplers import (ddim_step, guided_model, make_denoiser,
                                         sampling_timesteps)
from cifarjax.diffusion.schedules import Schedule


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
    predict = make_denoiser(model_one, schedule, parametrisation, label)

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
