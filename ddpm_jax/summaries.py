"""TensorBoard event files, written through the file layer (`storage`) so they land in a gs://
workdir the same way checkpoints do.

Events are TensorBoard's own protocol buffers (from the `tensorboard` package; TensorFlow is not
used) framed as TFRecords. A local file is appended to at each flush. An object in a bucket cannot
be appended to, so each flush rewrites the current object whole (an atomic upload), and a new file
starts once it holds ROTATE_BYTES: TensorBoard reads every event file of a folder in name order.
"""

import io
import itertools
import os
import socket
import struct
import time

import jax
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from ddpm_jax import storage

ROTATE_BYTES = 4 << 20  # a bucket object is rewritten whole at each flush: keep each one small
_counter = itertools.count()


def _record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the serialized event, its masked CRC-32C."""
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (
    header
    + struct.pack("<I", masked_crc32c(header))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


class SummaryWriter:
  """Scalars and images for TensorBoard in `log_dir` (a local folder or a gs:// URL)."""

  def __init__(self, log_dir: str):
    self.log_dir = storage.resolve(log_dir)
    self._written = b""  # the current file's records already stored (kept only for objects)
    self._pending = []
    self._path = None
    self._start_file()

  def _start_file(self):
    stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_counter)}"
    self._path = storage.join(self.log_dir, f"events.out.tfevents.{stamp}.v2")
    self._written = b""
    self._pending.insert(
      0, _record(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    )

  def _add(self, step: int, value: summary_pb2.Summary.Value):
    event = event_pb2.Event(
      wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value])
    )
    self._pending.append(_record(event))

  def scalar(self, tag: str, value, step: int):
    self._add(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

  def image(self, tag: str, image, step: int):
    """A uint8 image [H, W, C] (or a batch [N, H, W, C], of which the first is written)."""
    image = np.asarray(image)
    image = image[0] if image.ndim == 4 else image
    assert image.ndim == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    height, width, channels = image.shape
    encoded = summary_pb2.Summary.Image(
      height=height, width=width, colorspace=channels, encoded_image_string=_png(image)
    )
    self._add(step, summary_pb2.Summary.Value(tag=tag, image=encoded))

  def flush(self):
    if not self._pending:
      return
    new, self._pending = b"".join(self._pending), []
    if storage.is_remote(self._path):
      self._written += new
      storage.write_bytes(self._path, self._written)
      if len(self._written) >= ROTATE_BYTES:
        self._start_file()
    else:
      storage.make_dirs(self.log_dir)
      storage.append_bytes(self._path, new)

  def close(self):
    self.flush()


def writer(log_dir: str) -> SummaryWriter | None:
  """The TensorBoard writer of a run's `log_dir` on process 0; None on the other processes."""
  return SummaryWriter(log_dir) if jax.process_index() == 0 else None
