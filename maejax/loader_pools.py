"""Who decodes and augments the examples of a training batch: threads, or worker processes.

Both make the same rows: row j of batch k is the transform of its example with an
rng seeded by (seed, k, j), wherever it runs. Threads share one interpreter, and
the Python side of each example (PIL's wrappers, numpy's small calls) holds
its lock, so threads scale less than processes (1.81x against 1.92x from 1 to
2 cores in benchmarks/results/input_pipeline.txt) and worse with each core. Worker processes do
not share it; what they cost the training process is receiving the batch. A
pickled float32 batch costs the receiver about a millisecond of CPU per 224 px
image (benchmarks/input_pipeline.py), a ceiling of under 1,000 img/s. So the
workers write their rows straight into batch-sized buffers in shared memory
(files under /dev/shm) and return only the labels; the training process copies
a finished batch out of its buffer, which is then free for a later batch.
"""

import concurrent.futures
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import weakref

import numpy as np

from maejax.errors import ConfigError


def load_rows(source, transform, seed: int, batch_index: int, indices, rows) -> tuple:
    """Examples `indices` as rows `rows` of batch `batch_index`: ([float32 image], int32 labels)."""
    records = source.__getitems__([int(i) for i in indices])
    images = [
        transform(np.random.default_rng((seed, batch_index, int(row))), r["image"])
        for r, row in zip(records, rows, strict=True)
    ]
    return images, np.asarray([r["label"] for r in records], np.int32)


class Threads:
    """`num_threads` threads, one task per example (a slow example holds up one thread only)."""

    def __init__(self, source, transform, seed: int, num_threads: int):
        self._work = (source, transform, seed)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(num_threads, 1))

    def submit(self, batch_index: int, indices, rows):
        return [
            self._pool.submit(load_rows, *self._work, batch_index, [i], [r])
            for i, r in zip(indices, rows, strict=True)
        ]

    def gather(self, futures) -> tuple:
        parts = [f.result() for f in futures]
        # copy=False: the transforms already return float32, and a second copy of the batch costs.
        images = np.stack([image for images, _ in parts for image in images]).astype(np.float32, copy=False)
        return images, np.concatenate([labels for _, labels in parts])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# In a worker process: its source, transform and seed, and the batch buffers it has opened.
_WORKER: dict = {}


def _start_worker(source, transform, seed: int) -> None:
    # A preemption (SIGTERM) or Ctrl-C sent to the whole process group is the training
    # process's to handle: it saves a checkpoint from the batches it has, then closes the
    # pool; a worker dying first would only turn that into a broken pool. So workers
    # ignore both, and leave when the training process ends however it ends (their task
    # queue would not tell them: each worker holds its write end too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(multiprocessing.parent_process(),), daemon=True).start()
    _WORKER.update(source=source, transform=transform, seed=seed, buffers={})


def _exit_with(parent) -> None:
    parent.join()  # returns when the training process has ended
    os._exit(0)


def _load_into(path: str, shape: tuple, start: int, batch_index: int, indices, rows):
    """In a worker: write rows [start, start + len(rows)) of the batch buffer at `path`; return the labels."""
    buffers = _WORKER["buffers"]
    if path not in buffers:
        buffers[path] = np.memmap(path, np.float32, "r+", shape=shape)
    work = _WORKER["source"], _WORKER["transform"], _WORKER["seed"]
    images, labels = load_rows(*work, batch_index, indices, rows)
    for offset, image in enumerate(images):
        buffers[path][start + offset] = image
    return labels


def check_picklable(source, transform, num_workers: int) -> None:
    """Worker processes receive the source and transform by pickle: refuse before starting them."""
    try:
        pickle.dumps((source, transform))
    except Exception as e:
        valid = f"0 (threads) for this source and transform, which cannot be sent to a process: {e}"
        raise ConfigError("dataset.num_workers", num_workers, valid) from None


def shared_memory_dir() -> str:
    """/dev/shm where it exists (memory, never disk), else the temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


class Processes:
    """`num_workers` spawned processes writing into `buffers` batch buffers in shared memory.

    Each batch is cut into two slices per worker (a slow example delays a slice,
    not a worker's whole share). A buffer is taken when a batch is submitted and
    given back when it is gathered, so at most `buffers` batches are in flight.
    """

    def __init__(self, source, transform, seed: int, num_workers: int, rows: int, buffers: int):
        check_picklable(source, transform, num_workers)
        # One example made here gives the buffers their shape (the transforms' output size is fixed).
        example = transform(np.random.default_rng(0), source.__getitems__([0])[0]["image"])
        self._shape = (rows, *np.shape(example))
        self._slices = 2 * num_workers
        # Named by the training process's pid: a folder a SIGKILL left behind says whose it was.
        self._dir = tempfile.mkdtemp(prefix=f"maejax-batches-{os.getpid()}-", dir=shared_memory_dir())
        # Removed by close(), or at exit when the process ends without it (not after SIGKILL).
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._buffers = [
            np.memmap(os.path.join(self._dir, str(i)), np.float32, "w+", shape=self._shape)
            for i in range(buffers)
        ]
        self._free: queue.Queue = queue.Queue()
        for i in range(buffers):
            self._free.put(i)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            num_workers,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a process that runs JAX
            initializer=_start_worker,
            initargs=(source, transform, seed),
        )

    def submit(self, batch_index: int, indices, rows):
        buffer = self._free.get()
        path = self._buffers[buffer].filename
        starts = np.cumsum([0] + [len(s) for s in np.array_split(rows, self._slices)])[:-1]
        futures = [
            self._pool.submit(_load_into, path, self._shape, int(start), batch_index, i, r)
            for start, i, r in zip(
                starts, np.array_split(indices, self._slices), np.array_split(rows, self._slices), strict=True
            )
            if len(r)
        ]
        return buffer, futures

    def gather(self, handle) -> tuple:
        buffer, futures = handle
        try:
            labels = np.concatenate([f.result() for f in futures])
            # A copy: the buffer is refilled by a later batch while this one trains.
            return np.array(self._buffers[buffer]), labels
        finally:
            self._free.put(buffer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._remove_dir()
