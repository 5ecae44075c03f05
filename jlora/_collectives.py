"""The collectives a compiled step runs, read from its HLO.

``collectives`` reads a compiled program's HLO, so a user can check that a LoRA step moves only
adapter-sized gradients (and measure what it saves against full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

import jax
import numpy as np

_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)  # XLA's "/*index=5*/" inside long tuples
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)")
_COMPUTATION = re.compile(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"([\w\-]+)\(")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,<=]*)\]")
_CALLEE = re.compile(
    r"\b(to_apply|calls|body|condition|branch_computations|true_computation|false_computation)"
    r"=(\{[^}]*\}|%?[\w.\-]+)"
)
# backend_config is JSON, printed bare or as an escaped string depending on the XLA version
_TRIP = re.compile(r'known_trip_count\\?"\s*:\s*\{\s*\\?"n\\?"\s*:\s*\\?"(\d+)')
_DEVICES = re.compile(r"\b(replica_count|num_partitions)=(\d+)")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\}[,\s]*)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\((?P<ids>.*?)\))?"
    r"\s*\{(?P<grouped>[^}]*)\}"
)
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\}[,\s]*)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program: its kind, results, devices and repetitions.

    Attributes:
      kind: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``, ``"all-to-all"``,
        ``"ragged-all-to-all"``, ``"collective-permute"`` or ``"collective-broadcast"``
        (async ``-start``/``-done`` pairs are one op).
      shapes: the shape of every array it produces (one per tuple element).
      nbytes: bytes of those results per device, per execution of the op.
      replica_groups: the groups of devices that communicate, as positions in the program's
        device assignment (for ``jit`` over one mesh: indices into ``mesh.devices.flat``); for
        a collective-permute, the sets of devices its source-target pairs connect. ``()`` when
        the HLO does not say.
      axes: the mesh axes the groups span, when ``collectives`` was given the mesh: ``()`` for
        groups of one device, ``None`` without a mesh or when the groups are not whole axes.
      count: how often the op runs per execution of the program: the product of the trip
        counts of the ``while`` loops (``scan``, ``fori_loop``) around it.
      count_exact: ``False`` when a loop's trip count is unknown to XLA (counted once) or the
        op sits in a ``cond`` branch (counted as if taken), so ``count`` is an estimate.
      name: the op's name in the HLO text.
    """

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int
    replica_groups: tuple[tuple[int, ...], ...] = ()
    axes: tuple[str, ...] | None = None
    count: int = 1
    count_exact: bool = True
    name: str = ""

    @property
    def largest(self) -> int:
        """Element count of the largest array it moves."""
        return max((math.prod(s) for s in self.shapes), default=0)

    @property
    def total_bytes(self) -> int:
        """Bytes of its results per device over all ``count`` executions: ``nbytes * count``."""
        return self.nbytes * self.count


@dataclasses.dataclass
class _Op:
    name: str
    computation: str
    opcode: str
    shape: str
    operands: list[str]
    attrs: str
    trip_count: int | None


