"""Sampling from a run: periodic sample grids during training, and `--mode sample` (floor 4, wiring).

`--mode sample` loads the EMA parameters of the workdir's newest good checkpoint and writes
config.sample.num_samples images as PNG grids and one .npz (uint8, key "samples", NHWC) under
WORKDIR/samples/. The sampler is config.sample's (ancestral or DDIM, optionally respaced).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from etils import epath

from jaxddpm import checkpoint, config as config_lib, experiment, images, parallel, sampling
from jaxddpm.metrics import report


def sample_uint8(config, model, sched, params, mesh, image_shape, num_samples: int, *,
                 seed: int | None = None, snapshot_every: int | None = None) -> dict:
  """num_samples images from params with config.sample's sampler, quantised as saved images: uint8
  [N, H, W, C] under "samples" (and snapshots as float arrays when snapshot_every is set)."""
  s = config.sample
  shape = (num_samples,) + tuple(image_shape)
  key = jax.random.PRNGKey(s.seed if seed is None else seed)
  out = sampling.sample_batched(
      report.apply_fn(model), params, sched, shape, key, batch_size=min(s.batch_size, num_samples), mesh=mesh,
      method=s.method, timesteps=config_lib.sample_timesteps(config), grid=s.grid, eta=s.eta,
      options=config_lib.sampler_options(config), mean_type=config.diffusion.mean_type,
      var_type=config.diffusion.var_type, clip_denoised=s.clip_denoised, snapshot_every=snapshot_every)
  out["samples"] = np.asarray(images.to_uint8(out["samples"]))
  return out


def grid_png(samples_uint8: np.ndarray, cols: int) -> np.ndarray:
  """A grid of samples, upscaled so that tiny (8x8) images stay visible."""
  grid = images.make_grid(samples_uint8, ncols=cols)
  factor = max(1, 512 // max(grid.shape[:2]))
  return images.upscale(grid[None], factor)[0] if factor > 1 else grid


def write_sample_grid(config, model, sched, params, mesh, image_shape, workdir: str, step: int,
                      writer) -> str:
  """Samples config.sample.num_samples images from params, writes WORKDIR/samples/step_N.png and a
  TensorBoard image. Every process samples (the computation is sharded); process 0 writes."""
  out = sample_uint8(config, model, sched, params, mesh, image_shape, config.sample.num_samples)
  grid = grid_png(out["samples"], config.sample.grid_cols)
  path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
  if jax.process_index() == 0:
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    images.save_png(path, grid)
    writer.write_images(step, {"samples": grid})
    print(f"wrote sample grid {path}", flush=True)
  return path


def load_params(config, workdir: str, *, use_ema: bool = True):
  """(model, schedule, mesh, image_shape, params, step) from the newest restorable checkpoint."""
  image_shape, mesh, model, sched, _, _, abstract, _, manager = experiment.prepare(config, workdir)
  if not manager.all_steps():
    raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first "
                            f"(--mode train with the same --workdir)")
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(abstract, parallel.replicated(mesh)))
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)} could be restored")
  state = restored[0]
  step = int(parallel.replicated_to_host(state.step))
  return model, sched, mesh, image_shape, (state.ema_params if use_ema else state.params), step


def run(config, workdir: str) -> None:
  """--mode sample: config.sample.num_samples images -> WORKDIR/samples/{grid PNGs, samples.npz}."""
  model, sched, mesh, image_shape, params, step = load_params(config, workdir, use_ema=config.sample.use_ema)
  out = sample_uint8(config, model, sched, params, mesh, image_shape, config.sample.num_samples)
  if jax.process_index() != 0:
    return
  outdir = epath.Path(workdir) / "samples"
  outdir.mkdir(parents=True, exist_ok=True)
  samples = out["samples"]
  per_grid = config.sample.grid_cols ** 2
  for i in range(0, len(samples), per_grid):
    images.save_png(str(outdir / f"sample_step{step}_{i // per_grid:03d}.png"),
                    grid_png(samples[i:i + per_grid], config.sample.grid_cols))
  with (outdir / f"samples_step{step}.npz").open("wb") as f:
    np.savez(f, samples=samples)
  print(f"wrote {len(samples)} samples of step {step} to {outdir}", flush=True)
