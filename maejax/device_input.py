"""On-device training input for datasets that fit in device memory (config.dataset.on_device).

The host pipeline (input_pipeline.TrainLoader) decodes, crops, resizes and
normalises every example in Python threads: about 150 images a second per
core, far below what an accelerator consumes on a small dataset such as
Fashion-MNIST (60,000 x 28 x 28 x 1 uint8 = 47 MB). Here the training split is
read once as one uint8 (N, H, W, C) array and replicated on every device; each
step the host computes only a small plan per example, and the jitted train
step gathers, crops, resizes, flips and normalises on the device:

- `index`: the dataset indices, exactly input_pipeline.batch_indices, so the
  example order is the host loader's;
- `box` (top, left, h, w) and `flip`: drawn with the host loader's per-example
  rng (seed, batch index, row) and the same calls in the same order, so the
  randomness is a pure function of (seed, batch index) and resume stays exact.

Resampling is JAX's (jax.image.scale_and_translate with the Keys bicubic
kernel, a = -0.5, antialiased when shrinking): PIL's kernel and PIL's two
passes (width, then height, each rounded and clipped to uint8), but in float32
rather than PIL's fixed point. On Fashion-MNIST about 0.1 % of the pixels of a
resized crop differ from PIL's, by 1-2 grey levels; an image already at
model.image_size and not cropped comes out as on the host (to 1e-6).

Labels stay on the host: the task builds its targets from them there, with
the same functions as the host path. Evaluation, kNN and pictures still read
through the host pipeline (they run rarely).
"""

import concurrent.futures
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from maejax import input_pipeline, preprocess, sharding
from maejax.errors import ConfigError

# Loader batch keys the on-device step turns into the "image" batch entry.
PLAN_KEYS = ("index", "box", "flip")
READ_CHUNK = 1024  # examples per read task: large enough to amortise, small enough to spread over threads


