"""Deterministic, resumable, per-process input pipelines over random-access sources.

Training batch k (k = 0, 1, ... over the whole run) is a pure function of
(seed, k): epoch e = k // steps_per_epoch reads a permutation of the dataset
seeded by (seed, e), batch k takes the next `batch_size` indices of it (the
last partial batch of an epoch is dropped, as the official loader does), and
example j of that batch is augmented with an rng seeded by (seed, k, j). So a
run resumed at batch k reads exactly the examples an uninterrupted run would,
reading nothing before them, and the augmentation does not depend on the
number of processes. Process p of P reads rows [p * B/P, (p + 1) * B/P) of
each global batch, and `to_global` assembles the global `jax.Array`.
"""

import collections
import functools
import math
import queue
import threading

import jax
import numpy as np

from maejax import data_sources, loader_pools, preprocess
from maejax.errors import ConfigError

# Mixed into the epoch-order seed (seed, epoch, salt): keeps the permutation
# stream apart from the per-example augmentation streams seeded (seed, batch, row).
EPOCH_ORDER_SALT = 0x5EED


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Whole batches per epoch: the last partial batch is dropped, as the official loader does.

    The one definition: the loader's epoch order and the epochs-to-steps conversion
    (config.total_steps, config.warmup_steps) both use it.

    Raises:
      ConfigError: `batch_size` exceeds `num_examples`, so an epoch would hold no batch.
    """
    check_batch_fits(batch_size, num_examples)
    return num_examples // batch_size


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch, EPOCH_ORDER_SALT)).permutation(num_examples)


def check_batch_fits(batch_size: int, num_examples: int) -> None:
    """Refuse a batch larger than the training split: an epoch would have no batch at all."""
    if batch_size > num_examples:
        raise ConfigError("batch_size", batch_size, f"must not exceed the {num_examples} training examples")


def batch_indices(seed: int, batch_index: int, batch_size: int, num_examples: int) -> np.ndarray:
    """The dataset indices of global training batch `batch_index`, (batch_size,)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)  # refuses a batch larger than the dataset
    epoch, j = divmod(batch_index, per_epoch)
    return epoch_permutation(seed, epoch, num_examples)[j * batch_size : (j + 1) * batch_size]


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {process_count} processes")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


class TrainLoader:
    """Host-local training batches from `start_batch` on, prepared ahead in a thread.

    Iterating yields {"image": (B/P, H, W, C) float32, "label": (B/P,) int32}.
    `position` is the index of the next batch the consumer will receive: save
    it with the checkpoint and pass it back as `start_batch` to resume.

    Examples are read and augmented by `num_threads` threads, or, with
    `num_workers` > 0, by that many worker processes writing into shared
    memory (maejax/loader_pools.py). Either way the batches are the same
    function of (seed, position).
    """

    def __init__(
        self,
        source,
        transform,
        *,
        seed: int,
        batch_size: int,
        start_batch: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        num_threads: int = 4,
        num_workers: int = 0,
    ):
        # Before the thread starts: the refusal surfaces here, not at the first step.
        check_batch_fits(batch_size, len(source))
        self._source = source
        self._transform = transform
        self._seed = seed
        self._batch_size = batch_size
        self._rows = process_rows(batch_size, process_index, process_count)
        self.position = start_batch
        self._ahead = max(prefetch, 1)
        self._queue: queue.Queue = queue.Queue(maxsize=self._ahead)
        self._stop = threading.Event()
        if num_workers > 0:
            rows = self._rows.stop - self._rows.start
            # One buffer more than the producer keeps in flight: make_batch can always get one.
            self._pool = loader_pools.Processes(source, transform, seed, num_workers, rows, self._ahead + 1)
        else:
            self._pool = loader_pools.Threads(source, transform, seed, num_threads)
        self._thread = threading.Thread(target=self._produce, args=(start_batch,), daemon=True)
        self._thread.start()

    def _submit(self, batch_index: int):
        """Start making this process's rows of batch `batch_index` in the pool."""
        indices = batch_indices(self._seed, batch_index, self._batch_size, len(self._source))[self._rows]
        return self._pool.submit(batch_index, indices, np.arange(self._rows.start, self._rows.stop))

    def _gather(self, handle) -> dict:
        images, labels = self._pool.gather(handle)
        return {"image": images, "label": labels}

    def make_batch(self, batch_index: int) -> dict:
        return self._gather(self._submit(batch_index))

    def _produce(self, batch_index: int) -> None:
        # Batches up to `prefetch` ahead are in the pool at once: no worker idles at a batch's end.
        pending = collections.deque()
        while not self._stop.is_set():
            try:
                while len(pending) < self._ahead:
                    pending.append((batch_index + len(pending), self._submit(batch_index + len(pending))))
                index, futures = pending.popleft()
                item = (index, self._gather(futures))
            except Exception as e:  # surfaced to the consumer, not lost in the thread
                item = (batch_index, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            batch_index += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        index, batch = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        if index != self.position:  # a bug in the producer, never bad input: not an assert (python -O)
            raise RuntimeError(
                f"the input pipeline produced batch {index} where batch {self.position} was due; "
                "batches would no longer be a function of (seed, position)"
            )
        self.position += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.close()


def eval_indices(num_examples: int, batch_size: int, process_index: int, process_count: int):
    """This process's share of an evaluation split, padded to whole local batches.

    Returns (indices, valid): each example appears in exactly one process's
    share with valid=1; padding rows repeat index 0 with valid=0. Every process
    gets the same number of batches of batch_size / process_count rows.
    """
    local = batch_size // process_count
    per_process = math.ceil(num_examples / process_count)
    num_batches = max(math.ceil(per_process / local), 1)
    start = process_index * per_process
    real = np.arange(start, min(start + per_process, num_examples))
    padded = num_batches * local
    indices = np.zeros(padded, np.int64)
    valid = np.zeros(padded, np.float32)
    indices[: len(real)] = real
    valid[: len(real)] = 1.0
    return indices, valid


def eval_batches(
    source, transform, batch_size: int, process_index: int = 0, process_count: int = 1, limit=None
):
    """Host-local evaluation batches {"image", "label", "valid"} covering the split once.

    `limit` evaluates only the first `limit` examples (e.g. a kNN subset).
    """
    num = len(source) if limit is None else min(limit, len(source))
    indices, valid = eval_indices(num, batch_size, process_index, process_count)
    local = batch_size // process_count
    for start in range(0, len(indices), local):
        idx, ok = indices[start : start + local], valid[start : start + local]
        records = source.__getitems__(idx)
        yield {
            "image": np.stack([transform(r["image"]) for r in records]).astype(np.float32, copy=False),
            "label": np.asarray([r["label"] for r in records], np.int32),
            "valid": ok,
        }


def to_global(batch: dict, sharding) -> dict:
    """Host-local rows -> global jax.Arrays split along the batch over `sharding`."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def pretrain_transform(dataset_config, image_size: int, channels: int):
    mean, std = data_sources.normalization(dataset_config, channels)
    scale, flip = tuple(dataset_config.crop_scale), bool(dataset_config.flip)
    # A partial of a module function, not a closure: worker processes receive it by pickle.
    return functools.partial(
        preprocess.pretrain_transform, size=image_size, scale=scale, flip=flip, mean=mean, std=std
    )


def eval_transform(dataset_config, image_size: int, channels: int, crop_ratio: float = 1.0):
    mean, std = data_sources.normalization(dataset_config, channels)
    return lambda image: preprocess.eval_transform(image, image_size, mean, std, crop_ratio)
