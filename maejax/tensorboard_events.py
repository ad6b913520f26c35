"""TensorBoard event files written without TensorFlow.

An event file is a sequence of records (length, masked CRC32C of the length,
a serialized `Event` proto, masked CRC32C of the data); tensorboard's own
package provides the protos and the record framing and imports no
TensorFlow for them. Scalars are `simple_value`s and images PNG-encoded
`Summary.Image`s, which every TensorBoard version reads.
"""

import io
import os
import socket
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from maejax import paths

FILE_VERSION = "brain.Event:2"


def event_file_name(logdir: str) -> str:
    """A new file name in TensorBoard's pattern, unique per process and start time."""
    return paths.join(
        logdir, f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.maejax"
    )


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, C) image, C in 1, 3, 4."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class EventFile:
    """One TensorBoard event file in `logdir`: scalars and images, appended and flushed on request.

    Args:
      logdir: the folder TensorBoard is pointed at (created when missing).
      resumed_at: the step a resumed run continues from; TensorBoard then drops
        what an earlier run had logged after it (a SessionLog START event).
    """

    def __init__(self, logdir: str, resumed_at: int | None = None):
        self.path = event_file_name(logdir)
        self._records = RecordWriter(paths.AppendFile(self.path, binary=True))
        self._write(event_pb2.Event(file_version=FILE_VERSION))
        if resumed_at is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            # TensorBoard drops earlier events at steps >= this one: the first step logged again.
            self._write(event_pb2.Event(step=int(resumed_at) + 1, session_log=start))
        self.flush()

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, values: dict) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        self._write(event_pb2.Event(step=int(step), summary=summary))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 (H, W, C) image."""
        height, width = image.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        encoded = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png_bytes(image)
        )
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=encoded)])
        self._write(event_pb2.Event(step=int(step), summary=summary))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.flush()
            self._records.close()
