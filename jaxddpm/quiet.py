"""Contain the noise of an operation that may fail and is reported by its caller in one line (floor 3).

Restoring a damaged checkpoint makes orbax log the failure (with tracebacks and tensorstore's multi-line
specs) through absl, leaves asyncio tasks whose exceptions are never retrieved ("Task exception was never
retrieved" with a traceback each) and tensorstore callbacks that find their event loop closed ("Event
loop is closed", reported as unraisable or thread exceptions). `quiet_failures` holds all of that back
while its block runs: dropped if the block marks itself failed, replayed unchanged otherwise.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading

LOGGERS = ("absl", "asyncio")  # orbax logs through absl; asyncio reports orphaned task errors


class _Held(logging.Filter):
  def __init__(self):
    super().__init__()
    self.records: list[tuple[logging.Logger, logging.LogRecord]] = []
    self.unraisable: list = []
    self.thread_errors: list = []
    self.failed_ = False

  def filter(self, record):
    self.records.append((logging.getLogger(record.name), record))
    return False

  def failed(self) -> None:
    """Drop what was held (the caller reports the failure itself)."""
    self.failed_ = True


@contextlib.contextmanager
def quiet_failures(loggers=LOGGERS):
  """Holds back log records of `loggers`, unraisable exceptions and uncaught thread exceptions while
  the block runs. Yields an object with `failed()`: call it when the block failed, and what was held is
  dropped (after a garbage collection that brings orphaned asyncio tasks' errors into the net);
  otherwise it is emitted afterwards as it would have been."""
  held = _Held()
  targets = [logging.getLogger(n) for n in loggers]
  old_unraisable, old_thread = sys.unraisablehook, threading.excepthook
  for t in targets:
    t.addFilter(held)
  sys.unraisablehook = held.unraisable.append
  threading.excepthook = held.thread_errors.append
  try:
    yield held
    if held.failed_:
      gc.collect()  # orphaned tasks and futures of the failed attempt report now, into the net
  finally:
    for t in targets:
      t.removeFilter(held)
    sys.unraisablehook, threading.excepthook = old_unraisable, old_thread
  if not held.failed_:
    for logger, record in held.records:
      logger.handle(record)
    for u in held.unraisable:
      old_unraisable(u)
    for a in held.thread_errors:
      old_thread(a)
