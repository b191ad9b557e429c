"""Sampling from a run: periodic sample grids during training, and `--mode sample` (floor 4, wiring).

`--mode sample` loads the EMA parameters of the workdir's newest good checkpoint and writes
config.sample.num_samples images as PNG grids and one .npz (uint8, key "samples", NHWC) under
WORKDIR/samples/. The sampler is config.sample's (ancestral or DDIM, optionally respaced). Every file is
named by `report.sample_tag` (step, method, sampling steps, seed, count): a different sampling
configuration never overwrites another's files, the same command rewrites the same bytes.
"""
from __future__ import annotations

import os
import zipfile

import jax
import numpy as np
from etils import epath

from jaxddpm import checkpoint, experiment, images, logger, parallel, sampling
from jaxddpm.metrics import report

SAMPLES_DIR = "samples"


def sample_uint8(config, model, sched, params, mesh, image_shape, num_samples: int, *,
                 seed: int | None = None, snapshot_every: int | None = None, desc: str | None = None) -> dict:
  """num_samples images from params with config.sample's sampler, quantised as saved images: uint8
  [N, H, W, C] under "samples" (and snapshots as float arrays when snapshot_every is set).

  With desc, a progress bar of sampling steps: each batch's chain runs as a few jitted segments (the
  same samples as one scan). The one place where the modes invoke the sampler.
  """
  s = config.sample
  shape = (num_samples,) + tuple(image_shape)
  key = jax.random.PRNGKey(s.seed if seed is None else seed)
  batch_size = min(s.batch_size, num_samples)
  bar, on_steps = None, None
  if desc is not None:
    K, batches = report.sampling_steps(config), -(-num_samples // batch_size)
    bar = report.progress(K * batches, desc, unit="step")
    finished = [0]  # batches done

    def on_steps(steps, K):
      bar.update(finished[0] * K + steps - bar.n)
      finished[0] += steps == K
  try:
    out = sampling.sample_batched(
        report.apply_fn(model), params, sched, shape, key, batch_size=batch_size, mesh=mesh, on_steps=on_steps,
        **report.sampler_kwargs(config), snapshot_every=snapshot_every)
  finally:
    if bar is not None:
      bar.close()
  out["samples"] = np.asarray(images.to_uint8(out["samples"]))
  return out


def grid_png(samples_uint8: np.ndarray, cols: int) -> np.ndarray:
  """A grid of samples, upscaled so that tiny (8x8) images stay visible."""
  grid = images.make_grid(samples_uint8, ncols=cols)
  factor = max(1, 512 // max(grid.shape[:2]))
  return images.upscale(grid[None], factor)[0] if factor > 1 else grid


def grid_path(config, workdir: str, step: int) -> str:
  """WORKDIR/samples/<sample_tag>.png: the training job's sample grid of a step (EMA parameters)."""
  s = config.sample
  tag = report.sample_tag(config, step, seed=s.seed, num_samples=s.num_samples)
  return os.path.join(workdir, SAMPLES_DIR, f"{tag}.png")


def _save_png(path: str, image) -> None:
  """images.save_png through a temporary name: a kill never leaves a half-written file under `path`."""
  tmp = f"{path}.tmp-{os.getpid()}.png"
  images.save_png(tmp, image)
  os.replace(tmp, path)


def save_npz(path: str, **arrays) -> str:
  """np.savez's format (uncompressed zip of .npy files, entries dated 1980-01-01 so that the same arrays
  give the same bytes), written through a temporary name: a kill never leaves a truncated file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with epath.Path(tmp).open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    for name, a in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      with z.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(a), allow_pickle=False)
  os.replace(tmp, path)
  return path


def write_sample_grid(config, model, sched, params, mesh, image_shape, workdir: str, step: int,
                      writer, bar=None) -> str:
  """Samples config.sample.num_samples images from params, writes `grid_path` and a TensorBoard image.
  Every process samples (the computation is sharded); process 0 writes."""
  out = sample_uint8(config, model, sched, params, mesh, image_shape, config.sample.num_samples,
                     desc=f"sample grid, step {step}")
  grid = grid_png(out["samples"], config.sample.grid_cols)
  path = grid_path(config, workdir, step)
  if jax.process_index() == 0:
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save_png(path, grid)
    writer.write_images(step, {"samples": grid})
    (bar.write if bar is not None else print)(f"wrote sample grid {path}")
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
  """--mode sample: config.sample.num_samples images -> WORKDIR/samples/<tag>.npz and <tag>_gridNNN.png
  (`report.sample_tag`)."""
  s = config.sample
  model, sched, mesh, image_shape, params, step = load_params(config, workdir, use_ema=s.use_ema)
  tag = report.sample_tag(config, step, seed=s.seed, num_samples=s.num_samples, use_ema=s.use_ema)
  out = sample_uint8(config, model, sched, params, mesh, image_shape, s.num_samples, desc=f"sampling {tag}")
  if jax.process_index() != 0:
    return
  outdir = epath.Path(workdir) / SAMPLES_DIR
  outdir.mkdir(parents=True, exist_ok=True)
  logger.open_log_file(workdir)
  samples = out["samples"]
  per_grid = s.grid_cols ** 2
  for i in range(0, len(samples), per_grid):
    _save_png(str(outdir / f"{tag}_grid{i // per_grid:03d}.png"), grid_png(samples[i:i + per_grid], s.grid_cols))
  path = outdir / f"{tag}.npz"
  save_npz(str(path), samples=samples)
  print(f"wrote {len(samples)} samples of step {step}: {path} and {-(-len(samples) // per_grid)} grid(s) "
        f"{outdir / tag}_grid*.png", flush=True)
