"""Vision Transformer building blocks shared by MAE, DiffMAE and the classifier.

Everything here follows the official MAE code (timm ViT blocks) exactly:
pre-norm blocks, LayerNorm eps 1e-6, a fused qkv projection with bias, exact
(erf) GELU, xavier-uniform Linear weights with zero biases, and fixed 2-D
sin-cos position tables in the official channel layout.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maejax.models.attention import attention, self_attention

# (width, depth, num_heads, mlp_dim). 'mu' is a tiny size for tests.
VARIANTS = {
    "mu": (32, 1, 2, 128),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
_VARIANT_RE = re.compile(r"^(?P<size>[A-Za-z]+)(/(?P<patch>\d+))?$")

LAYER_NORM_EPS = 1e-6
# Official MAE (timm) initialisation: xavier-uniform Linear weights, zero biases.
xavier_uniform = nn.initializers.xavier_uniform()
# The patch-embedding kernel (p, p, C, D) is initialised like a Linear on its
# flattened (p*p*C, D) view, as the official code does for its conv weight.
patch_embed_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Sizes of a ViT encoder (or of a decoder stack, where patch_size is unused)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16


def decode_variant(variant: str) -> dict:
    """'B/16' -> {'width': 768, 'depth': 12, 'num_heads': 12, 'mlp_dim': 3072, 'patch_size': 16}.

    The patch part is optional ('B' gives no 'patch_size' key). Raises
    ValueError for an unknown size name or a malformed string.
    """
    match = _VARIANT_RE.match(variant or "")
    if not match or match.group("size") not in VARIANTS:
        raise ValueError(
            f"unknown ViT variant {variant!r}; valid: one of {sorted(VARIANTS)} "
            "optionally followed by '/<patch size>', e.g. 'B/16'"
        )
    width, depth, heads, mlp = VARIANTS[match.group("size")]
    out = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp)
    if match.group("patch"):
        out["patch_size"] = int(match.group("patch"))
    return out


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) table laid out as [sin | cos], float64."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(grid_size: int, dim: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position table in the official MAE layout, float32.

    Patches are numbered row-major. The official code builds its grid with
    meshgrid(w, h), so the *column* coordinate fills the first half of the
    channels and the *row* coordinate the second half; pretrained checkpoints
    depend on this. With `cls_token` a zero row is prepended.

    Returns:
      (grid_size**2 [+ 1], dim) float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position tables need a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)


def dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, kernel_init=xavier_uniform, dtype=dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with torch's numerics; params `scale` and `bias` as flax's.

    Two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form
    loses digits that parity with the official model needs), written out:
    flax's own two-pass path costs a ViT-B step about 10% more on CPU.
    Statistics and the affine part run in float32 (at least); the result is
    cast to `dtype` (None: float32, as flax infers from float32 params).
    """

    epsilon: float = LAYER_NORM_EPS
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype or jnp.result_type(y, scale))


def layer_norm(name: str, dtype: Any = None) -> LayerNorm:
    return LayerNorm(LAYER_NORM_EPS, dtype, name=name)


def materialize(x):
    """x, computed once in memory on CPU: an identity that XLA cannot fuse through.

    XLA CPU fuses elementwise chains into every consumer, however long. Along a
    transformer's residual stream (x + attn(norm(x)) + mlp(norm(...)) ...) that
    recomputes the whole sum and every LayerNorm before it, forward and
    backward, in each block's fusions: time quadratic in depth, a fifth of a
    ViT-B MAE step on this CPU. `lax.optimization_barrier` does not stop it
    (XLA CPU expands barriers before fusing); a conditional does, and its
    gradient passes through a conditional too. Both branches return x
    unchanged. Elsewhere (GPU, TPU) x is returned as is: their fusion passes
    weigh duplication, and a conditional there costs a device-host round trip.
    """
    if jax.default_backend() != "cpu":
        return x
    first = x.reshape(-1)[0]
    # A predicate XLA cannot fold (false only for a NaN), so the conditional stays.
    return jax.lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


class SelfAttention(nn.Module):
    """timm-style attention: one fused qkv Linear (weight rows [q | k | v]), then proj.

    `attention_impl` here and in every module below: None (XLA) or 'cudnn'
    (cuDNN flash attention, padded to lengths it accepts; `attention.attention`).
    """

    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = dense(3 * width, "qkv", self.dtype)(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        out = self_attention(qkv, self.attention_impl)
        return dense(width, "proj", self.dtype)(out.reshape(batch, length, width))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a context sequence (fused kv Linear)."""

    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, context):
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        q = dense(width, "q", self.dtype)(x).reshape(batch, length, self.num_heads, head_dim)
        kv = dense(2 * width, "kv", self.dtype)(context)
        kv = kv.reshape(batch, context.shape[1], 2, self.num_heads, head_dim)
        out = attention(q, kv[:, :, 0], kv[:, :, 1], self.attention_impl)
        return dense(width, "proj", self.dtype)(out.reshape(batch, length, width))


def gelu(x):
    """Exact GELU as PyTorch writes it, x * (1 + erf(x / sqrt(2))) / 2.

    `nn.gelu(approximate=False)` computes the same function through erfc,
    whose float32 expansion on XLA CPU costs about three times erf's (a ViT-B
    MAE step spent 4 % of its time in it).
    """
    return x * (1 + jax.lax.erf(x * 0.5**0.5)) / 2


class Mlp(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = dense(self.mlp_dim, "fc1", self.dtype)(x)
        y = gelu(y)
        return dense(x.shape[-1], "fc2", self.dtype)(y)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per example (timm semantics)."""

    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        drop = DropPath(self.drop_path, self.deterministic)
        x = materialize(x)
        y = layer_norm("norm1", self.dtype)(x)
        y = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(y)
        x = x + drop(y)
        x = materialize(x)
        y = layer_norm("norm2", self.dtype)(x)
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(y)
        return x + drop(y)


