"""QLoRA bases: storage bits per base parameter and output error against the float base.

Run: .venv/bin/python benchmarks/qlora.py [--d 256] [--layers 4] [--block 64]
For int8 and NF4 it prints the base's bits per parameter (scales included), the relative
output error of the quantised model against the float one, and a train-step time ratio
(adapters through the factorised path on the dequantised-in-step base vs the float base).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def model(d, layers, key):
    ks = jax.random.split(key, 2 * layers)
    return {
        f"layer{i}": {
            "up": {"kernel": jax.random.normal(ks[2 * i], (d, 4 * d)) / d**0.5},
            "down": {"kernel": jax.random.normal(ks[2 * i + 1], (4 * d, d)) / (4 * d) ** 0.5},
        }
        for i in range(layers)
    }


def apply(p, x):
    for i in range(len(p)):
        layer = p[f"layer{i}"]
        x = x + jax.nn.gelu(x @ layer["up"]["kernel"]) @ layer["down"]["kernel"]
    return x


def step_fn(cfg, tx, prepare):
    grad = jlora.value_and_grad(lambda p, x: jnp.mean(apply(p, x) ** 2), cfg)

    @jax.jit
    def step(params, state, x):
        value, g = grad(prepare(params), x)
        lora, base = jlora.split(params)
        updates, state = tx.update(g, state, lora)
        return jlora.combine(optax.apply_updates(lora, updates), base), state, value

    return step


def best_time(step, args, reps=10):
    jax.block_until_ready(step(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(step(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args()
    base = model(args.d, args.layers, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0)
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d))
    want = np.asarray(apply(base, x), np.float64)
    params = jlora.init_lora(jax.random.key(2), base, cfg)
    tx = optax.adam(1e-3)
    state = tx.init(jlora.split(params)[0])
    t_float = best_time(step_fn(cfg, tx, lambda p: p), (params, state, x))
    print(
        f"d={args.d}, {args.layers} layers, {args.tokens} tokens, block {args.block}, "
        f"{jax.devices()[0].platform}"
    )
    print("| base | bits/param | rel. output error | step time vs float base |")
    print("|---|---:|---:|---:|")
    print(f"| float32 | 32.00 | 0 | 1.00x ({t_float * 1e3:.1f} ms) |")
    for kind in ("int8", "nf4"):
        q = jlora.quantize(params, cfg, kind=kind, block_size=args.block)
        nodes = [
            n
            for n in jax.tree.leaves(q, is_leaf=lambda n: hasattr(n, "codes"))
            if hasattr(n, "codes")
        ]
        bits = sum(n.bits_per_parameter * np.prod(n.shape) for n in nodes) / sum(
            np.prod(n.shape) for n in nodes
        )
        got = np.asarray(apply(jlora.split(jlora.dequantize(q))[1], x), np.float64)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        t = best_time(step_fn(cfg, tx, jlora.dequantize), (q, state, x))
        print(f"| {kind} | {bits:.2f} | {err:.2e} | {t / t_float:.2f}x |")


if __name__ == "__main__":
    main()
