"""Eager calls of ``jlora.lora`` wrappers, compiled once per argument structure.

Interpreting a traced function is the expensive part of ``jlora.lora``; under ``jax.jit`` it
happens once per compilation. Called eagerly (a notebook, an eval loop), a wrapper would trace
and interpret on every call, so :func:`compile_eager` routes eager calls through one
``jax.jit`` per wrapper: array leaves (and quantised kernels) are its arguments, every other
leaf is static, as the interpreter treats them. Inside any JAX transformation the call goes
straight through: the outer transformation caches, and jitting there could capture its tracers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core

from jlora._quantized import Quantized, is_quantized

_EAGER = type(core.find_top_trace(()))  # the trace type when no transformation is running


def is_input(leaf: Any) -> bool:
    """Whether ``leaf`` is traced (an array or a quantised kernel) rather than static."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, Quantized))


def compile_eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, jitted per argument structure when called outside any JAX transformation.

    Non-array leaves are static (part of the cache key); if one is unhashable the call runs
    ``fn`` directly, as it would have without this cache.
    """

    @functools.partial(jax.jit, static_argnums=1)
    def compiled(arrays: list[Any], static: tuple[Any, tuple[Any, ...]]) -> Any:
        treedef, others = static
        it = iter(arrays)
        args, kwargs = jax.tree.unflatten(treedef, [next(it) if o is _ARRAY else o for o in others])
        return fn(*args, **kwargs)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if type(core.find_top_trace(())) is not _EAGER:
            return fn(*args, **kwargs)
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_quantized)
        arrays = [leaf for leaf in leaves if is_input(leaf)]
        static = (treedef, tuple(_ARRAY if is_input(leaf) else leaf for leaf in leaves))
        try:
            hash(static)
        except TypeError:
            return fn(*args, **kwargs)
        return compiled(arrays, static)

    return call


class _ArraySlot:
    """Marks where an array leaf goes back in (hashable, unlike the arrays themselves)."""

    def __repr__(self) -> str:
        return "<array>"


_ARRAY = _ArraySlot()
