"""A quantised base kernel inside ``jlora.lora``: dequantised only where a rule consumes it.

A QLoRA base (:class:`jlora.Quantized`) enters the interpreter as the ``w`` of a
``LoraValue`` still quantised. Ops that only move the kernel (casts, transposes, reshapes,
stack slices) are recorded on the view instead of run; the consuming rule computes its base
term with :func:`use`, which dequantises, replays the moves and runs the op inside one
``jax.checkpoint``. So the dense kernel is a short-lived temporary of that one use: autodiff
keeps the codes (already stored) rather than the dense ``W`` for the backward pass, and
dequantises again there. Inside ``scan`` over stacked layers each iteration dequantises its
own slice (:func:`per_layer`), never the whole stack.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora._quantized import Quantized

Move = Callable[[jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedView:
    """``q`` dequantised, then the recorded ``moves`` applied: a view of shape ``shape``."""

    q: Quantized
    moves: tuple[Move, ...] = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(metadata={"static": True})


def view(q: Quantized) -> QuantizedView:
    """The quantised kernel as an unmoved view."""
    return QuantizedView(q, (), tuple(q.shape), jnp.dtype(q.dtype))


def then(w: Any, move: Move) -> Any:
    """``move(w)`` for a dense ``w``; for a view, ``move`` recorded to run at use."""
    if not isinstance(w, QuantizedView):
        return move(w)
    out = jax.eval_shape(move, jax.ShapeDtypeStruct(w.shape, w.dtype))
    return dataclasses.replace(
        w, moves=(*w.moves, move), shape=tuple(out.shape), dtype=jnp.dtype(out.dtype)
    )


def dense(w: Any) -> Any:
    """``w`` as a dense array (a view is dequantised and its moves replayed)."""
    if not isinstance(w, QuantizedView):
        return w
    x = w.q.dequantize()
    for move in w.moves:
        x = move(x)
    return x


def use(w: Any, op: Callable[..., Any], *args: Any) -> Any:
    """``op(dense(w), *args)``; for a view, inside one ``jax.checkpoint``.

    The backward pass then dequantises again instead of keeping the dense kernel.
    """
    if not isinstance(w, QuantizedView):
        return op(w, *args)

    def run(q: Quantized, *xs: Any) -> Any:
        return op(dense(dataclasses.replace(w, q=q)), *xs)

    return jax.checkpoint(run)(w.q, *args)


def per_layer(w: Any) -> Any:
    """``w`` ready to be scanned over its axis 0, so each iteration dequantises one layer.

    For a view: a tree whose leaves have the layer axis leading and whose slices rebuild to
    one layer's view; dense only when the layers do not fill whole blocks.

    Quantisation blocks run over the kernel flattened in its own layout, so layer ``i`` owns
    blocks ``i·n .. (i+1)·n`` when its size is a multiple of the block size: slicing the codes
    and scales along a new leading axis then gives exactly that layer's quantised kernel.
    """
    if not isinstance(w, QuantizedView):
        return w
    q = w.q
    layers, layer_size = q.shape[0], math.prod(q.shape[1:])
    if w.moves or layer_size % q.block_size:
        return dense(w)
    stacked = dataclasses.replace(
        q,
        codes=q.codes.reshape(layers, -1, *q.codes.shape[1:]),
        scales=q.scales.reshape(layers, -1),
        shape=tuple(q.shape[1:]),
    )
    return dataclasses.replace(w, q=stacked, shape=tuple(w.shape[1:]))
