"""Diffusion math: schedules in closed form, forward noising, reverse steps, samplers, inversion."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from cifarjax import diffusion
from cifarjax.models.unet import UNet

T = 1000
DATA_STD = 0.5  # of the Gaussian toy data whose exact noise predictor is known
NULL_LABEL = 10


@pytest.fixture(scope="module")
def linear():
  return diffusion.linear_schedule(T)


@pytest.fixture(scope="module")
def sigmoid():
  return diffusion.sigmoid_schedule(T)


@pytest.fixture(scope="module")
def sigmoid_blog():
  return diffusion.sigmoid_blog_schedule(T)


def gaussian_eps_fn(schedule, data_std=DATA_STD):
  """The exact E[eps | x_t] for x_0 ~ N(mean(label), data_std^2 I): a closed-form stand-in model.

  mean(label) = 0.2 label, and 0 for the null label 10.
  """
  def eps_fn(x, t, labels):
    shape = t.shape + (1,) * (x.ndim - 1)
    a = schedule.alphas_cumprod[t].reshape(shape)
    mean = jnp.where(labels == NULL_LABEL, 0.0, 0.2 * labels).reshape(shape)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * data_std**2 + 1 - a)
  return eps_fn


def gaussian_v_fn(schedule, data_std=DATA_STD):
  """The exact E[v | x_t] = alpha E[eps | x_t] - sigma E[x_0 | x_t] for the same data, with
  E[x_0 | x_t] = mean + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mean) (Gaussian
  conditioning), written without dividing by alpha."""
  eps_fn = gaussian_eps_fn(schedule, data_std)

  def v_fn(x, t, labels):
    shape = t.shape + (1,) * (x.ndim - 1)
    a = schedule.alphas_cumprod[t].reshape(shape)
    mean = jnp.where(labels == NULL_LABEL, 0.0, 0.2 * labels).reshape(shape)
    x0 = mean + jnp.sqrt(a) * data_std**2 * (x - jnp.sqrt(a) * mean) / (a * data_std**2 + 1 - a)
    return jnp.sqrt(a) * eps_fn(x, t, labels) - jnp.sqrt(1 - a) * x0
  return v_fn


# Schedules.

def test_linear_schedule_endpoints(linear):
  chex.assert_shape(linear.betas, (T,))
  assert linear.betas.dtype == jnp.float32
  assert linear.betas[0] == np.float32(1e-4)
  assert linear.betas[-1] == np.float32(0.02)
  np.testing.assert_allclose(np.diff(np.asarray(linear.betas, np.float64)), 0.0199 / 999, rtol=1e-3)
  np.testing.assert_allclose(linear.alphas_cumprod[0], 1 - 1e-4, rtol=1e-7)
  np.testing.assert_allclose(linear.alphas_cumprod[-1], np.prod(1 - np.linspace(1e-4, 0.02, T)),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "sigmoid", "sigmoid_blog"])
def test_alpha_bar_decreases_from_one_to_zero(name, request):
  schedule = request.getfixturevalue(name)
  a = np.asarray(schedule.alphas_cumprod)
  assert (np.diff(a) < 0).all()
  assert 0.999 < a[0] < 1 and 0 < a[-1] < 1e-4
  assert schedule.num_timesteps == T
  np.testing.assert_allclose(schedule.alphas_cumprod_prev, np.append(1.0, a[:-1]))
  np.testing.assert_allclose(schedule.sqrt_alphas_cumprod**2, a, rtol=1e-6)
  np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod**2, 1 - a, rtol=1e-5, atol=1e-7)


def test_sigmoid_alpha_bar_is_gamma(sigmoid):
  """alphabar_t = gamma((t + 1) / T), Jabri et al.'s formula, written out here again."""
  s = np.arange(1, T + 1) / T
  gamma = (expit(3.0) - expit(6.0 * s - 3.0)) / (expit(3.0) - expit(-3.0))
  a = np.asarray(sigmoid.alphas_cumprod, np.float64)
  np.testing.assert_allclose(a[:-1], gamma[:-1], rtol=1e-5)
  # At s = 1 gamma is 0 (clipped to 1e-9); the last beta is clipped to 0.999 instead.
  assert sigmoid.betas[-1] == np.float32(0.999)
  assert (np.asarray(sigmoid.betas[:-1]) < 0.999).all()
  np.testing.assert_allclose(a[-1], gamma[-2] * 0.001, rtol=1e-4)


def test_sigmoid_gamma_endpoints():
  np.testing.assert_allclose(diffusion.sigmoid_gamma([0.0, 0.5, 1.0]), [1.0, 0.5, 1e-9], rtol=1e-12)


def test_sigmoid_blog_betas_are_the_blogs_formula(sigmoid_blog):
  """betas = sigmoid(linspace(-6, 6, T)) (0.02 - 1e-4) + 1e-4, as the Annotated Diffusion blog
  writes it: the sigmoid on the betas, short of both ends by 0.0199 sigmoid(-6) = 4.9e-5."""
  betas = np.asarray(sigmoid_blog.betas, np.float64)
  short = 0.0199 * expit(-6.0)
  np.testing.assert_allclose(betas[[0, -1]], [1e-4 + short, 0.02 - short], rtol=1e-6)
  np.testing.assert_allclose(betas, expit(np.linspace(-6, 6, T)) * 0.0199 + 1e-4, rtol=1e-6)
  assert (np.diff(betas) > 0).all()
  # sigmoid(-z) = 1 - sigmoid(z): the betas are symmetric about the middle of [1e-4, 0.02].
  np.testing.assert_allclose(betas + betas[::-1], 0.0201, rtol=1e-6)
  np.testing.assert_allclose(sigmoid_blog.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)


def test_schedule_registry():
  for name, make in diffusion.SCHEDULES.items():
    chex.assert_trees_all_equal(diffusion.make_schedule(name, 50), make(50))
  assert {"sigmoid", "linear", "sigmoid-blog"} <= set(diffusion.SCHEDULES)
  with pytest.raises(ValueError, match="unknown schedule 'cosine'; registered: sigmoid, linear, "
                     "sigmoid-blog"):
    diffusion.make_schedule("cosine", 50)


