"""What a run writes for people: metrics.jsonl, TensorBoard events, PNGs, progress lines.

Only process 0 writes; the others get a writer that does nothing, so loops
call it unconditionally.
"""

import json
import logging
import sys
import time

import numpy as np

from maejax import paths, tensorboard_events

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"


def readable_rows(lines, path: str):
    """(line, row) for each JSON object line; a torn or malformed line is skipped with a warning.

    A kill mid-write leaves one torn line; refusing it would make every resume
    fail until the file is edited by hand.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            logging.warning("skipping malformed line %d of %s (%s): %.80r", number, path, e.msg, line)
            continue
        if not isinstance(row, dict):
            logging.warning("skipping line %d of %s: not a JSON object: %.80r", number, path, line)
            continue
        yield line if line.endswith("\n") else line + "\n", row


class Writer:
    """metrics.jsonl, TensorBoard events and PNGs under `workdir` (a no-op unless `enabled`).

    resumed_at: the step a resumed run continues from (TensorBoard then hides
    what the earlier run logged after it).
    """

    def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        self._metrics = None  # opened after truncate_after, which may rewrite the file
        if enabled:
            self._tb = tensorboard_events.EventFile(workdir, resumed_at)

    @property
    def metrics_path(self) -> str:
        return paths.join(self.workdir, METRICS_FILE)

    def truncate_after(self, step: int) -> None:
        """Drop metric rows logged after `step` (a resumed run logs them again)."""
        if not self.enabled or not paths.exists(self.metrics_path):
            return
        lines = paths.read_text(self.metrics_path).splitlines(keepends=True)
        rows = [line for line, row in readable_rows(lines, self.metrics_path) if row.get("step", 0) <= step]
        self._close_metrics()
        paths.write_atomic(self.metrics_path, "".join(rows))

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        if self._metrics is None:
            self._metrics = paths.AppendFile(self.metrics_path)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self._tb.scalars(step, scalars)
        self._tb.flush()

    def write_image(self, step: int, name: str, grid: np.ndarray, filename: str) -> str | None:
        """Save a uint8 (H, W, C) grid as images/<filename> and as a TensorBoard image."""
        if not self.enabled:
            return None
        from maejax import visualize

        path = paths.join(self.workdir, IMAGES_DIR, filename)
        visualize.save_png(path, grid)
        self._tb.image(step, name, grid)
        self._tb.flush()
        return path

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def close(self) -> None:
        self._close_metrics()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """One line per log step: step/total, loss, lr, img/s, ETA."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int, enabled: bool = True):
        self.total = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def images_per_second(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

    def line(self, step: int, metrics: dict, img_per_s: float) -> str:
        eta = (self.total - step) * self.batch_size / max(img_per_s, 1e-9)
        return (
            f"step {step}/{self.total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
            f"{img_per_s:.1f} img/s  ETA {format_seconds(eta)}"
        )

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
