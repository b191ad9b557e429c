"""Devices, meshes and shardings: one code path from one CPU to every device of every host.

Data parallelism with `jax.jit` over a 1-D ("data",) mesh of all global devices: parameters replicated,
the batch sharded along its first axis. Each process feeds its own slice of the global batch.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MULTI_HOST_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Starts JAX's multi-controller runtime when this is one process of several.

  Explicit arguments (GPU hosts, tests on 127.0.0.1) are passed to `jax.distributed.initialize`;
  otherwise a multi-host TPU slice or a cluster manager is auto-detected from its environment and JAX
  finds its peers itself. On one host nothing happens. Returns True when the runtime was started.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or any(os.environ.get(k) for k in MULTI_HOST_ENV[1:]):
    jax.distributed.initialize()
    return True
  return False


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


def replicated_to_host(tree):
  """A replicated (possibly multi-host) pytree as numpy: each process reads its first local copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def gather_batch(tree):
  """A batch-sharded (possibly multi-host) pytree as numpy global arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
