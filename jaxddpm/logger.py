"""What a run tells a person: TensorBoard events, the console (progress bars or plain lines), and the log
file that keeps library log lines off the console.

clu's metric writers need TensorFlow or PyTorch to write event files; jaxddpm must not, so this module
writes them with the `tensorboard` package's own event-file writer and protos (no TensorFlow).
Only process 0 writes files; every process may call the methods.
"""
from __future__ import annotations

import io
import json
import logging as pylogging
import os
import sys
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


LOG_FILE = "jaxddpm.log"
EVENTS_GLOB = "events.out.tfevents.*"


def last_logged_step(logdir: str) -> int:
  """The highest step of any event in the newest TensorBoard event file of logdir (-1 if none).

  A run killed after its newest checkpoint logged steps past it; a resumed run replays those steps
  bitwise, and skips logging them again (one value per step in TensorBoard)."""
  from etils import epath  # noqa: PLC0415
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader  # noqa: PLC0415
  last = -1
  try:
    files = sorted(epath.Path(logdir).glob(EVENTS_GLOB), key=lambda p: p.name.split(".")[3:4])
    for raw in (RawEventFileLoader(os.fspath(files[-1])).Load() if files else ()):
      last = max(last, int(event_pb2.Event.FromString(raw).step))
  except Exception as e:  # noqa: BLE001  (unreadable: log everything, as before this check existed)
    pylogging.getLogger(__name__).warning("could not read the event files in %s (%s)", logdir, e)
  return last


class MetricWriter:
  """Scalars, images and text as TensorBoard events under logdir (when enabled).

  The event file is created with the first event, so a run that logs nothing leaves no file. Events of
  steps <= skip_through are dropped (a resumed run does not log a step twice)."""

  def __init__(self, logdir: str, enabled: bool = True, skip_through: int = -1):
    self._logdir, self._enabled, self._skip = logdir, enabled, skip_through
    self._writer = None

  def _add(self, step: int, values: list) -> None:
    if not self._enabled or step <= self._skip:
      return
    if self._writer is None:
      self._writer = EventFileWriter(self._logdir)
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: dict) -> None:
    """images: name -> uint8 [H, W, C] (C = 1 or 3)."""
    values = []
    for name, img in images.items():
      img = np.asarray(img)
      buf = io.BytesIO()
      Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
      values.append(summary_pb2.Summary.Value(tag=name, image=summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[-1], encoded_image_string=buf.getvalue())))
    self._add(step, values)

  def write_text(self, step: int, name: str, text: str) -> None:
    from tensorboard.plugins.text import metadata  # noqa: PLC0415
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: PLC0415
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                    tensor_shape=tensor_shape_pb2.TensorShapeProto())
    self._add(step, [summary_pb2.Summary.Value(tag=name, metadata=metadata.create_summary_metadata("", ""),
                                               tensor=tensor)])

  def write_config(self, config) -> None:
    self.write_text(0, "config", "```\n" + json.dumps(json.loads(config.to_json()), indent=2) + "\n```")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


# ------------------------------------------------------------------------------------------ console
def is_terminal(stream=None) -> bool:
  stream = sys.stdout if stream is None else stream
  return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
  """Steps per second and time left, measured between reports from the first compiled step on: the
  first call of a jitted step compiles it, so `started(step)` is called once that call returned, and the
  rate of the first report counts only the steps after it."""

  def __init__(self, num_steps: int, start_step: int):
    self.num_steps, self._step, self._time = num_steps, start_step, None

  def started(self, step: int) -> None:
    if self._time is None:
      self._step, self._time = step, time.time()

  def __call__(self, step: int) -> dict:
    now = time.time()
    if self._time is None or step <= self._step:
      return {}  # nothing measured yet (the only step so far included the compilation)
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_minutes": eta / 60.0}


