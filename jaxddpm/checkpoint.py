"""Checkpoints of the train state and the data-iterator state with orbax (floor 3).

One orbax `CheckpointManager` under `WORKDIR/checkpoints`: asynchronous saves, keep-K, every process
participating. Each step holds three items: "state" (the `TrainState` pytree), "data" (the input
iterator's state, JSON) and "meta" (JSON: what the checkpoint was trained for, so a workdir of an
incompatible model is refused rather than overwritten, and a fingerprint of the state's bytes). A step
that fails to restore (truncated, missing or corrupt files, a fingerprint that does not match) is reported
by name, moved aside to `STEP.damaged` (kept for inspection, never deleted) and the previous one is used;
unfinished async saves live in `*.orbax-checkpoint-tmp` folders orbax never lists as steps. Nothing but
orbax's keep-K policy deletes a committed checkpoint.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager (its folder is created on the first save).

  read_only=True (checking a workdir, sampling from it) touches nothing on disk: in particular it leaves
  the unfinished async saves of a training job that may be running in that workdir alone; the writing
  manager of the training job removes them.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         cleanup_tmp_directories=not read_only,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(checkpoint_dir(workdir)), options=options)


def _host(x) -> np.ndarray:
  """A replicated (possibly multi-host) array as numpy: this process's first copy."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def state_summary(state) -> tuple[bool, str]:
  """(params and EMA params all finite, fingerprint) of a replicated train state.

  The fingerprint is a BLAKE2b hash of every leaf's path, dtype, shape and bytes, computed on the host
  (nothing is compiled; the arrays are fetched once, as the checkpoint writer does anyway).
  """
  finite = all(np.isfinite(a).all() for a in map(_host, jax.tree.leaves((state.params, state.ema_params)))
               if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16")
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(_host(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
  return bool(finite), h.hexdigest()


def all_finite(tree) -> bool:
  """True when every float leaf of a pytree is finite."""
  return all(np.isfinite(a).all() for a in map(_host, jax.tree.leaves(tree))
             if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16")


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict, *,
         force: bool = False) -> bool:
  """Starts an (async) save of step. Refuses non-finite parameters. Returns whether a save started.

  meta gets the state's fingerprint ("state_fingerprint"), checked again when the step is restored.
  """
  finite, fingerprint = state_summary(state)
  if not finite:
    raise FloatingPointError(f"refusing to write checkpoint {step}: the parameters are not finite")
  meta = dict(meta, state_fingerprint=fingerprint)
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The meta item of a step, or None if it cannot be read."""
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # noqa: BLE001  (any damage means: no usable meta)
    return None


def _restore_checked(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores a step and checks it: finite parameters, state.step == step, the saved fingerprint."""
  r = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                    data=ocp.args.JsonRestore(),
                                                    meta=ocp.args.JsonRestore()))
  state = r["state"]
  finite, fingerprint = state_summary(state)
  if not finite:
    raise ValueError("non-finite parameters")
  if int(_host(state.step)) != step:
    raise ValueError(f"state.step = {int(_host(state.step))} does not match the step number {step}")
  saved = r["meta"].get("state_fingerprint")
  if saved is not None and saved != fingerprint:
    raise ValueError("the restored arrays do not match the fingerprint saved with them (corrupt files)")
  return state, r["data"], r["meta"]


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a coordination barrier, then one all-gather)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  from jaxddpm import parallel  # noqa: PLC0415
  parallel.barrier("jaxddpm_restore_agree")
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames a damaged step folder to STEP.damaged (or STEP.damaged-N) so that orbax no longer lists it
  and training can save that step again; nothing is deleted. Process 0 renames; returns the new path."""
  directory = str(manager.directory)
  src = os.path.join(directory, str(step))
  dst, n = f"{src}.damaged", 1
  while os.path.exists(dst):
    n += 1
    dst = f"{src}.damaged-{n}"
  if jax.process_index() == 0:
    os.rename(src, dst)
  return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *,
                   move_damaged: bool = False) -> tuple[Any, dict, dict] | None:
  """(state, data_state, meta) of the newest step that restores completely, or None if there is none.

  abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) like the state to restore. A step
  that fails on any process (missing or truncated files, corrupt bytes caught by the fingerprint,
  non-finite parameters) is reported with its path and skipped, on every process alike. With
  move_damaged=True (the training job) it is renamed to STEP.damaged, so that step can be saved again.
  """
  manager.reload()
  result, moved = None, False
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(str(manager.directory), str(step))
    try:
      restored, error = _restore_checked(manager, step, abstract_state), None
    except Exception as e:  # noqa: BLE001  (a damaged step of any kind: fall back to the previous one)
      restored, error = None, f"{type(e).__name__}: {str(e)[:300]}"
    if _all_processes(restored is not None):
      result = restored
      break
    msg = f"checkpoint {path} is damaged and cannot be restored ({error or 'it failed on another process'})"
    if move_damaged:
      msg += f"; moved it to {move_aside(manager, step)}"
      moved = True
    msg += "; trying the previous one"
    logging.warning(msg)
    print(f"WARNING: {msg}", flush=True)
  if moved:
    from jaxddpm import parallel  # noqa: PLC0415
    parallel.barrier("jaxddpm_moved_damaged")
    manager.reload()
  return result


def abstract_like(state, sharding):
  """jax.ShapeDtypeStruct pytree of a (possibly abstract) state, every leaf with the given sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
