"""The adapters' optimizer: ``lora_optimizer``, and ``optimizer_shardings`` for its state."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jlora._loraplus import loraplus_partition
from jlora._paths import path_str
from jlora._split import lora_labels
from jlora._tree import find_sites


def lora_optimizer(
    optimizer: optax.GradientTransformation,
    params: Any,
    *,
    loraplus_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so it updates only LoRA adapters; every other leaf is frozen.

    Built with ``optax.partition``: adapter leaves (``*_lora_a``, ``*_lora_b``) go to
    ``optimizer``, all others to ``optax.set_to_zero()``. Frozen leaves get zero updates (so
    they stay bitwise unchanged) and no optimizer state, and XLA drops their gradients when the
    whole step is jitted. The leaner alternative is to differentiate only the ``lora`` half of
    :func:`jlora.split` and use ``optimizer`` on it directly; both give identical updates.

    With ``loraplus_lr_ratio`` (LoRA+), B factors and 1-D adapter leaves get the learning rate
    times the ratio: their group runs ``optimizer`` then ``optax.scale(ratio)``, which equals
    multiplying the learning rate for every transform whose update is proportional to it (sgd,
    adam, adamw, lion, ...). See :func:`jlora.loraplus_labels` for the groups.

    Args:
      optimizer: the optax transformation for the adapters (e.g. ``optax.adam(1e-3)``).
      params: the adapted tree the optimizer will be used on (validated here).
      loraplus_lr_ratio: LoRA+ ratio of B's learning rate to A's (``None``: plain LoRA).

    Returns:
      An ``optax.GradientTransformation`` for trees structured like ``params``.

    Raises:
      ValueError: if ``params`` holds no adapters (call ``init_lora`` first), or the ratio
        is not positive.
      TypeError: if ``loraplus_lr_ratio`` is not a number.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}},
      ...                     jlora.LoraConfig(rank=2))
      >>> tx = lora_optimizer(optax.adam(1e-3), p)
      >>> state = tx.init(p)
    """
    if not find_sites(params):
        raise ValueError(
            "lora_optimizer: params holds no LoRA adapters (no '*_lora_a'/'*_lora_b' leaves "
            "beside a kernel); call jlora.init_lora(key, params, config) first"
        )
    if loraplus_lr_ratio is not None:
        return loraplus_partition(optimizer, loraplus_lr_ratio)
    return optax.partition({"lora": optimizer, "frozen": optax.set_to_zero()}, lora_labels)


