"""maejax: Masked Autoencoders (MAE) and DiffMAE in JAX/Flax."""

__version__ = "0.1.0"
