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


def _probs_and_output(q, k, v):
    """Heads-major (B, H, T, d) attention: float32 softmax probabilities and the output."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v)


def _gradients(q, k, v, probs, d_out):
    """(dq, dk, dv), heads-major, with the softmax's gradient written out.

    d_logits = P * (dP - rowsum(P * dP)): autodiff of the forward reaches the
    same numbers with twice the work on XLA CPU.
    """
    scale = q.shape[-1] ** -0.5
    d_v = jnp.einsum("bhts,bhtd->bhsd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bhtd,bhsd->bhts", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * scale
    d_q = jnp.einsum("bhts,bhsd->bhtd", d_logits.astype(k.dtype), k)
    d_k = jnp.einsum("bhts,bhtd->bhsd", d_logits.astype(q.dtype), q)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _heads_major(x):
    """(B, T, H, d) <-> (B, H, T, d)."""
    return x.transpose(0, 2, 1, 3)


@jax.custom_vjp
def _attention(q, k, v):
    return _heads_major(_probs_and_output(*map(_heads_major, (q, k, v)))[1])


def _attention_forward(q, k, v):
    q, k, v = map(_heads_major, (q, k, v))
    probs, out = _probs_and_output(q, k, v)
    return _heads_major(out), (q, k, v, probs)


def _attention_backward(residuals, d_out):
    return tuple(map(_heads_major, _gradients(*residuals, _heads_major(d_out))))


_attention.defvjp(_attention_forward, _attention_backward)


@jax.custom_vjp
def _packed_attention(qkv):
    return _heads_major(_probs_and_output(*qkv.transpose(2, 0, 3, 1, 4))[1])


def _packed_attention_forward(qkv):
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    probs, out = _probs_and_output(q, k, v)
    return _heads_major(out), (q, k, v, probs)


def _packed_attention_backward(residuals, d_out):
    # One array in the packed layout: the gradients of three slices would be three padded
    # copies summed, each a pass over the whole qkv gradient.
    return (jnp.stack(_gradients(*residuals, _heads_major(d_out))).transpose(1, 3, 0, 2, 4),)


_packed_attention.defvjp(_packed_attention_forward, _packed_attention_backward)


def _on_cpu(implementation: str | None) -> bool:
    """Whether XLA CPU computes this attention: there the backward pass is written out.

    XLA CPU runs the autodiff backward of `jax.nn.dot_product_attention` (its
    batch-heads-last einsums and softmax rule) at half the speed of the same
    gradient written out over heads-major arrays: on a ViT-B MAE decoder block
    (B=8, 197 tokens, 16 heads of 32) 71 against 35-48 ms forward and backward.
    The numbers equal the library's to float32 rounding
    (tests/test_attention.py). GPUs and TPUs keep the library's path.
    """
    return implementation is None and jax.default_backend() == "cpu"


def attention(q, k, v, implementation: str | None = None):
    """Multi-head attention on (B, T, H, d) queries and (B, S, H, d) keys/values -> (B, T, H, d).

    Args:
      implementation: None lets XLA compute it (the default, the only choice on
        CPU, where the backward pass is written out (`_on_cpu`); the PyTorch
        parity tests run this path); 'cudnn' runs cuDNN flash attention on NVIDIA GPUs through
        `padded_attention`, so any sequence length works. cuDNN computes in
        bfloat16 or float16 only (a float32 model raises jax's
        NotImplementedError).
    """
    if implementation == "cudnn":
        return padded_attention(q, k, v, "cudnn")
    if _on_cpu(implementation):
        return _attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def self_attention(qkv, implementation: str | None = None):
    """`attention` on queries, keys and values packed as (B, T, 3, H, d) -> (B, T, H, d)."""
    if _on_cpu(implementation):
        return _packed_attention(qkv)
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation)
