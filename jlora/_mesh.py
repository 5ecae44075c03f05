"""Meshes in practice: regex rules to ``PartitionSpec``s, and the collectives a step runs.

``collectives`` reads a compiled program's HLO, so a user can check that a LoRA step moves only
adapter-sized gradients (and measure what it saves against full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jlora._paths import path_str

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# e.g. "%all-reduce.3 = f32[64,256]{1,0} all-reduce(" or a tuple "(f32[4], f32[8,2]) all-reduce("
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


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


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: its kind, result shapes and bytes."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int

    @property
    def largest(self) -> int:
        """Element count of the largest array it moves."""
        return max((math.prod(s) for s in self.shapes), default=0)


def collectives(compiled: Any) -> list[Collective]:
    """The collectives in a compiled program's HLO, with the sizes of what they produce.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``) or its HLO text.

    Returns:
      One :class:`Collective` per op, in program order.

    Example:
      >>> hlo = "%ar = f32[64,256]{1,0} all-reduce(f32[64,256]{1,0} %x), to_apply=%add"
      >>> [(c.kind, c.shapes, c.nbytes) for c in collectives(hlo)]
      [('all-reduce', ((64, 256),), 65536)]
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    found = []
    for result, kind in _OP.findall(text):
        shapes, nbytes = [], 0
        for dtype, dims in _ARRAY.findall(result):
            shape = tuple(int(d) for d in dims.split(",") if d)
            shapes.append(shape)
            nbytes += math.prod(shape) * _itemsize(dtype)
        found.append(Collective(kind, tuple(shapes), nbytes))
    return found


def _itemsize(hlo_dtype: str) -> int:
    names = {"pred": "bool", "bf16": "bfloat16", "f16": "float16", "f32": "float32"}
    names |= {"f64": "float64", "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64"}
    names |= {"u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64"}
    if hlo_dtype == "bf16":
        return 2
    return np.dtype(names.get(hlo_dtype, "float32")).itemsize
