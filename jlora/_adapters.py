"""Several named adapters on one base: a plain mapping ``{name: Adapter}``, pure functions on it.

Each :class:`Adapter` is the ``lora`` half of :func:`jlora.split` (keys ``k_lora_a`` /
``k_lora_b`` exactly as ``_layout`` names them; no adapter name ever enters a key) with the
:class:`jlora.LoraConfig` it was made with. The one "active" adapter is the one combined into
the params (:func:`select_adapter`); the others stay in their own trees. Functions that mix
adapters (:func:`jlora.combine_adapters`, :func:`jlora.mixed_batch`) re-express them with a
per-path config whose scale is 1 (see :func:`unit_config`) so they can be added or stacked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey

from jlora._config import LoraConfig
from jlora._layout import adapter_keys
from jlora._paths import KeyPath, path_str
from jlora._resolve import Adapted, resolve_sites
from jlora._split import combine, split
from jlora._tree import rebuild


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """One named adapter: its ``lora`` tree (from :func:`jlora.split`) and its config.

    A pytree whose leaves are the adapter arrays (the config is static), so a mapping of
    adapters can be saved, jitted over or mapped with ``jax.tree.map``.
    """

    lora: Any
    config: LoraConfig = dataclasses.field(metadata={"static": True})


def _known(adapters: Mapping[str, Adapter], name: Any, what: str) -> Adapter:
    if name not in adapters:
        raise KeyError(
            f"{what}: no adapter named {name!r}; the adapters are {sorted(adapters)}. Add it "
            "first with jlora.add_adapter"
        )
    return adapters[name]


def add_adapter(
    adapters: Mapping[str, Adapter], name: str, lora: Any, config: LoraConfig
) -> dict[str, Adapter]:
    """A new mapping with ``lora`` (an adapter half from :func:`jlora.split`) added as ``name``.

    Raises:
      TypeError: if ``name`` is not a string or ``config`` not a ``LoraConfig``.
      ValueError: if ``name`` is taken (delete it first) or ``lora`` holds no adapter leaves.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> lora, base = jlora.split(p)
      >>> bank = add_adapter({}, "chat", lora, cfg)
      >>> sorted(add_adapter(bank, "code", lora, cfg))
      ['chat', 'code']
    """
    if not isinstance(name, str):
        raise TypeError(f"add_adapter: adapter names are strings; got {name!r}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter: config must be a LoraConfig; got {type(config).__name__}")
    if name in adapters:
        raise ValueError(
            f"add_adapter: an adapter named {name!r} already exists; delete_adapter it first or "
            "pick another name"
        )
    if not jax.tree.leaves(lora):
        raise ValueError(
            f"add_adapter: the tree given for {name!r} holds no adapter leaves; pass the lora "
            "half of jlora.split(params)"
        )
    return {**adapters, name: Adapter(lora, config)}


def delete_adapter(adapters: Mapping[str, Adapter], name: str) -> dict[str, Adapter]:
    """A new mapping without the adapter ``name``.

    Raises:
      KeyError: if there is no such adapter (the message lists the names there are).

    Example:
      >>> delete_adapter({"a": 1, "b": 2}, "a")
      {'b': 2}
    """
    _known(adapters, name, "delete_adapter")
    return {k: v for k, v in adapters.items() if k != name}


def select_adapter(
    base: Any, adapters: Mapping[str, Adapter], name: str | None
) -> tuple[Any, LoraConfig | None]:
    """The params with adapter ``name`` active, and its config; ``None`` selects the bare base.

    The result feeds :func:`jlora.merge_params`, :func:`jlora.lora`, the optimizer, ...

    Raises:
      KeyError: for an unknown name.
      ValueError: if that adapter does not line up with ``base``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> lora, base = jlora.split(jlora.init_lora(jax.random.key(0),
      ...                                          {"d": {"kernel": jnp.ones((4, 3))}}, cfg))
      >>> params, c = select_adapter(base, {"chat": Adapter(lora, cfg)}, "chat")
      >>> sorted(params["d"]), c.rank
      (['kernel', 'kernel_lora_a', 'kernel_lora_b'], 2)
    """
    if name is None:
        return base, None
    adapter = _known(adapters, name, "select_adapter")
    return combine(adapter.lora, base), adapter.config


def sites_of(base: Any, adapter: Adapter) -> dict[KeyPath, Adapted]:
    """The adapted kernels of one adapter against ``base``, by kernel path, shapes checked."""
    return {a.site.path: a for a in resolve_sites(combine(adapter.lora, base), adapter.config)}


def sites_by_name(
    base: Any, adapters: Mapping[str, Adapter], what: str
) -> tuple[dict[str, dict[KeyPath, Adapted]], dict[KeyPath, tuple[str, ...]]]:
    """Every adapter's sites, and the union of kernel paths with their (agreed) axis roles.

    Only plain (additive) adapters can be re-expressed as factors: ``what`` names the caller
    in the error for a DoRA adapter.

    Raises:
      ValueError: if two adapters give one kernel different axis roles, or one is DoRA.
    """
    per = {name: sites_of(base, adapter) for name, adapter in adapters.items()}
    for name, sites in per.items():
        dora = [a.site.name for a in sites.values() if a.site.m is not None]
        if dora:
            raise ValueError(
                f"{what}: adapter {name!r} is DoRA at {dora} (it has '*_lora_m' magnitudes); "
                "a DoRA kernel is renormalised, not W + s·A·B, so its factors cannot be added or "
                "stacked with others. Merge it (merge_params) or use plain LoRA adapters"
            )
    roles: dict[KeyPath, tuple[str, ...]] = {}
    owner: dict[KeyPath, str] = {}
    for name, sites in per.items():
        for path, adapted in sites.items():
            if roles.setdefault(path, adapted.roles) != adapted.roles:
                raise ValueError(
                    f"adapters {owner[path]!r} and {name!r} lay out kernel {path_str(path)!r} "
                    f"differently: axis roles {roles[path]} vs {adapted.roles}; give both the "
                    "same LoraConfig.axis_rules"
                )
            owner.setdefault(path, name)
    return per, roles


def unit_config(
    plan: Mapping[KeyPath, tuple[tuple[str, ...], int]], dtype: str = "float32"
) -> LoraConfig:
    """A config naming each kernel exactly, with its roles and rank, and scale ``alpha/r = 1``.

    Example:
      >>> from jax.tree_util import DictKey
      >>> cfg = unit_config({(DictKey("d"), DictKey("kernel")): (("in", "out"), 3)})
      >>> cfg.rank_for("d/kernel"), cfg.scale_for("d/kernel")
      (3, 1.0)
    """
    names = {re.escape(path_str(p)): v for p, v in plan.items()}
    return LoraConfig(
        rank=max((r for _, r in plan.values()), default=1),
        alpha=float(max((r for _, r in plan.values()), default=1)),
        targets=list(names) or "(?!)",
        rank_pattern={n: r for n, (_, r) in names.items()},
        alpha_pattern={n: float(r) for n, (_, r) in names.items()},
        axis_rules=[(n, roles) for n, (roles, _) in names.items()],
        dtype=dtype,
    )


def place(base: Any, factors: Mapping[KeyPath, tuple[jax.Array, jax.Array]]) -> Any:
    """The ``lora`` tree holding ``factors[path] = (A, B)`` beside each kernel of ``base``."""

    def hook(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            path = (*parent, DictKey(k))
            if path in factors:
                a_key, b_key = adapter_keys(k)
                items[a_key], items[b_key] = factors[path]
        return items

    return split(rebuild(base, hook))[0]


def scaled_b(adapted: Adapted, weight: float = 1.0) -> jax.Array:
    """``weight · s · B``: B with the adapter's scale folded in, so its config scale can be 1."""
    b = adapted.site.b
    return b * jnp.asarray(weight * adapted.scale, b.dtype)
