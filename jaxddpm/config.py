"""The run configuration: defaults shared by every `configs/*.py`, and its up-front validation.

A config is an ml_collections `ConfigDict` with the sections data, model, diffusion, training, optim,
sample and eval. It is locked, so `--config.training.batch_sise=64` (a typo) fails at parse time.
`validate(config)` checks every value before anything is compiled and raises ValueError naming the field
and the allowed values.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxddpm import diffusion, losses, schedule
from jaxddpm.core import process as process_lib
from jaxddpm.core.samplers import engine as sampler_engine, grids as sampler_grids, options as sampler_options_lib
from jaxddpm.models import presets

MAX_INPUT_THREADS_AND_BATCHES = 64  # host threads reading records / batches prepared ahead
SAMPLE_METHODS = sampler_engine.METHODS
DISCRETE = "ddpm"  # config.diffusion.process of DDPM's discrete chain; any other value names a Process
DIFFUSION_PROCESSES = (DISCRETE,) + process_lib.PROCESSES
# config.model.dtype -> the network's compute dtype; "auto" is decided by the backend (resolve_dtype)
DTYPES = ("auto", "float32", "bfloat16")
AUTO_DTYPE = {"gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16", "tpu": "bfloat16", "cpu": "float32"}


def base_config() -> ml_collections.ConfigDict:
  """DDPM's CIFAR-10 recipe as defaults; `configs/*.py` change what their dataset needs."""
  c = ml_collections.ConfigDict()
  c.data = dict(name="cifar10", data_dir=config_dict.placeholder(str), split="train", eval_split="test",
                image_size=32, random_flip=True,
                # batches the input thread prepares ahead (>= 1); threads that read records of datasets
                # too large for memory (0: batches are made in the training loop's thread)
                prefetch_batches=4, num_threads=2)
  # dtype: the network's compute dtype, "float32", "bfloat16" or "auto" (bfloat16 on GPU/TPU, float32 on CPU)
  c.model = dict(preset="cifar10", dtype="float32", remat=False,
                 ch=config_dict.placeholder(int), ch_mult=config_dict.placeholder(tuple),
                 num_res_blocks=config_dict.placeholder(int), attn_resolutions=config_dict.placeholder(tuple),
                 dropout=config_dict.placeholder(float), num_heads=config_dict.placeholder(int),
                 use_scale_shift_norm=config_dict.placeholder(bool),
                 resamp_with_conv=config_dict.placeholder(bool), num_groups=config_dict.placeholder(int))
  # process: "ddpm" (the discrete chain of `schedule` and `num_timesteps`) or a continuous process of
  # jaxddpm.make_process ("vp", "vp_cosine", "subvp", "ve", "flow"), whose network output is mean_type
  # (eps, x0, v, u, score) and whose loss is weighting's w(lambda) (see jaxddpm.core.losses)
  c.diffusion = dict(process=DISCRETE, schedule="linear", num_timesteps=1000, mean_type="eps", var_type="fixed_large",
                     loss_type="mse", weighting="none", t_sampling="uniform", min_snr_gamma=5.0,
                     p2_gamma=1.0, p2_k=1.0)
  c.training = dict(batch_size=128, num_steps=800_000, seed=0, log_every=100, checkpoint_every=10_000,
                    keep_checkpoints=3, sample_every=50_000, max_nonfinite_streak=20,
                    eval_at_end=True,  # the built-in datasets' in-domain score when training ends
                    # continue a workdir's checkpoints on another dataset or split (fine-tuning); without it
                    # such a workdir is refused like one of another model
                    allow_dataset_change=False)
  c.optim = dict(lr=2e-4, warmup_steps=5000, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 ema_decay=0.9999, ema_warmup=True)
  # timesteps: the discrete chain's respacing spec, or a continuous process's number of steps; grid: the
  # continuous time grid ("uniform", "logsnr", "edm")
  # steps: the number of sampler steps, shorthand for timesteps=str(steps) (set one of the two); the
  # stepper options: EDM's churn of method "heun" (s_churn, s_tmin, s_tmax, s_noise) and the Langevin
  # corrector of method "pc" (pc_snr, pc_corrector_steps)
  c.sample = dict(num_samples=64, batch_size=64, method="ancestral", timesteps=config_dict.placeholder(str),
                  grid="uniform", steps=config_dict.placeholder(int),
                  s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, pc_snr=0.16, pc_corrector_steps=1,
                  eta=0.0, clip_denoised=True, seed=0, use_ema=True, grid_cols=8)
  c.eval = dict(num_examples=config_dict.placeholder(int), batch_size=64, seed=0, fid_num_samples=50_000,
                inception_weights=config_dict.placeholder(str), fid_stats=config_dict.placeholder(str),
                # which metrics --mode evaluate runs: "auto" (bpd, figures, and FID when inception_weights is
                # set, else the in-domain score for digits/mnist5k) or a comma-separated subset of
                # "bpd,fid,in_domain,figures" (see jaxddpm.evaluate)
                metrics="auto", use_ema=True,
                # bits/dim: clip the predicted x0 to [-1, 1] in p(x_{t-1} | x_t), as the DDPM and Improved
                # DDPM evaluation code does (any fixed decoder gives a valid bound)
                bpd_clip_denoised=True,
                # FID reference: the split whose statistics are computed (and cached in stats_dir, default
                # WORKDIR/eval) when fid_stats is not given, or the split a published fid_stats file is of
                fid_stats_split="train", stats_dir=config_dict.placeholder(str),
                # in-domain score (built-in datasets): samples scored, training steps of the cached classifier
                in_domain_num_samples=200, classifier_steps=400,
                # figures: samples in the grid, snapshots of the predicted x0 along the chain, interpolation
                # pairs / lambdas / the paper's t to encode to (None: T // 2)
                figure_num_samples=16, figure_num_snapshots=10, interp_num_pairs=4, interp_num_lambdas=11,
                interp_timestep=config_dict.placeholder(int),
                # "ode_bpd": the probability-flow ODE's bits/dim (jaxddpm.core.likelihood): solver "rk4" or "heun",
                # steps, divergence "hutchinson" (probes "rademacher"/"gaussian") or "exact"
                ode_solver="rk4", ode_steps=50, ode_divergence="hutchinson", ode_probe="rademacher", ode_num_probes=1,
                # "nfe_sweep": the in-domain score of these samplers at these network-call budgets (and of
                # config.sample's sampler), plotted against NFE
                nfe_sweep_methods="ddim,heun,dpm_solver_pp,dpm_solver_pp_3m", nfe_sweep_nfe="5,10,20,50",
                nfe_sweep_num_samples=1000)
  # JAX devices the host CPU is split into when it is the platform: 0 = auto, one per core as far as
  # training.batch_size and eval.batch_size divide (parallel.cpu_device_count); ignored when XLA_FLAGS sets
  # --xla_force_host_platform_device_count
  c.system = dict(cpu_devices=0)
  return c