def collectives(compiled: Any, mesh: jax.sharding.Mesh | None = None) -> list[Collective]:
    r"""The collectives a compiled program runs, with result sizes, device groups and counts.

    Reads the optimised HLO text (after SPMD partitioning, so it shows what XLA really
    inserted). Ops in ``while`` bodies (``lax.scan``, ``fori_loop``) are listed once with
    ``count`` = the loop's trip count, so ``sum(c.total_bytes for c in ...)`` is the traffic
    of one call of the program, per device.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``) or its HLO text.
      mesh: the mesh the program was compiled for; each collective's ``axes`` then names the
        mesh axes it communicates over.

    Returns:
      One :class:`Collective` per op, in program order.

    Raises:
      TypeError: if ``compiled`` is a ``Lowered`` (its text has no collectives yet) or has no
        HLO text.
      ValueError: if ``mesh`` does not have as many devices as the program.

    Example:
      >>> hlo = "\n".join([
      ...     "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
      ...     "  %ar = f32[8]{0} all-reduce(%v), replica_groups={{0,2},{1,3}}, to_apply=%add",
      ...     "}",
      ...     "ENTRY %main (a: f32[8]) -> f32[8] {",
      ...     "  %w = (s32[], f32[8]) while(%t), condition=%c, body=%body,"
      ...     ' backend_config={"known_trip_count":{"n":"4"}}',
      ...     "}",
      ... ])
      >>> [(c.kind, c.shapes, c.nbytes, c.count, c.replica_groups) for c in collectives(hlo)]
      [('all-reduce', ((8,),), 32, 4, ((0, 2), (1, 3)))]
    """
    if isinstance(compiled, jax.stages.Lowered):
        raise TypeError(
            "collectives needs the compiled program: XLA inserts collectives when it compiles, "
            "so a Lowered has none yet. Pass jit(f).lower(...).compile()"
        )
    if isinstance(compiled, str):
        text = compiled
    elif hasattr(compiled, "as_text"):
        text = compiled.as_text()
    else:
        raise TypeError(
            f"collectives takes a jax.stages.Compiled or its HLO text, not "
            f"{type(compiled).__name__}"
        )
    text = _COMMENT.sub("", text)
    ops, calls, entry = _parse(text)
    header = text.lstrip().split("\n", 1)[0]
    sizes = [int(n) for _, n in _DEVICES.findall(header)] if header.startswith("HloModule") else []
    n_devices = math.prod(sizes) if sizes else None
    if mesh is not None and n_devices is not None and mesh.devices.size != n_devices:
        raise ValueError(
            f"collectives: the program runs on {n_devices} devices but the mesh "
            f"{dict(mesh.shape)} has {mesh.devices.size}; pass the mesh it was compiled for"
        )
    counts = _counts(calls, entry)
    done = {op.operands[0]: op.shape for op in ops if op.opcode.endswith("-done") and op.operands}
    found = []
    for op in ops:
        kind = op.opcode.removesuffix("-start")
        if kind not in _KINDS or op.computation not in counts:
            continue
        if op.opcode.endswith("-start") and "calls=" in op.attrs:
            continue  # an async wrapper: the wrapped op is counted in its own computation
        shapes, nbytes = _arrays(done.get(op.name, op.shape))
        groups = _groups(op.attrs, n_devices)
        count, exact = counts[op.computation]
        axes = None if mesh is None else _mesh_axes(groups, mesh, op.name)
        found.append(Collective(kind, shapes, nbytes, groups, axes, count, exact, op.name))
    return found


def _parse(text: str) -> tuple[list[_Op], dict[str, list[tuple[str, int, bool]]], str | None]:
    """The ops, the call graph ``{caller: [(callee, times, exact)]}`` and the entry's name."""
    ops, calls, entry, computation = [], defaultdict(list), None, ""
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            header = _COMPUTATION.match(line)
            if header is not None and not line.startswith(("HloModule", " ")):
                computation = header.group(1)
                entry = computation if line.startswith("ENTRY") else entry
            continue
        trip = _TRIP.search(line)
        rest = _STRING.sub('""', match.group(2))
        if rest.startswith("("):
            close = _closing(rest, 0)
            shape, rest = rest[: close + 1], rest[close + 1 :].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        opcode = _OPCODE.match(rest)
        if opcode is None:
            continue
        close = _closing(rest, opcode.end() - 1)
        operands = re.findall(r"%([\w.\-]+)", rest[opcode.end() : close])
        op = _Op(match.group(1), computation, opcode.group(1), shape, operands, rest[close + 1 :],
                 int(trip.group(1)) if trip else None)  # fmt: skip
        ops.append(op)
        for attr, value in _CALLEE.findall(op.attrs):
            for callee in re.findall(r"%?([\w.\-]+)", value):
                if op.opcode == "while" and attr in ("body", "condition"):
                    times = 1 if op.trip_count is None else op.trip_count + (attr == "condition")
                    calls[computation].append((callee, times, op.trip_count is not None))
                else:
                    conditional = attr.endswith(("branch_computations", "_computation"))
                    calls[computation].append((callee, 1, not conditional))
    return ops, calls, entry


