"""A :class:`~jlora.models.decoder.Decoder`'s head, run in chunks or as full logits.

The objectives score a decoder's target tokens through :func:`decoder_scores`: the
final-normed hidden states (``Decoder(..., return_hidden=True)``) and the head's weight
(:func:`decoder_head`: ``lm_head/kernel``, or the embedding table when tied) go through
:func:`jlora.chunked_token_logps`, so no ``[tokens, vocab]`` logits exist; ``chunk_size=0``
takes the full-logit path instead (the decoder's logits, then ``log_softmax``), which the
chunked one equals to float32 rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from jlora._chunked_loss import chunked_logps_and_entropy, chunked_token_logps
from jlora.models.decoder import Decoder, DecoderConfig


def decoder_head(params: Any, config: DecoderConfig) -> tuple[jax.Array, dict[str, Any]]:
    """The head's weight and the keywords :func:`jlora.chunked_token_logps` needs for it.

    ``lm_head/kernel`` ``[H, V]``, or ``model/embed_tokens/embedding`` ``[V, H]`` with
    ``tied=True`` when the config ties them; the keywords also carry the final logit soft cap
    and the compute dtype, so ``chunked_token_logps(hidden, weight, targets, **keywords)``
    equals ``log_softmax`` of the decoder's logits.

    Args:
      params: the decoder's ``"params"`` collection (adapted or not; under :func:`jlora.lora`
        the head may be adapted).
      config: its config.

    Returns:
      ``(weight, {"tied": ..., "softcap": ..., "dtype": ...})``.

    Example:
      >>> c = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
      >>> params = {"model": {"embed_tokens": {"embedding": jnp.zeros((50, 16))}}}
      >>> weight, kw = decoder_head(params, c)
      >>> weight.shape, kw["tied"]
      ((50, 16), True)
    """
    keywords = {
        "tied": config.tie_word_embeddings,
        "softcap": config.final_logit_softcapping,
        "dtype": config.dtype,
    }
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"], keywords
    return params["lm_head"]["kernel"], keywords


class DecoderScores(NamedTuple):
    """What :func:`decoder_scores` returns (a pytree)."""

    #: ``[B, T]`` float32: each target token's log-probability, 0 where the mask is false.
    logps: jax.Array
    #: ``[B, T]`` float32 entropies (no gradient) when asked for, else ``None``.
    entropy: jax.Array | None
    #: the ``"intermediates"`` collection (a mixture's router logits) when asked for, else
    #: ``None``.
    intermediates: Any


def decoder_scores(
    model: Decoder,
    params: Any,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    intermediates: bool = False,
) -> DecoderScores:
    """A decoder's log-probability of each target token where ``mask`` is true.

    ``log_softmax(logits[b, t] / temperature)[targets[b, t]]``, computed through the chunked
    head (:func:`jlora.chunked_token_logps`, ``chunk_size`` tokens per chunk, ``None`` for
    :func:`jlora.auto_chunk_size`), or from the full logits with ``chunk_size=0``.

    Args:
      model: the decoder.
      params: its ``"params"`` collection.
      tokens: int ``[B, T]``.
      targets: int ``[B, T]``, the token after each of ``tokens``.
      mask: bool ``[B, T]``, the targets that count.
      positions: ``[B, T]`` rotary positions, or ``None``.
      segment_ids: ``[B, T]`` packed segments, or ``None``.
      chunk_size: tokens per chunk; 0 for the full-logit path.
      temperature: logits are divided by it (GRPO).
      entropy: also give each position's entropy ``-Σ p·log p`` (without gradient).
      intermediates: also give the ``"intermediates"`` collection (``mutable``).

    Returns:
      :class:`DecoderScores`.

    Example:
      >>> c = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
      ...                   num_hidden_layers=1, num_attention_heads=2)
      >>> tokens = jnp.zeros((1, 4), jnp.int32)
      >>> params = Decoder(c).init(jax.random.key(0), tokens)["params"]
      >>> mask = jnp.array([[False, True, True, True]])
      >>> chunked = decoder_scores(Decoder(c), params, tokens, tokens, mask, chunk_size=2)
      >>> full = decoder_scores(Decoder(c), params, tokens, tokens, mask, chunk_size=0)
      >>> bool(jnp.allclose(chunked.logps, full.logps, atol=1e-6)), float(chunked.logps[0, 0])
      (True, 0.0)
    """
    kw: dict[str, Any] = {"segment_ids": segment_ids, "return_hidden": chunk_size != 0}
    if intermediates:
        kw["mutable"] = ["intermediates"]
    out = model.apply({"params": params}, tokens, positions, **kw)
    applied = cast(tuple[jax.Array, Any], out) if intermediates else (cast(jax.Array, out), None)
    out, state = applied
    state = None if state is None else state.get("intermediates", {})
    mask = jnp.asarray(mask, bool)
    if chunk_size == 0:
        logits = jnp.asarray(out, jnp.float32) / temperature
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)
        logps = jnp.where(mask, picked[..., 0], 0.0)
        ent = None
        if entropy:
            held = jax.lax.stop_gradient(logp)
            ent = jnp.where(mask, -jnp.sum(jnp.exp(held) * held, axis=-1), 0.0)
        return DecoderScores(logps, ent, state)
    weight, head = decoder_head(params, model.config)
    options = {**head, "chunk_size": chunk_size, "temperature": temperature}
    if entropy:
        logps, ent = chunked_logps_and_entropy(out, weight, targets, mask, **options)
        return DecoderScores(logps, ent, state)
    return DecoderScores(chunked_token_logps(out, weight, targets, mask, **options), None, state)


def mean_nll(scores: DecoderScores, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over ``mask``: ``-Σ logps / max(Σ mask, 1)``.

    Example:
      >>> s = DecoderScores(jnp.array([[0.0, -1.0, -3.0]]), None, None)
      >>> float(mean_nll(s, jnp.array([[False, True, True]])))
      2.0
    """
    count = jnp.maximum(jnp.sum(jnp.asarray(mask, jnp.float32)), 1.0)
    return -jnp.sum(scores.logps) / count
