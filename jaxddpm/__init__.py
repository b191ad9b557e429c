"""jaxddpm: denoising diffusion probabilistic models in JAX.

The public API: pure functions of a `Schedule` or `Process` pytree and arrays (DDPM, Improved DDPM, DDIM,
score SDEs, flow matching), the samplers, the UNet, and the training/evaluation building blocks. Research
code imports only these names.
"""
from jaxddpm.schedule import (SCHEDULES, Schedule, beta_schedule, make_schedule, respace,
                              schedule_from_betas, space_timesteps)
from jaxddpm.diffusion import (MEAN_TYPES, VAR_TYPES, PMeanVariance, eps_from_score, output_channels,
                               p_mean_variance, predict_eps_from_v, predict_eps_from_x0, predict_x0_from_eps,
                               predict_x0_from_v, predict_x0_from_xprev, q_mean_variance,
                               q_posterior_mean_variance, q_sample, score_from_eps, split_model_output,
                               v_from_eps_x0)
from jaxddpm.losses import (LOSS_TYPES, T_SAMPLINGS, WEIGHTINGS, calc_bpd_loop,
                            discretized_gaussian_log_likelihood, loss_weight, mean_flat, normal_kl, prior_bpd,
                            sample_timesteps, snr, training_losses, vb_terms_bpd)

__version__ = "0.1.0"
from jaxddpm.sampling import (METHODS as SAMPLE_METHODS, ddim_sigma, ddim_step, make_sampler, p_sample,
                              resolve_timesteps, sample, sample_batched)
from jaxddpm.core.process import PROCESSES, Process, make_process
from jaxddpm.core.diffusion import (OUTPUTS, PathPoint, convert_output, output_from_x0_eps, path_point, posterior,
                                    q_sample_at, x0_eps_from_output)
from jaxddpm.core.losses import (CONTINUOUS_T_SAMPLINGS, CONTINUOUS_WEIGHTINGS, continuous_losses,
                                 output_mse_factor, sample_t)
from jaxddpm.core.samplers.base import SamplerConfig, Stepper
from jaxddpm.core.samplers.engine import STEPPERS, nfe
from jaxddpm.core.samplers.grids import GRIDS, make_time_grid
from jaxddpm.models.unet import UNet
from jaxddpm.models.presets import PRESETS, make_unet, validate_unet_config
from jaxddpm.training import TrainState, init_train_state, make_optimizer, train_step
from jaxddpm.core.likelihood import ddpm_continuous_limit, dequantize, ode_bpd, ode_logp