@pytest.mark.parametrize("t", [1, 500])
def test_posterior_coefficients_by_hand(linear, t):
  beta = lambda i: 1e-4 + i * (0.02 - 1e-4) / (T - 1)
  abar = lambda i: np.prod([1 - beta(j) for j in range(i + 1)])
  var = beta(t) * (1 - abar(t - 1)) / (1 - abar(t))
  np.testing.assert_allclose(linear.posterior_variance[t], var, rtol=1e-5)
  np.testing.assert_allclose(linear.posterior_log_variance_clipped[t], np.log(var), rtol=1e-5)
  np.testing.assert_allclose(linear.posterior_mean_coef1[t],
                             beta(t) * np.sqrt(abar(t - 1)) / (1 - abar(t)), rtol=1e-5)
  np.testing.assert_allclose(linear.posterior_mean_coef2[t],
                             (1 - abar(t - 1)) * np.sqrt(1 - beta(t)) / (1 - abar(t)), rtol=1e-5)


def test_posterior_at_t0(linear):
  """q(x_{-1} | x_0, x_0) is x_0 itself: no variance, mean coefficient 1 on x_0."""
  assert linear.posterior_variance[0] == 0
  np.testing.assert_allclose(linear.posterior_mean_coef1[0], 1.0, rtol=1e-6)
  assert linear.posterior_mean_coef2[0] == 0
  assert linear.posterior_log_variance_clipped[0] == linear.posterior_log_variance_clipped[1]


# Forward process and loss.

def test_q_sample_statistics(sigmoid):
  x0 = jnp.full((3, 100_000), 0.7)
  t = jnp.array([0, 300, 900])
  noise = jnp.asarray(np.random.default_rng(0).normal(size=x0.shape), jnp.float32)
  x_t = jax.jit(diffusion.q_sample)(sigmoid, x0, t, noise)  # the schedule is a pytree argument
  a = np.asarray(sigmoid.alphas_cumprod)[np.asarray(t)]
  np.testing.assert_allclose(x_t.mean(axis=1), np.sqrt(a) * 0.7, atol=0.01)
  np.testing.assert_allclose(x_t.var(axis=1), 1 - a, rtol=0.02, atol=1e-4)


def test_training_loss_is_the_mean_squared_error_over_examples_and_pixels(sigmoid):
  """From clean images x0 = 0, x_t = sigma_t eps: a model returning x_t / sigma_t + offset
  errs by the offset alone (up to rounding), so the unweighted eps loss is mean(offset^2)."""
  x0 = jnp.zeros((2, 2, 1, 1))
  labels = jnp.zeros((2,), jnp.int32)
  offset = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(x0.shape)

  def model_fn(x, t, y, offset):
    return x / sigmoid.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] + offset

  loss = lambda offset: diffusion.training_loss(functools.partial(model_fn, offset=offset),
                                                sigmoid, x0, labels, jax.random.PRNGKey(3))
  np.testing.assert_allclose(loss(jnp.zeros_like(offset)), 0.0, atol=1e-10)
  np.testing.assert_allclose(loss(offset), 7.5, rtol=1e-5)


# The training objective: predictions and loss weightings.

GAMMA_5 = {"none": None, "min-snr": {"gamma": 5.0}}  # each weighting's settings in these tests

@pytest.mark.parametrize("t", [0, 100, 400, 999])
def test_loss_weights_are_the_closed_form(linear, t):
  """Min-SNR-5 (Hang et al. 2023): min(SNR, 5) / SNR on the eps loss, min(SNR, 5) / (SNR + 1)
  on the v loss; 1 without weighting. SNR = abar / (1 - abar), abar by hand in float64; the
  four t put SNR above 5 (t = 0: 1e4, 100: 9) and below (400: 0.2, 999: 4e-5)."""
  abar = np.prod(1 - np.linspace(1e-4, 0.02, T)[:t + 1])
  snr = abar / (1 - abar)
  expected = {("eps", "none"): 1.0, ("v", "none"): 1.0,
              ("eps", "min-snr"): min(snr, 5.0) / snr, ("v", "min-snr"): min(snr, 5.0) / (snr + 1)}
  np.testing.assert_allclose(diffusion.snr(linear, jnp.array([t])), [snr], rtol=1e-5)
  for (prediction, weighting), weight in expected.items():
    got = diffusion.loss_weights(linear, jnp.array([t]), prediction=prediction,
                                 loss_weighting=weighting, loss_weighting_kwargs=GAMMA_5[weighting])
    np.testing.assert_allclose(got, [weight], rtol=1e-5, err_msg=f"{prediction}, {weighting}")


def test_default_loss_is_ddpm_simplified_objective(sigmoid):
  """eps, unweighted (the paper's): bit for bit the mean of (model(x_t, t) - eps)^2, with t
  and eps drawn from the two halves of the key as before the objective had options."""
  rng = np.random.default_rng(4)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(8, 4, 4, 3)), jnp.float32)
  labels = jnp.zeros((8,), jnp.int32)
  model_fn = lambda x, t, y: 0.9 * x + 1e-3 * t[:, None, None, None]
  key = jax.random.PRNGKey(7)

  @jax.jit
  def by_hand(x0):
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (8,), 0, T)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    eps_pred = model_fn(diffusion.q_sample(sigmoid, x0, t, noise), t, labels)
    return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - noise))

  loss = jax.jit(lambda x0: diffusion.training_loss(model_fn, sigmoid, x0, labels, key))(x0)
  assert loss == by_hand(x0)


def expected_irreducible_loss(schedule, prediction, weighting, std=DATA_STD, gamma=5.0):
  """(E_t[w_t V_t], E_t[(w_t V_t)^2]), t uniform, in float64, for Gaussian data N(m, s^2):
  V_t = Var[target | x_t], what the exact predictor leaves. x_t = alpha x0 + sigma eps is
  jointly Gaussian with both targets, so Var[eps | x_t] = 1 - sigma^2 / (alpha^2 s^2 +
  sigma^2) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2), and v = (eps - sigma x_t) / alpha gives
  Var[v | x_t] = s^2 / (alpha^2 s^2 + sigma^2)."""
  a = np.asarray(schedule.alphas_cumprod, np.float64)
  snr = a / (1 - a)
  var = {"eps": a * std**2, "v": std**2}[prediction] / (a * std**2 + 1 - a)
  weight = {"none": np.ones_like(snr),
            "min-snr": np.minimum(snr, gamma) / {"eps": snr, "v": snr + 1}[prediction]}[weighting]
  return np.mean(weight * var), np.mean((weight * var) ** 2)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["none", "min-snr"])