def optimizer_shardings(
    optimizer: optax.GradientTransformation, params: Any, shardings: Any = None
) -> Any:
    """Shardings for ``optimizer.init(params)``: each state leaf laid out like its parameter.

    optax's per-parameter states (Adam's ``mu`` and ``nu``, momentum, ...) mirror the params
    tree, also inside ``optax.partition`` / ``lora_optimizer``: a state leaf whose path ends in
    a parameter's path and has that parameter's shape gets the parameter's sharding. Every
    other leaf (step counts, schedules' scalars, factored statistics) is replicated on the same
    mesh, so a jitted step can fix ``out_shardings`` for the whole state (``jit(tx.init)``
    alone leaves the count on one device, which such a step rejects). Nothing is allocated:
    the state's shapes come from ``jax.eval_shape``.

    Args:
      optimizer: the optax transformation (e.g. ``jlora.lora_optimizer(optax.adam(...), p)``).
      params: the tree it is initialised on (arrays or ``jax.ShapeDtypeStruct``), e.g. the
        adapted params or the ``lora`` half of :func:`jlora.split`.
      shardings: a tree like ``params`` of ``NamedSharding`` / ``PartitionSpec`` / ``None``
        (``None``: replicated), e.g. from :func:`jlora.lora_shardings`. By default each
        leaf's own ``.sharding``.

    Returns:
      A tree shaped like ``optimizer.init(params)`` of shardings of the same kind as
      ``shardings`` (``PartitionSpec`` ones need an active mesh: ``jax.set_mesh``).

    Raises:
      ValueError: if ``shardings`` is not shaped like ``params``, or it is omitted and a leaf
        of ``params`` has no sharding.
      TypeError: if an entry of ``shardings`` is not a sharding.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jlora
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> params = {"d": {"kernel": jnp.ones((4, 3))}}
      >>> specs = {"d": {"kernel": NamedSharding(mesh, P("fsdp", None))}}
      >>> p = jlora.init_lora(jax.random.key(0), params, cfg)
      >>> tx = jlora.lora_optimizer(optax.adam(1e-3), p)
      >>> state_shardings = optimizer_shardings(tx, p, jlora.lora_shardings(params, specs, cfg))
      >>> state = jax.jit(tx.init, out_shardings=state_shardings)(p)
      >>> adam = state_shardings.inner_states["lora"].inner_state[0]
      >>> adam.mu["d"]["kernel_lora_a"].spec, adam.count.spec
      (P('fsdp', None), P())
    """
    param_leaves = jax.tree.flatten_with_path(params)[0]
    if shardings is None:
        missing = [path_str(p) for p, x in param_leaves if getattr(x, "sharding", None) is None]
        if missing:
            raise ValueError(
                f"optimizer_shardings: {missing[0]!r} has no sharding; pass shardings (e.g. "
                "jlora.lora_shardings(base, specs, config)) or placed arrays / "
                "ShapeDtypeStructs with sharding=..."
            )
        specs = [x.sharding for _, x in param_leaves]
    else:
        specs = _line_up(shardings, [tuple(p) for p, _ in param_leaves])
    replicated = _replicated(specs)
    by_path = {
        tuple(path): (tuple(leaf.shape), spec)
        for (path, leaf), spec in zip(param_leaves, specs, strict=True)
    }

    def sharding_for(path: Any, leaf: Any) -> Any:
        for start in range(len(path) + 1):
            # the longest parameter path that ends the state leaf's path, with its shape
            found = by_path.get(tuple(path[start:]))
            if found is not None and found[0] == tuple(leaf.shape):
                return replicated if found[1] is None else found[1]
        return replicated

    return jax.tree.map_with_path(sharding_for, jax.eval_shape(optimizer.init, params))


def _line_up(shardings: Any, paths: list[Any]) -> list[Any]:
    """``shardings``' entries in the order of the params' leaf ``paths``, one per leaf."""
    is_entry = lambda x: x is None or isinstance(x, (Sharding, PartitionSpec))  # noqa: E731
    entries = jax.tree.flatten_with_path(shardings, is_leaf=is_entry)[0]
    have = [tuple(p) for p, _ in entries]
    if have != paths:
        extra = [path_str(p) for p in have if p not in set(paths)]
        lacking = [path_str(p) for p in paths if p not in set(have)]
        raise ValueError(
            f"optimizer_shardings: shardings is not shaped like params: entries for {extra[:3]} "
            f"that params lacks, none for {lacking[:3]}; pass one sharding (or None) per leaf "
            "of params, e.g. jlora.lora_shardings(base, specs, config) for the adapted tree"
        )
    for path, entry in entries:
        if not is_entry(entry):
            raise TypeError(
                f"optimizer_shardings: the sharding of {path_str(path)!r} is "
                f"{type(entry).__name__}; expected a NamedSharding, a PartitionSpec or None"
            )
    return [entry for _, entry in entries]


def _replicated(specs: list[Any]) -> Any:
    """The replicated sharding of the same kind (and mesh) as ``specs``."""
    for spec in specs:
        if isinstance(spec, NamedSharding):
            return NamedSharding(spec.mesh, PartitionSpec())
    for spec in specs:
        if isinstance(spec, Sharding) and spec.is_fully_replicated:
            return spec  # e.g. a SingleDeviceSharding: replicated on its one device
    return PartitionSpec()
