"""Multi-head attention through `jax.nn.dot_product_attention`, and cuDNN at ViT lengths.

`model.attention_impl='xla'` (the default, `implementation=None` here) calls
the kernel as it is. `'cudnn'` selects cuDNN flash attention, which cannot
take the odd lengths ViTs have (197 = 1 + 14^2 tokens, the MAE encoder's 50
visible ones): jax refuses any odd query or key/value length in training
with `NotImplementedError: Unsupported sequence length Q 197, KV 197`. Its
check (`jax/_src/cudnn/fused_attention_stablehlo.py`, `check_is_flash_attention`)
is meant for calls with a bias, but the training rule always sees one, the
empty placeholder that stands for "no bias". So on the cuDNN path
`padded_attention` pads queries, keys and values along the sequence to a
multiple of CUDNN_SEQ_MULTIPLE, has the kernel ignore the padding through
its own sequence-length arguments (no mask or bias tensor), and drops the
padded queries from the output.
"""

import jax
import jax.numpy as jnp

# Pad sequences to a multiple of this on the cuDNN path. jax needs only even lengths; 64 also
# divides flash attention's tiles (64 or 128 rows), so the padding adds no tile the kernel would
# not compute anyway, and it stays clear of older cuDNN releases' multiple-of-64 rules.
CUDNN_SEQ_MULTIPLE = 64
# The kernel's own function: tests replace it to run the padded path on CPU, where only XLA exists.
_dot_product_attention = jax.nn.dot_product_attention


def padded_length(length: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `length`."""
    return -(-length // multiple) * multiple


def _pad_sequence(x, length: int):
    """(B, T, H, d) -> (B, length, H, d), zeros after the T real positions."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def padded_attention(q, k, v, implementation: str | None = "cudnn", multiple: int = CUDNN_SEQ_MULTIPLE):
    """Attention with both sequences padded to a multiple of `multiple`; the padding ignored.

    The padded keys are excluded and the padded queries dropped, so the result
    equals unpadded attention for any implementation (the tests check it
    through XLA on CPU); cuDNN needs it for lengths it refuses.

    Args:
      q: (B, T, H, d) queries.
      k: (B, S, H, d) keys.
      v: (B, S, H, d) values.
      implementation: passed on to `jax.nn.dot_product_attention` ('cudnn',
        'xla' or None).
      multiple: pad T and S up to a multiple of this.

    Returns:
      (B, T, H, d), as `jax.nn.dot_product_attention(q, k, v)`.
    """
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    q_padded, kv_padded = padded_length(q_len, multiple), padded_length(kv_len, multiple)
    if (q_padded, kv_padded) == (q_len, kv_len):
        return _dot_product_attention(q, k, v, implementation=implementation)
    out = _dot_product_attention(
        _pad_sequence(q, q_padded),
        _pad_sequence(k, kv_padded),
        _pad_sequence(v, kv_padded),
        query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32),
        implementation=implementation,
    )
    return out[:, :q_len]


def attention(q, k, v, implementation: str | None = None):
    """Multi-head attention on (B, T, H, d) queries and (B, S, H, d) keys/values -> (B, T, H, d).

    Args:
      implementation: None lets XLA compute it (the default, the only choice on
        CPU; the PyTorch parity tests run this path, unchanged); 'cudnn' runs
        cuDNN flash attention on NVIDIA GPUs through `padded_attention`, so
        any sequence length works. cuDNN computes in bfloat16 or float16 only
        (a float32 model raises jax's NotImplementedError).
    """
    if implementation == "cudnn":
        return padded_attention(q, k, v, "cudnn")
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