def test_exact_predictor_attains_the_irreducible_loss(sigmoid, prediction, weighting):
  """For Gaussian data the exact E[target | x_t] leaves only Var[target | x_t]: the loss is
  E_t[w_t V_t], and scaling the predictor either way raises it.

  The tolerance: given t, each pixel's residual is N(0, V_t), so an example's term (the mean
  over its P pixels) is w_t V_t chi^2_P / P, of variance E[(w V)^2] (1 + 2 / P) - E[w V]^2;
  the batch mean of B of them is within 5 standard errors sqrt(that / B). A wrong target
  (v = alpha eps + sigma x0) or weight (SNR / min(SNR, 5), or /SNR for v) moves the
  expectation by 10 to 10^4 of them.
  """
  num, pixels = 16384, 4
  model_fn = {"eps": gaussian_eps_fn, "v": gaussian_v_fn}[prediction](sigmoid)
  x0 = jnp.asarray(0.4 + DATA_STD * np.random.default_rng(5).normal(size=(num, pixels)),
                   jnp.float32)
  labels = jnp.full((num,), 2, jnp.int32)  # mean 0.4, as x0's

  @jax.jit
  def loss(scale):
    return diffusion.training_loss(lambda x, t, y: scale * model_fn(x, t, y), sigmoid, x0,
                                   labels, jax.random.PRNGKey(6), prediction=prediction,
                                   loss_weighting=weighting,
                                   loss_weighting_kwargs=GAMMA_5[weighting])

  mean, mean_square = expected_irreducible_loss(sigmoid, prediction, weighting)
  stderr = np.sqrt((mean_square * (1 + 2 / pixels) - mean**2) / num)
  assert abs(float(loss(1.0)) - mean) < 5 * stderr, (float(loss(1.0)), mean, stderr)
  assert float(loss(0.9)) > float(loss(1.0)) < float(loss(1.1))


def test_unknown_prediction_or_weighting(sigmoid):
  x0, labels = jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32)
  eps_fn = gaussian_eps_fn(sigmoid)
  with pytest.raises(ValueError, match="unknown prediction 'x0'; registered: eps, v"):
    diffusion.training_loss(eps_fn, sigmoid, x0, labels, jax.random.PRNGKey(0), prediction="x0")
  with pytest.raises(ValueError, match="unknown loss weighting 'snr'; registered: none, min-snr"):
    diffusion.training_loss(eps_fn, sigmoid, x0, labels, jax.random.PRNGKey(0),
                            loss_weighting="snr")


def test_drop_labels():
  labels = jnp.arange(8, dtype=jnp.int32)
  key = jax.random.key(0)
  np.testing.assert_array_equal(diffusion.drop_labels(key, labels, 100, 0.0), labels)
  np.testing.assert_array_equal(diffusion.drop_labels(key, labels, 100, 1.0), 100)
  dropped = diffusion.drop_labels(key, jnp.zeros(10_000, jnp.int32), 100, 0.1)
  assert dropped.dtype == jnp.int32
  assert 0.08 < float(jnp.mean(dropped == 100)) < 0.12


# Reverse steps.

def _step_inputs(shape=(4, 8, 8, 3)):
  rng = np.random.default_rng(1)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def test_ddim_eta0_is_deterministic(sigmoid):
  eps, x_t, z = _step_inputs()
  t = jnp.full((4,), 500)
  step = functools.partial(diffusion.ddim_step, sigmoid, eps, x_t, t, t - 100, 0.0)
  np.testing.assert_array_equal(step(z), step(None))
  np.testing.assert_array_equal(step(z), step(-z))


@pytest.mark.parametrize("name", ["linear", "sigmoid"])
@pytest.mark.parametrize("t", [0, 1, 10, 500, 998, 999])
def test_ddim_eta1_one_step_is_the_ancestral_step(name, t, request):
  """With sigma^2 = posterior variance both are the same Gaussian, noise draw included."""
  schedule = request.getfixturevalue(name)
  eps, x_t, z = _step_inputs()
  tt = jnp.full((4,), t)
  ddpm = diffusion.ddpm_step(schedule, eps, x_t, tt, z)
  ddim = diffusion.ddim_step(schedule, eps, x_t, tt, tt - 1, eta=1.0, noise=z)
  np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_ddpm_step_adds_no_noise_at_t0(linear):
  eps, x_t, z = _step_inputs()
  t = jnp.zeros((4,), jnp.int32)
  np.testing.assert_array_equal(diffusion.ddpm_step(linear, eps, x_t, t, z),
                                diffusion.ddpm_step(linear, eps, x_t, t, jnp.zeros_like(z)))
  # The clean image x_0 = (x_t - sqrt(1 - alphabar_0) eps) / sqrt(alphabar_0).
  a0 = linear.alphas_cumprod[0]
  np.testing.assert_allclose(diffusion.ddpm_step(linear, eps, x_t, t, z),
                             (x_t - jnp.sqrt(1 - a0) * eps) / jnp.sqrt(a0), atol=1e-5)


def test_ddpm_step_with_the_true_noise_is_the_posterior_mean(linear):
  """Given the exact eps, the step's mean is q(x_{t-1} | x_t, x_0)'s mean (DDPM eq. 7)."""
  x0, eps, _ = _step_inputs()
  t = jnp.array([1, 10, 400, 999])
  x_t = diffusion.q_sample(linear, x0, t, eps)
  mean = diffusion.ddpm_step(linear, eps, x_t, t, jnp.zeros_like(x0))
  c1 = linear.posterior_mean_coef1[t][:, None, None, None]
  c2 = linear.posterior_mean_coef2[t][:, None, None, None]
  np.testing.assert_allclose(mean, c1 * x0 + c2 * x_t, rtol=1e-3, atol=1e-3)


def test_sampling_timesteps():
  np.testing.assert_array_equal(diffusion.sampling_timesteps(1000, 4), [999, 666, 333, 0])
  np.testing.assert_array_equal(diffusion.sampling_timesteps(5, 5), [4, 3, 2, 1, 0])
  np.testing.assert_array_equal(diffusion.sampling_timesteps(1000, 1), [999])
  assert len(set(diffusion.sampling_timesteps(1000, 999))) == 999
  with pytest.raises(ValueError):
    diffusion.sampling_timesteps(10, 11)