def ddpm256_config(dataset: str, preset: str, num_steps: int, eval_split: str) -> ml_collections.ConfigDict:
  """DDPM's 256x256 recipe (Ho et al. 2020, Appendix B): the 114M-parameter UNet, lr 2e-5, batch 64,
  EMA 0.9999, random flips, no dropout, bfloat16 activations on GPU/TPU ("auto"); for CelebA-HQ and LSUN."""
  c = base_config()
  c.data.name, c.data.image_size, c.data.eval_split = dataset, 256, eval_split
  c.model.preset, c.model.dtype = preset, "auto"
  c.training.batch_size, c.training.num_steps, c.training.sample_every = 64, num_steps, 100_000
  c.optim.lr = 2e-5
  c.sample.num_samples = c.sample.batch_size = 16
  c.sample.grid_cols = 4
  c.eval.batch_size = 16
  return c


MODEL_OVERRIDES = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_heads",
                   "use_scale_shift_norm", "resamp_with_conv", "num_groups")


def unet_kwargs(config, image_shape) -> dict:
  """The UNet constructor arguments: the preset, the config's overrides, dtype, and out_channels."""
  m = config.model
  kw = dict(presets.PRESETS[m.preset])
  kw.update({k: m[k] for k in MODEL_OVERRIDES if m[k] is not None})
  for k in ("ch_mult", "attn_resolutions"):
    kw[k] = tuple(kw[k])
  kw["dtype"] = resolve_dtype(m.dtype)
  kw["remat"] = bool(m.remat)
  kw["out_channels"] = diffusion.output_channels(image_shape[-1], config.diffusion.var_type)
  return kw


