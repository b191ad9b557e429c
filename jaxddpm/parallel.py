"""Devices, meshes and shardings: one code path from one CPU to every device of every host.

Data parallelism with `jax.jit` over a 1-D ("data",) mesh of all global devices: parameters replicated,
the batch sharded along its first axis. Each process feeds its own slice of the global batch.
"""
from __future__ import annotations

import collections
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MULTI_HOST_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300,
                           heartbeat_timeout_s: int = 100, shutdown_timeout_s: int = 60) -> bool:
  """Starts JAX's multi-controller runtime when this is one process of several.

  Explicit arguments (GPU hosts, tests on 127.0.0.1) are passed to `jax.distributed.initialize`;
  otherwise a multi-host TPU slice or a cluster manager is auto-detected from its environment and JAX
  finds its peers itself. On one host nothing happens. Returns True when the runtime was started.

  Failure bounds: start-up waits at most timeout_s for every process to connect; once running, a
  process that sends no heartbeat for heartbeat_timeout_s is declared dead and JAX's coordination
  service aborts all the others (non-zero exit, "Terminating process because the JAX distributed service
  detected fatal errors"); at exit a process waits at most shutdown_timeout_s for the others.
  """
  for name, v in (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s),
                  ("shutdown_timeout_s", shutdown_timeout_s)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1 (seconds), got {v!r}")
  timeouts = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  else:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not ("," in hosts or any(os.environ.get(k) for k in MULTI_HOST_ENV[1:])):
      return False
    jax.distributed.initialize(**timeouts)
  _use_coordination_barriers()
  return True


def _use_coordination_barriers() -> None:
  """Makes orbax synchronise processes with the coordination service's barriers (with timeouts) rather
  than with device collectives, which on CPU (gloo) fail when processes arrive more than ~30 s apart."""
  from absl import flags  # noqa: PLC0415
  import orbax.checkpoint  # noqa: F401, PLC0415  (defines the flag)
  if "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


_barriers: dict[str, int] = {}


