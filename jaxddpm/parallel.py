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
