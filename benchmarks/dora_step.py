"""DoRA train-step time vs plain LoRA, both through the factorised path (``jlora.value_and_grad``).

Run: .venv/bin/python benchmarks/dora_step.py [--tokens 2048] [--d 256] [--layers 4] [--rank 8]
    [--quick] [--json F]
Prints each step's best time, measured side by side in one process, and the DoRA/LoRA ratio
(PEFT users see up to 2x; the aim here is <= 1.15x).
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from _common import adapter_step, add_runner_flags, interleaved, parse, report, write_json

import jlora


def model(d, layers, key):
    ks = jax.random.split(key, 4 * layers)
    out = {}
    for i in range(layers):
        out[f"layer{i}"] = {
            "qkv": {"kernel": jax.random.normal(ks[4 * i], (d, 3 * d)) / d**0.5},
            "proj": {"kernel": jax.random.normal(ks[4 * i + 1], (d, d)) / d**0.5},
            "up": {"kernel": jax.random.normal(ks[4 * i + 2], (d, 4 * d)) / d**0.5},
            "down": {"kernel": jax.random.normal(ks[4 * i + 3], (4 * d, d)) / (2 * d)},
        }
    return out


def apply(p, x):
    for i in range(len(p)):
        layer = p[f"layer{i}"]
        q, k, v = jnp.split(x @ layer["qkv"]["kernel"], 3, axis=-1)
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / q.shape[-1] ** 0.5, axis=-1)
        x = x + (att @ v) @ layer["proj"]["kernel"]
        x = x + jax.nn.gelu(x @ layer["up"]["kernel"]) @ layer["down"]["kernel"]
    return x


QUICK = {"tokens": 1024, "reps": 5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    add_runner_flags(ap, QUICK)
    args = parse(ap, argv)
    base = model(args.d, args.layers, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=args.rank, alpha=16.0)
    x = jax.random.normal(jax.random.key(1), (args.tokens // args.seq, args.seq, args.d))
    tx = optax.adam(1e-3)
    runs = {}
    for name, init in (("lora", jlora.init_lora), ("dora", jlora.init_dora)):
        params = init(jax.random.key(2), base, cfg)
        state = tx.init(jlora.split(params)[0])
        runs[name] = (adapter_step(apply, cfg, tx), (params, state, x))
    best = interleaved(runs, args.reps)  # side by side, so background load hits both alike
    tables = []
    title = (
        f"DoRA step: {args.tokens} tokens, d={args.d}, {args.layers} layers, rank {args.rank}; "
        f"best of {args.reps} interleaved rounds"
    )
    rows = [
        ["plain LoRA step", f"{best['lora'] * 1e3:.2f}", "1.00"],
        ["DoRA step", f"{best['dora'] * 1e3:.2f}", f"{best['dora'] / best['lora']:.3f}"],
    ]
    report(tables, "dora_step", title, ["step", "ms", "x LoRA"], rows)
    write_json(args.json, args, tables, seconds=best)
    return best


if __name__ == "__main__":
    main()
