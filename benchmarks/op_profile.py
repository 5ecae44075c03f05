"""Where a step's time goes, op by op: XLA's own per-op durations from ``jax.profiler``.

Builds the rows of ``train_step.py`` and profiles them in turn, ``--calls`` calls each, for
``--reps`` rounds. Each compiled op's (fusion, dot, ...) time is its median over all those
calls, so a call slowed by the machine's noise does not count; the medians are summed by kind:
matmuls (``dot`` / YNNPACK ``ynn``), elementwise loops, and whether the op's result is
rank-sized (a thin product). Comparing a row with the limit shows which kind of work the gap
is made of. For steadier numbers run it on one core and one thread, without page faults:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 1 .venv/bin/python benchmarks/op_profile.py --keep-freed-memory
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
from typing import Any

import jax
import train_step

from jlora.runner.host_memory import keep_freed_memory

ROWS = ("jlora.lora", "limit (no weight grads)", "infer: base forward", "infer: jlora.lora forward")
_OP = re.compile(r"\s*(?:ROOT )?%(\S+) = \w+\[([^\]]*)\]\S* (\w+)\(")


def op_kinds(compiled_text: str, rank: int) -> dict[str, str]:
    """Each op's name in the compiled HLO -> its kind, e.g. ``"matmul thin"``."""
    kinds = {}
    for line in compiled_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        name, dims, op = m.groups()
        base = "matmul" if name.startswith("ynn") or op == "dot" else "elementwise/other"
        thin = str(rank) in re.findall(r"\d+", dims)
        kinds[name] = base + (" (rank-sized result)" if thin else "")
    return kinds


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


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_model_flags(parser)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()  # before the first computation
    run, _ = train_step.build(args)
    kinds = {
        row: op_kinds(run[row][0].lower(*run[row][1]).compile().as_text(), args.rank)
        for row in ROWS
    }
    durations: dict[str, dict[str, list[float]]] = {
        row: collections.defaultdict(list) for row in ROWS
    }
    for _ in range(args.reps):  # rows interleaved, so that drift hits them alike
        for row in ROWS:
            fn, fn_args = run[row]
            for event in profile(fn, fn_args, args.calls):
                if event["name"] in kinds[row]:
                    durations[row][event["name"]].append(event["dur"] / 1e3)
    out = {}
    for row in ROWS:
        ms: collections.Counter[str] = collections.Counter()
        for name, ts in durations[row].items():  # an op that runs n times a call counts n times
            ms[kinds[row][name]] += statistics.median(ts) * len(ts) / (args.calls * args.reps)
        out[row] = dict(ms)
        print(f"{row}: {sum(ms.values()):.1f} ms in ops per call (sum of per-op medians)")
        for kind, t in sorted(ms.items()):
            print(f"    {kind:40} {t:8.2f} ms")
    return out


if __name__ == "__main__":
    main()