def resolve_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """The network's compute dtype for config.model.dtype: "float32", "bfloat16", or "auto" = bfloat16 on
  GPU and TPU, float32 on CPU (and any other backend). Parameters, optimizer state, the diffusion math,
  the loss and the sampler update stay float32 whatever this says. backend: jax.default_backend() if None.
  The one place the dtype is decided: training, sampling and evaluation build their UNet through
  `unet_kwargs`."""
  if name == "auto":
    if backend is None:
      import jax  # noqa: PLC0415
      backend = jax.default_backend()
    name = AUTO_DTYPE.get(backend, "float32")
  return jnp.dtype(name)


def _fail(field: str, value, allowed: str):
  raise ValueError(f"config.{field} = {value!r} is invalid; allowed: {allowed}")


def _choice(config, field, allowed):
  section, name = field.split(".")
  value = config[section][name]
  if value not in allowed:
    _fail(field, value, f"one of {tuple(allowed)}")


def _positive_int(config, field, zero_ok=False):
  section, name = field.split(".")
  v = config[section][name]
  if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
    _fail(field, v, "an integer >= 0" if zero_ok else "an integer >= 1")


# float32 limits for the optimizer's numbers, which the train step uses in float32: a nonzero value below
# F32_TINY (the smallest normal float32) is 0 or flushed to 0, one above F32_MAX is inf, and a decay above
# F32_BELOW_ONE rounds to 1 (1 - decay = 0: Adam's bias correction divides by 0, the EMA freezes).
F32_TINY = float(np.finfo(np.float32).tiny)            # 1.1754944e-38
F32_MAX = float(np.finfo(np.float32).max)              # 3.4028235e+38
F32_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))  # 0.99999994
# Adam's update m / (sqrt(v) + eps): a gradient g below sqrt(F32_TINY) ~ 1.1e-19 has g^2 = 0 in float32
# (v = 0, m != 0), so the update is ~ g / eps; eps >= sqrt(F32_TINY) keeps it <= 1 (eps = 0 gives 0 / 0).
MIN_ADAM_EPS = float(np.sqrt(np.float64(F32_TINY)))   # 1.0842022e-19


def _number(config, field, lo, hi, lo_open=False, hi_open=False, why=""):
  """A real number in the interval, and, when nonzero, a normal float32 (neither 0 nor inf in float32)."""
  section, name = field.split(".")
  v = config[section][name]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  ok = ok and (v == 0 or F32_TINY <= abs(v) <= F32_MAX)
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo:.8g}, {hi:.8g}{')' if hi_open else ']'}"
    _fail(field, v, f"a number in {interval}" + (f" ({why})" if why else
                                                 f", 0 or of magnitude [{F32_TINY:.8g}, {F32_MAX:.8g}] "
                                                 "(not 0 or inf in float32)"))


def sample_timesteps(config):
  """config.sample's timesteps spec: str(sample.steps) when steps is set, else sample.timesteps."""
  s = config.sample
  return s.timesteps if s.steps is None else str(s.steps)


# config.sample field -> stepper option, per method (see jaxddpm.core.samplers.options)
SAMPLER_OPTION_FIELDS = {"heun": {"s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise"},
                         "pc": {"pc_snr": "snr", "pc_corrector_steps": "corrector_steps"}}


def sampler_options(config) -> dict:
  """The stepper options of config.sample's method (an empty dict for methods without options)."""
  return {opt: config.sample[field] for field, opt in SAMPLER_OPTION_FIELDS.get(config.sample.method, {}).items()}


