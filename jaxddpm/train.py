"""The training job: `python -m jaxddpm --mode train` (floor 4, wiring only).

Validate the config, build model, schedule and optimizer, resume from the workdir's newest good
checkpoint (refusing one of an incompatible model), then loop: global batch from every process's local
batch, jitted train step, metrics to TensorBoard and the console, checkpoints every N steps and at the end
(and on SIGTERM / a JAX preemption notice), sample grids from the EMA parameters.
"""
from __future__ import annotations

import functools
import signal
import time

import jax
import numpy as np
from absl import logging

from jaxddpm import checkpoint, data, evaluate, experiment, generate, logger, parallel, training


class Preemption:
  """Turns SIGTERM (how Cloud TPU VMs are preempted) into a flag the loop polls between steps; with
  several processes JAX's preemption sync point makes every process stop at the same step."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._handler) if jax.process_count() == 1 else None

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def kept_checkpoint(manager, workdir: str) -> str:
  """Which checkpoint a stopped run leaves to resume from (saves refuse non-finite parameters, so any
  checkpoint is finite), or that there is none."""
  latest = manager.latest_step()
  if latest is None:
    return f"no checkpoint was written in {workdir}, so none is kept"
  return f"the newest checkpoint, step {latest}, is kept in {checkpoint.checkpoint_dir(workdir)}"


def run(config, workdir: str) -> None:
  """Trains (or resumes training) to config.training.num_steps."""
  image_shape, mesh, model, sched, optimizer, lr_fn, abstract, meta, reader = experiment.prepare(config, workdir)
  reader.close()
  tc, d = config.training, config.diffusion
  rep = parallel.replicated(mesh)
  manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)  # checks passed: now we may write
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(abstract, rep), move_damaged=True)
  it = data.make_train_iterator(
      config.data.name, split=config.data.split, data_dir=config.data.data_dir,
      global_batch_size=tc.batch_size, process_index=jax.process_index(), process_count=jax.process_count(),
      seed=tc.seed, random_flip=config.data.random_flip, image_size=config.data.image_size,
      num_threads=config.data.num_threads, prefetch_batches=config.data.prefetch_batches)
  if restored is None:
    init = jax.jit(functools.partial(training.init_train_state, model=model, optimizer=optimizer,
                                     image_shape=image_shape), out_shardings=rep)
    state = init(jax.random.PRNGKey(tc.seed))
    message = f"starting from scratch in {workdir}"
  else:
    state, data_state, old_meta = restored
    message = f"resumed from step {int(parallel.replicated_to_host(state.step))} in {workdir}"
    if all(old_meta.get(k, meta[k]) == meta[k] for k in experiment.DATASET_FIELDS):
      it.set_state(data_state["iterator"])
    else:  # allowed by config.training.allow_dataset_change: the old position means nothing in the new data
      message += f" on new data ({config.data.name!r}, split {config.data.split!r}, read from its start)"
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)
  step_fn = functools.partial(
      training.train_step, model=model, optimizer=optimizer, schedule=sched, mean_type=d.mean_type,
      var_type=d.var_type, loss_type=d.loss_type, weighting=d.weighting, t_sampling=d.t_sampling,
      min_snr_gamma=d.min_snr_gamma, p2_gamma=d.p2_gamma, p2_k=d.p2_k, ema=config.optim.ema_decay,
      ema_warmup=config.optim.ema_warmup, learning_rate=lr_fn)
  p_step = training.jit_train_step(step_fn, mesh)
  if jax.process_count() > 1:
    # Compile first, then meet: the first collective must not wait for a peer still compiling (CPU
    # collectives give up after ~30 s), and a peer that never arrives is reported by the barrier.
    batch_spec = {"image": jax.ShapeDtypeStruct((tc.batch_size,) + tuple(image_shape), np.float32,
                                                sharding=parallel.batch_sharded(mesh))}
    p_step = p_step.lower(state, batch_spec).compile()
    parallel.barrier("jaxddpm_train_step_compiled")

  is_main = jax.process_index() == 0
  writer = logger.MetricWriter(workdir, enabled=is_main)
  step = int(parallel.replicated_to_host(state.step))
  if step == 0:
    writer.write_config(config)
  progress = logger.Progress(tc.num_steps, step)
  preemption = Preemption()
  acc, t_input, t_last = [], 0.0, time.time()

  def save(step, force=False):
    # The iterator state is a position in this process's stream, the same on every process (they all
    # consume one local batch per step), so the copy orbax writes from process 0 serves them all.
    checkpoint.save(manager, step, state, {"iterator": it.get_state()}, meta, force=force)

  try:
    while step < tc.num_steps:
      t0 = time.time()
      batch = parallel.global_batch({"image": next(it)["image"]}, mesh)
      t_input += time.time() - t0
      state, metrics = p_step(state, batch)
      step += 1
      acc.append(metrics)
      if step % tc.log_every == 0 or step == tc.num_steps:
        m = jax.tree.map(lambda *xs: float(np.mean([float(x) for x in xs])), *acc)
        streak = int(parallel.replicated_to_host(state.nonfinite_streak))
        now = time.time()
        m["input_wait_fraction"] = t_input / max(now - t_last, 1e-9)
        m.update(progress(step))
        acc, t_input, t_last = [], 0.0, now
        writer.write_scalars(step, m)
        if is_main:
          print(f"step {step}/{tc.num_steps} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
                f"lr {m.get('lr', 0):.2e} nonfinite {int(m['nonfinite_total'])} "
                f"{m['steps_per_sec']:.1f} steps/s ETA {m['eta_minutes']:.1f} min", flush=True)
        if streak >= tc.max_nonfinite_streak:
          raise FloatingPointError(
              f"{streak} non-finite training steps in a row (config.training.max_nonfinite_streak = "
              f"{tc.max_nonfinite_streak}); stopping: {kept_checkpoint(manager, workdir)}.")
      if preemption.reached(step):
        save(step, force=True)
        manager.wait_until_finished()
        print(f"preempted: saved checkpoint at step {step}; exiting", flush=True)
        return
      if step % tc.checkpoint_every == 0 or step == tc.num_steps:
        save(step, force=step == tc.num_steps)
      if step % tc.sample_every == 0 or step == tc.num_steps:
        generate.write_sample_grid(config, model, sched, state.ema_params, mesh, image_shape, workdir, step,
                                    writer)
      if step == tc.num_steps and tc.eval_at_end and config.data.name in evaluate.IN_DOMAIN_DATASETS:
        manager.wait_until_finished()
        result = evaluate.in_domain_report(config, model, sched, state.ema_params, mesh, image_shape, workdir,
                                           step=step)
        writer.write_scalars(step, {f"in_domain/{k}": v for k, v in result.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
  finally:
    manager.wait_until_finished()
    writer.close()
    preemption.close()
