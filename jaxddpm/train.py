"""The training job: `python -m jaxddpm --mode train` (floor 4, wiring only).

Validate the config, build model, schedule and optimizer, resume from the workdir's newest good
checkpoint (refusing one of an incompatible model), then loop: global batch from every process's local
batch, jitted train step, metrics to TensorBoard and the console, checkpoints every N steps and at the end
(and on SIGTERM, Ctrl-C or a JAX preemption notice), sample grids from the EMA parameters. A finished
run writes nothing, except the end-of-run outputs (final grid, in-domain score) a killed run never wrote.
"""
from __future__ import annotations

import functools
import json
import time

import jax
import numpy as np

from jaxddpm import checkpoint, data, evaluate, experiment, generate, logger, parallel, stop, training


class Preemption:
  """A stop request polled between steps: SIGTERM / Ctrl-C on one process (`stop.StopSignals`); with
  several processes JAX's preemption sync point, so that every process stops at the same step."""

  def __init__(self, signals: stop.StopSignals | None):
    self.signals = signals

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signals is not None and self.signals.requested is not None

  @property
  def reason(self) -> str:
    return (self.signals.requested if self.signals is not None else None) or "preemption notice"


def kept_checkpoint(manager, workdir: str) -> str:
  """Which checkpoint a stopped run leaves to resume from (saves refuse non-finite parameters, so any
  checkpoint is finite), or that there is none."""
  latest = manager.latest_step()
  if latest is None:
    return f"no checkpoint was written in {workdir}, so none is kept"
  return f"the newest checkpoint, step {latest}, is kept in {checkpoint.checkpoint_dir(workdir)}"


def _final_outputs(config, workdir: str) -> dict:
  """name -> path of the outputs the end of training promises (sample grid, in-domain score)."""
  tc = config.training
  out = {"sample grid": generate.grid_path(config, workdir, tc.num_steps)}
  if tc.eval_at_end and config.data.name in evaluate.IN_DOMAIN_DATASETS:
    out["in-domain score"] = evaluate.in_domain_path(config, workdir, tc.num_steps)
  return out


def _is_complete(path: str) -> bool:
  """A PNG that decodes or a JSON that parses (a file cut short by a kill does not count)."""
  try:
    if path.endswith(".json"):
      with open(path) as f:
        json.load(f)
    else:
      from PIL import Image  # noqa: PLC0415
      with Image.open(path) as im:
        im.load()
    return True
  except Exception:  # noqa: BLE001
    return False


