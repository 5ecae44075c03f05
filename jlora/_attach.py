"""Placing adapter factors beside their kernels in a base tree, without touching it.

Loaded factors (:func:`place_adapters`, shared by :func:`jlora.load_adapter` and
:func:`jlora.import_peft`): the base must be un-adapted, every named kernel must sit in a dict
(where its ``*_lora_a`` / ``*_lora_b`` siblings go, see ``_layout``), and a
``NamedSharding``-placed kernel gets its adapters sharded to match. Factors computed from the
kernel (:func:`place_factored`, for PiSSA, OLoRA and LoftQ) replace the kernel as well. A new
tree is built; the base's dicts and arrays are never modified.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.tree_util import DictKey

from jlora._layout import adapter_keys
from jlora._paths import KeyPath, join_paths, path_str
from jlora._sharding import adapter_specs
from jlora._split import is_adapter_path
from jlora._tree import rebuild


def check_unadapted(base_params: Any) -> None:
    """Refuses a base tree that already holds adapter leaves.

    Raises:
      ValueError: naming the adapter leaves found.
    """
    already = [p for p, _ in jax.tree.flatten_with_path(base_params)[0] if is_adapter_path(p)]
    if already:
        raise ValueError(
            f"base_params already holds adapters ({join_paths(already)}); pass the un-adapted "
            "base, e.g. jlora.split(params)[1]"
        )


def place_adapters(
    base_params: Any,
    factors: dict[str, tuple[Any, Any]],
    roles: dict[str, tuple[str, ...]],
    where: str,
) -> Any:
    """A new tree: ``base_params`` with ``(A, B)`` beside each kernel named in ``factors``.

    A kernel placed with a ``NamedSharding`` gets A and B sharded to match (its in / out axes'
    mesh axes, the rank axis replicated: ``jlora.adapter_specs``); others go to the default
    device.

    Raises:
      ValueError: if a named kernel is not held by a dict (adapters cannot sit beside it).
    """
    placed: set[str] = set()

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            name = path_str((*parent, jax.tree_util.DictKey(k)))
            if name not in factors or not isinstance(k, str):
                continue
            a_key, b_key = adapter_keys(k)
            a, b = factors[name]
            sharding = getattr(items[k], "sharding", None)
            if isinstance(sharding, NamedSharding):
                spec_a, spec_b = adapter_specs(sharding, roles[name], name)
                items[a_key], items[b_key] = jax.device_put(a, spec_a), jax.device_put(b, spec_b)
            else:
                items[a_key], items[b_key] = jnp.asarray(a), jnp.asarray(b)
            placed.add(name)
        return items

    params = rebuild(base_params, add)
    missing = [name for name in factors if name not in placed]
    if missing:
        raise ValueError(
            f"{where}: kernels {missing[:8]} are not held by a dict in base_params, so their "
            "adapters cannot be placed beside them; convert that part to nested dicts"
        )
    return params


def place_factored(
    params: Any, planned: dict[KeyPath, tuple[Any, jax.Array, jax.Array]], caller: str
) -> Any:
    """``params`` with each planned kernel replaced by its new base and A/B set beside it.

    Raises:
      ValueError: if a planned kernel already has adapters or is not held by a dict.
    """
    planned = dict(planned)

    def replace(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            path = (*parent, DictKey(k))
            if path in planned:
                a_key, b_key = adapter_keys(k)
                if a_key in items or b_key in items:
                    raise ValueError(
                        f"{caller}: kernel {path_str(path)!r} already has LoRA adapters; "
                        "merge_params or split them off first"
                    )
                items[k], items[a_key], items[b_key] = planned.pop(path)
        return items

    out = rebuild(params, replace)
    if planned:
        raise ValueError(
            f"{caller}: kernels {[path_str(p) for p in planned]} are not held by a dict, "
            "which cannot hold the adapter leaves beside them; convert that part of the tree to "
            "nested dicts, or exclude those paths"
        )
    return out
