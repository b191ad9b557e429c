"""What the metric reports of a run share (floor 3): where they are written (WORKDIR/eval), which process
writes, the progress bar, the model's apply function, the sampler protocol, and how many batches each
process reads of a split. Used by `metrics.bpd`, `metrics.fid` and `jaxddpm.evaluate`."""
from __future__ import annotations

import functools
import math
import os

import jax

from jaxddpm import data

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


def progress(total, desc):
  """A tqdm bar of `total` batches, shown on process 0 only."""
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(total=total, desc=desc, unit="batch", disable=not is_main(), dynamic_ncols=True, leave=True)


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
