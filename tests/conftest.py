"""Test-session setup: 8 fake CPU devices for every test, float32 JAX (the library default).

Setting XLA_FLAGS here, before anything imports jax, gives each pytest worker 8 host-platform devices;
single-device tests simply run on device 0. Multi-process tests start their own subprocesses.
"""
import os
import socket

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def free_port() -> int:
  """A free TCP port on 127.0.0.1 for a jax.distributed coordinator."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def port():
  return free_port()
