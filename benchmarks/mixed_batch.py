"""Mixed-adapter batch (one forward, each row its own adapter) vs one pass per adapter.

Run: .venv/bin/python benchmarks/mixed_batch.py [--adapters 4] [--rows 16] [--seq 128]
    [--quick] [--json F]
Prints the time of each, measured side by side in one process, and their ratio.
"""

import argparse

import jax
import jax.numpy as jnp
from _common import add_runner_flags, interleaved, mlp, mlp_apply, parse, report, write_json

import jlora

QUICK = {"rows": 8, "reps": 5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    add_runner_flags(ap, QUICK)
    args = parse(ap, argv)
    base = mlp(args.d, args.layers, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=args.rank, alpha=16.0)
    adapters = {}
    for i in range(args.adapters):
        p = jlora.init_lora(jax.random.key(i + 1), base, cfg)
        p = jax.tree.map_with_path(
            lambda q, x: x + 0.01 if jlora.is_adapter_path(q) else x, p
        )  # B != 0
        adapters = jlora.add_adapter(adapters, f"a{i}", jlora.split(p)[0], cfg)
    names = list(adapters)
    rows = [names[i % len(names)] for i in range(args.rows)]
    x = jax.random.normal(jax.random.key(99), (args.rows, args.seq, args.d))

    mixed = jax.jit(lambda b, ads, x: jlora.mixed_batch(mlp_apply, b, ads, rows, x))
    idx = jnp.asarray([names.index(r) for r in rows])
    traced = jax.jit(lambda b, ads, i, x: jlora.mixed_batch(mlp_apply, b, ads, i, x))
    one = jax.jit(jlora.lora(mlp_apply, cfg))

    def separate(b, ads, x):
        outs = []
        for n in names:
            sel = jnp.asarray([i for i, r in enumerate(rows) if r == n])
            outs.append(one(jlora.select_adapter(b, ads, n)[0], x[sel]))
        return outs

    plain = jax.jit(mlp_apply)
    times = interleaved(
        {
            "base": (plain, (base, x)),
            "mixed": (mixed, (base, adapters, x)),
            "traced": (traced, (base, adapters, idx, x)),
            "separate": (separate, (base, adapters, x)),
        },
        reps=args.reps,
    )
    t_base, t_mixed, t_traced, t_sep = times.values()
    tables = []
    title = (
        f"Mixed-adapter batch: {args.rows} rows x {args.seq} tokens, d={args.d}, "
        f"{args.layers} layers, {args.adapters} adapters of rank {args.rank}; best of {args.reps} "
        f"interleaved rounds"
    )
    rows = [
        [name, f"{t * 1e3:.2f}", f"{t / t_base:.2f}", f"{t / t_mixed:.2f}"]
        for name, t in (
            ("base forward (no adapters)", t_base),
            ("mixed batch, rows by name", t_mixed),
            ("mixed batch, traced indices", t_traced),
            ("one pass per adapter", t_sep),
        )
    ]
    report(tables, "mixed_batch", title, ["forward", "ms", "x base", "x mixed"], rows)
    write_json(args.json, args, tables, seconds=times)
    return times


if __name__ == "__main__":
    main()