def _closing(text: str, start: int) -> int:
    """The index of the parenthesis closing the one at ``start`` (or the end of ``text``)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def _counts(
    calls: dict[str, list[tuple[str, int, bool]]], entry: str | None
) -> dict[str, tuple[int, bool]]:
    """How often each computation reachable from the entry runs, and whether that is exact."""
    called = {callee for edges in calls.values() for callee, _, _ in edges}
    roots = [entry] if entry is not None else [""] + [c for c in calls if c not in called]
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for callee, _, _ in calls.get(name, ()):
            visit(callee)
        order.append(name)

    for root in roots:
        visit(root)
    counts = dict.fromkeys(order, 0)
    exact = dict.fromkeys(order, True)
    for root in roots:
        counts[root] = 1
    for name in reversed(order):  # callers before callees: a call graph has no cycles
        for callee, times, known in calls.get(name, ()):
            counts[callee] += counts[name] * times
            exact[callee] = exact[callee] and exact[name] and known
    return {name: (counts[name], exact[name]) for name in order}


def _arrays(shape: str) -> tuple[tuple[tuple[int, ...], ...], int]:
    shapes, nbytes = [], 0
    for dtype, dims in _ARRAY.findall(shape):
        dims_ = tuple(int(d.removeprefix("<=")) for d in dims.split(",") if d)
        shapes.append(dims_)
        nbytes += math.ceil(math.prod(dims_) * _bits(dtype) / 8)
    return tuple(shapes), nbytes


def _bits(hlo_dtype: str) -> int:
    """Bits per element of an HLO element type: ``pred`` 8, ``bf16`` 16, ``f8e4m3fn`` 8, ..."""
    if hlo_dtype == "pred":
        return 8
    width = re.match(r"[a-z]+?(\d+)", hlo_dtype)
    return int(width.group(1)) if width else 0  # token[], opaque[]: no data


def _groups(attrs: str, n_devices: int | None) -> tuple[tuple[int, ...], ...]:
    """The device groups of one op, from any of the forms XLA prints them in."""
    if (m := _GROUPS_LIST.search(attrs)) is not None:
        groups = tuple(
            tuple(int(i) for i in re.findall(r"\d+", g)) for g in re.findall(r"\{[^}]*\}", m[1])
        )
        if groups or n_devices is None:
            return groups
        return (tuple(range(n_devices)),)  # "{}": every device in one group
    if (m := _GROUPS_IOTA.search(attrs)) is not None:
        shape, reshape = _ints(m[1]), _ints(m[2])
        ids = np.arange(math.prod(reshape)).reshape(reshape)
        if m[3]:
            ids = ids.transpose(_ints(m[3]))
        return tuple(tuple(int(i) for i in g) for g in ids.reshape(shape))
    if (m := _GROUPS_MESH.search(attrs)) is not None:
        return _mesh_groups(m["axes"], m["ids"], m["grouped"])
    if (m := _PAIRS.search(attrs)) is not None:
        return _connected(re.findall(r"\{(\d+),(\d+)\}", m[1]))
    return ()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in text.split(",") if i)


def _mesh_groups(axes: str, ids: str | None, grouped: str) -> tuple[tuple[int, ...], ...]:
    """Groups of the ``mesh['x'=2,'y'=4] {'y'}`` form: devices differing only along ``y``."""
    names_sizes = re.findall(r"'?([^'=,\s]+)'?=(\d+)", axes)
    names = [n for n, _ in names_sizes]
    sizes = [int(s) for _, s in names_sizes]
    if ids is None:
        devices = np.arange(math.prod(sizes))
    elif iota := re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", ids.strip()):
        devices = np.arange(math.prod(_ints(iota[2]))).reshape(_ints(iota[2]))
        devices = devices.transpose(_ints(iota[3])) if iota[3] else devices
    else:
        devices = np.array([int(i) for i in re.findall(r"\d+", ids)])
    # per mesh axis, the (pre_size, size) digits of its coordinate that the group spans
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for name, pre, size in re.findall(r"'?([^'\s,:]+)'?(?::\((\d+)\)(\d+))?", grouped):
        axis = names.index(name)
        spans[axis].append((int(pre), int(size)) if size else (1, sizes[axis]))
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, device in enumerate(devices.reshape(-1)):
        key = []
        for axis, coord in enumerate(np.unravel_index(position, sizes)):
            rest = int(coord)
            for pre, size in spans.get(axis, ()):
                rest -= (int(coord) // pre) % size * pre
            key.append(rest)
        groups[tuple(key)].append(int(device))
    return tuple(tuple(g) for g in groups.values())


def _connected(pairs: list[tuple[str, str]]) -> tuple[tuple[int, ...], ...]:
    """The sets of devices that a collective-permute's source-target pairs connect."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for source, target in pairs:
        parent[root(int(source))] = root(int(target))
    components: dict[int, list[int]] = defaultdict(list)
    for i in sorted(parent):
        components[root(i)].append(i)
    return tuple(tuple(c) for c in components.values())


def _mesh_axes(
    groups: tuple[tuple[int, ...], ...], mesh: jax.sharding.Mesh, name: str
) -> tuple[str, ...] | None:
    """The mesh axes along which the groups' devices differ, if the groups are whole axes."""
    if not groups:
        return None
    shape = mesh.devices.shape
    varying: set[int] = set()
    for group in groups:
        if max(group) >= mesh.devices.size:
            raise ValueError(
                f"collectives: op {name!r} groups device {max(group)}, but the mesh "
                f"{dict(mesh.shape)} has {mesh.devices.size} devices; pass the mesh the program "
                "was compiled for"
            )
        coords = np.unravel_index(np.array(group), shape)
        varying |= {i for i, c in enumerate(coords) if len(set(c.tolist())) > 1}
    spanned = math.prod(shape[i] for i in varying)
    if any(len(set(group)) != spanned for group in groups):
        return None  # e.g. a sub-axis, or groups of unequal sizes
    return tuple(mesh.axis_names[i] for i in sorted(varying))