def _end_of_run(config, model, sched, state, mesh, image_shape, workdir, writer, missing=None) -> None:
  """The final sample grid and in-domain score (only those in `missing`, when given)."""
  step = config.training.num_steps
  if missing is None or "sample grid" in missing:
    generate.write_sample_grid(config, model, sched, state.ema_params, mesh, image_shape, workdir, step, writer)
  if "in-domain score" in _final_outputs(config, workdir) and (missing is None or "in-domain score" in missing):
    result = evaluate.in_domain_report(config, model, sched, state.ema_params, mesh, image_shape, workdir,
                                       step=step)
    writer.write_scalars(step, {f"in_domain/{k}": v for k, v in result.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _finished(config, workdir, reader, abstract, mesh, model, sched, image_shape) -> bool:
  """True (after completing any missing end-of-run output) when the workdir's newest good checkpoint
  is the final step; writes nothing when every output is there."""
  N = config.training.num_steps
  if max(reader.all_steps(), default=-1) < N:
    return False
  restored = checkpoint.restore_latest(reader, checkpoint.abstract_like(abstract, parallel.replicated(mesh)))
  if restored is None or int(parallel.replicated_to_host(restored[0].step)) < N:
    return False  # damaged: the writing manager moves it aside and training redoes the steps
  step = int(parallel.replicated_to_host(restored[0].step))
  if step > N:
    _say(f"training already went to step {step}, past config.training.num_steps = {N}; nothing to do")
    return True
  outputs = _final_outputs(config, workdir)
  missing = [name for name, path in outputs.items() if not _is_complete(path)]
  if jax.process_count() > 1:  # process 0 writes the files: its view decides, on every process alike
    from jax.experimental import multihost_utils  # noqa: PLC0415
    flags = multihost_utils.broadcast_one_to_all(np.asarray([n in missing for n in outputs], np.int32))
    missing = [n for n, f in zip(outputs, np.asarray(flags)) if f]
  if not missing:
    _say(f"training already finished at step {step}/{N}; nothing to do")
    return True
  _say(f"training already finished at step {step}/{N}; writing the missing {' and '.join(missing)}")
  logger.open_log_file(workdir, jax.process_index())
  writer = logger.MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    _end_of_run(config, model, sched, restored[0], mesh, image_shape, workdir, writer, missing=missing)
  finally:
    writer.close()
  return True


def _close(bar) -> None:
  """Closes a progress bar (None: none was made); returns None."""
  if bar is not None:
    bar.close()


def _say(message: str) -> None:
  """One console line, from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


def run(config, workdir: str, signals: stop.StopSignals | None = None) -> None:
  """Trains (or resumes training) to config.training.num_steps.

  signals: the stop requests `python -m jaxddpm` installed at start-up; None installs them here (and
  removes them at the end).
  """
  own_signals = signals is None
  if own_signals:
    signals = stop.StopSignals(sigterm=jax.process_count() == 1)
  try:
    _run(config, workdir, signals)
  finally:
    if own_signals:
      signals.close()


def _run(config, workdir: str, signals: stop.StopSignals) -> None:
  image_shape, mesh, model, sched, optimizer, lr_fn, abstract, meta, reader = experiment.prepare(config, workdir)
  tc, d = config.training, config.diffusion
  try:
    if _finished(config, workdir, reader, abstract, mesh, model, sched, image_shape):
      return
  finally:
    reader.close()
  preemption = Preemption(signals)
  if signals.requested is not None:
    _say(f"stopped by {signals.requested} before training started; nothing was written")
    return
  rep = parallel.replicated(mesh)
  experiment.check_free_space(workdir, abstract)
  manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)  # checks passed: now we may write
  logger.open_log_file(workdir, jax.process_index())
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
  _say(message)
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
  step = int(parallel.replicated_to_host(state.step))
  # TensorBoard: one value per step; a killed run may have logged steps past its newest checkpoint.
  logged = logger.last_logged_step(workdir) if is_main else -1
  writer = logger.MetricWriter(workdir, enabled=is_main, skip_through=max(logged, step if step else -1))
  if step == 0:
    writer.write_config(config)
  progress = logger.Progress(tc.num_steps, step)
  # A terminal gets a bar (made after the first step, whose call compiled it: its rate and ETA count
  # only compiled steps); logs and CI get the plain line of each report.
  plain, bar = not (is_main and logger.is_terminal()), None
  acc, t_input, t_last = [], 0.0, time.time()
  # The next batches go to the devices while the current step runs; data_state is the iterator's state
  # after the last batch a step consumed (the prefetched ones are read again after a resume).
  batches, data_state = parallel.prefetch_to_devices(it, mesh, size=2), it.get_state()

  def save(step, force=False):
    # The iterator state is a position in this process's stream, the same on every process (they all
    # consume one local batch per step), so the copy orbax writes from process 0 serves them all.
    checkpoint.save(manager, step, state, {"iterator": data_state}, meta, force=force)

  try:
    while step < tc.num_steps:
      t0 = time.time()
      batch, data_state = next(batches)
      t_input += time.time() - t0
      state, metrics = p_step(state, batch)
      step += 1
      progress.started(step)  # the first call compiled the step: rates count from here
      if not plain:
        if bar is None:
          bar = logger.progress(tc.num_steps, "train", unit="step", initial=step - 1)
        bar.update(1)
      acc.append(metrics)
      if step % tc.log_every == 0 or step == tc.num_steps:
        m = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(acc))  # one transfer per log step
        streak = int(parallel.replicated_to_host(state.nonfinite_streak))
        now = time.time()
        m["input_wait_fraction"] = t_input / max(now - t_last, 1e-9)
        m.update(progress(step))
        acc, t_input, t_last = [], 0.0, now
        writer.write_scalars(step, m)
        if is_main:
          rate = (f"{m['steps_per_sec']:.1f} steps/s ETA {m['eta_minutes']:.1f} min" if "steps_per_sec" in m
                  else "compiled the step")
          line = (f"step {step}/{tc.num_steps} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
                  f"lr {m.get('lr', 0):.2e} nonfinite {int(m['nonfinite_total'])} {rate}")
          if plain:
            print(line, flush=True)
          else:
            bar.set_postfix(loss=f"{m['loss']:.4f}", nonfinite=int(m["nonfinite_total"]))
        if streak >= tc.max_nonfinite_streak:
          raise FloatingPointError(
              f"{streak} non-finite training steps in a row (config.training.max_nonfinite_streak = "
              f"{tc.max_nonfinite_streak}); stopping: {kept_checkpoint(manager, workdir)}.")
      if preemption.reached(step):
        save(step, force=True)
        manager.wait_until_finished()
        bar = _close(bar)
        _say(f"preempted: saved checkpoint at step {step}; exiting ({preemption.reason}; the same command "
             "resumes)")
        return
      if step % tc.checkpoint_every == 0 or step == tc.num_steps:
        save(step, force=step == tc.num_steps)
      if step % tc.sample_every == 0 and step != tc.num_steps:
        generate.write_sample_grid(config, model, sched, state.ema_params, mesh, image_shape, workdir, step,
                                    writer, bar=bar)
    bar = _close(bar)
    manager.wait_until_finished()
    _say(f"training finished at step {step}/{tc.num_steps}; checkpoints in {checkpoint.checkpoint_dir(workdir)}")
    _end_of_run(config, model, sched, state, mesh, image_shape, workdir, writer)
  finally:
    _close(bar)
    manager.wait_until_finished()
    writer.close()
