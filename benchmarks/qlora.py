"""QLoRA bases: storage bits per base parameter, output error, and the train step's memory.

Run: .venv/bin/python benchmarks/qlora.py [--d 1024] [--layers 4] [--block 64] [--quick] [--json F]
For a float32, int8 and NF4 base it prints the bits per base parameter (scales included), the
relative output error against the float base, the train-step time ratio (adapters trained
through the factorised path, each quantised kernel dequantised where it is used) and the
compiled step's argument and temporary memory, for the same residual MLP written two ways:
``unrolled`` (a Python loop over layers) and ``scan`` (stacked kernels under ``lax.scan``, as
``nn.scan`` builds them).
"""

import argparse

import jax
import numpy as np
import optax
from _common import (
    adapter_step,
    add_runner_flags,
    interleaved,
    mlp,
    mlp_apply,
    parse,
    report,
    stacked_mlp,
    stacked_mlp_apply,
    write_json,
)

import jlora


def memory(step, args):
    """(argument, temporary) bytes of the compiled step."""
    stats = step.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes, stats.temp_size_in_bytes


def bits(p):
    quantized = lambda n: isinstance(n, jlora.Quantized)  # noqa: E731
    nodes = [n for n in jax.tree.leaves(p, is_leaf=quantized) if quantized(n)]
    if not nodes:
        return 32.0
    size = sum(np.prod(n.shape) for n in nodes)
    return sum(n.bits_per_parameter * np.prod(n.shape) for n in nodes) / size


QUICK = {"d": 512, "reps": 5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    add_runner_flags(ap, QUICK)
    args = parse(ap, argv)
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d))
    tx = optax.adam(1e-3)
    layouts = {
        "unrolled": (mlp(args.d, args.layers, jax.random.key(0)), mlp_apply, {}),
        "scan": (
            stacked_mlp(args.d, args.layers, jax.random.key(0)),
            stacked_mlp_apply,
            {"axis_rules": [(r".*", ("stack", "in", "out"))]},
        ),
    }
    mb = 2**20
    cells, rows = [], []
    for layout, (base, apply, rules) in layouts.items():
        cfg = jlora.LoraConfig(rank=8, alpha=16.0, **rules)
        want = np.asarray(apply(base, x), np.float64)
        params = jlora.init_lora(jax.random.key(2), base, cfg)
        state = tx.init(jlora.split(params)[0])
        step = adapter_step(apply, cfg, tx)
        runs = {"float32": params}
        for kind in ("int8", "nf4"):
            runs[kind] = jlora.quantize(params, cfg, kind=kind, block_size=args.block)
        times = interleaved({k: (step, (p, state, x)) for k, p in runs.items()}, args.reps)
        for kind, p in runs.items():
            got = np.asarray(apply(jlora.split(jlora.dequantize(p))[1], x), np.float64)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            arg_b, tmp_b = memory(step, (p, state, x))
            ratio = times[kind] / times["float32"]
            rows.append(
                {
                    "layout": layout,
                    "base": kind,
                    "bits": float(bits(p)),
                    "error": err,
                    "seconds": times[kind],
                    "argument_bytes": int(arg_b),
                    "temp_bytes": int(tmp_b),
                }
            )
            cells.append(
                [
                    layout,
                    kind,
                    f"{bits(p):.2f}",
                    f"{err:.2e}",
                    f"{ratio:.2f}x ({times[kind] * 1e3:.1f} ms)",
                    f"{arg_b / mb:.1f}",
                    f"{tmp_b / mb:.1f}",
                    f"{(arg_b + tmp_b) / mb:.1f}",
                ]
            )
    header = [
        "layout",
        "base",
        "bits/param",
        "rel. output error",
        "step time",
        "step args MB",
        "step temp MB",
        "args + temp MB",
    ]
    tables = []
    title = (
        f"QLoRA bases: residual MLP d={args.d}, {args.layers} layers, {args.tokens} tokens, "
        f"block {args.block}, rank 8, Adam; step time best of {args.reps} interleaved rounds"
    )
    report(tables, "qlora", title, header, cells)
    write_json(args.json, args, tables, rows=rows)
    return rows


if __name__ == "__main__":
    main()
