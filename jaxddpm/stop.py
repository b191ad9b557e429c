"""Stop requests from the outside: SIGTERM (how Cloud TPU VMs are preempted) and Ctrl-C (SIGINT).

Both set one flag that the training loop polls between steps: it finishes the step, saves a checkpoint
and exits with a message. A second Ctrl-C raises KeyboardInterrupt at once (abort without saving).
Imports nothing heavy, so `python -m jaxddpm` installs it before JAX starts: a signal that arrives
while the run is still starting is honoured too.
"""
from __future__ import annotations

import signal

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class StopSignals:
  """Installs handlers for SIGTERM (when `sigterm`) and SIGINT; `requested` is the name of the first
  signal received (None while none was). `close()` restores the previous handlers."""

  def __init__(self, sigterm: bool = True, sigint: bool = True, announce=print):
    self.requested: str | None = None
    self._announce = announce
    self._old = {}
    for sig, on in ((signal.SIGTERM, sigterm), (signal.SIGINT, sigint)):
      if on:
        self._old[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: abort now
    if self.requested is None:
      self.requested = SIGNAL_NAMES.get(signum, str(signum))
      if signum == signal.SIGINT and self._announce is not None:
        self._announce("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again aborts without one)")

  def close(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