class _PlainBar:
  """tqdm's interface for logs and CI (stdout not a terminal): a line at most every `interval` seconds."""

  def __init__(self, total, desc, unit, interval, initial=0):
    self.total, self.desc, self.unit, self.interval, self.n = total, desc, unit, interval, initial
    self._t0 = self._last = time.time()
    self._n0 = initial
    self._postfix = ""

  def update(self, k=1):
    self.n += k
    now = time.time()
    if now - self._last >= self.interval and self.n < (self.total or 0):
      self._last = now
      rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
      eta = f", ETA {(self.total - self.n) / rate / 60:.1f} min" if self.total and rate > 0 else ""
      print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({rate:.2f} {self.unit}s/s{eta}){self._postfix}",
            flush=True)

  def set_postfix(self, **kw):
    self._postfix = "".join(f", {k} {v}" for k, v in kw.items())

  def write(self, msg):
    print(msg, flush=True)

  def close(self):
    pass


def progress(total, desc: str, unit: str = "batch", enabled: bool = True, interval: float = 60.0, initial=0):
  """A progress bar (tqdm on a terminal, a plain line every `interval` s otherwise, nothing when not
  enabled): update(k), set_postfix(**kw), write(msg), close()."""
  if not enabled:
    return _PlainBar(total, desc, unit, float("inf"), initial)
  if is_terminal():
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stdout, dynamic_ncols=True,
                leave=False)
  return _PlainBar(total, desc, unit, interval, initial)


# ------------------------------------------------------------------------------------------- log file
class LogCapture(pylogging.Handler):
  """Keeps library log records in memory until the run knows it writes into its workdir
  (`open_log_file`), then appends them, and every later record, to the log file. A run that stops
  before (bad input, nothing to do) leaves no file."""

  MAX_BUFFERED = 20_000

  def __init__(self):
    super().__init__(pylogging.DEBUG)
    self.setFormatter(pylogging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] "
                                          "%(message)s"))
    self._records, self._file = [], None

  def emit(self, record):
    try:
      if self._file is not None:
        self._file.write(self.format(record) + "\n")
        self._file.flush()
      elif len(self._records) < self.MAX_BUFFERED:
        self._records.append(record)
    except Exception:  # noqa: BLE001  (logging must never break the run)
      self.handleError(record)

  def open(self, path: str) -> None:
    if self._file is None:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._file = open(path, "a")  # noqa: SIM115
      self._file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
      for record in self._records:
        self._file.write(self.format(record) + "\n")
      self._records = []
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    super().close()


class _LibraryWarnings(pylogging.Filter):
  """Keeps the checkpoint library's warnings ("waiting for previous save", "removing tmp folder") and
  tfds' notes on folders it is about to create in the log file; errors still reach the console."""

  QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record):
    return record.levelno >= pylogging.ERROR or not any(q in record.pathname for q in self.QUIET)


def quiet_console(verbosity: int | None = None) -> LogCapture:
  """Library log lines (absl, orbax, JAX) leave the console for the log file (`open_log_file`); the
  console keeps warnings and errors. verbosity (absl's --verbosity, when given) sets the console's level
  instead: 0 shows INFO lines again."""
  from absl import logging  # noqa: PLC0415
  from absl.logging import converter  # noqa: PLC0415
  console = pylogging.WARNING if verbosity is None else converter.absl_to_standard(verbosity)
  handler = logging.get_absl_handler()
  handler.setLevel(console)
  if verbosity is None and not any(isinstance(f, _LibraryWarnings) for f in handler.filters):
    handler.addFilter(_LibraryWarnings())
  root = pylogging.getLogger()
  capture = next((h for h in root.handlers if isinstance(h, LogCapture)), None)
  if capture is None:
    capture = LogCapture()
    root.addHandler(capture)
  return capture


def open_log_file(workdir: str, process_index: int = 0) -> str | None:
  """Starts WORKDIR/jaxddpm.log (process i > 0: jaxddpm.process<i>.log) when `quiet_console` runs
  (the command line); a local workdir only. Returns its path, or None."""
  capture = next((h for h in pylogging.getLogger().handlers if isinstance(h, LogCapture)), None)
  if capture is None or "://" in os.fspath(workdir):
    return None
  name = LOG_FILE if process_index == 0 else f"jaxddpm.process{process_index}.log"
  path = os.path.join(os.fspath(workdir), name)
  capture.open(path)
  return path
