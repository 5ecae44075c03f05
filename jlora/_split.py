"""Splitting an adapted tree into its trainable adapters and its frozen base, and back.

``split`` returns ``(lora, base)``: ``base`` is exactly the tree ``init_lora`` was given (same
structure and containers), and ``lora`` holds only the adapter leaves, nested as in the full
tree; inside non-dict containers (lists, tuples) non-adapter positions are ``None``.
Differentiating a loss with respect to ``lora`` alone is the lean way to train: no gradient is
ever formed for the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.tree_util import DictKey

from jlora._layout import adapter_owner
from jlora._paths import KeyPath, path_str
from jlora._tree import find_sites, rebuild


def is_adapter_path(path: KeyPath) -> bool:
    """Whether a leaf path ends in an adapter key (``*_lora_a`` / ``*_lora_b``).

    Example:
      >>> from jax.tree_util import DictKey
      >>> is_adapter_path((DictKey("dense"), DictKey("kernel_lora_a")))
      True
    """
    return bool(path) and adapter_owner(getattr(path[-1], "key", None)) is not None


def lora_labels(params: Any) -> Any:
    """A tree like ``params`` with ``"lora"`` on adapter leaves and ``"frozen"`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> lora_labels({"kernel": jnp.ones((2, 2)), "kernel_lora_a": jnp.ones((2, 1)),
      ...              "kernel_lora_b": jnp.ones((1, 2))})
      {'kernel': 'frozen', 'kernel_lora_a': 'lora', 'kernel_lora_b': 'lora'}
    """
    return jax.tree.map_with_path(lambda p, _: "lora" if is_adapter_path(p) else "frozen", params)


def split(params: Any) -> tuple[Any, Any]:
    """Splits an adapted tree into ``(lora, base)``; ``combine(lora, base)`` restores it.

    Args:
      params: a tree from :func:`jlora.init_lora` (or a trained one).

    Returns:
      ``lora``: only the adapter leaves (the trainable part); ``base``: the tree without them,
      structured exactly like the tree given to ``init_lora``.

    Raises:
      ValueError: for adapter leaves without their kernel or partner.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> p = jlora.init_lora(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> lora, base = split(p)
      >>> sorted(lora["dense"]), sorted(base["dense"])
      (['kernel_lora_a', 'kernel_lora_b'], ['bias', 'kernel'])
    """
    find_sites(params)  # validates that every adapter sits beside its kernel

    def drop_adapters(_: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        return {k: v for k, v in items.items() if adapter_owner(k) is None}

    def drop_empty(_: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        return {k: v for k, v in items.items() if jax.tree.leaves(v)}

    only_adapters = jax.tree.map_with_path(lambda p, x: x if is_adapter_path(p) else None, params)
    return rebuild(only_adapters, drop_empty), rebuild(params, drop_adapters)


def _overlay(lora: Any, base: Any, path: KeyPath) -> Any:
    if lora is None:
        return base
    if isinstance(lora, Mapping):
        if not isinstance(base, Mapping):
            raise ValueError(
                f"combine: lora has a dict at {path_str(path)!r} where base has "
                f"{type(base).__name__}; were these halves split from the same tree?"
            )
        items = dict(base)
        for k, v in lora.items():
            sub = (*path, DictKey(k))
            if k in base:
                items[k] = _overlay(v, base[k], sub)
            elif adapter_owner(k) is not None:
                items[k] = v
            else:
                raise ValueError(
                    f"combine: lora has {path_str(sub)!r}, which is neither an adapter leaf nor "
                    "in base; were these halves split from the same tree?"
                )
        return items if type(base) is dict else type(base)(items)  # type: ignore[call-arg]
    lora_children, lora_def = jax.tree_util.tree_flatten_with_path(
        lora, is_leaf=lambda x: x is not lora
    )
    if jax.tree_util.treedef_is_leaf(lora_def):
        raise ValueError(
            f"combine: lora holds a non-adapter leaf at {path_str(path)!r}; pass the lora half "
            "returned by split(), not the full tree"
        )
    base_children, base_def = jax.tree_util.tree_flatten_with_path(
        base, is_leaf=lambda x: x is not base
    )
    if str(lora_def) != str(base_def):
        raise ValueError(
            f"combine: at {path_str(path)!r} lora is {lora_def} but base is {base_def}; were "
            "these halves split from the same tree?"
        )
    return jax.tree.unflatten(
        base_def,
        [
            _overlay(lc, bc, (*path, *k))
            for (k, lc), (_, bc) in zip(lora_children, base_children, strict=True)
        ],
    )


def combine(lora: Any, base: Any) -> Any:
    """Puts the adapter leaves of ``lora`` back beside their kernels in ``base``.

    Args:
      lora: the adapter half from :func:`split` (possibly trained or loaded from a file).
      base: the base tree (the other half from :func:`split`, or the original params).

    Returns:
      The adapted tree; ``combine(*split(p))`` has the same structure and leaves as ``p``.

    Raises:
      ValueError: if ``lora`` holds non-adapter leaves, or does not line up with ``base``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> p = jlora.init_lora(jax.random.key(0), params, jlora.LoraConfig(rank=2))
      >>> jax.tree.structure(combine(*split(p))) == jax.tree.structure(p)
      True
    """
    out = _overlay(lora, base, ())
    find_sites(out)  # every adapter must now sit beside its kernel
    return out
