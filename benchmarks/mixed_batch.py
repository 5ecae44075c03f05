"""Mixed-adapter batch (one forward, each row its own adapter) vs one pass per adapter.

Run: .venv/bin/python benchmarks/mixed_batch.py [--adapters 4] [--rows 16] [--seq 128]
Prints the time of each, measured side by side in one process, and their ratio.
"""

import argparse

import jax
import jax.numpy as jnp
from _common import interleaved, mlp, mlp_apply

import jlora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
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
        reps=30,
    )
    t_base, t_mixed, t_traced, t_sep = times.values()
    print(
        f"{args.rows} rows x {args.seq} tokens, d={args.d}, {args.layers} layers, "
        f"{args.adapters} adapters of rank {args.rank}, {jax.devices()[0].platform}"
    )
    print(f"base forward (no adapters)     {t_base * 1e3:8.2f} ms  1.00x")
    print(f"mixed batch, rows by name      {t_mixed * 1e3:8.2f} ms  {t_mixed / t_base:.2f}x")
    print(f"mixed batch, traced indices    {t_traced * 1e3:8.2f} ms  {t_traced / t_base:.2f}x")
    print(f"one pass per adapter           {t_sep * 1e3:8.2f} ms  {t_sep / t_base:.2f}x")
    print(f"separate / mixed by name       {t_sep / t_mixed:.2f}x")


if __name__ == "__main__":
    main()