# Samplers, with the exact noise predictor of Gaussian data.

GAUSSIAN_SHAPE = (4, 4, 1)
NUM_GAUSSIAN_SAMPLES = 512


@pytest.fixture(scope="module")
def gaussian_samplers(sigmoid):
  """Jitted samplers of the Gaussian toy data, each compiled once: ddpm (rng, labels);
  ddim (x_T, labels) and guided ddim (x_T, labels, guidance), 50 steps from given noise;
  dpm++2m and guided dpm++2m, the same with 20 steps."""
  def run(rng, labels, sampler, num_steps, guidance=0.0, x_T=None):
    return diffusion.sample(gaussian_eps_fn(sigmoid), sigmoid, rng, labels,
                            image_shape=GAUSSIAN_SHAPE, sampler=sampler, num_steps=num_steps,
                            guidance=guidance, null_label=NULL_LABEL, x_T=x_T, clip="off")
  key = jax.random.key(0)  # unused by deterministic DDIM from a given x_T
  return {"ddpm": jax.jit(lambda rng, labels: run(rng, labels, "ddpm", None)),
          "ddim": jax.jit(lambda x_T, labels: run(key, labels, "ddim", DDIM_STEPS, x_T=x_T)),
          "guided ddim": jax.jit(lambda x_T, labels, w: run(key, labels, "ddim", DDIM_STEPS,
                                                               guidance=w, x_T=x_T)),
          "dpm++2m": jax.jit(lambda x_T, labels: run(key, labels, "dpm++2m", DPM_STEPS,
                                                     x_T=x_T)),
          "guided dpm++2m": jax.jit(lambda x_T, labels, w: run(key, labels, "dpm++2m", DPM_STEPS,
                                                                  guidance=w, x_T=x_T))}


DDIM_STEPS = 50
DPM_STEPS = 20


def ddim_affine_map(schedule, num_steps, mean, std=DATA_STD):
  """(A, B) with DDIM(x_T) = A x_T + B, in float64, for data N(mean, std^2) per pixel.

  With the exact predictor eps(x, t) = c_t (x - sqrt(abar_t) mean), c_t = sqrt(1 - abar_t) /
  (abar_t std^2 + 1 - abar_t), each deterministic DDIM step (Song et al. 2021, eq. 12)
  x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), x' = sqrt(abar_t') x0 + sqrt(1 - abar_t') eps
  is affine in x, so the whole chain is one affine map of x_T.
  """
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  ts = diffusion.sampling_timesteps(schedule.num_timesteps, num_steps)
  a_mul, b_add = 1.0, 0.0
  for t, t_prev in zip(ts, [*ts[1:], -1]):
    a, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
    c = np.sqrt(1 - a) / (a * std**2 + 1 - a)
    eps_mul, eps_add = c, -c * np.sqrt(a) * mean  # eps = eps_mul x + eps_add
    step_mul = np.sqrt(a_prev / a) * (1 - np.sqrt(1 - a) * eps_mul) + np.sqrt(1 - a_prev) * eps_mul
    step_add = (np.sqrt(1 - a_prev) - np.sqrt(a_prev / a) * np.sqrt(1 - a)) * eps_add
    a_mul, b_add = step_mul * a_mul, step_mul * b_add + step_add
  return a_mul, b_add


def dpmpp_2m_affine_map(schedule, num_steps, mean, std=DATA_STD):
  """(A, B) with DPM-Solver++(2M)(x_T) = A x_T + B, in float64, for data N(mean, std^2).

  Lu et al. 2022, Algorithm 2, as the paper writes it: from s = t_{i-1} to t = t_i,
  h = lambda_t - lambda_s, lambda = log(alpha / sigma), r = h_{i-1} / h_i,
  D = (1 + 1 / (2r)) x0_i - 1 / (2r) x0_{i-1} (D = x0_0 on the first step, and on the
  last step between timesteps where num_steps < 15: their code's lower_order_final),
  x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D; onto the clean image (sigma = 0,
  h infinite) x = x0. The exact data predictor x0(x, t) = mean + alpha std^2 / (alpha^2
  std^2 + sigma^2) (x - alpha mean) is affine in x, so the chain is an affine map of x_T.
  The timesteps are the sampler's, `log_snr_timesteps` (pinned by its own test).
  """
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  ts = np.asarray(diffusion.log_snr_timesteps(schedule, num_steps))
  x = (1.0, 0.0)  # x = x[0] x_T + x[1]
  x0_before = lam_before = None
  for i, (t, t_next) in enumerate(zip(ts, [*ts[1:], -1])):
    alpha, sigma = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    gain = alpha * std**2 / (abar[t] * std**2 + 1 - abar[t])
    x0 = (gain * x[0], gain * x[1] + mean - gain * alpha * mean)
    lam = np.log(alpha / sigma)
    if t_next < 0:
      x = x0
      continue
    alpha_next, sigma_next = np.sqrt(abar[t_next]), np.sqrt(1 - abar[t_next])
    h = np.log(alpha_next / sigma_next) - lam
    if i == 0 or (num_steps < 15 and i == len(ts) - 2):
      d = x0
    else:
      k = 1 / (2 * (lam - lam_before) / h)
      d = tuple((1 + k) * new - k * old for new, old in zip(x0, x0_before))
    x = tuple(sigma_next / sigma * xs - alpha_next * np.expm1(-h) * ds for xs, ds in zip(x, d))
    x0_before, lam_before = x0, lam
  return x


def exact_flow_map(schedule, mean, std=DATA_STD):
  """(A, B) of the probability-flow ODE's exact map from x_T to the clean image.

  x_t ~ N(alpha mean, alpha^2 std^2 + sigma^2) at every level and the flow is monotone
  per pixel, so it keeps the standardised (x_t - alpha mean) / sqrt(alpha^2 std^2 +
  sigma^2): x_0 = mean + std (x_T - alpha_T mean) / sqrt(abar_T std^2 + 1 - abar_T).
  """
  a = float(np.asarray(schedule.alphas_cumprod, np.float64)[-1])
  mul = std / np.sqrt(a * std**2 + 1 - a)
  return mul, mean - mul * np.sqrt(a) * mean


def _labels(label):
  return jnp.full((NUM_GAUSSIAN_SAMPLES,), label, jnp.int32)


