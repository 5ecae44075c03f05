"""The LM head and log-softmax run over chunks of tokens, so no ``[tokens, vocab]`` array lives.

Design note: the caller (:mod:`jlora._chunked_loss`) has already moved the tokens that count
to the front and cut them into ``k`` chunks of ``c``; ``count`` of them are real. Chunk ``i``
is computed only when ``i·c < count`` (``lax.cond``), so masked positions cost nothing.

Two ways to differentiate it, chosen per call by what is differentiated:

- The primal is a ``lax.scan`` over chunks whose body is ``jax.checkpoint``-ed: the backward
  pass recomputes one chunk's logits at a time. This is what :func:`jlora.lora` runs when the
  head itself is adapted (it inlines a ``custom_vjp`` and differentiates its primal), and what
  a head that is trained (``weight`` differentiated) gets.
- When only the hidden states are differentiated (a frozen head: the usual LoRA case), the
  forward pass also stores each token's ``d logp / d hidden`` (``[c, H]``, the size of the
  hidden states), so the backward pass is a product with the output cotangent and no chunk is
  computed twice: the same two head matmuls as the full-logit path, not three.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


class HeadOptions(NamedTuple):
    """The static settings of the head (hashable: a ``custom_vjp`` non-differentiable input)."""

    tied: bool  # weight is an embedding table [V, H] rather than a kernel [H, V]
    softcap: float | None  # logits become cap·tanh(l / cap)
    temperature: float  # then divided by it (GRPO)
    dtype: Any  # the matmul's dtype; logits are float32 after it
    entropy: bool  # also return each token's entropy (no gradient)


def logits(weight: jax.Array, x: jax.Array, o: HeadOptions) -> jax.Array:
    """``[c, V]`` float32 logits of ``x [c, H]``, as ``Decoder`` computes them (Dense/attend)."""
    x, w = x.astype(o.dtype), weight.astype(o.dtype)
    if o.tied:
        raw = jnp.dot(x, w.T)  # flax's Embed.attend
    else:
        raw = lax.dot_general(x, w, (((1,), (0,)), ((), ())))  # flax's Dense
    out = raw.astype(jnp.float32)
    if o.softcap is not None:
        out = jnp.tanh(out / o.softcap) * o.softcap
    if o.temperature != 1.0:
        out = out / o.temperature
    return out


def _stats(weight: jax.Array, x: jax.Array, y: jax.Array, o: HeadOptions) -> tuple[Any, ...]:
    """One chunk's target log-probs ``[c]`` and, if asked, entropies ``[c]`` (no gradient)."""
    logp = jax.nn.log_softmax(logits(weight, x, o), axis=-1)
    picked = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    if not o.entropy:
        return (picked,)
    held = lax.stop_gradient(logp)
    return picked, -jnp.sum(jnp.exp(held) * held, axis=-1)


def _zeros(c: int, o: HeadOptions) -> tuple[Any, ...]:
    return tuple(jnp.zeros((c,), jnp.float32) for _ in range(1 + o.entropy))


def _scan(
    weight: jax.Array, xs: jax.Array, ys: jax.Array, count: jax.Array, o: HeadOptions
) -> tuple[Any, ...]:
    """The primal: chunk by chunk, each chunk's logits recomputed in the backward pass."""
    c = xs.shape[1]

    @jax.checkpoint
    def chunk(weight: jax.Array, i: jax.Array, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
        return lax.cond(i * c < count, lambda: _stats(weight, x, y, o), lambda: _zeros(c, o))

    def body(_: None, step: tuple[Any, ...]) -> tuple[None, tuple[Any, ...]]:
        return None, chunk(weight, *step)

    return lax.scan(body, None, (jnp.arange(xs.shape[0]), xs, ys))[1]


def _jacobian_chunk(
    weight: jax.Array, x: jax.Array, y: jax.Array, o: HeadOptions
) -> tuple[Any, ...]:
    """Outputs and ``d logp / d x`` ``[c, H]`` (float32) of one chunk, in one pass."""
    x_c, w = x.astype(o.dtype), weight.astype(o.dtype)
    raw = (jnp.dot(x_c, w.T) if o.tied else x_c @ w).astype(jnp.float32)
    slope = jnp.float32(1.0 / o.temperature)
    z = raw
    if o.softcap is not None:
        squashed = jnp.tanh(raw / o.softcap)
        z = squashed * o.softcap
        slope = slope * (1.0 - squashed * squashed)  # d(cap·tanh(l/cap))/dl
    if o.temperature != 1.0:
        z = z / o.temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    picked = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=jnp.float32)
    dz = ((onehot - jnp.exp(logp)) * slope).astype(o.dtype)
    jac = (dz @ w if o.tied else jnp.dot(dz, w.T)).astype(jnp.float32)
    if not o.entropy:
        return picked, jac
    return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1), jac


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head(
    weight: jax.Array, xs: jax.Array, ys: jax.Array, count: jax.Array, o: HeadOptions
) -> tuple[Any, ...]:
    return _scan(weight, xs, ys, count, o)


def _fwd(weight: Any, xs: Any, ys: Any, count: Any, opts: HeadOptions) -> tuple[Any, Any]:
    w, x, y, n = weight.value, xs.value, ys.value, count.value
    if weight.perturbed or not xs.perturbed:  # a trained head: recompute in the backward
        return _scan(w, x, y, n, opts), (w, x, y, n, None)
    c = x.shape[1]

    def body(_: None, step: tuple[Any, ...]) -> tuple[None, tuple[Any, ...]]:
        i, xc, yc = step
        skip = (*_zeros(c, opts), jnp.zeros(xc.shape, jnp.float32))
        return None, lax.cond(i * c < n, lambda: _jacobian_chunk(w, xc, yc, opts), lambda: skip)

    *outs, jac = lax.scan(body, None, (jnp.arange(x.shape[0]), x, y))[1]
    return tuple(outs), (None, x, None, None, jac)


def _bwd(o: HeadOptions, res: tuple[Any, ...], cotangents: tuple[Any, ...]) -> tuple[Any, ...]:
    weight, xs, ys, count, jac = res
    g = cotangents[0]  # entropies carry no gradient
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(xs.shape[:2], jnp.float32)
    if jac is not None:
        return None, (g[..., None] * jac).astype(xs.dtype), None, None
    c = xs.shape[1]

    def body(acc: jax.Array, step: tuple[Any, ...]) -> tuple[jax.Array, jax.Array]:
        i, xc, yc, gc = step

        def run() -> tuple[jax.Array, jax.Array]:
            _, vjp = jax.vjp(lambda w, x: _stats(w, x, yc, o)[0], weight, xc)
            dw, dx = vjp(gc)
            return acc + dw.astype(jnp.float32), dx

        return lax.cond(i * c < count, run, lambda: (acc, jnp.zeros_like(xc)))

    zero = jnp.zeros(weight.shape, jnp.float32)
    dw, dxs = lax.scan(body, zero, (jnp.arange(xs.shape[0]), xs, ys, g))
    return dw.astype(weight.dtype), dxs, None, None


_head.defvjp(_fwd, _bwd, symbolic_zeros=True)


def head_stats(
    weight: jax.Array, xs: jax.Array, ys: jax.Array, count: jax.Array, o: HeadOptions
) -> tuple[Any, ...]:
    """Per chunk ``[k, c]`` target log-probs (and entropies) of chunks ``xs [k, c, H]``.

    Only chunks ``i`` with ``i·c < count`` are computed (the others give 0); gradients flow
    to ``weight`` and ``xs`` (none through the entropies).
    """
    return tuple(_head(weight, xs, ys, count, o))