@dataclasses.dataclass
class Split:
    """A whole training split on the host: images (N, H, W, C) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    seconds: float = 0.0  # how long reading it took, for the log line

    def describe(self) -> str:
        n, h, w, c = self.images.shape
        return (
            f"on-device input: {n} training images of {h}x{w}x{c} "
            f"({self.images.nbytes / 1e6:.1f} MB) read in {self.seconds:.1f} s"
        )


def read_split(source, num_threads: int = 1, verbose: bool = False) -> Split:
    """Every example of `source` as one uint8 array: the one pass over the files a run makes.

    verbose: print a line saying what was read and how long it took (process 0).

    Raises:
      ConfigError (dataset.on_device): the images differ in size (an image
        folder of photos, ImageNet), so they are no single array; found in
        the first chunk that shows it, not after reading everything.
    """
    started = time.perf_counter()
    chunks = [range(i, min(i + READ_CHUNK, len(source))) for i in range(0, len(source), READ_CHUNK)]
    records = source.__getitems__(chunks[0])  # alone first: photos of many sizes stop the run here
    shape = records[0]["image"].shape
    _check_sizes(records, shape)
    pool = concurrent.futures.ThreadPoolExecutor(max(num_threads, 1))
    try:
        for part in pool.map(source.__getitems__, chunks[1:]):
            _check_sizes(part, shape)
            records.extend(part)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # after a refusal, read nothing more
    images = np.stack([record["image"] for record in records]).astype(np.uint8, copy=False)
    labels = np.asarray([record["label"] for record in records], np.int32)
    split = Split(images, labels, time.perf_counter() - started)
    if verbose:
        print(split.describe(), flush=True)
    return split


def _check_sizes(records: list, shape: tuple) -> None:
    sizes = {record["image"].shape for record in records} - {shape}
    if sizes:
        raise ConfigError(
            "dataset.on_device",
            True,
            f"needs every training image the same size, to hold the split as one uint8 array; "
            f"it has {shape} and {sorted(sizes)[0]}: set dataset.on_device=False",
        )


def crop_plan(seed: int, batch_index: int, rows: range, height: int, width: int, scale, flip: bool):
    """The RandomResizedCrop boxes and flips of rows `rows` of batch `batch_index`.

    The same draws as the host transforms (preprocess.pretrain_transform and
    finetune_input.train_transform): the box first, then the flip, from the
    rng seeded (seed, batch_index, row). `flip=False` draws no flip, as there.

    Returns:
      box (b, 4) int32 rows (top, left, h, w); flip (b,) bool.
    """
    box = np.zeros((len(rows), 4), np.int32)
    flips = np.zeros(len(rows), bool)
    for i, row in enumerate(rows):
        rng = np.random.default_rng((seed, batch_index, row))
        box[i] = preprocess.random_resized_crop_box(rng, height, width, scale)
        flips[i] = flip and rng.uniform() < 0.5
    return box, flips


class DeviceLoader:
    """Host-local plans of the training batches from `start_batch` on: TrainLoader's contract.

    Iterating yields {"index": (B/P,) int32, "box": (B/P, 4) int32, "flip":
    (B/P,) bool, "label": (B/P,) int32}; `position` is the next batch's index
    (saved with the checkpoint, passed back as `start_batch`). A plan costs
    milliseconds, so there is no thread: the host computes the next one while
    the device runs the step it was just given.
    """

    def __init__(
        self,
        labels: np.ndarray,
        image_shape: tuple,
        *,
        seed: int,
        batch_size: int,
        scale,
        flip: bool,
        start_batch: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        input_pipeline.check_batch_fits(batch_size, len(labels))
        self._labels = labels
        self._height, self._width = image_shape[:2]
        self._seed, self._batch_size = seed, batch_size
        self._scale, self._flip = tuple(scale), bool(flip)
        self._rows = input_pipeline.process_rows(batch_size, process_index, process_count)
        self.position = start_batch

    def make_batch(self, batch_index: int) -> dict:
        indices = input_pipeline.batch_indices(self._seed, batch_index, self._batch_size, len(self._labels))
        index = indices[self._rows].astype(np.int32)
        rows = range(self._rows.start, self._rows.stop)
        height, width = self._height, self._width
        box, flip = crop_plan(self._seed, batch_index, rows, height, width, self._scale, self._flip)
        return {"index": index, "box": box, "flip": flip, "label": self._labels[index]}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.make_batch(self.position)
        self.position += 1
        return batch

    def close(self) -> None:
        pass  # nothing runs in the background


def train_loader(config, split: Split, position: dict, scale, flip: bool) -> DeviceLoader:
    """This process's plans from the checkpointed input position on (cf. loop.train_loader)."""
    return DeviceLoader(
        split.labels,
        split.images.shape[1:],
        seed=config.seed,
        batch_size=config.batch_size,
        scale=scale,
        flip=flip,
        start_batch=int(position["next_batch"]),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def plan(batch: dict) -> dict:
    """The entries of a loader batch the on-device step needs to make its images."""
    return {key: batch[key] for key in PLAN_KEYS}


def resized_crops(images, box, size: int):
    """Crop each image to its box and resize it to size x size, bicubic, in uint8 levels.

    images (B, H, W, C) uint8, box (B, 4) int32 (top, left, h, w) -> (B, size, size, C) float32.
    Output pixel centre y samples the input at top + (y + 0.5) * h / size - 0.5,
    as PIL's resize with a box does. Like PIL, it resizes the width first and
    rounds and clips to uint8 levels after each pass: bicubic overshoots at
    sharp edges, and clipping it between the passes changes the second pass by
    up to tens of levels on Fashion-MNIST's black-white edges.
    """

    def one(image, box):
        top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
        image = image.astype(jnp.float32)
        for dim, start, extent in ((1, left, w), (0, top, h)):
            shape = list(image.shape)
            shape[dim] = size
            scale = size / extent
            image = jax.image.scale_and_translate(
                image, shape, (dim,), scale[None], (-start * scale)[None], method="cubic", antialias=True
            )
            image = jnp.clip(jnp.round(image), 0.0, 255.0)
        return image

    return jax.vmap(one)(images, box)


def augment(images, index, box, flip, size: int, mean, std):
    """The batch's training images on the device: gather, crop + resize, flip, normalise.

    images: the whole split (N, H, W, C) uint8; index (B,), box (B, 4), flip (B,)
    from DeviceLoader. Returns (B, size, size, C) float32, normalised as
    preprocess.normalize does ((x / 255 - mean) / std, in that order).
    """
    crops = resized_crops(images[index], box, size)
    crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
    return (crops / np.float32(255.0) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def replicate(images: np.ndarray, mesh) -> jax.Array:
    """The split as a jax.Array replicated on every device of `mesh` (every process holds it all)."""
    return jax.make_array_from_callback(images.shape, sharding.replicated(mesh), lambda index: images[index])


def compile_step(step_fn, split: Split, size: int, mean, std, state_shardings, batch_sharding, mesh):
    """loop.compile_step for on-device input: (state, plan batch) -> step_fn(state, image batch).

    The split goes to the devices once, here; it is an argument of the jitted
    step (a constant would be baked into the program) and never donated.
    Entries of the batch other than the plan (e.g. fine-tuning's targets) pass
    through to `step_fn` unchanged.
    """
    images = replicate(split.images, mesh)
    replicated = sharding.replicated(mesh)

    def step(state, batch, images):
        rest = {k: v for k, v in batch.items() if k not in PLAN_KEYS}
        made = augment(images, batch["index"], batch["box"], batch["flip"], size, mean, std)
        rest["image"] = jax.lax.with_sharding_constraint(made, batch_sharding)
        return step_fn(state, rest)

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return lambda state, batch: jitted(state, batch, images)