# How a (B, 1 + L, D) token sequence becomes one feature: the classifier's `model.pool` and the
# pre-training kNN monitor's `knn.pool` both choose from this list.
POOLS = ("avg", "cls")


def pool_tokens(tokens, pool: str):
    """(B, 1 + L, D) -> (B, D): the cls token ('cls') or the mean of the patch tokens ('avg').

    Raises:
      ValueError: `pool` is not one of POOLS (an unknown name must not fall back to averaging).
    """
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(axis=1)
    raise ValueError(f"unknown pool {pool!r}; valid: {POOLS}")


def block_class(remat: bool):
    """Block, or Block with its activations recomputed in the backward pass."""
    return nn.remat(Block) if remat else Block


class PatchEmbed(nn.Module):
    """Linear projection of non-overlapping p x p patches (the official stride-p conv).

    The kernel is stored as (p, p, C, D) (a conv kernel in HWIO order) and
    applied as one matmul on patchified pixels, whose (row, column, channel)
    order matches it.
    """

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches):
        """(B, L, p*p*C) patches -> (B, L, D) tokens."""
        p, dim = self.patch_size, patches.shape[-1]
        kernel = self.param("kernel", patch_embed_init, (p, p, dim // (p * p), self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        return patches.astype(self.dtype) @ kernel.reshape(dim, self.width) + bias


class Encoder(nn.Module):
    """The MAE encoder: patch embedding, fixed positions, visible tokens only, cls first.

    Attributes:
      spec: encoder sizes.
      image_size: side of the square input image.
      drop_path: the last block's stochastic-depth rate (linear from 0, as timm).
      learned_pos: keep the position table as a trainable `pos_embed` param,
        initialised to the sin-cos table (official fine-tuning does this).
      final_norm: end with LayerNorm `norm` (off for the average-pooling
        classifier, which normalises the pooled feature instead).
      attention_impl: None (XLA) or 'cudnn' (cuDNN flash attention, the
        sequence padded to a length it accepts; `attention.attention`).
    """

    spec: ViTSpec
    image_size: int
    drop_path: float = 0.0
    learned_pos: bool = False
    final_norm: bool = True
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.spec.patch_size

    def position_table(self):
        """(1, 1 + L, D): the fixed sin-cos table or the trainable `pos_embed`."""
        table = sincos_2d(self.grid_size, self.spec.width, cls_token=True)[None]
        if self.learned_pos:
            return self.param("pos_embed", lambda *_: jnp.asarray(table))
        return jnp.asarray(table)

    @nn.compact
    def __call__(self, patches, ids_keep=None, train: bool = False, return_blocks: bool = False):
        """Encode the visible patches.

        Args:
          patches: (B, L, p*p*C) patchified pixels.
          ids_keep: optional (B, Lk) int indices of the visible patches; all
            patches are encoded when None.
          train: enables drop path (the "dropout" rng).
          return_blocks: also return every block's output.

        Returns:
          (B, 1 + Lk, D) normalised tokens, cls first; with `return_blocks`, a
          tuple (tokens, [depth x (B, 1 + Lk, D)]).
        """
        spec = self.spec
        pos = self.position_table()
        x = PatchEmbed(spec.patch_size, spec.width, self.dtype, name="patch_embed")(patches)
        x = x + pos[:, 1:].astype(x.dtype)
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
        cls = self.param("cls_token", token_init, (1, 1, spec.width))
        cls = (cls + pos[:, :1]).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, spec.width)), x], axis=1)

        block = block_class(self.remat)
        rates = np.linspace(0.0, self.drop_path, spec.depth)  # timm: 0 at the first block
        outputs = []
        for i in range(spec.depth):
            x = block(
                spec.num_heads,
                spec.mlp_dim,
                float(rates[i]),
                not train,
                self.dtype,
                self.attention_impl,
                name=f"blocks_{i}",
            )(x)
            outputs.append(x)
        if self.final_norm:
            x = layer_norm("norm", self.dtype)(x)
        return (x, outputs) if return_blocks else x
