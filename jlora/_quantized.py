"""The quantised kernel node of a QLoRA base: codes, blockwise scales, and how to undo them.

Its own module so that target selection (``_targets``) can treat it as a kernel without
importing the quantiser. See ``_qlora`` for how kernels are quantised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1], exact zero), as in bitsandbytes.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A blockwise-quantised kernel: codes, one scale per block, and how to undo it."""

    codes: jax.Array
    scales: jax.Array
    kind: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(metadata={"static": True})

    @property
    def ndim(self) -> int:
        """Rank of the original kernel."""
        return len(self.shape)

    @property
    def bits_per_parameter(self) -> float:
        """Storage bits per kernel value, scales included (int8: 8 + 32/block; NF4: 4 + ...)."""
        return 8 * (self.codes.nbytes + self.scales.nbytes) / math.prod(self.shape)

    def dequantize(self) -> jax.Array:
        """The kernel back in its original dtype (up to the quantisation error)."""
        if self.kind == "int8":
            values = self.codes.astype(jnp.float32) / 127.0
        else:
            idx = jnp.stack([self.codes >> 4, self.codes & 0xF], axis=-1).reshape(
                self.scales.shape[0], -1
            )
            values = jnp.asarray(NF4)[idx]
        return (values * self.scales[:, None]).reshape(self.shape).astype(self.dtype)


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a :class:`Quantized` kernel (a leaf for jlora, though a pytree).

    Pass it as ``is_leaf`` to see quantised kernels whole in ``jax.tree`` functions.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> q = jlora.quantize({"w": jnp.ones((8, 16)), "b": jnp.ones(16)}, "w", block_size=16)
      >>> [is_quantized(x) for x in jax.tree.leaves(q, is_leaf=is_quantized)]
      [False, True]
    """
    return isinstance(leaf, Quantized)


def as_array(kernel: Any) -> Any:
    """``kernel`` as a dense array: a :class:`Quantized` one dequantised, others as they are."""
    return kernel.dequantize() if is_quantized(kernel) else kernel
