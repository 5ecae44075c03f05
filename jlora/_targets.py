"""Selecting the kernels to adapt: ``targets`` minus ``exclude``, checked against the tree."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._axes import axis_roles
from jlora._config import LoraConfig, Selector, selectors
from jlora._layout import adapter_owner, check_rank
from jlora._paths import KeyPath, path_str, some_paths
from jlora._quantized import is_quantized


def _matches(selectors: Sequence[Selector], path: str, leaf: Any) -> bool:
    spec = jax.ShapeDtypeStruct(getattr(leaf, "shape", ()), getattr(leaf, "dtype", None))
    for selector in selectors:
        if isinstance(selector, str):
            if re.fullmatch(selector, path):
                return True
        elif selector(path, spec):
            return True
    return False


def _is_float(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _flax_box(x: Any) -> str | None:
    """``"linen"`` / ``"nnx"`` for Flax's boxed parameters, else ``None``."""
    # Looked up, not imported: if Flax was never imported, no tree can hold its boxes.
    meta, nnx = sys.modules.get("flax.core.meta"), sys.modules.get("flax.nnx")
    if meta is not None and isinstance(x, meta.AxisMetadata):
        return "linen"
    if nnx is not None and isinstance(x, nnx.Variable):
        return "nnx"
    return None


def _refuse_boxes(params: Any) -> None:
    leaves = jax.tree.flatten_with_path(params, is_leaf=lambda x: _flax_box(x) is not None)[0]
    for path, leaf in leaves:
        kind = _flax_box(leaf)
        if kind is None:
            continue
        where = f"{type(leaf).__name__} at {path_str(path)!r}"
        if kind == "linen":
            fix = (
                "unbox them with flax.linen.meta.unbox(params) (nn.unbox) and pass their "
                "shardings, nn.get_partition_spec(params) (through nn.logical_to_mesh for "
                "logical names), as init_lora(..., shardings=...); jlora.lora_shardings(...) "
                "then gives the shardings of the adapted tree"
            )
        else:
            fix = (
                "take the arrays with nnx.to_pure_dict(state) and their shardings with "
                "nnx.to_pure_dict(nnx.get_partition_spec(state)), passed as "
                "init_lora(..., shardings=...)"
            )
        raise TypeError(
            f"params holds Flax boxed parameters ({where}); jlora adapts trees of plain "
            f"arrays, and would add adapters beside the box's .value. To use them, {fix}"
        )


def select_kernels(params: Any, config: LoraConfig) -> list[tuple[KeyPath, Any]]:
    """The ``(path, kernel)`` pairs of ``params`` that ``config`` adapts, in tree order.

    Adapter leaves already in the tree are never candidates. Each selected leaf must be a
    floating-point array of rank >= 2, or a quantised kernel (``jlora.quantize``: QLoRA bases
    take adapters like float ones).

    Args:
      params: a parameter tree.
      config: the LoRA config whose ``targets`` and ``exclude`` select.

    Returns:
      A list of ``(key_path, leaf)``.

    Raises:
      ValueError: if nothing matches (the message lists real paths), or a match is not a
        floating-point kernel of rank >= 2.
      TypeError: if ``params`` holds Flax boxed parameters (``nn.Partitioned``,
        ``nnx.Variable``); the message says how to unbox them and keep their shardings.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
      >>> [path_str(p) for p, _ in select_kernels(tree, LoraConfig())]
      ['dense/kernel']
    """
    _refuse_boxes(params)
    chosen = []
    for path, leaf in jax.tree.flatten_with_path(params, is_leaf=is_quantized)[0]:
        if adapter_owner(getattr(path[-1], "key", None)) is not None:
            continue
        name = path_str(path)
        wanted = _matches(selectors(config.targets), name, leaf)
        if not wanted or _matches(selectors(config.exclude), name, leaf):
            continue
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) < 2:
            raise ValueError(
                f"targets selected {name!r}, which is {type(leaf).__name__} of shape {shape}; "
                "LoRA adapts kernels of rank >= 2. Narrow targets (e.g. r'.*/kernel') or add "
                "this path to exclude"
            )
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not is_quantized(leaf) and not _is_float(dtype):
            raise ValueError(
                f"targets selected {name!r}, a {jnp.dtype(dtype).name} array of shape "
                f"{tuple(shape)}; LoRA adds a float update W + s·A·B, which an integer or "
                "boolean leaf cannot hold. Add this path to exclude or narrow targets (for "
                "quantised kernels use jlora.quantize, whose kernels take adapters)"
            )
        chosen.append((path, leaf))
    if not chosen:
        raise ValueError(
            f"LoraConfig targets {list(selectors(config.targets))} (exclude "
            f"{list(selectors(config.exclude))}) match "
            f"no kernel; regexes are fullmatched against paths such as:\n{some_paths(params)}"
        )
    return chosen


def float_kernels(
    params: Any, config: LoraConfig, caller: str, why: str
) -> Iterator[tuple[KeyPath, jax.Array, tuple[str, ...], int, float]]:
    """``(path, W, roles, rank, scale)`` of each selected float kernel, rank checked.

    For the variants that factor the kernel itself (PiSSA, OLoRA, LoftQ); ``caller`` names
    the function in errors.

    Raises:
      ValueError: for a quantised kernel (``why`` says what to do instead), a rank too large
        for a kernel, or a kernel with no axis rule.
    """
    for path, w in select_kernels(params, config):
        name = path_str(path)
        if is_quantized(w):
            raise ValueError(f"{caller}: kernel {name!r} is quantised; {why}")
        roles = axis_roles(name, tuple(w.shape), config)
        rank = config.rank_for(name)
        check_rank(name, tuple(w.shape), roles, rank)
        yield tuple(path), w, roles, rank, config.scale_for(name, rank)