def _x_T(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(NUM_GAUSSIAN_SAMPLES,) + GAUSSIAN_SHAPE), jnp.float32)


@pytest.mark.parametrize("label", [0, 2])
def test_ddpm_recovers_gaussian_data(gaussian_samplers, label):
  run = gaussian_samplers["ddpm"]
  x = run(jax.random.key(0), _labels(label))
  chex.assert_shape(x, (NUM_GAUSSIAN_SAMPLES,) + GAUSSIAN_SHAPE)
  chex.assert_type(x, jnp.float32)
  # 512 x 16 = 8192 draws: the sample mean and std scatter by 0.5 / sqrt(8192) = 0.0055 and
  # 0.5 / sqrt(2 * 8192) = 0.0039; the bounds are 5 of those, plus 1% for the ancestral
  # steps' variance (the posterior's, not the true reverse one's).
  assert abs(float(x.std()) - DATA_STD) < 5 * 0.0039 + 0.01 * DATA_STD
  assert abs(float(x.mean()) - 0.2 * label) < 5 * 0.0055
  np.testing.assert_array_equal(run(jax.random.key(0), _labels(label)), x)  # determinism per seed
  assert not np.allclose(run(jax.random.key(1), _labels(label)), x)


@pytest.mark.parametrize("label", [0, 2])
def test_ddim_is_the_closed_form_map_of_gaussian_data(gaussian_samplers, sigmoid, label):
  """50 DDIM steps with the exact predictor are the affine map `ddim_affine_map`: the sampler
  (float32) matches the float64 recursion to rounding, and the map takes N(0, 1) noise to
  the data's N(0.2 label, 0.5^2) up to DDIM's 50-step discretisation error."""
  x_T = _x_T()
  x = gaussian_samplers["ddim"](x_T, _labels(label))
  chex.assert_shape(x, (NUM_GAUSSIAN_SAMPLES,) + GAUSSIAN_SHAPE)
  chex.assert_type(x, jnp.float32)
  mul, add = ddim_affine_map(sigmoid, DDIM_STEPS, 0.2 * label)
  # float32 rounding: the first step takes x - sqrt(1 - abar_T) eps, a difference of numbers
  # of size |x| <= 4, and divides it by sqrt(abar_T) = 5.5e-4; the next level scales that by
  # sqrt(abar) = 0.08: eps * 4 * 0.08 / 5.5e-4 = 7e-5, later steps shrink it. Seen: 3e-5.
  # A sampler one step off (49 steps) lands 1.5e-3 away.
  np.testing.assert_allclose(x, mul * np.asarray(x_T, np.float64) + add, rtol=0, atol=1e-4)
  # The map itself: the mean lands on the data mean to sqrt(abar_T) mean (x_T has mean 0,
  # not sqrt(abar_T) mean: abar_T = 3e-7); the scale is the data's std to within 3.5% at
  # 50 steps (0.4834), 0.25% at 1000 (the probability-flow ODE's exact map is std / 1).
  np.testing.assert_allclose(add, 0.2 * label, atol=2e-4)
  assert abs(mul - DATA_STD) < 0.035 * DATA_STD
  assert abs(ddim_affine_map(sigmoid, T, 0.2 * label)[0] - DATA_STD) < 0.0025 * DATA_STD
  assert not np.allclose(gaussian_samplers["ddim"](_x_T(1), _labels(label)), x)


@pytest.mark.parametrize("label", [0, 2])
def test_dpmpp_2m_is_the_closed_form_map_of_gaussian_data(gaussian_samplers, sigmoid, label):
  """20 DPM-Solver++(2M) steps with the exact predictor are `dpmpp_2m_affine_map` (the paper's
  lambda/expm1 form in float64; the sampler writes its coefficients otherwise) to float32
  rounding: as for DDIM (above), the first step's x0 = (x - sigma eps) / alpha divides by
  alpha_T = 5.5e-4; seen 6e-5. A correction term of 1/r instead of 1/(2r) lands 0.5 away,
  one of r/2 0.18, the corrections shifted by a step 0.025."""
  x_T = _x_T()
  x = gaussian_samplers["dpm++2m"](x_T, _labels(label))
  chex.assert_shape(x, (NUM_GAUSSIAN_SAMPLES,) + GAUSSIAN_SHAPE)
  chex.assert_type(x, jnp.float32)
  mul, add = dpmpp_2m_affine_map(sigmoid, DPM_STEPS, 0.2 * label)
  np.testing.assert_allclose(x, mul * np.asarray(x_T, np.float64) + add, rtol=0, atol=1e-4)


def test_dpmpp_2m_under_15_steps_takes_its_last_step_at_first_order(sigmoid):
  """Below 15 steps the step into t = 0 is first order too (Lu et al.'s lower_order_final):
  10 steps match the reference that does so (1e-4, float32 as above); a second-order last
  step lands 1e-2 away (seen)."""
  x_T = _x_T()
  x = jax.jit(lambda x_T: diffusion.sample(
      gaussian_eps_fn(sigmoid), sigmoid, jax.random.key(0), _labels(2), sampler="dpm++2m",
      num_steps=10, x_T=x_T, clip="off"))(x_T)
  mul, add = dpmpp_2m_affine_map(sigmoid, 10, 0.4)
  np.testing.assert_allclose(x, mul * np.asarray(x_T, np.float64) + add, rtol=0, atol=1e-4)


def test_dpmpp_2m_reference_converges_at_second_order(sigmoid, linear):
  """The float64 reference above tends to the chain through all T timesteps (the finest the
  discrete schedule allows) at second order: its error falls 18-21-fold from 20 to 80 steps
  (second order: 16; first order, DDIM's: 4). A correction of 1/r instead of 1/(2r) falls
  7-fold, none 4-fold, which the bound of 12 rejects."""
  for schedule in (sigmoid, linear):
    limit = dpmpp_2m_affine_map(schedule, T, 0.4)[0]
    dpm = [abs(dpmpp_2m_affine_map(schedule, n, 0.4)[0] - limit) for n in (20, 80)]
    assert dpm[0] / dpm[1] > 12, dpm


