"""``lora_optimizer``: an optax transform that trains only the adapter leaves."""

from __future__ import annotations

from typing import Any

import optax

from jlora._loraplus import loraplus_partition
from jlora._partition import lora_labels
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
