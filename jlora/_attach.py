"""Placing loaded adapter factors beside their kernels in a base tree, without touching it.

Shared by :func:`jlora.load_adapter` and :func:`jlora.import_peft`: the base must be
un-adapted, every named kernel must sit in a dict (where its ``*_lora_a`` / ``*_lora_b``
siblings go, see ``_layout``), and a ``NamedSharding``-placed kernel gets its adapters sharded
to match. A new tree is built; the base's dicts and arrays are never modified.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

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