def test_log_snr_timesteps(sigmoid, linear):
  """Descending from T - 1 to 0, distinct, and after the first step evenly spaced in lambda:
  at 10 and 20 steps the largest lambda step is within 1.6x the smallest (evenly spaced
  timesteps: 6-32x). The sigmoid schedule's first step is its clipped last beta (999 -> 998,
  3.4 in lambda); the rest share what is left."""
  for schedule in (sigmoid, linear):
    lam = diffusion.log_snr(schedule)
    # log(alpha / sigma) of the schedule's own float32 alpha and sigma; float32 logs of
    # numbers up to e^8 round by 8 * 6e-8 each.
    alpha = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)
    sigma = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)
    np.testing.assert_allclose(lam, np.log(alpha / sigma), rtol=0, atol=1e-5)
    assert (np.diff(lam) < 0).all()
    for n in (10, 20):
      ts = np.asarray(diffusion.log_snr_timesteps(schedule, n))
      assert ts.dtype == np.int32 and len(ts) == n and ts[0] == T - 1 and ts[-1] == 0
      assert (np.diff(ts) < 0).all()
      h = np.diff(np.asarray(lam)[ts])[1:]
      assert h.max() / h.min() < 1.6, (n, ts)
    np.testing.assert_array_equal(diffusion.log_snr_timesteps(schedule, T), np.arange(T)[::-1])
    np.testing.assert_array_equal(diffusion.log_snr_timesteps(schedule, 2), [T - 1, 0])
  assert list(diffusion.log_snr_timesteps(sigmoid, 20)[:2]) == [T - 1, T - 2]
  with pytest.raises(ValueError, match="num_steps must lie in"):
    diffusion.log_snr_timesteps(linear, T + 1)


NARROW_MEAN, NARROW_STD = 0.5, 0.2  # Gaussian data well inside the data range [-1, 1]


def narrow_eps_fn(schedule, bias=0.0, wobble=0.0):
  """The exact noise predictor of N(0.5, 0.2^2) data, plus a constant `bias` and a `wobble`
  that varies fast with x and t (0.1 sin(1000 x + 7 t): an error like a trained network's,
  ~0.07 rms, the same at every noise level)."""
  def eps_fn(x, t, labels):
    shape = t.shape + (1,) * (x.ndim - 1)
    a = schedule.alphas_cumprod[t].reshape(shape)
    exact = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * NARROW_MEAN) / (a * NARROW_STD**2 + 1 - a)
    return exact + bias + wobble * jnp.sin(1000.0 * x + 7.0 * t.reshape(shape))
  return eps_fn


def _narrow_samples(schedule, eps_fn, sampler, num_steps, clip, x_T):
  return jax.jit(lambda x_T: diffusion.sample(
      eps_fn, schedule, jax.random.key(0), jnp.zeros((len(x_T),), jnp.int32), sampler=sampler,
      num_steps=num_steps, x_T=x_T, clip=clip))(x_T)


@pytest.mark.parametrize("name", ["sigmoid", "linear"])
def test_dpmpp_2m_20_steps_within_5e_3_of_the_data_std(name, request):
  """With the exact predictor the sampler is an affine map of x_T; its slope is the std it
  gives N(0, 1) noise. At 20 steps DPM-Solver++(2M)'s lies within 5e-3 of the exact flow's
  (float64 reference: 1.1e-3 sigmoid, 2.8e-3 linear; over evenly spaced timesteps it was
  3.0e-2 and 5.0e-2), and nearer than DDIM's at 20 (3.5e-2, 5.8e-2). The slope is fitted
  to the sampler's own float32 output."""
  schedule = request.getfixturevalue(name)
  exact, _ = exact_flow_map(schedule, NARROW_MEAN, NARROW_STD)
  x_T = _x_T()
  slopes = {}
  for sampler in ("dpm++2m", "ddim"):
    x = _narrow_samples(schedule, narrow_eps_fn(schedule), sampler, 20, "off", x_T)
    slopes[sampler] = np.polyfit(np.ravel(x_T), np.ravel(x), 1)[0]
  assert abs(slopes["dpm++2m"] - exact) < 5e-3, slopes
  assert abs(slopes["ddim"] - exact) > 5 * abs(slopes["dpm++2m"] - exact), slopes


@pytest.mark.parametrize("error", [dict(bias=0.01), dict(wobble=0.1)], ids=["bias", "wobble"])
@pytest.mark.parametrize("sampler,num_steps", [("ddpm", None), ("ddim", 50), ("dpm++2m", 20)])
def test_samplers_hold_with_a_slightly_wrong_eps_model_on_the_sigmoid_schedule(
    sigmoid, sampler, num_steps, error):
  """An eps model's x0 = (x - sigma eps) / alpha multiplies its error by sigma / alpha:
  1,800 at the sigmoid schedule's last timestep. With x0 clipped to the data range (the
  default), samples of a model off by a bias of 0.01 or a 0.07-rms wobble stay on the data:
  mean within 0.05 and std within 0.03 of N(0.5, 0.2^2) (seen: 0.042 and 0.035 at most,
  from DDIM at 20 steps; 8192 draws scatter by 0.002). Unclipped, DDIM's mean moves 0.28
  (bias) or its std 1.7 (wobble)."""
  x_T = _x_T()
  x = _narrow_samples(sigmoid, narrow_eps_fn(sigmoid, **error), sampler, num_steps, "static", x_T)
  chex.assert_tree_all_finite(x)
  assert abs(float(x.mean()) - NARROW_MEAN) < 0.05
  assert abs(float(x.std()) - NARROW_STD) < 0.03
  if sampler == "ddim":
    off = _narrow_samples(sigmoid, narrow_eps_fn(sigmoid, **error), sampler, num_steps, "off",
                          x_T)
    assert (abs(float(off.mean()) - NARROW_MEAN) > 0.2 or abs(float(off.std()) - NARROW_STD) > 1)


def test_clips():
  """static: the data range; dynamic (Imagen): divide by the 99.5th percentile of |x0| where it
  exceeds 1, else as static; off: the sampler reads the model's x0 as it is."""
  x0 = jnp.linspace(-3.0, 3.0, 1001)
  np.testing.assert_array_equal(diffusion.static_clip(x0), jnp.clip(x0, -1, 1))
  s = np.percentile(np.abs(np.asarray(x0)), 99.5)
  np.testing.assert_allclose(diffusion.dynamic_clip(x0), np.clip(x0, -s, s) / s, rtol=1e-6)
  inside = jnp.linspace(-0.9, 0.9, 11)
  np.testing.assert_array_equal(diffusion.dynamic_clip(inside), inside)
  assert diffusion.CLIPS["off"] is None and set(diffusion.CLIPS) == {"static", "dynamic", "off"}


