"""What the metric reports of a run share (floor 3): where they are written (WORKDIR/eval), the names
every output of a run carries (`sample_tag`), which process writes, the progress bar, the model's apply
function, the sampler protocol, and how many batches each process reads of a split. Used by
`metrics.bpd`, `metrics.fid`, `jaxddpm.generate` and `jaxddpm.evaluate`."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os

import jax

from jaxddpm import data
from jaxddpm.core.samplers import grids
from jaxddpm.schedule import space_timesteps

EVAL_DIR = "eval"


def sampler_kwargs(config) -> dict:
  """The sampler options of config.sample / config.diffusion, as `sampling.make_sampler` takes them."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  s, d = config.sample, config.diffusion
  return dict(method=s.method, timesteps=config_lib.sample_timesteps(config), grid=s.grid,
              options=config_lib.sampler_options(config), eta=s.eta, mean_type=d.mean_type, var_type=d.var_type,
              clip_denoised=s.clip_denoised)


def sampler_description(config) -> dict:
  """`sampler_kwargs` plus the schedule: the sampler as written into a protocol."""
  kw = sampler_kwargs(config)
  kw["num_timesteps"] = config.diffusion.num_timesteps
  kw["schedule"] = config.diffusion.schedule
  kw["process"] = config.diffusion.process
  return kw


@functools.lru_cache(maxsize=None)
def apply_fn(model):
  """One apply function per model (cache hits for the compiled samplers and bound)."""
  return lambda params, x, t: model.apply({"params": params}, x, t, train=False)


def eval_dir(workdir: str) -> str:
  """WORKDIR/eval, where every report is written."""
  return os.path.join(workdir, EVAL_DIR)


def is_main() -> bool:
  """True on the process that writes files and prints (process 0)."""
  return jax.process_index() == 0


def progress(total, desc, unit: str = "batch"):
  """A progress bar of `total` units on process 0 (tqdm on a terminal, a plain line a minute otherwise)."""
  from jaxddpm import logger  # noqa: PLC0415
  return logger.progress(total, desc, unit=unit, enabled=is_main())


# ------------------------------------------------------------------------------------ output names
def sampling_steps(config) -> int:
  """K, the number of steps of config.sample's sampler: on the discrete chain all T or the respaced
  count; on a continuous process sample.timesteps (default grids.DEFAULT_STEPS)."""
  from jaxddpm import config as config_lib  # noqa: PLC0415
  T, spec = config.diffusion.num_timesteps, config_lib.sample_timesteps(config)
  if config.diffusion.process != "ddpm":
    return grids.DEFAULT_STEPS if spec is None else grids.continuous_steps(spec)
  return T if spec is None else len(space_timesteps(T, spec))


def sample_tag(config, step: int, *, seed: int, num_samples: int, use_ema: bool = True) -> str:
  """The name of every output made of samples: step{step:08d}_{method}{K}[_{grid}][_{options}][_eta{eta}][_noclip][_raw]
  _seed{seed}_n{num_samples}, e.g. "step00002000_ddim50_seed0_n1000" (K: sampling steps). Two sampling
  configurations never share a name; the same one always gives the same name."""
  s = config.sample
  parts = [f"step{int(step):08d}", f"{s.method}{sampling_steps(config)}"]
  if s.grid != "uniform":
    parts.append(s.grid)
  from jaxddpm import config as config_lib  # noqa: PLC0415
  defaults = config_lib.base_config().sample
  parts += [f"{field.replace('_', '')}{s[field]:g}" for field in config_lib.SAMPLER_OPTION_FIELDS.get(s.method, {})
            if s[field] != defaults[field]]  # a stepper's options, where not the defaults
  if s.method == "ddim" and s.eta:
    parts.append(f"eta{s.eta:g}")
  if not s.clip_denoised:
    parts.append("noclip")
  if not use_ema:
    parts.append("raw")
  return "_".join(parts + [f"seed{int(seed)}", f"n{int(num_samples)}"])


def config_tag(config, step: int) -> str:
  """step{step:08d}_{8 hex digits of the config's hash}: the name of a file that depends on the whole
  configuration (evaluate's results), equal for equal configs."""
  digest = hashlib.sha256(json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True).encode())
  return f"step{int(step):08d}_{digest.hexdigest()[:8]}"


def eval_num_batches(num_split: int, global_batch: int, num_examples: int | None) -> int:
  """Batches every process runs: enough for each process to reach its last example with index < N."""
  P = jax.process_count()
  local = global_batch // P
  n = num_split if num_examples is None else min(num_examples, num_split)
  most = 0
  for p in range(P):
    start, stop = data.shard_bounds(num_split, p, P)
    most = max(most, max(0, min(stop, n) - start))
  return max(1, math.ceil(most / local))
