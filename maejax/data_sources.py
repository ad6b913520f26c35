"""Random-access image sources: tfds (array_record) datasets and image folders.

Every source has `len(source)` and `source.__getitems__(indices)` returning a
list of {"image": (H, W, C) uint8, "label": int}. Random access is what lets
the input pipeline resume at any batch without re-reading what was consumed,
and lets each process read only its own examples.

tfds datasets are prepared once in the array_record format:
- `fashion_mnist` reads local IDX files (Debian's `dataset-fashion-mnist`, or
  `dataset.manual_dir`) when they exist and never touches the network; tfds'
  registered checksums are for the upstream downloads, whose gzip bytes differ
  from Debian's, so the local files go through tfds' extractor, not its
  downloader. Without local files it is tfds' normal download.
- `imagenet2012` is built from the ImageNet tars in `dataset.manual_dir`
  (tfds' manual-download procedure).
- `cifar10` and other tfds names use tfds' normal download.
A dataset already prepared as TFRecord can be converted in place with
`tfds convert_format --dataset_dir=... --out_file_format=array_record`.
"""

import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import urllib.parse

import numpy as np

from maejax import paths
from maejax.errors import ConfigError, UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".JPEG", ".JPG", ".PNG")

# Per-channel mean and std of pixels in [0, 1] (training split), for normalisation;
# other datasets use ImageNet's, as MAE codebases do. Fashion-MNIST's are measured
# from its training split (a test recomputes them).
NORMALIZATION = {
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


class _LocalDownloads:
    """Stands in for tfds' download manager: URLs -> local files, extracted by tfds."""

    def __init__(self, dl_manager, folder: str):
        self._dl_manager = dl_manager
        self._folder = folder

    def download_and_extract(self, urls: dict) -> dict:
        local = {
            k: os.path.join(self._folder, os.path.basename(urllib.parse.urlparse(u).path))
            for k, u in urls.items()
        }
        return self._dl_manager.extract(local)


def _local_fashion_mnist_builder(folder: str):
    """tfds' own fashion_mnist builder, fed from local IDX files (same name, same output)."""
    from tensorflow_datasets.image_classification import mnist

    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
        name = "fashion_mnist"

        def _split_generators(self, dl_manager):
            return super()._split_generators(_LocalDownloads(dl_manager, folder))

    return LocalFashionMNIST


def fashion_mnist_local_dir(manual_dir: str | None) -> str | None:
    """The folder holding the four IDX files: `manual_dir`, else Debian's, else None."""

    def complete(folder):
        return all(os.path.exists(os.path.join(folder, f)) for f in FASHION_MNIST_FILES)

    if manual_dir:
        if complete(manual_dir):
            return manual_dir
        raise UserError(
            f"config.dataset.manual_dir={manual_dir!r} lacks the Fashion-MNIST files "
            f"{list(FASHION_MNIST_FILES)}; on Debian: apt-get install dataset-fashion-mnist "
            "(files in /usr/share/datasets/fashion-mnist)"
        )
    if complete(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    return None


def tfds_builder(dataset_config):
    """A prepared tfds builder in array_record format (prepares it on first use).

    A data_dir on a store (gs://...) is read from a local copy: see `staged_builder`.
    """
    if paths.is_url(dataset_config.data_dir or ""):
        return staged_builder(dataset_config)
    builder = _unprepared_builder(dataset_config)
    if not builder.is_prepared():
        download_config = _download_config(dataset_config)
        builder = _prepare_once(builder, download_config, lambda: tfds_builder(dataset_config))
    return builder


def _download_config(dataset_config):
    import tensorflow_datasets as tfds

    return tfds.download.DownloadConfig(manual_dir=dataset_config.manual_dir)


def _unprepared_builder(dataset_config):
    """tfds' builder for the config's dataset under its data_dir, prepared or not."""
    import tensorflow_datasets as tfds

    name, data_dir, manual_dir = dataset_config.name, dataset_config.data_dir, dataset_config.manual_dir
    kwargs = {"data_dir": data_dir, "file_format": "array_record"}
    if name == "fashion_mnist":
        local = fashion_mnist_local_dir(manual_dir)
        builder = _local_fashion_mnist_builder(local)(**kwargs) if local else tfds.builder(name, **kwargs)
    else:
        try:
            builder = tfds.builder(name, **kwargs)
        except tfds.core.registered.DatasetNotFoundError:
            raise ConfigError("dataset.name", name, "a tfds dataset name or 'image_folder'") from None
    if name == "imagenet2012" and not builder.is_prepared() and not manual_dir:
        raise ConfigError(
            "dataset.manual_dir",
            manual_dir,
            "imagenet2012 is not prepared under dataset.data_dir; set dataset.manual_dir to the folder "
            "holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (tfds builds it once, in "
            "array_record format)",
        )
    return builder


DATA_CACHE_ENV = "MAEJAX_DATA_CACHE"
# tfds writes this last when it prepares a version; maejax uploads it last too.
DATASET_INFO = "dataset_info.json"


def staging_dir(url: str) -> str:
    """Where a host keeps its copy of the datasets under `url`: $MAEJAX_DATA_CACHE/<scheme>/<path>."""
    root = os.environ.get(DATA_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "maejax", "datasets"
    )
    return os.path.join(root, *url.replace("://", "/", 1).split("/"))


def staged_builder(dataset_config):
    """The dataset of a data_dir on a store, read from a local copy on each host.

    tfds' array_record reader opens local files only, so each host copies the
    prepared version folder (e.g. fashion_mnist/3.0.1) from the store once,
    into `staging_dir(data_dir)`, and reads it there; later runs find the
    copy and skip the download. A dataset not on the store yet is built
    locally by process 0 and uploaded (what `maejax.prepare_data` does ahead
    of a run), its dataset_info.json last, so that nobody takes a partial
    upload for a prepared dataset.
    """
    url = dataset_config.data_dir
    paths.check_backend(url, "config.dataset.data_dir")
    local_config = dataset_config.copy_and_resolve_references()
    local_config.data_dir = staging_dir(url)
    builder = _unprepared_builder(local_config)
    if builder.is_prepared():
        return builder
    relative = os.path.relpath(os.fspath(builder.data_dir), local_config.data_dir)
    remote = paths.join(url, *relative.split(os.sep))
    if paths.exists(paths.join(remote, DATASET_INFO)):
        _download(remote, os.fspath(builder.data_dir))
        return _unprepared_builder(local_config)

    def upload(prepared):
        _upload(os.fspath(prepared.data_dir), remote)

    return _prepare_once(
        builder, _download_config(dataset_config), lambda: staged_builder(dataset_config), after=upload
    )


def _download(remote: str, local: str) -> None:
    """Copy a prepared version folder from the store; the local folder appears complete or not at all."""
    started = time.perf_counter()
    partial = f"{local}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)  # and the parents `local` is renamed into
    files = paths.copy_to_local(remote, partial)
    try:
        os.rename(partial, local)
    except OSError:  # another process on this host staged it first
        shutil.rmtree(partial, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(local) for f in files)
    logging.warning(
        "staged %s to %s: %d files, %.1f MB in %.1f s",
        remote,
        local,
        files,
        size / 1e6,
        time.perf_counter() - started,
    )


def _upload(local: str, remote: str) -> None:
    """Copy a prepared version folder to the store, dataset_info.json last."""
    names = [
        os.path.relpath(os.path.join(root, f), local) for root, _, files in os.walk(local) for f in files
    ]
    for name in sorted(names, key=lambda name: name == DATASET_INFO):
        with open(os.path.join(local, name), "rb") as f:
            paths.write_atomic(paths.join(remote, *name.split(os.sep)), f.read())
    logging.warning("uploaded the prepared dataset %s to %s", local, remote)


DATA_EXTRA = "maejax[data]"


def require_tensorflow(name: str, data_dir) -> None:
    """Refuse, in one line, to build a dataset without TensorFlow (tfds' builders need it).

    Reading a prepared dataset needs none: only building one from raw files does.
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise UserError(
            f"dataset {name!r} is not prepared under {data_dir}, and building it from raw files needs "
            f"TensorFlow: pip install '{DATA_EXTRA}' (or prepare it on another machine with "
            "python -m maejax.prepare_data and point dataset.data_dir at it)"
        )


def _prepare_once(builder, download_config, rebuild, after=None):
    """Build the dataset on process 0 while the others wait, then open what it wrote.

    Every process preparing into a shared data_dir at once would race; where
    data_dir is local to each host, the others build their own copy after.
    `after(builder)` runs on process 0 once the dataset is built, before the
    others go on (the upload of a dataset for a store).
    """
    import jax

    def prepare(b):
        require_tensorflow(b.name, b.data_dir)
        b.download_and_prepare(file_format="array_record", download_config=download_config)

    if jax.process_index() == 0:
        prepare(builder)
        if after is not None:
            after(builder)
    if jax.process_count() == 1:
        return builder
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("maejax: dataset prepared")
    builder = rebuild()
    if not builder.is_prepared():
        prepare(builder)
    return builder


class TfdsSource:
    """A tfds split, random access through tfds' array_record data source."""

    def __init__(self, dataset_config, split: str):
        self._config, self._split = dataset_config, split
        builder = tfds_builder(dataset_config)
        if split not in builder.info.splits:
            raise ConfigError(
                "dataset split", split, f"one of {sorted(builder.info.splits)} for {builder.name}"
            )
        self._source = builder.as_data_source(split)
        self.num_classes = builder.info.features["label"].num_classes
        self.channels = builder.info.features["image"].shape[-1]

    def __len__(self) -> int:
        return len(self._source)

    def __getitems__(self, indices) -> list:
        return [
            {"image": r["image"], "label": int(r["label"])} for r in self._source.__getitems__(list(indices))
        ]

    # A loader's worker process reopens the prepared split from the config (tfds' reader
    # holds the builder, which need not pickle).
    def __getstate__(self):
        return {"dataset_config": self._config, "split": self._split}

    def __setstate__(self, state):
        self.__init__(**state)


BAD_IMAGE_POLICIES = ("error", "skip")
CLASSES_FILE = "classes.json"
# How many unreadable files a refusal names before it says "and N more".
MAX_NAMED_FILES = 10


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, corrupt) or has no 8-bit meaning."""


def is_hidden(name: str) -> bool:
    # `.ipynb_checkpoints`, `.DS_Store`, macOS `._x.jpg` forks: never classes or images.
    return name.startswith(".")


def class_names(folder: str) -> list:
    """The sorted, non-hidden sub-folders of `folder`."""
    return sorted(
        d for d in os.listdir(folder) if not is_hidden(d) and os.path.isdir(os.path.join(folder, d))
    )


def image_files(folder: str) -> list:
    """The sorted, non-hidden image files directly under `folder`."""
    return sorted(f for f in os.listdir(folder) if not is_hidden(f) and f.endswith(IMAGE_EXTENSIONS))


def split_folder(root: str | None, split: str, train_split: str = "train") -> str:
    """`root/<split>`, or `root` itself for the training split when it has no such sub-folder."""
    if not root or not os.path.isdir(root):
        raise ConfigError("dataset.manual_dir", root, "an existing folder of <class>/<image> sub-folders")
    folder = os.path.join(root, split)
    if os.path.isdir(folder):
        return folder
    if split != train_split:
        raise ConfigError("dataset split", split, f"a sub-folder of {root}")
    return root


def abbreviated(names: list, limit: int = 20) -> str:
    """`names` for a one-line message: a thousand ImageNet classes would bury the point."""
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} ... ({len(names)} in all)"


def check_split_classes(folder: str, classes: list, known: list) -> None:
    """Refuse a split with a class the training split lacks: its label would mean nothing."""
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise UserError(
            f"{folder} has class folders {unknown} that the training split does not have; "
            f"labels come from the training split's classes {abbreviated(known)}: rename or remove them"
        )


def check_classes(workdir: str, classes: list | None) -> None:
    """Save the training classes as WORKDIR/classes.json, or refuse when they changed since.

    Labels are positions in this list: a checkpoint trained on one list scores
    a folder with another against the wrong labels. `classes=None` (a tfds
    source, whose labels are fixed by the dataset) does nothing.
    """
    if classes is None:
        return
    path = paths.join(workdir, CLASSES_FILE)
    if paths.exists(path):
        saved = json.loads(paths.read_text(path))
        if list(saved) != list(classes):
            added, missing = sorted(set(classes) - set(saved)), sorted(set(saved) - set(classes))
            change = f"added {added}, missing {missing}" if added or missing else "the same names, reordered"
            raise UserError(
                f"the training folder's classes differ from the {len(saved)} saved in {path} when this "
                f"run started ({change}): labels would change meaning; restore the folder or use a new "
                "workdir"
            )
        return
    # Every process may get here first: each replaces the file atomically with
    # the same list, so a reader never sees a partial one.
    paths.write_atomic(path, json.dumps(list(classes), indent=1))


def eight_bit(img):
    """`img` in an 8-bit mode: 16-bit greyscale scaled to 0-255 rather than clipped.

    PIL's `convert('L')` clips 16-bit values at 255, which turns a 16-bit PNG
    almost all white. 16-bit greyscale opens as 'I;16*' (or 'I' in older
    Pillows): its 0-65535 range is divided by 257. 16-bit RGB PNGs already
    open as 8-bit 'RGB' (PIL keeps the high byte of each sample).
    """
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.asarray(img, dtype=np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UnreadableImage(f"mode {img.mode!r} with values outside 0-65535: not an 8- or 16-bit image")
        return Image.fromarray(np.round(pixels / 257.0).astype(np.uint8))
    if img.mode == "F":
        raise UnreadableImage("floating-point pixels (mode 'F') have no 8-bit meaning")
    return img


def read_image(path: str, channels: int) -> np.ndarray:
    """(H, W, channels) uint8 pixels of an image file; UnreadableImage when it cannot be decoded."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            img.load()  # decoding is lazy: make a truncated file fail here, inside the try
            image = np.asarray(eight_bit(img).convert(mode))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL reports a damaged file as any of these, naming no file.
        raise UnreadableImage(str(e) or type(e).__name__) from e
    return image.reshape(image.shape[:2] + (channels,))


class ImageFolderSource:
    """`root/<split>/<class>/<image>` (or `root/<class>/<image>` for the train split).

    Labels are positions in one class list for every split: the training
    split's sorted class folders (hidden ones ignored). A split with a class
    the training split lacks is refused. Files are listed once, sorted, so
    every process sees the same order.

    An unreadable image raises a UserError naming it (bad_images='error'), or
    (bad_images='skip') is replaced by the next readable example, with one
    warning per file: a substitute that depends only on the folder keeps every
    batch a pure function of (seed, batch index), so resume stays exact.
    """

    def __init__(
        self,
        root: str | None,
        split: str,
        channels: int = 3,
        *,
        train_split: str = "train",
        bad_images: str = "error",
        check_images: bool = False,
    ):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ConfigError("dataset.bad_images", bad_images, f"one of {list(BAD_IMAGE_POLICIES)}")
        train_folder = split_folder(root, train_split, train_split)
        self.classes = class_names(train_folder)
        folder = split_folder(root, split, train_split)
        split_classes = class_names(folder)
        check_split_classes(folder, split_classes, self.classes)
        label_of = {c: i for i, c in enumerate(self.classes)}
        self.files = [
            (os.path.join(folder, c, f), label_of[c])
            for c in split_classes
            for f in image_files(os.path.join(folder, c))
        ]
        if not self.files:
            raise ConfigError("dataset.manual_dir", root, f"needs images under {folder}/<class>/")
        self.folder = folder
        self.num_classes = len(self.classes)
        self.channels = channels
        self.bad_images = bad_images
        self._unreadable: dict = {}  # path -> reason, each warned about once
        self._lock = threading.Lock()
        if check_images:
            self.check_all()

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):  # a loader's worker process gets its own lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _note_unreadable(self, path: str, reason: str) -> None:
        with self._lock:
            first_time = path not in self._unreadable
            self._unreadable[path] = reason
        if first_time:
            logging.warning(
                "skipping unreadable image %s (%s): using the next readable one instead", path, reason
            )

    def _read(self, index: int) -> dict:
        path, label = self.files[index]
        return {"image": read_image(path, self.channels), "label": label}

    def read_or_substitute(self, index: int) -> dict:
        """Example `index`, or under bad_images='skip' the next readable one (wrapping around)."""
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            path = self.files[i][0]
            if path in self._unreadable:
                continue
            try:
                return self._read(i)
            except UnreadableImage as e:
                if self.bad_images == "error":
                    raise UserError(
                        f"cannot read image {path}: {e}; remove or replace it, or set "
                        "config.dataset.bad_images='skip' to use the next readable image in its place"
                    ) from None
                self._note_unreadable(path, str(e))
        raise UserError(f"none of the {len(self.files)} images under {self.folder} can be read")

    def __getitems__(self, indices) -> list:
        return [self.read_or_substitute(int(i)) for i in indices]

    def check_all(self) -> None:
        """Open every image now; refuse naming the unreadable ones (bad_images='error') or warn."""
        bad = []
        for path, _ in self.files:
            try:
                read_image(path, self.channels)
            except UnreadableImage as e:
                bad.append(f"{path} ({e})")
                if self.bad_images == "skip":
                    self._note_unreadable(path, str(e))
        if bad and self.bad_images == "error":
            named = "; ".join(bad[:MAX_NAMED_FILES])
            more = f" and {len(bad) - MAX_NAMED_FILES} more" if len(bad) > MAX_NAMED_FILES else ""
            raise UserError(
                f"{len(bad)} of {len(self.files)} images cannot be read: {named}{more}; "
                "remove or replace them, or set config.dataset.bad_images='skip'"
            )


def get_source(dataset_config, split: str, channels: int = 3):
    if dataset_config.name == "image_folder":
        return ImageFolderSource(
            dataset_config.manual_dir,
            split,
            channels,
            train_split=dataset_config.train_split,
            bad_images=dataset_config.get("bad_images", "error"),
            check_images=bool(dataset_config.get("check_images", False)),
        )
    return TfdsSource(dataset_config, split)


def normalization(dataset_config, channels: int):
    """(mean, std) per channel: the dataset's entry in NORMALIZATION, else ImageNet's."""
    mean, std = NORMALIZATION.get(dataset_config.name, NORMALIZATION["imagenet2012"])
    if len(mean) != channels:
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