def test_one_step_per_timestep_ddim_and_dpmpp_2m_agree(sigmoid):
  """With all T steps both solve the probability-flow ODE finely: the fitted scale of each
  map is the exact one's to 0.3% (DDIM, first order: 0.23% seen) and 0.1% (DPM-Solver++(2M):
  0.05% seen), so they agree to 0.3%; the means agree with the exact map's to 1e-3."""
  x_T = _x_T()
  fits = {}
  for sampler in ("ddim", "dpm++2m"):
    x = jax.jit(lambda x_T: diffusion.sample(
        gaussian_eps_fn(sigmoid), sigmoid, jax.random.key(0), _labels(2),
        sampler=sampler, num_steps=T, x_T=x_T, clip="off"))(x_T)
    fits[sampler] = np.polyfit(np.ravel(x_T), np.ravel(x), 1)
  mul, add = exact_flow_map(sigmoid, 0.4)
  assert abs(fits["ddim"][0] / mul - 1) < 3e-3, fits
  assert abs(fits["dpm++2m"][0] / mul - 1) < 1e-3, fits
  assert abs(fits["dpm++2m"][0] / fits["ddim"][0] - 1) < 3e-3, fits
  for slope, intercept in fits.values():
    assert abs(intercept - add) < 1e-3


@pytest.mark.parametrize("num_steps", [1, 2])
def test_dpmpp_2m_first_order_steps_are_ddim_steps(sigmoid, num_steps):
  """Its first step has no earlier prediction and its last lands on the clean image: both are
  first order, which is DDIM's step. With 1 or 2 steps there is no other."""
  run = lambda sampler: jax.jit(lambda x_T: diffusion.sample(
      gaussian_eps_fn(sigmoid), sigmoid, jax.random.key(0), _labels(2), sampler=sampler,
      num_steps=num_steps, x_T=x_T, clip="off"))(_x_T())
  np.testing.assert_allclose(run("dpm++2m"), run("ddim"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_deterministic_samplers_recover_gaussian_data_in_20_steps(sigmoid, sampler):
  """4096 pixels, 20 steps, data N(0.4, 0.5^2): the sample mean and std land on the data's
  within Monte-Carlo error plus the sampler's discretisation error.

  Monte Carlo: 4 standard errors, 4 * 0.5 / sqrt(4096) = 0.031 on the mean and
  4 * 0.5 / sqrt(2 * 4096) = 0.022 on the std. Discretisation, from the float64 maps above:
  20 evenly spaced steps on the sigmoid schedule scale the data's std by 0.920 (DDIM) and
  1.074 (DPM-Solver++(2M)), so the std bound adds 8% of 0.5; the means are exact to 1e-4.
  (2% on the std takes 47 DPM-Solver++(2M) steps or 87 DDIM ones, 1% 72 or 183; the
  exact-map tests above are the sharp checks.)
  """
  num_pixels = 4096
  x_T = jnp.asarray(np.random.default_rng(8).normal(size=(num_pixels // 16,) + GAUSSIAN_SHAPE),
                    jnp.float32)
  x = jax.jit(lambda x_T: diffusion.sample(
      gaussian_eps_fn(sigmoid), sigmoid, jax.random.key(0), jnp.full((len(x_T),), 2, jnp.int32),
      sampler=sampler, num_steps=DPM_STEPS, x_T=x_T, clip="off"))(x_T)
  mean_err, std_err = 0.5 / np.sqrt(num_pixels), 0.5 / np.sqrt(2 * num_pixels)
  assert abs(float(x.mean()) - 0.4) < 4 * mean_err + 1e-4
  assert abs(float(x.std()) - DATA_STD) < 4 * std_err + 0.08 * DATA_STD


def test_guided_dpmpp_2m_is_dpmpp_2m_of_the_guided_data(gaussian_samplers, sigmoid):
  """As for DDIM below: at w = 1 the guided model is the exact one of data with mean 0.8."""
  x_T = _x_T()
  guided = gaussian_samplers["guided dpm++2m"](x_T, _labels(2), 1.0)
  mul, add = dpmpp_2m_affine_map(sigmoid, DPM_STEPS, 2 * 0.4)
  np.testing.assert_allclose(guided, mul * np.asarray(x_T, np.float64) + add, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler,num_steps,guidance", [
    ("ddpm", None, 0.0), ("ddim", 20, 0.0), ("dpm++2m", 20, 0.0), ("dpm++2m", 20, 1.0)])
def test_v_prediction_samples_as_eps_prediction(sigmoid, sampler, num_steps, guidance):
  """The exact v model read with prediction='v' is the exact eps model: every sampler, guided
  or not, draws the same images (the same noise too). float32: the eps and v models round
  differently, and the first steps divide by alpha_T; seen 6e-5. Reading v as eps is off by
  hundreds."""
  x_T = _x_T()[:64]
  labels = jnp.full((64,), 2, jnp.int32)

  def run(model_fn, prediction):
    return jax.jit(lambda x_T: diffusion.sample(
        model_fn, sigmoid, jax.random.key(1), labels, sampler=sampler, num_steps=num_steps,
        guidance=guidance, null_label=NULL_LABEL, x_T=x_T, prediction=prediction,
        clip="off"))(x_T)

  np.testing.assert_allclose(run(gaussian_v_fn(sigmoid), "v"),
                             run(gaussian_eps_fn(sigmoid), "eps"), rtol=0, atol=5e-4)


def test_v_prediction_inverts_as_eps_prediction(sigmoid):
  x0 = jnp.asarray(DATA_STD * np.random.default_rng(2).normal(size=(8,) + GAUSSIAN_SHAPE),
                   jnp.float32)
  labels = jnp.zeros((8,), jnp.int32)
  invert = lambda model_fn, prediction: jax.jit(lambda x0: diffusion.ddim_invert(
      model_fn, sigmoid, x0, labels, num_steps=20, prediction=prediction))(x0)
  np.testing.assert_allclose(invert(gaussian_v_fn(sigmoid), "v"),
                             invert(gaussian_eps_fn(sigmoid), "eps"), rtol=1e-4, atol=1e-3)


def test_guidance_zero_is_unguided(gaussian_samplers):
  unguided = gaussian_samplers["ddim"](_x_T(), _labels(2))
  guided = gaussian_samplers["guided ddim"](_x_T(), _labels(2), 0.0)
  np.testing.assert_allclose(guided, unguided, atol=1e-5)


def test_guidance_extrapolates_away_from_the_null_label(gaussian_samplers, sigmoid):
  """For Gaussian data, (1 + w) eps(x, y) - w eps(x, null) is the exact noise of data with
  mean (1 + w) mean(y) - w mean(null) = 2 * 0.4 at w = 1: DDIM maps x_T as for that data."""
  x_T = _x_T()
  guided = gaussian_samplers["guided ddim"](x_T, _labels(2), 1.0)
  mul, add = ddim_affine_map(sigmoid, DDIM_STEPS, 2 * 0.4)
  np.testing.assert_allclose(guided, mul * np.asarray(x_T, np.float64) + add, rtol=0, atol=1e-4)


def test_ddim_inversion_round_trip(sigmoid):
  x0 = jnp.asarray(DATA_STD * np.random.default_rng(2).normal(size=(8,) + GAUSSIAN_SHAPE),
                   jnp.float32)
  labels = jnp.zeros((8,), jnp.int32)
  eps_fn = gaussian_eps_fn(sigmoid)

  @jax.jit
  def round_trip(x0):
    latents = diffusion.ddim_invert(eps_fn, sigmoid, x0, labels, num_steps=T)
    return latents, diffusion.sample(eps_fn, sigmoid, jax.random.key(3), labels,
                                     image_shape=GAUSSIAN_SHAPE, sampler="ddim", num_steps=T,
                                     x_T=latents, clip="off")

  latents, x0_again = round_trip(x0)
  assert 0.8 < float(latents.std()) < 1.2  # latents look like the N(0, I) the sampler starts from
  np.testing.assert_allclose(x0_again, x0, atol=0.02)


def test_sample_rejects_bad_arguments(linear):
  eps_fn = gaussian_eps_fn(linear)
  labels = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="ddim"):
    diffusion.sample(eps_fn, linear, jax.random.key(0), labels, sampler="ddpm", num_steps=10)
  with pytest.raises(ValueError,
                     match="unknown sampler 'euler'; registered: ddpm, ddim, dpm\\+\\+2m"):
    diffusion.sample(eps_fn, linear, jax.random.key(0), labels, sampler="euler")
  with pytest.raises(ValueError, match="unknown prediction 'x0'"):
    diffusion.sample(eps_fn, linear, jax.random.key(0), labels, prediction="x0")
  with pytest.raises(ValueError, match="dpm\\+\\+2m is deterministic"):
    diffusion.sample(eps_fn, linear, jax.random.key(0), labels, sampler="dpm++2m", num_steps=4,
                     eta=1.0)
  with pytest.raises(ValueError, match="null_label"):
    diffusion.sample(eps_fn, linear, jax.random.key(0), labels, guidance=1.0)


# Samplers driving a tiny U-Net.

NUM_CLASSES = 10
UNET_T = 20
UNET_SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def unet_sampler():
  """A jitted DDIM sampler (eta = 1) over a tiny U-Net with random parameters."""
  model = UNet(num_classes=NUM_CLASSES, num_timesteps=UNET_T, base_channels=8,
               channel_mults=(1, 2), blocks_per_level=1, embed_hidden=16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + UNET_SHAPE),
                          jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  # Random parameters drawn with numpy: compiling model.init is slow on a CPU.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), jnp.float32), shapes)
  eps_fn = functools.partial(model.apply, params)
  schedule = diffusion.linear_schedule(UNET_T)
  return jax.jit(lambda rng, labels: diffusion.sample(
      eps_fn, schedule, rng, labels, image_shape=UNET_SHAPE, sampler="ddim", num_steps=4, eta=1.0))


def test_unet_sampler_shape_dtype_and_seeds(unet_sampler):
  labels = jnp.array([0, 3, 7], jnp.int32)
  x = unet_sampler(jax.random.key(0), labels)
  chex.assert_shape(x, (3,) + UNET_SHAPE)
  chex.assert_type(x, jnp.float32)
  chex.assert_tree_all_finite(x)
  np.testing.assert_array_equal(unet_sampler(jax.random.key(0), labels), x)
  assert not np.allclose(unet_sampler(jax.random.key(1), labels), x)


def test_unet_sampler_chains_are_independent(unet_sampler):
  """Vmapped per example: an image depends on its own key and label only."""
  x = unet_sampler(jax.random.key(0), jnp.array([0, 3, 7], jnp.int32))
  y = unet_sampler(jax.random.key(0), jnp.array([0, 3, NUM_CLASSES], jnp.int32))
  np.testing.assert_allclose(y[:2], x[:2], atol=1e-4)
  assert not np.allclose(y[2], x[2])


# Interpolation.

def test_slerp():
  a = jnp.array([1.0, 0.0, 0.0])
  b = jnp.array([0.0, 1.0, 0.0])
  np.testing.assert_allclose(diffusion.slerp(a, b, 0.0), a, atol=1e-6)
  np.testing.assert_allclose(diffusion.slerp(a, b, 1.0), b, atol=1e-6)
  np.testing.assert_allclose(diffusion.slerp(a, b, 0.5), [0.5**0.5, 0.5**0.5, 0.0], atol=1e-6)
  # Parallel latents fall back to the straight line, without NaNs.
  np.testing.assert_allclose(diffusion.slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-6)


def test_slerp_keeps_gaussian_latents_on_their_shell():
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(32, 32, 3)), jnp.float32) for _ in range(2))
  alphas = jnp.linspace(0.0, 1.0, 5)
  path = jax.jit(jax.vmap(diffusion.slerp, in_axes=(None, None, 0)))(a, b, alphas)
  chex.assert_shape(path, (5, 32, 32, 3))
  norms = jnp.linalg.norm(path.reshape(5, -1), axis=1)
  np.testing.assert_allclose(norms, np.sqrt(32 * 32 * 3), rtol=0.05)
  # The straight line's midpoint falls well inside the shell.
  assert float(jnp.linalg.norm((a + b) / 2)) < 0.8 * np.sqrt(32 * 32 * 3)
