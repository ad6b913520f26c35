"""maejax: Masked Autoencoders (MAE) and DiffMAE in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
    "tensorboard",  # TensorBoard event files (tensorflow-cpu no longer pulls it in)
    "ml-collections>=1.1.0,<1.2",
    "einops>=0.8.2,<0.9",
    "absl-py",
    "numpy",
    "pillow",
]

setup(
    name="maejax",
    version="0.1.0",
    description="Masked Autoencoders (MAE) and DiffMAE in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["maejax", "maejax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "torch": ["torch==2.13.0"],
        "test": [
            "pytest",
            "ruff",
            "torch==2.13.0",
            "transformers>=5,<6",
            "matplotlib",
        ],
    },
)