def validate(config, image_shape=None) -> None:
  """Checks every field of a run config (nothing is traced or compiled). image_shape (H, W, C) of the
  dataset, when known, is checked against the model: size divisible by its downsampling, attention
  resolutions that occur, channel groups."""
  expected = base_config()
  for section in expected:
    if section not in config:
      raise ValueError(f"config has no section {section!r}; sections: {list(expected)}")
    unknown = sorted(set(config[section]) - set(expected[section]))
    if unknown:
      raise ValueError(f"config.{section} has unknown field(s) {unknown}; allowed: {sorted(expected[section])}")
  from jaxddpm import data  # noqa: PLC0415  (data imports tfds; keep this module light)
  _choice(config, "data.name", sorted(data.DATASETS))
  _positive_int(config, "data.image_size")
  for field, lo in (("data.prefetch_batches", 1), ("data.num_threads", 0)):
    v = config.data[field.split(".")[1]]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_INPUT_THREADS_AND_BATCHES:
      _fail(field, v, f"an integer in [{lo}, {MAX_INPUT_THREADS_AND_BATCHES}]")
  for field in ("split", "eval_split"):
    splits = data.DATASETS[config.data.name].splits
    if config.data[field] not in splits:
      _fail(f"data.{field}", config.data[field], f"a split of {config.data.name!r}: {splits}")
  _choice(config, "model.preset", sorted(presets.PRESETS))
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "diffusion.process", DIFFUSION_PROCESSES)
  _choice(config, "diffusion.schedule", schedule.SCHEDULES)
  _positive_int(config, "diffusion.num_timesteps")
  _choice(config, "diffusion.var_type", diffusion.VAR_TYPES)
  _choice(config, "diffusion.loss_type", losses.LOSS_TYPES)
  if config.diffusion.process == DISCRETE:
    _choice(config, "diffusion.mean_type", diffusion.MEAN_TYPES)
    _choice(config, "diffusion.weighting", losses.WEIGHTINGS)
    _choice(config, "diffusion.t_sampling", losses.T_SAMPLINGS)
  else:
    continuous = f"with process={config.diffusion.process!r}"
    _choice(config, "diffusion.mean_type", diffusion.OUTPUTS)
    _choice(config, "diffusion.weighting", tuple(losses.CONTINUOUS_WEIGHTINGS))
    _choice(config, "diffusion.t_sampling", losses.CONTINUOUS_T_SAMPLINGS)
    if config.diffusion.loss_type != "mse":
      _fail("diffusion.loss_type", config.diffusion.loss_type, f"'mse' {continuous} (the bound is the discrete chain's)")
    if config.diffusion.var_type not in ("fixed_small", "fixed_large"):
      _fail("diffusion.var_type", config.diffusion.var_type, f"'fixed_small' or 'fixed_large' {continuous}")
  _number(config, "diffusion.min_snr_gamma", F32_TINY, F32_MAX, why="min(SNR, gamma) / SNR: gamma > 0 in float32")
  _number(config, "diffusion.p2_gamma", 0.0, F32_MAX)
  _number(config, "diffusion.p2_k", F32_TINY, F32_MAX, why="(k + SNR)^-gamma: k > 0 in float32")
  if config.diffusion.weighting == "p2" and config.diffusion.p2_k ** -config.diffusion.p2_gamma > F32_MAX:
    _fail("diffusion.p2_gamma", config.diffusion.p2_gamma,
          f"a value with p2_k^-p2_gamma <= {F32_MAX:.8g} (the weight at SNR -> 0 is inf in float32)")
  _choice(config, "sample.grid", sampler_grids.GRIDS)
  if config.sample.steps is not None:
    _positive_int(config, "sample.steps")
    if config.sample.timesteps is not None:
      _fail("sample.steps", config.sample.steps, f"None when sample.timesteps is set ({config.sample.timesteps!r}); "
            "set one of the two")

  if config.diffusion.process == DISCRETE:
    if config.sample.method in sampler_engine.CONTINUOUS_ONLY:
      _fail("sample.method", config.sample.method,
            f"one of {tuple(m for m in SAMPLE_METHODS if m not in sampler_engine.CONTINUOUS_ONLY)} with "
            "diffusion.process='ddpm' (set a continuous diffusion.process for the probability-flow ODE)")
    if config.sample.grid != "uniform":
      _fail("sample.grid", config.sample.grid, "'uniform' with diffusion.process='ddpm' (respace with "
            "sample.timesteps)")
  elif sample_timesteps(config) is not None:
    try:
      sampler_grids.continuous_steps(sample_timesteps(config))
    except ValueError:
      _fail("sample.timesteps", config.sample.timesteps, f"None or a number of steps such as '100' {continuous}")
  learned = config.diffusion.var_type in ("learned", "learned_range")
  if config.diffusion.loss_type == "mse" and learned:
    _fail("diffusion.loss_type", "mse", f"'hybrid' or 'kl' with var_type={config.diffusion.var_type!r}")
  if config.diffusion.loss_type == "hybrid" and not learned:
    _fail("diffusion.var_type", config.diffusion.var_type, "'learned' or 'learned_range' with loss_type='hybrid'")
  if config.diffusion.weighting != "none" and config.diffusion.mean_type == "x_prev":
    _fail("diffusion.weighting", config.diffusion.weighting, "'none' with mean_type='x_prev'")
  for f in ("training.batch_size", "training.num_steps", "training.log_every", "training.checkpoint_every",
            "training.keep_checkpoints", "training.sample_every", "training.max_nonfinite_streak",
            "sample.num_samples", "sample.batch_size", "sample.grid_cols", "eval.batch_size",
            "eval.fid_num_samples"):
    _positive_int(config, f)
  _positive_int(config, "training.seed", zero_ok=True)
  if not isinstance(config.training.allow_dataset_change, bool):
    _fail("training.allow_dataset_change", config.training.allow_dataset_change, "True or False")
  if not isinstance(config.training.eval_at_end, bool):
    _fail("training.eval_at_end", config.training.eval_at_end, "True or False")
  _positive_int(config, "system.cpu_devices", zero_ok=True)
  _positive_int(config, "optim.warmup_steps", zero_ok=True)
  # the warm-up's first learning rate lr / warmup_steps must not vanish in float32 either
  min_lr = F32_TINY * max(1, config.optim.warmup_steps)
  _number(config, "optim.lr", min_lr, 1.0, why=f"lr / max(1, warmup_steps) >= {F32_TINY:.8g}: not 0 in float32")
  _number(config, "optim.grad_clip", 0.0, F32_MAX, why=f"0 (no clipping) or [{F32_TINY:.8g}, {F32_MAX:.8g}]: "
          "not 0 or inf in float32")
  below_one = f"1 - value must not be 0 in float32, so at most {F32_BELOW_ONE:.8g}"
  _number(config, "optim.b1", 0.0, F32_BELOW_ONE, why=below_one)
  _number(config, "optim.b2", 0.0, F32_BELOW_ONE, why=below_one)
  _number(config, "optim.eps", MIN_ADAM_EPS, 1.0,
          why="Adam divides by sqrt(v) + eps, and v is 0 in float32 for gradients below 1.1e-19")
  _number(config, "optim.weight_decay", 0.0, 1.0)
  _number(config, "optim.ema_decay", 0.0, F32_BELOW_ONE, why=below_one)
  _choice(config, "sample.method", SAMPLE_METHODS)
  defaults = base_config().sample
  for method, fields in SAMPLER_OPTION_FIELDS.items():
    for field in fields:
      if config.sample.method != method and config.sample[field] != defaults[field]:
        _fail(f"sample.{field}", config.sample[field], f"{defaults[field]!r} with sample.method="
              f"{config.sample.method!r} (it is an option of method {method!r})")
  try:
    sampler_options_lib.check_options(config.sample.method, sampler_options(config),
                                      config.diffusion.process == DISCRETE, config.diffusion.mean_type)
  except ValueError as e:
    raise ValueError(f"config.sample: {e}") from None
  _number(config, "sample.eta", 0.0, F32_MAX)
  if config.sample.method != "ddim" and config.sample.eta != 0.0:
    _fail("sample.eta", config.sample.eta, f"0.0 with sample.method={config.sample.method!r} (eta is DDIM's)")
  try:
    schedule.beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  except ValueError as e:
    raise ValueError(f"config.diffusion: {e}") from None
  if sample_timesteps(config) is not None and config.diffusion.process == DISCRETE:
    try:
      schedule.space_timesteps(config.diffusion.num_timesteps, sample_timesteps(config))
    except ValueError as e:
      raise ValueError(f"config.sample.timesteps: {e}") from None
  from jaxddpm import evaluate  # noqa: PLC0415  (evaluate imports this module)
  evaluate.validate_eval_config(config)
  if image_shape is not None:
    if image_shape[0] != image_shape[1]:
      _fail("data.image_size", image_shape, "square images")
    try:
      presets.validate_unet_config(image_size=image_shape[0], in_channels=image_shape[-1],
                                   **unet_kwargs(config, image_shape))
    except ValueError as e:
      raise ValueError(f"config.model (preset {config.model.preset!r}) cannot take {image_shape} images: {e}") \
          from None
