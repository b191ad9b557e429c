"""Metrics to TensorBoard event files and the console, and a progress report (steps/s, ETA).

clu's metric writers need TensorFlow or PyTorch to write event files; jaxddpm must not, so this module
writes them with the `tensorboard` package's own event-file writer and protos (no TensorFlow).
Only process 0 writes files; every process may call the methods.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Scalars, images and text as TensorBoard events under logdir (when enabled)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = EventFileWriter(logdir) if enabled else None

  def _add(self, step: int, values: list) -> None:
    if self._writer is not None:
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


class Progress:
  """Steps per second and time left, measured between reports."""

  def __init__(self, num_steps: int, start_step: int):
    self.num_steps, self._step, self._time = num_steps, start_step, time.time()

  def __call__(self, step: int) -> dict:
    now = time.time()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_minutes": eta / 60.0}
