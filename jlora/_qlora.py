"""QLoRA bases: blockwise int8 / NF4 quantisation of the frozen kernels, dequantised at use.

``quantize`` replaces each kernel that the config's ``targets``/``exclude`` select by a
:class:`Quantized` node: the kernel flattened (in its own layout, so stacked and N-d kernels
need nothing special) into blocks of ``block_size`` values, one float32 absmax scale per block,
and per value an int8 code (``round(127·x/absmax)``, 8 bits) or a 4-bit index into the NF4
levels of QLoRA (Dettmers et al., 2023; two per byte). Adapters stay in float. ``jlora.lora``
and ``jlora.value_and_grad`` take such trees as they are and dequantise each kernel where it is
used (``_factorised.quantized_view``): inside the consuming op's ``jax.checkpoint``, so the
backward pass keeps codes rather than dense kernels, and per layer inside a ``scan`` over a
stack. With stacked layers (``nn.scan``) the step's temporary memory is then the float base's
and only the stored base shrinks. In an unrolled loop over layers, XLA:CPU schedules the
dequantisations, which read only arguments, ahead of their uses, so several dense kernels are
alive at once (measured in ``benchmarks/qlora.py``; the README gives the XLA flag that fixes
inference).
``merge_params`` refuses quantised kernels; ``merge_quantized`` (``_merge``) asks how the merged
kernels are stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig, Selectors
from jlora._paths import path_str
from jlora._quantized import NF4, Quantized, as_array, is_quantized
from jlora._targets import select_kernels

KINDS = ("int8", "nf4")


def check_options(kind: str, block_size: int, caller: str) -> None:
    """Validates a quantisation ``kind`` and ``block_size``; errors name ``caller``."""
    if kind not in KINDS:
        raise ValueError(f"{caller}: kind must be one of {KINDS}; got {kind!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{caller}: block_size must be an int >= 2; got {block_size!r}")
    if kind == "nf4" and block_size % 2:
        raise ValueError(
            f"{caller}: NF4 packs two 4-bit codes per byte, so block_size must be even; got "
            f"{block_size}"
        )


def quantize_kernel(name: str, w: jax.Array, kind: str, block_size: int) -> Quantized:
    size = math.prod(w.shape)
    if size % block_size:
        fits = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if size % b == 0 and b < block_size]
        hint = f"e.g. block_size={fits[0]}" if fits else "or exclude it from the targets"
        raise ValueError(
            f"quantize: kernel {name!r} of shape {tuple(w.shape)} has {size} values, not a "
            f"multiple of block_size={block_size}; pick a block size that divides it ({hint})"
        )
    blocks = w.astype(jnp.float32).reshape(-1, block_size)
    scales = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(scales == 0, 1.0, scales)[:, None]
    if kind == "int8":
        codes = jnp.round(normed * 127).astype(jnp.int8)
    else:
        mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
        idx = jnp.searchsorted(mids, normed).astype(jnp.uint8).reshape(-1, 2)
        codes = (idx[:, 0] << 4 | idx[:, 1]).reshape(scales.shape[0], -1)
    return Quantized(codes, scales, kind, tuple(w.shape), jnp.dtype(w.dtype).name, block_size)


def quantize(
    params: Any, targets: LoraConfig | Selectors, *, kind: str = "nf4", block_size: int = 64
) -> Any:
    """Replaces every selected kernel by a blockwise-quantised :class:`Quantized` node.

    Args:
      params: a tree (with or without adapters; adapter leaves are never quantised).
      targets: a :class:`jlora.LoraConfig` (its ``targets``/``exclude`` select, the same rules
        as ``init_lora``) or the selectors themselves (regex, predicate or a list).
      kind: ``"nf4"`` (4-bit NormalFloat, QLoRA's) or ``"int8"`` (absmax int8).
      block_size: values per scale; must divide each selected kernel's size (even for NF4).

    Returns:
      The tree with the selected kernels quantised; every other leaf unchanged.

    Raises:
      ValueError: for an unknown kind, a bad block size, a kernel whose size the block does
        not divide, or one already quantised; as ``init_lora`` for targets that match nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize({"d": {"kernel": jnp.ones((8, 16))}}, r".*kernel", kind="int8")
      >>> q["d"]["kernel"].bits_per_parameter
      8.5
      >>> bool(jnp.allclose(dequantize(q)["d"]["kernel"], 1.0))
      True
    """
    check_options(kind, block_size, "quantize")
    config = targets if isinstance(targets, LoraConfig) else LoraConfig(targets=targets)
    chosen = {tuple(p) for p, _ in select_kernels(params, config)}

    def one(path: Sequence[Any], leaf: Any) -> Any:
        if tuple(path) not in chosen:
            return leaf
        if is_quantized(leaf):
            raise ValueError(
                f"quantize: kernel {path_str(tuple(path))!r} is already quantised ({leaf.kind}, "
                f"block_size={leaf.block_size}); call jlora.dequantize first to quantise it "
                "again another way, or exclude it from the targets"
            )
        return quantize_kernel(path_str(tuple(path)), leaf, kind, block_size)

    return jax.tree.map_with_path(one, params, is_leaf=is_quantized)


def has_quantized(tree: Any) -> bool:
    """Whether ``tree`` holds any :class:`Quantized` kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.ones((8, 16))}
      >>> has_quantized(base), has_quantized(quantize(base, "w", block_size=16))
      (False, True)
    """
    return any(map(is_quantized, jax.tree.leaves(tree, is_leaf=is_quantized)))


def dequantize(params: Any) -> Any:
    """``params`` with every :class:`Quantized` node replaced by its dense kernel.

    ``jlora.lora`` and ``jlora.value_and_grad`` do not need it (they dequantise each kernel
    where it is used); call it for the merge path or any code that wants the dense base.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize({"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}, "w", block_size=16)
      >>> float(jnp.abs(dequantize(q)["w"] - jnp.linspace(-1, 1, 64).reshape(8, 8)).max()) < 0.15
      True
    """
    if not has_quantized(params):
        return params  # nothing to do: the very same tree, no container rebuilt
    return jax.tree.map(as_array, params, is_leaf=is_quantized)