def barrier(name: str, timeout_s: int = 600) -> None:
  """Waits until every process reaches this point (a coordination-service barrier, no device
  collective); a no-op with one process. Raises when a process does not arrive within timeout_s."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # noqa: PLC0415
  n = _barriers[name] = _barriers.get(name, 0) + 1
  ocp.multihost.get_barrier_sync_fn()(key=f"{name}_{n}", timeout_ms=timeout_s * 1000)


def cpu_device_count(batch_sizes, cores: int | None = None, requested: int = 0) -> int:
  """How many CPU devices to split the host into: `requested` if > 0, else the largest d <= cores that
  divides every global batch size (at least 1).

  XLA:CPU runs the small convolutions of a small UNet on one core; with one CPU device per core the
  data-parallel mesh spreads each batch over all cores (100 small32 sampling steps at batch 16 on 2 cores:
  10.9 s on one device, 5.7 s on two; benchmarks/README.md). Large networks neither gain nor lose.
  """
  if requested:
    return int(requested)
  cores = (os.cpu_count() or 1) if cores is None else cores
  return max(d for d in range(1, max(cores, 1) + 1) if all(b % d == 0 for b in batch_sizes))


def use_cpu_devices(n: int) -> bool:
  """Splits the host CPU into n JAX devices (`jax_num_cpu_devices`), unless XLA_FLAGS already sets
  --xla_force_host_platform_device_count (the user's or a test's choice). Must run before JAX starts its
  backends; harmless on GPU/TPU hosts, whose default devices are the accelerators. Returns True if set."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return False
  jax.config.update("jax_num_cpu_devices", int(n))
  return True


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named "data" over all global devices (or the given ones)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, the schedule)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the "data" axis of the mesh."""
  return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "training.batch_size") -> None:
  """The global batch must split evenly over devices and processes."""
  n, p = mesh.devices.size, jax.process_count()
  if global_batch_size < 1 or global_batch_size % n or global_batch_size % p:
    raise ValueError(f"{field} = {global_batch_size} must be a positive multiple of the number of devices "
                     f"({n}) and of processes ({p})")


def global_batch(local_batch, mesh: Mesh):
  """Assembles the global batch from every process's local part (a pytree of numpy arrays [B_local, ...]).

  The global array has leading size B_local * process_count, sharded over the mesh.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def prefetch_to_devices(iterator, mesh: Mesh, size: int = 2, keys=("image",)):
  """Yields (global batch on the devices, the iterator's state just after that batch was drawn), with
  `size` batches already put on the devices: the transfer of the next batches overlaps the current
  step, and the step never waits for a host-to-device copy.

  iterator: yields dicts of process-local numpy arrays [B_local, ...] and has `get_state()` (a
  checkpoint must hold the state of the batches consumed, not of those prefetched); only `keys` travel.
  Each batch is `global_batch` of the local batches of every process, sharded over the mesh's "data" axis.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"size={size!r} must be an integer >= 1")
  queue = collections.deque()
  while True:
    while len(queue) < size:
      local = next(iterator)
      queue.append((global_batch({k: local[k] for k in keys}, mesh), iterator.get_state()))
    yield queue.popleft()


def replicated_to_host(tree):
  """A replicated (possibly multi-host) pytree as numpy: each process reads its first local copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def gather_batch(tree):
  """A batch-sharded (possibly multi-host) pytree as numpy global arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------- sharded sampling (the sampler's device code)
import functools  # noqa: E402  (kept with the code that uses it)


@functools.lru_cache(maxsize=64)
def _sharded_sampler(apply_fn, shape, cfg, mesh: Mesh):
  """The jitted (params, process, grid, key, sample_offset) -> dict for a padded batch `shape` over mesh."""
  from jaxddpm.core.samplers import engine  # noqa: PLC0415

  def fn(params, process, grid, key, sample_offset):
    return engine.run_chain(lambda x, t: apply_fn(params, x, t), process, grid, key, None, sample_offset, shape,
                            cfg, sharding=mesh)
  return jax.jit(fn)


@functools.lru_cache(maxsize=64)
def _sharded_segments(apply_fn, shape, cfg, mesh: Mesh, length: int):
  """The jitted chain in pieces: start(process, grid, key, sample_offset) -> carry, and
  steps(params, process, grid, key, sample_offset, carry, first) -> the carry `length` steps later."""
  from jaxddpm.core.samplers import engine  # noqa: PLC0415

  def start(process, grid, key, sample_offset):
    return engine.chain_start(process, grid, key, None, sample_offset, shape, cfg, sharding=mesh)

  def steps(params, process, grid, key, sample_offset, carry, first):
    return engine.chain_steps(lambda x, t: apply_fn(params, x, t), process, grid, key, carry, sample_offset,
                              shape, cfg, sharding=mesh, first=first, length=length)
  return jax.jit(start), jax.jit(steps, donate_argnums=(5,))


def make_sampler(apply_fn, schedule, shape, *, method: str = "ancestral", timesteps=None, grid: str = "uniform",
                 eta: float = 0.0, mean_type: str = "eps", var_type: str = "fixed_large",
                 clip_denoised: bool = True, snapshot_every: int | None = None, mesh: Mesh | None = None,
                 options=None):
  """A compiled sampler for one batch, sharded over a 1-D ("data",) mesh: sampler(params, key,
  sample_offset=0) -> the dict of `jaxddpm.sample` for samples sample_offset .. sample_offset + B - 1.

  The batch is padded up to a multiple of the mesh size (extra samples are generated and dropped);
  params, schedule (or process), time grid and key are replicated (NamedSharding(mesh, P())), the batch
  is sharded (P("data")). The jitted program is built once per (apply_fn, shape, config, mesh) and
  cached, and compiled once per parameter shapes; key and sample_offset are traced.

  Args:
    apply_fn: (params, x_t [B', ...], t [B']) -> output, e.g.
      ``lambda p, x, t: unet.apply({"params": p}, x, t)``. Hashed by identity.
    schedule: the discrete `Schedule` or a continuous `Process`.
    shape, method, timesteps, grid, eta, mean_type, var_type, clip_denoised, snapshot_every, options: as in
      `jaxddpm.sample` (timesteps respaced / the grid built here, once).
    mesh: a jax.sharding.Mesh with the single axis "data" (default: all devices).
  Returns:
    sampler, with attributes ``jitted`` (the jax.jit function of (params, process, grid, key,
    sample_offset) on the padded batch), ``schedule`` (the respaced schedule, or the process), ``grid``,
    ``padded_shape``, ``nfe`` (network calls per sample) and ``place`` (puts its arguments on the mesh,
    replicated), so ``sampler.jitted.lower(*sampler.place(params, key, 0))`` gives the compiled program.
  """
  import numbers  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxddpm.core.samplers import engine, grids  # noqa: PLC0415
  cfg = engine.make_config(method, eta, mean_type, var_type, clip_denoised, snapshot_every, schedule, options)
  shape = engine.check_shape(shape)
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable (params, x_t, t) -> output, got {apply_fn!r}")
  mesh = data_mesh() if mesh is None else mesh
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != ("data",):
    raise ValueError(f"mesh must be a jax.sharding.Mesh with axis_names ('data',), got {mesh!r}")
  process, time_grid = grids.make_time_grid(schedule, timesteps, grid)
  n = mesh.size
  B = shape[0]
  padded = (-(-B // n) * n,) + shape[1:]
  jitted = _sharded_sampler(apply_fn, padded, cfg, mesh)

  def place(params, key, sample_offset=0):
    if isinstance(sample_offset, numbers.Integral) and sample_offset < 0:
      raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    args = (params, process, time_grid, key, jnp.asarray(sample_offset, jnp.int32))
    return jax.device_put(args, replicated(mesh))

  def unpad(out):
    if padded[0] != B:
      out = {k: (v if k == "snapshot_timesteps" else v[:B] if k == "samples" else v[:, :B])
             for k, v in out.items()}
    return out

  def sampler(params, key, sample_offset=0) -> dict:
    return unpad(jitted(*place(params, key, sample_offset)))

  def in_segments(params, key, sample_offset=0, *, max_segments=10, on_segment=None) -> dict:
    """The same samples as sampler(...), the chain run as at most max_segments jitted pieces of equal
    length; on_segment(steps_done, num_steps) is called after each (it waits for the piece)."""
    K = int(time_grid.shape[0]) - 1
    length = engine.segment_length(K, max_segments)
    start, steps = _sharded_segments(apply_fn, padded, cfg, mesh, length)
    params, proc, grid_, key, offset = place(params, key, sample_offset)
    carry = start(proc, grid_, key, offset)
    for first in range(0, K, length):
      carry = steps(params, proc, grid_, key, offset, carry, jnp.asarray(first, jnp.int32))
      if on_segment is not None:
        jax.block_until_ready(carry)
        on_segment(first + length, K)
    return unpad(engine.chain_result(proc, grid_, carry, cfg))

  sampler.in_segments = in_segments
  sampler.jitted = jitted
  sampler.schedule = process
  sampler.grid = time_grid
  sampler.padded_shape = padded
  sampler.nfe = engine.nfe(cfg.method, int(time_grid.shape[0]) - 1, process, cfg.options)
  sampler.place = place
  return sampler


def sample_batched(apply_fn, params, schedule, shape, key, *, batch_size: int | None = None,
                   mesh: Mesh | None = None, sample_offset: int = 0, on_steps=None, max_segments: int = 10,
                   **kwargs) -> dict:
  """shape[0] samples in batches of batch_size on a device mesh; returns host numpy arrays.

  Batch b holds global sample indices sample_offset + b * batch_size + [0, batch_size); every batch has
  the same shape (the last one is padded, and padding to the mesh size too), so the program compiles
  once, and the result is identical for any batch_size or mesh (each sample's noise comes from its global
  index). kwargs: method, timesteps, grid, eta, mean_type, var_type, clip_denoised, snapshot_every, options (see
  `jaxddpm.sample`). With on_steps, each batch's chain runs in at most max_segments jitted pieces (the
  same samples) and on_steps(steps_done, K) reports after each piece (a progress bar).
  Returns the dict of `sample` with N = shape[0] samples (snapshots [S, N, ...]).
  """
  import numbers  # noqa: PLC0415
  from jaxddpm.core.samplers import engine  # noqa: PLC0415
  shape = engine.check_shape(shape)
  N = shape[0]
  batch_size = N if batch_size is None else batch_size
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if isinstance(sample_offset, bool) or not isinstance(sample_offset, numbers.Integral) or sample_offset < 0:
    raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
  batch_size = min(int(batch_size), N)
  sampler = make_sampler(apply_fn, schedule, (batch_size,) + shape[1:], mesh=mesh, **kwargs)
  pieces = []
  for start in range(0, N, batch_size):
    if on_steps is None:
      out = sampler(params, key, sample_offset + start)
    else:
      out = sampler.in_segments(params, key, sample_offset + start, max_segments=max_segments,
                                on_segment=on_steps)
    pieces.append(gather_batch(out))
  keep = lambda a, axis: np.concatenate(a, axis=axis)
  result = {"samples": keep([p["samples"] for p in pieces], 0)[:N]}
  if "pred_x0_snapshots" in pieces[0]:
    result["pred_x0_snapshots"] = keep([p["pred_x0_snapshots"] for p in pieces], 1)[:, :N]
    result["x_t_snapshots"] = keep([p["x_t_snapshots"] for p in pieces], 1)[:, :N]
    result["snapshot_timesteps"] = np.asarray(pieces[0]["snapshot_timesteps"])
  return result
