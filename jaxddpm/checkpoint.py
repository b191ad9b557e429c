"""Checkpoints of the train state and the data-iterator state with orbax (floor 3).

One orbax `CheckpointManager` under `WORKDIR/checkpoints`: asynchronous saves, keep-K, every process
participating. Each step holds three items: "state" (the `TrainState` pytree), "data" (the input
iterator's state, JSON) and "meta" (JSON: what the checkpoint was trained for, so a workdir of an
incompatible model is refused rather than overwritten, and a fingerprint of the state's bytes). A step
that fails to restore (truncated, missing or corrupt files, a fingerprint that does not match) is reported
in one line (the array or file and what is wrong with it; the noise of orbax's failed attempt is held
back), moved aside to `STEP.damaged` (kept for inspection, never deleted) and the previous one is used;
unfinished async saves live in `*.orbax-checkpoint-tmp` folders orbax never lists as steps. Nothing but
orbax's keep-K policy deletes a committed checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxddpm.quiet import quiet_failures


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
  """The meta item of a step, or None if it cannot be read (orbax's noise about it held back)."""
  with quiet_failures() as quiet:
    try:
      return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001  (any damage means: no usable meta)
      quiet.failed()
      return None


def _restore_checked(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Checks a step's files, restores it and checks it: finite parameters, state.step == step, the saved
  fingerprint."""
  _check_files(epath.Path(manager.directory) / str(step))
  r = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                    data=ocp.args.JsonRestore(),
                                                    meta=ocp.args.JsonRestore()))
  state = r["state"]
  finite, fingerprint = state_summary(state)
  if not finite:
    raise Damaged("non-finite parameters")
  if int(_host(state.step)) != step:
    raise Damaged(f"state.step = {int(_host(state.step))} does not match the step number {step}")
  saved = r["meta"].get("state_fingerprint")
  if saved is not None and saved != fingerprint:
    raise Damaged("the restored arrays do not match the fingerprint saved with them (corrupt files)")
  return state, r["data"], r["meta"]


# Files every step of ours has (orbax's pytree and JSON handlers): a missing one is named as such rather
# than surfacing as orbax's "pytree structure error" or a tensorstore NOT_FOUND on some array.
REQUIRED_FILES = ("state/_METADATA", "meta/metadata", "data/metadata")
JSON_FILES = ("state/_METADATA", "meta/metadata", "data/metadata")


class Damaged(ValueError):
  """A step that restores but fails our checks, or lacks a file: the message says what is wrong."""


def _check_files(step_dir) -> None:
  """Raises Damaged naming a required file that is missing, or a JSON item that does not parse."""
  step_dir = epath.Path(step_dir)
  missing = [f for f in REQUIRED_FILES if not (step_dir / f).exists()]
  state = step_dir / "state"
  if state.exists() and any(p.name == "d" or p.name.startswith("ocdbt.process_") for p in state.iterdir()) \
      and not (state / "manifest.ocdbt").exists():
    missing.append("state/manifest.ocdbt")
  if missing:
    raise Damaged(f"missing file{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
  for f in JSON_FILES:
    try:
      json.loads((step_dir / f).read_text())
    except ValueError as e:
      raise Damaged(f"file {f} is not valid JSON, truncated or corrupt ({e})") from None


_ARRAY = re.compile(r'Error reading "([^"]+?)(?:/[^"/]*)?" in OCDBT')
_FILE = re.compile(r'local file "([^"]+/d/[^"]+)"')
_RANGE = re.compile(r"Requested byte range \[(\d+), (\d+)\) is not valid for value of size (\d+)")
_CODE = re.compile(r"\b(OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN):")


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_damage(error: BaseException, step_dir) -> str:
  """One line: which array or file of a step failed to restore and how (from orbax's and tensorstore's
  exception chain, whose messages hold the array's path, the data file and the byte range it needed)."""
  if isinstance(error, Damaged):
    return _one_line(error)
  chain, e = [], error
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = "\n".join(str(x) for x in chain)
  array, file_, rng = _ARRAY.search(text), _FILE.search(text), _RANGE.search(text)
  if not (array or file_ or rng):
    return f"{type(error).__name__}: {_one_line(error)}"
  step_dir = str(step_dir)
  parts = [f"array {array.group(1)} cannot be read" if array else "an array cannot be read"]
  path = file_.group(1) if file_ else None
  if rng:
    size = int(rng.group(3))
    if path is None:  # the message gives the data file's size only: find it
      sized = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
               if os.path.basename(d) == "d" and os.path.getsize(os.path.join(d, f)) == size]
      path = sized[0] if len(sized) == 1 else None
    where = f"file {os.path.relpath(path, step_dir)}" if path else "its data file"
    parts.append(f"{where} is truncated: bytes [{rng.group(1)}, {rng.group(2)}) needed, {size} present")
  else:
    if path:
      parts.append(f"file {os.path.relpath(path, step_dir)}")
    inner = [str(x) for x in chain if _CODE.search(str(x))]
    detail = (inner[-1] if inner else text).split("[tensorstore_spec")[0]
    code_ = _CODE.search(detail)
    detail = detail.rsplit('": ', 1)[-1]  # after 'Error reading "..." in OCDBT database at local file "...": '
    parts.append(_one_line(f"{code_.group(1) + ' ' if code_ else ''}({detail.strip()}): corrupt or missing data",
                           200))
  return ": ".join(parts)


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
    with quiet_failures() as quiet:
      try:
        restored, error = _restore_checked(manager, step, abstract_state), None
      except Exception as e:  # noqa: BLE001  (a damaged step of any kind: fall back to the previous one)
        restored, error = None, describe_damage(e, path)
        quiet.failed()
    if _all_processes(restored is not None):
      result = restored
      break
    msg = f"checkpoint {path} is damaged (step {step}): {error or 'it failed on another process'}"
    if move_damaged:
      msg += f"; moved it to {move_aside(manager, step)}"
      moved = True
    msg += "; trying the previous one"
    if jax.process_index() == 0 or error:  # one line per damaged step (a process's own failure: its own)
      print(f"WARNING: {msg}", flush=True)
  if moved:
    from jaxddpm import parallel  # noqa: PLC0415
    parallel.barrier("jaxddpm_moved_damaged")
    manager.reload()
  return result


def abstract_like(state, sharding):
  """jax.ShapeDtypeStruct pytree of a (possibly abstract) state, every leaf with the given sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
