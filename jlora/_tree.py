"""Walking parameter trees: rebuilding dict nodes, and finding the adapted kernels (sites).

Trees are nested mappings (``dict``, Flax ``FrozenDict``) possibly inside other pytree
containers (lists, tuples). Adapters only ever live in mappings (see ``_layout``), so every
transform here is a bottom-up rebuild that lets a hook edit the items of each mapping and
leaves every other node's structure as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.tree_util import DictKey

from jlora._layout import adapter_keys, adapter_owner, magnitude_key
from jlora._paths import KeyPath, path_str

DictHook = Callable[[KeyPath, dict[Any, Any]], dict[Any, Any]]


def _remake(node: Mapping[Any, Any], items: dict[Any, Any]) -> Mapping[Any, Any]:
    return items if type(node) is dict else type(node)(items)  # type: ignore[call-arg]


def rebuild(tree: Any, hook: DictHook, path: KeyPath = ()) -> Any:
    """Rebuilds ``tree`` bottom-up, passing each mapping's rebuilt items through ``hook``.

    ``hook(path, items)`` gets the mapping's path and a fresh ``dict`` of its (already rebuilt)
    children and returns the items to keep; the mapping's own type (``dict``, ``FrozenDict``)
    is preserved. Leaves and non-mapping containers are kept as they are.
    """
    if isinstance(tree, Mapping):
        items = {k: rebuild(v, hook, (*path, DictKey(k))) for k, v in tree.items()}
        return _remake(tree, hook(path, items))
    children, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    if jax.tree_util.treedef_is_leaf(treedef):
        return tree
    return jax.tree.unflatten(treedef, [rebuild(c, hook, (*path, *k)) for k, c in children])


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted kernel: its dict, the kernel's key there, the arrays (``m``: DoRA or None)."""

    parent: KeyPath
    key: str
    kernel: Any
    a: Any
    b: Any
    m: Any = None

    @property
    def path(self) -> KeyPath:
        """The kernel's key path."""
        return (*self.parent, DictKey(self.key))

    @property
    def name(self) -> str:
        """The kernel's ``"a/b/c"`` path."""
        return path_str(self.path)


def sites_in(parent: KeyPath, items: Mapping[Any, Any]) -> list[Site]:
    """The adapted kernels among one mapping's items, checking every adapter has its partners.

    Raises:
      ValueError: for an adapter leaf whose kernel or partner factor is missing.
    """
    found = []
    for key in items:
        owner = adapter_owner(key)
        if owner is None:
            continue
        kernel_key, which = owner
        a_key, b_key = adapter_keys(kernel_key)
        where = path_str((*parent, DictKey(key)))
        if kernel_key not in items:
            raise ValueError(
                f"adapter {where!r} has no kernel {kernel_key!r} beside it; adapters must sit "
                "next to their kernel. Did you pass only the lora half of split()? Use "
                "combine(lora, base) first"
            )
        partner = b_key if which == "a" else a_key
        if partner not in items:
            raise ValueError(
                f"adapter {where!r} has no partner {partner!r}; a LoRA kernel needs both A and B"
            )
        if which == "a":
            m = items.get(magnitude_key(kernel_key))
            found.append(Site(parent, kernel_key, items[kernel_key], items[a_key], items[b_key], m))
    return found


def find_sites(tree: Any) -> list[Site]:
    """Every adapted kernel in ``tree``, in tree order.

    Raises:
      ValueError: for adapters without their kernel or partner.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"d": {"kernel": jnp.ones((2, 3)), "kernel_lora_a": jnp.ones((2, 1)),
      ...               "kernel_lora_b": jnp.zeros((1, 3))}}
      >>> [s.name for s in find_sites(tree)]
      ['d/kernel']
    """
    found: list[Site] = []

    def collect(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        found.extend(sites_in(parent, items))
        return items

    rebuild(tree, collect)
    return found
