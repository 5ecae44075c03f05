"""Selecting the kernels to adapt: ``targets`` minus ``exclude``, checked against the tree."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from jlora._config import LoraConfig, Selector, selectors
from jlora._layout import adapter_owner
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


def select_kernels(params: Any, config: LoraConfig) -> list[tuple[KeyPath, Any]]:
    """The ``(path, kernel)`` pairs of ``params`` that ``config`` adapts, in tree order.

    Adapter leaves already in the tree are never candidates. Each selected leaf must be an
    array of rank >= 2, or a quantised kernel (``jlora.quantize``: QLoRA bases take adapters
    like float ones).

    Args:
      params: a parameter tree.
      config: the LoRA config whose ``targets`` and ``exclude`` select.

    Returns:
      A list of ``(key_path, leaf)``.

    Raises:
      ValueError: if nothing matches (the message lists real paths), or a match is not a
        kernel of rank >= 2.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
      >>> [path_str(p) for p, _ in select_kernels(tree, LoraConfig())]
      ['dense/kernel']
    """
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
        chosen.append((path, leaf))
    if not chosen:
        raise ValueError(
            f"LoraConfig targets {list(selectors(config.targets))} (exclude "
            f"{list(selectors(config.exclude))}) match "
            f"no kernel; regexes are fullmatched against paths such as:\n{some_paths(params)}"
        )
    return chosen
