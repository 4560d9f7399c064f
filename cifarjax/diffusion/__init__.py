"""Denoising diffusion (Ho et al. 2020, DDPM) as pure functions of arrays (Part 2, section 4).

One module per concept, each name of theirs reached as `diffusion.NAME`:
  schedules      the noise schedules (`Schedule`, `SCHEDULES`), alphabar, SNR, `q_sample`
  objectives     predictions (eps, v), loss weightings (min-SNR), `training_loss`
  samplers       DDPM, DDIM, DPM-Solver++(2M), clipping, guidance, `sample`
  interpolation  DDIM inversion and slerp between latents

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
`Protocol` beside it: `SCHEDULES` (`ScheduleFn`), `SAMPLERS` (`Sampler`), `PREDICTIONS`
(`Prediction`), `LOSS_WEIGHTINGS` (`LossWeighting`) and `CLIPS`. Adding one is a
function and an entry; its keyword parameters after the contract's are its
settings (`cifarjax.registry`), which configs pass as `schedule_kwargs`,
`loss_weighting_kwargs` and `sample(..., sampler_kwargs=...)`. An unknown name
raises a ValueError (`errors.UserError`) that lists the registered ones.

Everything here traces under `jax.jit`: shapes are static and the reverse
chains run under `jax.lax.scan`, with no Python loop over timesteps.
"""

from cifarjax.diffusion.interpolation import ddim_invert, slerp
from cifarjax.diffusion.objectives import (EPS_PREDICTION, LOSS_WEIGHTINGS, PREDICTIONS,
                                           V_PREDICTION, LossWeighting, ModelFn, Prediction,
                                           drop_labels, loss_weights, min_snr_weighting,
                                           no_weighting, training_loss)
from cifarjax.diffusion.samplers import (CLIPS, LOWER_ORDER_FINAL_BELOW, SAMPLERS, Denoiser,
                                         Sampler, check_sampler, ddim_sampler, ddim_step,
                                         ddpm_sampler, ddpm_step, dpmpp_2m_coefficients,
                                         dpmpp_2m_sampler, dynamic_clip, guided_model,
                                         log_snr_timesteps, next_levels, sample,
                                         sampling_timesteps, static_clip)
from cifarjax.diffusion.schedules import (SCHEDULES, Schedule, ScheduleFn, alpha_bar,
                                          linear_schedule, log_snr, make_schedule, q_sample,
                                          schedule_from_betas, sigmoid_blog_schedule,
                                          sigmoid_gamma, sigmoid_schedule, snr)
