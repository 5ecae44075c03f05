"""Shardings for adapters, derived from their kernel's: A follows the inputs, B the outputs.

For a kernel sharded ``P(s_0, ..., s_n)`` whose axes have roles (see ``_layout``), A gets the
specs of the stack and input axes and B those of the stack and output axes; the rank axis is
replicated. So ``x·A`` needs the same input layout as ``x·W``, ``(x·A)·B`` produces the same
output layout as ``x·W``, and an FSDP- or tensor-parallel base keeps its layout for the
adapters with no code of jlora's own for communication: XLA inserts what the specs imply.

Specs come from wherever the user keeps them: a tree of ``PartitionSpec`` / ``NamedSharding``
(``None`` = replicated), Flax Linen boxed params via ``nn.get_partition_spec`` (logical axes
via ``nn.logical_to_mesh``), or NNX state via ``nnx.get_partition_spec`` + ``nnx.to_pure_dict``,
or from ``(regex, spec)`` rules over the whole tree (:func:`partition_specs`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora._axes import axis_roles
from jlora._config import LoraConfig
from jlora._layout import adapter_keys, axes_of
from jlora._paths import KeyPath, path_str
from jlora._targets import select_kernels
from jlora._tree import rebuild

Spec = PartitionSpec | NamedSharding | None


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def partition_specs(params: Any, rules: Sequence[tuple[str, PartitionSpec | None]]) -> Any:
    """A ``PartitionSpec`` for every leaf, from ``(regex, spec)`` rules; first match wins.

    Leaves that no rule matches are replicated (``PartitionSpec()``). Regexes are
    ``re.fullmatch``-ed against the ``"a/b/c"`` path, as everywhere in jlora.

    Args:
      params: a parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      rules: ``[(regex, PartitionSpec), ...]``.

    Returns:
      A tree like ``params`` of ``PartitionSpec``.

    Raises:
      ValueError: if a matching spec has more entries than the leaf has axes.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> partition_specs({"mlp": {"kernel": jnp.ones((4, 8))}}, [(".*kernel", P("fsdp", "tp"))])
      {'mlp': {'kernel': P('fsdp', 'tp')}}
    """

    def spec_for(path: Any, leaf: Any) -> PartitionSpec:
        name = path_str(path)
        ndim = len(getattr(leaf, "shape", ()))
        for pattern, spec in rules:
            if re.fullmatch(pattern, name):
                spec = PartitionSpec() if spec is None else spec
                if len(spec) > ndim:
                    raise ValueError(
                        f"rule {pattern!r} -> {spec} matches {name!r}, which has {ndim} axes; "
                        "give at most one entry per axis or narrow the regex"
                    )
                return spec
        return PartitionSpec()

    return jax.tree.map_with_path(spec_for, params)


def adapter_specs(spec: Spec, roles: tuple[str, ...], name: str = "kernel") -> tuple[Spec, Spec]:
    """The shardings of A and B for a kernel sharded by ``spec`` with axis ``roles``.

    Args:
      spec: the kernel's ``PartitionSpec`` or ``NamedSharding`` (``None``: replicated). A spec
        shorter than the kernel's rank is padded with ``None``, as JAX does.
      roles: the kernel's axis roles.
      name: the kernel's path, for error messages.

    Returns:
      ``(spec_a, spec_b)`` of the same kind as ``spec``; the rank axis is replicated.

    Raises:
      ValueError: if ``spec`` has more entries than the kernel has axes.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> adapter_specs(P("fsdp", "tensor"), ("in", "out"))
      (P('fsdp', None), P(None, 'tensor'))
      >>> adapter_specs(P(None, "fsdp", "tensor", None), ("stack", "in", "out", "out"))
      (P(None, 'fsdp', None), P(None, None, 'tensor', None))
    """
    if spec is None:
        return None, None
    parts = tuple(spec.spec if isinstance(spec, NamedSharding) else spec)
    if len(parts) > len(roles):
        raise ValueError(
            f"sharding {spec} of {name!r} has {len(parts)} entries, but the kernel has "
            f"{len(roles)} axes (roles {roles}); give at most one entry per axis"
        )
    parts += (None,) * (len(roles) - len(parts))

    def pick(role: str) -> tuple[Any, ...]:
        return tuple(parts[i] for i in axes_of(roles, role))

    spec_a = PartitionSpec(*pick("stack"), *pick("in"), None)
    spec_b = PartitionSpec(*pick("stack"), None, *pick("out"))
    if isinstance(spec, NamedSharding):
        return NamedSharding(spec.mesh, spec_a), NamedSharding(spec.mesh, spec_b)
    return spec_a, spec_b


def derive_adapter_specs(
    params: Any, shardings: Any, config: LoraConfig
) -> dict[KeyPath, tuple[Spec, Spec]]:
    """``(spec_a, spec_b)`` for every kernel ``config`` selects, by the kernel's key path."""
    flat = jax.tree.flatten_with_path(shardings, is_leaf=_is_spec)[0]
    by_path = {tuple(p): s for p, s in flat}
    out = {}
    for path, leaf in select_kernels(params, config):
        name = path_str(path)
        if tuple(path) not in by_path:
            raise ValueError(
                f"the shardings tree has no entry for the adapted kernel {name!r}; pass a tree "
                "of PartitionSpec / NamedSharding / None shaped like the base params"
            )
        spec = by_path[tuple(path)]
        if not _is_spec(spec):
            raise TypeError(
                f"sharding of {name!r} is {type(spec).__name__}; expected a PartitionSpec, a "
                "NamedSharding or None (for Flax boxed params use nn.get_partition_spec first)"
            )
        roles = axis_roles(name, tuple(leaf.shape), config)
        out[tuple(path)] = adapter_specs(spec, roles, name)
    return out


def lora_shardings(params: Any, shardings: Any, config: LoraConfig) -> Any:
    """The shardings of the adapted tree: the base's, plus derived ones for every A and B.

    Args:
      params: the base params (arrays or ``jax.ShapeDtypeStruct``), to select kernels and
        read their shapes.
      shardings: a tree like ``params`` of ``PartitionSpec`` / ``NamedSharding`` / ``None``.
      config: the LoRA config that will adapt ``params``.

    Returns:
      A tree shaped like ``init_lora(key, params, config)``, e.g. for ``out_shardings``.

    Raises:
      ValueError: if a selected kernel has no sharding entry, or one with too many axes.
      TypeError: if an entry is not a sharding.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}
      >>> specs = {"dense": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}}
      >>> lora_shardings(params, specs, jlora.LoraConfig(rank=2))["dense"]["kernel_lora_b"]
      P(None, 'tensor')
    """
    derived = derive_adapter_specs(params, shardings, config)

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            path = (*parent, jax.tree_util.DictKey(k))
            if path in derived:
                a_key, b_key = adapter_keys(k)
                items[a_key], items[b_key] = derived[path]
        return items

    return rebuild(shardings, add)


def constrain(x: jax.Array, spec: Spec) -> jax.Array:
    """Lays ``x`` out by ``spec`` inside or outside ``jit`` (no-op for ``None``)."""
    if spec is None:
        return x
    if isinstance(spec, NamedSharding) and any(
        t == jax.sharding.AxisType.Explicit for t in spec.mesh.axis_types
    ):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)
