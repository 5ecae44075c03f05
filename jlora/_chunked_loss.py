"""A memory-bounded LM loss: the head and cross-entropy over chunks of the tokens that count.

The full-logit path forms ``logits [B, T, V]`` in float32 (4 × 1,024 tokens of a 262,144-token
vocabulary are 4 GiB, and their gradient as much again). These functions take the hidden
states before the head instead, and the head's weight: a kernel ``[H, V]`` or, for tied
embeddings, the embedding table ``[V, H]``. Positions whose label is masked (prompt tokens,
padding) are dropped before the head: the valid positions are moved to the front (a stable
sort of the mask), cut into chunks of ``chunk_size`` tokens, and only chunks holding a valid
token are computed, so at most one ``[chunk_size, V]`` block of logits is live, forward and
backward (:mod:`jlora._chunked_head`). The results are scattered back to ``[B, T]``, 0 where
masked. Values and gradients equal the full-logit path's (``Decoder`` then
:func:`jlora.models.decoder.causal_lm_loss`, :func:`jlora.sequence_logps`,
:func:`jlora.token_logps`) to float32 rounding, and the head may be adapted under
:func:`jlora.lora`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jlora._chunked_head import HeadOptions, head_stats

#: :func:`auto_chunk_size` aims at about this many logits (float32) per chunk: 256 MiB.
CHUNK_LOGITS = 1 << 26
_MIN_CHUNK, _MAX_CHUNK = 64, 4096


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: a power of two near ``CHUNK_LOGITS / vocab_size``.

    Clipped to ``[64, 4096]``, so a chunk's logits stay about 256 MiB in float32 while its
    matmul stays large enough to run at full speed.

    Example:
      >>> auto_chunk_size(262144), auto_chunk_size(49152), auto_chunk_size(32000)
      (256, 1024, 2048)
    """
    size = _MIN_CHUNK
    while size * 2 * vocab_size <= CHUNK_LOGITS and size < _MAX_CHUNK:
        size *= 2
    return size


def _check(
    hidden: Any, head: Any, targets: Any, mask: Any, tied: bool, chunk_size: Any, where: str
) -> int:
    """Validates shapes and options on entry; returns the vocabulary size."""
    shape = tuple(jnp.shape(hidden))
    if len(shape) != 3:
        raise ValueError(f"{where}: hidden must be [batch, seq, hidden]; got shape {shape}")
    head_shape = tuple(jnp.shape(head))
    features = head_shape[1 if tied else 0] if len(head_shape) == 2 else None
    if features != shape[2]:
        form = "an embedding table [vocab, hidden]" if tied else "a kernel [hidden, vocab]"
        raise ValueError(
            f"{where}: head must be {form} with hidden = {shape[2]} like hidden's last axis; "
            f"got shape {head_shape} (tied={tied}: pass tied={not tied} if it is the other form)"
        )
    for name, value in (("targets", targets), ("mask", mask)):
        if value is not None and tuple(jnp.shape(value)) != shape[:2]:
            raise ValueError(
                f"{where}: {name} must be [batch, seq] = {shape[:2]} like hidden; got shape "
                f"{tuple(jnp.shape(value))}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{where}: chunk_size must be a positive int (tokens per chunk) or None for "
            f"auto_chunk_size(vocab); got {chunk_size!r}"
        )
    return int(head_shape[0 if tied else 1])


