"""LoRA+ learning-rate groups: B factors (and 1-D adapter leaves) train ``ratio`` times faster.

LoRA+ (Hayou et al., 2024) gives B a learning rate ``ratio`` times A's. Here the two groups are
optax labels (``"lora_a"``, ``"lora_b"``, ``"frozen"``), and the B group runs the same inner
transform followed by ``optax.scale(ratio)``. Scaling the update equals scaling the learning
rate exactly (up to one rounding) for every transform whose update is proportional to its
learning rate: ``sgd``, ``adam``, ``adamw`` (weight decay is inside the ``lr`` product),
``lion``, ``adafactor``, ``rmsprop``, ... For a transform where ``lr`` enters non-linearly,
build the groups yourself with :func:`loraplus_labels` and ``optax.partition``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora._layout import adapter_owner

LABELS = ("lora_a", "lora_b", "frozen")


def _label(path: Any, leaf: Any) -> str:
    owner = adapter_owner(getattr(path[-1], "key", None)) if path else None
    if owner is None:
        return "frozen"
    # B, and any 1-D adapter leaf (PEFT's rule: DoRA's magnitude vector), get lr * ratio.
    if owner[1] != "a" or getattr(leaf, "ndim", 0) == 1:
        return "lora_b"
    return "lora_a"


def loraplus_labels(params: Any) -> Any:
    """A tree like ``params`` labelling each leaf ``"lora_a"``, ``"lora_b"`` or ``"frozen"``.

    ``"lora_b"`` covers every B factor and every other non-A adapter leaf (1-D or magnitude
    leaves), as PEFT's ``create_loraplus_optimizer`` does.

    Example:
      >>> import jax.numpy as jnp
      >>> loraplus_labels({"kernel": jnp.ones((2, 2)), "kernel_lora_a": jnp.ones((2, 1)),
      ...                  "kernel_lora_b": jnp.ones((1, 2))})
      {'kernel': 'frozen', 'kernel_lora_a': 'lora_a', 'kernel_lora_b': 'lora_b'}
    """
    return jax.tree.map_with_path(_label, params)


def check_ratio(ratio: Any) -> float:
    """Validates a LoRA+ ratio (a positive number) and returns it as a float.

    Raises:
      TypeError: if ``ratio`` is not a real number.
      ValueError: if it is not positive.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(
            f"loraplus_lr_ratio must be a positive number (PEFT suggests 16); got {ratio!r}"
        )
    if not ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be > 0 (B's lr = A's lr * ratio; PEFT suggests 16); "
            f"got {ratio!r}"
        )
    return float(ratio)


def loraplus_partition(
    optimizer: optax.GradientTransformation, ratio: float
) -> optax.GradientTransformation:
    """``optimizer`` on A, ``optimizer`` then ``scale(ratio)`` on B, zero updates elsewhere.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"k": jnp.ones((2, 2)), "k_lora_a": jnp.ones((2, 1)), "k_lora_b": jnp.ones((1, 2))}
      >>> tx = loraplus_partition(optax.sgd(0.1), 4.0)
      >>> u, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
      >>> [round(float(u[k][0, 0]), 6) for k in ("k_lora_a", "k_lora_b", "k")]
      [-0.1, -0.4, 0.0]
    """
    return optax.partition(
        {
            "lora_a": optimizer,
            "lora_b": optax.chain(optimizer, optax.scale(check_ratio(ratio))),
            "frozen": optax.set_to_zero(),
        },
        loraplus_labels,
    )
