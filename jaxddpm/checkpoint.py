"""Checkpoints of the train state and the data-iterator state with orbax (floor 3).

One orbax `CheckpointManager` under `WORKDIR/checkpoints`: asynchronous saves, keep-K, every process
participating. Each step holds three items: "state" (the `TrainState` pytree), "data" (the input
iterator's state, JSON) and "meta" (JSON: what the checkpoint was trained for, so a workdir of an
incompatible model is refused rather than overwritten). A step that fails to restore (truncated or
corrupt files) is reported by name and the previous one is used; unfinished async saves live in
temporary folders orbax never lists as steps.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager (created lazily on first save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(checkpoint_dir(workdir)), options=options)


def all_finite(tree) -> bool:
  """True when every float leaf of a pytree is finite (computed on device, one scalar fetched)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jnp.all(jnp.stack(leaves))) if leaves else True


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict, *,
         force: bool = False) -> bool:
  """Starts an (async) save of step. Refuses non-finite parameters. Returns whether a save started."""
  if not all_finite((state.params, state.ema_params)):
    raise FloatingPointError(f"refusing to write checkpoint {step}: the parameters are not finite")
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The meta item of a step, or None if it cannot be read."""
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # noqa: BLE001  (any damage means: no usable meta)
    return None


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict, dict] | None:
  """(state, data_state, meta) of the newest step that restores completely, or None if there is none.

  abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) like the state to restore. Damaged
  steps are logged with their path and skipped; they are left on disk for inspection.
  """
  manager.reload()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      r = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=ocp.args.JsonRestore(),
                                                        meta=ocp.args.JsonRestore()))
      state = r["state"]
      if not all_finite((state.params, state.ema_params)):
        raise ValueError("non-finite parameters")
      if int(np.asarray(state.step.addressable_data(0) if isinstance(state.step, jax.Array) else state.step)) \
          != step:
        raise ValueError(f"state.step does not match the step number {step}")
      return state, r["data"], r["meta"]
    except Exception as e:  # noqa: BLE001  (a damaged step of any kind: fall back to the previous one)
      path = os.path.join(str(manager.directory), str(step))
      msg = f"checkpoint {path} is damaged and cannot be restored ({type(e).__name__}: {str(e)[:300]}); " \
            "trying the previous one"
      logging.warning(msg)
      print(f"WARNING: {msg}", flush=True)
  return None


def abstract_like(state, sharding):
  """jax.ShapeDtypeStruct pytree of a (possibly abstract) state, every leaf with the given sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