def _per_token(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None,
    chunk_size: int | None,
    options: HeadOptions,
    where: str,
) -> tuple[jax.Array, ...]:
    """Per-token results ``[B, T]`` (0 where masked): the compaction around the chunked head."""
    vocab = _check(hidden, head, targets, mask, options.tied, chunk_size, where)
    if not (isinstance(options.temperature, int | float) and options.temperature > 0):
        raise ValueError(f"{where}: temperature must be a number > 0; got {options.temperature!r}")
    hidden, head = jnp.asarray(hidden), jnp.asarray(head)
    if options.dtype is None:  # flax's promotion of input and weight
        options = options._replace(dtype=jnp.result_type(hidden, head))
    b, t, h = hidden.shape
    n = b * t
    x = hidden.reshape(n, h)
    valid = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool).reshape(n)
    y = jnp.where(valid, jnp.asarray(targets, jnp.int32).reshape(n), 0)
    order = None
    if mask is not None:  # the valid positions first, in their order
        order = jnp.argsort(~valid, stable=True)
        x, y = x[order], y[order]
    c = min(chunk_size or auto_chunk_size(vocab), n)
    k = -(-n // c)
    xs = jnp.pad(x, ((0, k * c - n), (0, 0))).reshape(k, c, h)
    ys = jnp.pad(y, (0, k * c - n)).reshape(k, c)
    outs = head_stats(head, xs, ys, jnp.sum(valid, dtype=jnp.int32), options)
    flat = [o.reshape(k * c)[:n] for o in outs]
    if order is not None:
        back = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        flat = [f[back] for f in flat]
    return tuple(jnp.where(valid, f, 0.0).reshape(b, t) for f in flat)


def chunked_token_logps(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    tied: bool = False,
    softcap: float | None = None,
    temperature: float = 1.0,
    dtype: Any = None,
) -> jax.Array:
    """Each target token's log-probability under the head, computed in chunks of tokens.

    ``log_softmax(z)[targets[b, t]]`` with ``z = softcap(hidden[b, t] @ head) / temperature``
    (``head.T`` when ``tied``), ``softcap(l) = cap·tanh(l / cap)``: what :func:`jlora.token_logps`
    gives on a decoder's logits, without forming them. Positions where ``mask`` is false are
    never sent through the head and give 0.

    Args:
      hidden: ``[B, T, H]`` the final-normed hidden states (``Decoder(..., return_hidden=True)``).
      head: the kernel ``[H, V]``, or with ``tied=True`` the embedding table ``[V, H]``.
      targets: int ``[B, T]``; ``hidden[b, t]`` predicts ``targets[b, t]``.
      mask: bool ``[B, T]``, the positions that count; ``None`` for all.
      chunk_size: tokens per chunk (at most one ``[chunk_size, V]`` block of logits is live);
        ``None`` for :func:`auto_chunk_size`.
      tied: ``head`` is an embedding table ``[V, H]``.
      softcap: the final logit soft-capping (Gemma 2), or ``None``.
      temperature: logits are divided by it after the soft cap (GRPO's sampling temperature).
      dtype: the matmul's dtype (the model's compute dtype); logits are float32 after it.
        ``None`` for the promotion of ``hidden`` and ``head``.

    Returns:
      ``[B, T]`` float32, 0 where ``mask`` is false.

    Raises:
      ValueError: for ``hidden`` not 3-D, a head whose hidden axis does not match (or of the
        other form than ``tied`` says), ``targets``/``mask`` not ``[B, T]``, a ``chunk_size``
        that is not a positive int, or ``temperature <= 0``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> hidden, kernel = jnp.ones((1, 3, 2)), jnp.zeros((2, 4))  # uniform over 4 tokens
      >>> mask = jnp.array([[False, True, True]])
      >>> jlora.chunked_token_logps(hidden, kernel, jnp.zeros((1, 3), jnp.int32), mask).round(4)
      Array([[ 0.    , -1.3863, -1.3863]], dtype=float32)
    """
    options = HeadOptions(tied, softcap, temperature, dtype, False)
    return _per_token(hidden, head, targets, mask, chunk_size, options, "chunked_token_logps")[0]


def chunked_logps_and_entropy(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    tied: bool = False,
    softcap: float | None = None,
    temperature: float = 1.0,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`chunked_token_logps` and each position's entropy ``-Σ p·log p``, in one pass.

    The entropy (of ``softmax(z)``, as GRPO logs it) carries no gradient. Arguments, errors
    and masking as :func:`chunked_token_logps`.

    Returns:
      ``(logps, entropy)``, each ``[B, T]`` float32 and 0 where ``mask`` is false.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> logps, entropy = jlora.chunked_logps_and_entropy(
      ...     jnp.ones((1, 2, 2)), jnp.zeros((2, 4)), jnp.zeros((1, 2), jnp.int32))
      >>> entropy.round(4)  # log 4
      Array([[1.3863, 1.3863]], dtype=float32)
    """
    options = HeadOptions(tied, softcap, temperature, dtype, True)
    where = "chunked_logps_and_entropy"
    logps, entropy = _per_token(hidden, head, targets, mask, chunk_size, options, where)
    return logps, entropy


def chunked_cross_entropy(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    tied: bool = False,
    softcap: float | None = None,
    dtype: Any = None,
) -> jax.Array:
    """Mean next-token cross-entropy over the positions ``mask`` marks, in chunks of tokens.

    ``-Σ mask·logp / max(Σ mask, 1)`` with ``logp`` from :func:`chunked_token_logps`: equal to
    :func:`jlora.models.decoder.causal_lm_loss` on the decoder's logits (the mean over every
    token with no mask; 0 for a mask with no true entry). Arguments and errors as
    :func:`chunked_token_logps`.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> loss = jlora.chunked_cross_entropy(
      ...     jnp.ones((1, 2, 2)), jnp.zeros((2, 4)), jnp.zeros((1, 2), jnp.int32))
      >>> round(float(loss), 4)
      1.3863
    """
    options = HeadOptions(tied, softcap, 1.0, dtype, False)
    logps = _per_token(hidden, head, targets, mask, chunk_size, options, "chunked_cross_entropy")
    if mask is None:
        return -jnp.mean(logps[0])
    count = jnp.maximum(jnp.sum(jnp.asarray(mask, jnp.float32)), 1.0)
    return -jnp.sum(logps[0]) / count
