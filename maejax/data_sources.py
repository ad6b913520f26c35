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

import os
import urllib.parse

import numpy as np

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
    """A prepared tfds builder in array_record format (prepares it on first use)."""
    import tensorflow_datasets as tfds

    name, data_dir, manual_dir = dataset_config.name, dataset_config.data_dir, dataset_config.manual_dir
    kwargs = {"data_dir": data_dir, "file_format": "array_record"}
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
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
    if not builder.is_prepared():
        builder = _prepare_once(builder, download_config, lambda: tfds_builder(dataset_config))
    return builder


def _prepare_once(builder, download_config, rebuild):
    """Build the dataset on process 0 while the others wait, then open what it wrote.

    Every process preparing into a shared data_dir at once would race; where
    data_dir is local to each host, the others build their own copy after.
    """
    import jax

    def prepare(b):
        b.download_and_prepare(file_format="array_record", download_config=download_config)

    if jax.process_index() == 0:
        prepare(builder)
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


class ImageFolderSource:
    """`root/<split>/<class>/<image>` (or `root/<class>/<image>` for the train split).

    Labels are the sorted class-folder names' positions; files are listed
    once, sorted, so every process sees the same order.
    """

    def __init__(self, root: str | None, split: str, channels: int = 3):
        if not root or not os.path.isdir(root):
            raise ConfigError("dataset.manual_dir", root, "an existing folder of <class>/<image> sub-folders")
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            if split != "train":
                raise ConfigError("dataset split", split, f"a sub-folder of {root}")
            folder = root
        self.classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        self.files = [
            (os.path.join(folder, c, f), label)
            for label, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(folder, c)))
            if f.endswith(IMAGE_EXTENSIONS)
        ]
        if not self.files:
            raise ConfigError("dataset.manual_dir", root, f"needs images under {folder}/<class>/")
        self.num_classes = len(self.classes)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices) -> list:
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        out = []
        for i in indices:
            path, label = self.files[i]
            with Image.open(path) as img:
                image = np.asarray(img.convert(mode))
            out.append({"image": image.reshape(image.shape[:2] + (self.channels,)), "label": label})
        return out


def get_source(dataset_config, split: str, channels: int = 3):
    if dataset_config.name == "image_folder":
        return ImageFolderSource(dataset_config.manual_dir, split, channels)
    return TfdsSource(dataset_config, split)


def normalization(dataset_config, channels: int):
    """(mean, std) per channel: the dataset's entry in NORMALIZATION, else ImageNet's."""
    mean, std = NORMALIZATION.get(dataset_config.name, NORMALIZATION["imagenet2012"])
    if len(mean) != channels:
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
