"""Where LoRA adapters live in a tree, and how their shapes relate to the kernel's.

Design note (the one place this is decided):

* An adapted kernel ``W`` stored under key ``k`` of a dict keeps its place, untouched. Its two
  adapter factors are new siblings in the same dict: ``f"{k}_lora_a"`` (A) and ``f"{k}_lora_b"``
  (B). The suffix names the kernel it belongs to, so a dict holding several kernels
  (``kernel``, ``embedding``, ``w1``, ...) stays unambiguous, and stripping all ``*_lora_*``
  keys gives back exactly the original tree.
* Every axis of ``W`` has a role: ``"stack"`` (a layer axis added by ``nn.scan``, experts),
  ``"in"`` (contracted with the input) or ``"out"``. With ``S``, ``I`` and ``O`` the shapes of
  the stack, in and out axes in kernel order::

      A: S + I + (r,)        B: S + (r,) + O
      delta_W = scale * einsum(A, B over r), laid back in W's axis order.

  For a 2-D ``(in, out)`` Dense kernel this is the paper's ``W + s * A @ B``.
* Several named adapters on one base never put a name into a key: each is its own ``lora``
  tree (the adapter half of ``split``, with these same ``k_lora_a`` / ``k_lora_b`` keys) kept in
  a mapping ``{name: Adapter}`` (``_adapters``); the active one is the one combined into the
  params. So every function works on any of them unchanged, and a mixed batch stacks them along
  a new leading axis of A and B.
* DoRA adds a third sibling, ``f"{k}_lora_m"``: the magnitude ``m``, one entry per output unit
  (shape ``S + O``), so the adapted kernel is ``m * (W + s*A*B) / ||W + s*A*B||`` with the norm
  over the ``in`` axes (``_dora``). It is an adapter leaf like A and B (trained, split off).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

Role = Literal["stack", "in", "out"]
ROLES: tuple[str, ...] = ("stack", "in", "out")

A_SUFFIX = "_lora_a"
B_SUFFIX = "_lora_b"
M_SUFFIX = "_lora_m"


def adapter_keys(kernel_key: str) -> tuple[str, str]:
    """The dict keys of A and B for a kernel stored under ``kernel_key``.

    Example:
      >>> adapter_keys("kernel")
      ('kernel_lora_a', 'kernel_lora_b')
    """
    return kernel_key + A_SUFFIX, kernel_key + B_SUFFIX


def magnitude_key(kernel_key: str) -> str:
    """The dict key of the DoRA magnitude for a kernel stored under ``kernel_key``.

    Example:
      >>> magnitude_key("kernel")
      'kernel_lora_m'
    """
    return kernel_key + M_SUFFIX


def adapter_owner(key: object) -> tuple[str, str] | None:
    """For an adapter key, ``(kernel_key, "a" | "b" | "m")``; ``None`` for any other key.

    Example:
      >>> adapter_owner("kernel_lora_b"), adapter_owner("kernel")
      (('kernel', 'b'), None)
    """
    if not isinstance(key, str):
        return None
    for suffix, which in ((A_SUFFIX, "a"), (B_SUFFIX, "b"), (M_SUFFIX, "m")):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], which
    return None


def axes_of(roles: Sequence[str], role: str) -> tuple[int, ...]:
    """Indices of the kernel axes that have ``role``."""
    return tuple(i for i, r in enumerate(roles) if r == role)


def magnitude_shape(kernel_shape: Sequence[int], roles: Sequence[str]) -> tuple[int, ...]:
    """Shape of a kernel's DoRA magnitude: its ``stack`` then ``out`` axes.

    Example:
      >>> magnitude_shape((2, 64, 4, 16), ("stack", "in", "out", "out"))
      (2, 4, 16)
    """
    stack, _, fan_out = role_sizes(kernel_shape, roles)
    return stack + fan_out


def role_sizes(
    kernel_shape: Sequence[int], roles: Sequence[str]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The sizes of the kernel's ``stack``, ``in`` and ``out`` axes, each group in kernel order.

    Example:
      >>> role_sizes((2, 64, 4, 16), ("stack", "in", "out", "out"))
      ((2,), (64,), (4, 16))
    """
    stack, fan_in, fan_out = (
        tuple(kernel_shape[i] for i in axes_of(roles, role)) for role in ROLES
    )
    return stack, fan_in, fan_out


def fans(kernel_shape: Sequence[int], roles: Sequence[str]) -> tuple[int, int]:
    """``(fan_in, fan_out)``: the kernel per stack entry as a ``(fan_in, fan_out)`` matrix.

    Example:
      >>> fans((2, 64, 4, 16), ("stack", "in", "out", "out"))
      (64, 64)
    """
    _, fan_in, fan_out = role_sizes(kernel_shape, roles)
    return math.prod(fan_in), math.prod(fan_out)


def check_rank(name: str, shape: tuple[int, ...], roles: tuple[str, ...], rank: int) -> None:
    """Refuses a rank above ``min(fan_in, fan_out)`` of kernel ``name``.

    Raises:
      ValueError: naming the kernel, its shape and roles, and the largest rank it allows.
    """
    fan_in, fan_out = fans(shape, roles)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"rank {rank} for {name!r} exceeds what its kernel allows: shape {shape} with roles "
            f"{roles} has {fan_in} inputs and {fan_out} outputs, so rank <= {min(fan_in, fan_out)}"
            "; lower rank or set a smaller one for this path with rank_pattern"
        )


def adapter_shapes(
    kernel_shape: Sequence[int], roles: Sequence[str], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for a kernel of ``kernel_shape`` whose axes have ``roles``.

    Example:
      >>> adapter_shapes((2, 64, 4, 16), ("stack", "in", "out", "out"), 8)
      ((2, 64, 8), (2, 8, 4, 16))
    """
    stack, fan_in, fan_out = role_sizes(kernel_shape, roles)
    return (*stack, *fan_in, rank), (*stack, rank, *fan_out)


def einsum_spec(roles: Sequence[str]) -> str:
    """The einsum that contracts A with B over the rank axis into the kernel's axis order.

    Example:
      >>> einsum_spec(("in", "in", "out"))
      'abz,zc->abc'
    """
    letters = string.ascii_lowercase[: len(roles)]
    if len(roles) > 25:
        raise ValueError(f"kernels of rank {len(roles)} > 25 are not supported")
    pick = {role: "".join(letters[i] for i in axes_of(roles, role)) for role in ROLES}
    a = pick["stack"] + pick["in"] + "z"
    b = pick["stack"] + "z" + pick["out"]
    return f"{a},{b}->{letters}"


def delta(a: jax.Array, b: jax.Array, roles: Sequence[str], scale: float) -> jax.Array:
    """``scale * A·B`` laid out like the kernel, in the adapters' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> delta(jnp.ones((3, 2)), jnp.ones((2, 4)), ("in", "out"), 0.5).shape
      (3, 4)
    """
    product = jnp.einsum(einsum_spec(roles), a, b, precision=jax.lax.Precision.HIGHEST)
    return product * jnp.asarray(scale, product.dtype)
