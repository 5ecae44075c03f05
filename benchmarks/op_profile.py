"""Where a step's time goes, op by op: XLA's own per-op durations from ``jax.profiler``.

Builds the rows of ``train_step.py`` and profiles them in turn, ``--calls`` calls each, for
``--reps`` rounds. Each compiled op's (fusion, dot, ...) time is its median over all those
calls, so a call slowed by the machine's noise does not count; the medians are summed by kind:
matmuls (``dot`` / YNNPACK ``ynn``), elementwise loops, and whether the op's result is
rank-sized (a thin product). Comparing a row with the limit shows which kind of work the gap
is made of. For steadier numbers run it on one core and one thread, without page faults:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 1 .venv/bin/python benchmarks/op_profile.py --keep-freed-memory

``--quick`` profiles small sizes once; ``--json F`` writes the table and numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import re
import statistics
import tempfile
from typing import Any

import jax
import train_step
from _common import add_runner_flags, parse, report, write_json

from jlora.runner.host_memory import keep_freed_memory

ROWS = ("jlora.lora", "limit (no weight grads)", "infer: base forward", "infer: jlora.lora forward")
_OP = re.compile(r"\s*(?:ROOT )?%(\S+) = \w+\[([^\]]*)\]\S* (\w+)\((.*)")
_COMPUTATION = re.compile(r"\n%(\S+) \([^)]*\) -> \S+ \{\n(.*?)\n\}", re.S)


def op_kinds(compiled_text: str, rank: int) -> dict[str, str]:
    """Each op's name in the compiled HLO -> its kind, e.g. ``"matmul thin"``."""
    kinds = {}
    for line in compiled_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        name, dims, op, _ = m.groups()
        base = "matmul" if name.startswith("ynn") or op == "dot" else "elementwise/other"
        thin = str(rank) in re.findall(r"\d+", dims)
        kinds[name] = base + (" (rank-sized result)" if thin else "")
    return kinds


def _dot_flops(lines: list[str], rank: int) -> dict[str, tuple[int, bool]]:
    """Each dot among ``lines`` (one computation) -> its FLOPs, and whether it is thin."""
    shapes: dict[str, list[int]] = {}
    out = {}
    for line in lines:
        m = _OP.match(line)
        if not m:
            continue
        name, dims, op, rest = m.groups()
        shapes[name] = [int(d) for d in dims.split(",") if d]
        if op == "dot":
            lhs = re.match(r"%([^,)\s]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([^}]*)\}", rest).group(1)
            k = math.prod(shapes[lhs][int(d)] for d in contracting.split(",") if d)
            # Thin: x·A, dy·Bᵀ, dh·Aᵀ and the A/B gradients have the rank as a matrix dim.
            out[name] = (2 * math.prod(shapes[name]) * k, rank in (k, *shapes[name][-2:]))
    return out


def dot_flops(compiled_text: str, rank: int) -> dict[str, tuple[int, bool]]:
    """Each compiled op that runs matmuls -> (their FLOPs, whether it is a thin product)."""
    bodies = {m.group(1): m.group(2).splitlines() for m in _COMPUTATION.finditer(compiled_text)}
    entry = compiled_text[compiled_text.index("\nENTRY") :].splitlines()
    out = _dot_flops(entry, rank)  # dots outside fusions
    for line in entry:
        m = _OP.match(line)
        called = (
            re.search(r"calls=%([^,\s]+)", m.group(4)) if m and m.group(3) == "fusion" else None
        )
        dots = _dot_flops(bodies[called.group(1)], rank).values() if called else ()
        if dots:
            out[m.group(1)] = (sum(f for f, _ in dots), any(t for _, t in dots))
    return out


def profile(fn: Any, fn_args: tuple, calls: int) -> list[dict[str, Any]]:
    """The profiler's complete events ("X") of ``calls`` calls of ``fn``."""
    for _ in range(2):
        jax.block_until_ready(fn(*fn_args))
    with tempfile.TemporaryDirectory() as out:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*fn_args))
        (path,) = glob.glob(f"{out}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


QUICK = {"batch": 4, "calls": 1, "reps": 2}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_model_flags(parser)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep-freed-memory", action="store_true")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    if args.keep_freed_memory:
        keep_freed_memory()  # before the first computation
    run, _ = train_step.build(args)
    texts = {row: run[row][0].lower(*run[row][1]).compile().as_text() for row in ROWS}
    kinds = {row: op_kinds(texts[row], args.rank) for row in ROWS}
    durations: dict[str, dict[str, list[float]]] = {
        row: collections.defaultdict(list) for row in ROWS
    }
    for _ in range(args.reps):  # rows interleaved, so that drift hits them alike
        for row in ROWS:
            fn, fn_args = run[row]
            for event in profile(fn, fn_args, args.calls):
                if event["name"] in kinds[row]:
                    durations[row][event["name"]].append(event["dur"] / 1e3)
    out, rates = {}, {}
    for row in ROWS:
        ms: collections.Counter[str] = collections.Counter()
        rate: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        flops = dot_flops(texts[row], args.rank)
        for name, ts in durations[row].items():  # an op that runs n times a call counts n times
            t = statistics.median(ts) * len(ts) / (args.calls * args.reps)
            ms[kinds[row][name]] += t
            if name in flops:
                f, thin = flops[name]
                rate["thin products" if thin else "full-size matmuls"][0] += f / 1e9
                rate["thin products" if thin else "full-size matmuls"][1] += t
        out[row] = dict(ms)
        rates[row] = {kind: {"gflop": g, "ms": t} for kind, (g, t) in rate.items()}
    kinds_seen = sorted({kind for ms in out.values() for kind in ms})
    cells = [[kind] + [f"{out[row].get(kind, 0.0):.2f}" for row in ROWS] for kind in kinds_seen]
    cells.append(["total"] + [f"{sum(out[row].values()):.2f}" for row in ROWS])
    for kind in ("full-size matmuls", "thin products"):
        per_row = [rates[row].get(kind, {"gflop": 0.0, "ms": 0.0}) for row in ROWS]
        speeds = [f"{r['gflop'] / r['ms'] * 1e3:.0f}" if r["ms"] else "-" for r in per_row]
        cells.append([f"{kind}: GFLOP/s", *speeds])
    tables: list[dict[str, Any]] = []
    title = (
        f"Op profile: ms of XLA ops per call (sums of per-op medians over {args.calls} calls x "
        f"{args.reps} rounds), train_step.py's decoder at {args.batch} x {args.seq} tokens, "
        f"d={args.d_model}, {args.layers} layers, rank {args.rank}"
    )
    report(tables, "op_profile", title, ["ms per call", *ROWS], cells)
    write_json(args.json, args, tables, ms=out, matmul_rates=rates)
    return out


if __name__ == "__main__":
    main()
