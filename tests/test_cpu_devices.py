"""The host CPU split into one JAX device per core (parallel.cpu_device_count / use_cpu_devices, the
config's system.cpu_devices): XLA:CPU runs a small UNet's convolutions on one core, so the command line
shards each batch over as many CPU devices as there are cores and the batch sizes allow."""
import os

import pytest

import runner
from jaxddpm import parallel


@pytest.mark.parametrize("batch_sizes,cores,requested,expected", [
    ((128, 64), 2, 0, 2),    # CI: both cores
    ((128, 64), 8, 0, 8),
    ((100,), 8, 0, 5),       # the largest divisor of the batch that is <= the cores
    ((12, 64), 8, 0, 4),     # every batch size must split evenly
    ((7,), 2, 0, 1),         # a prime batch stays on one device
    ((16,), 1, 0, 1),
    ((12,), 8, 3, 3),        # an explicit request wins
])
def test_cpu_device_count(batch_sizes, cores, requested, expected):
  assert parallel.cpu_device_count(batch_sizes, cores=cores, requested=requested) == expected


def _env_without_device_flag(tmp_path):
  e = runner.env(tmp_path / "cache")
  e["XLA_FLAGS"] = " ".join(f for f in e["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f)
  return e


@pytest.mark.parametrize("requested", [0, 4])
def test_command_line_splits_the_cpu(requested, tmp_path):
  """`python -m jaxddpm` with no device-count flag in XLA_FLAGS: system.cpu_devices devices, or with 0
  one per core as far as training.batch_size (16 in configs/test.py) and eval.batch_size (64) divide."""
  cores = os.cpu_count() or 1
  expected = requested or max(d for d in range(1, cores + 1) if 16 % d == 0 and 64 % d == 0)
  r = runner.run(runner.command(tmp_path / "empty", None, f"system.cpu_devices={requested}", mode="sample")
                 + ["--verbosity=0"], _env_without_device_flag(tmp_path), timeout=120)
  assert r.returncode == 2 and "no checkpoint" in r.output, r.output[-3000:]
  assert f"{expected} local / {expected} global devices (cpu)" in r.output, r.output[-3000:]


def test_device_flag_in_xla_flags_wins(tmp_path):
  r = runner.run(runner.command(tmp_path / "empty", None, "system.cpu_devices=3", mode="sample")
                 + ["--verbosity=0"], runner.env(tmp_path / "cache", devices=1), timeout=120)
  assert r.returncode == 2 and "1 local / 1 global devices (cpu)" in r.output, r.output[-3000:]
