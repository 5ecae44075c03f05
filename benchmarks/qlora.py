"""QLoRA bases: storage bits per base parameter and output error against the float base.

Run: .venv/bin/python benchmarks/qlora.py [--d 256] [--layers 4] [--block 64]
For int8 and NF4 it prints the base's bits per parameter (scales included), the relative
output error of the quantised model against the float one, the train-step time ratio
(adapters through the factorised path, the base dequantised inside the step, vs the float
base), and the compiled step's argument and temporary memory.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import interleaved, mlp, mlp_apply

import jlora


def step_fn(cfg, tx, prepare):
    grad = jlora.value_and_grad(lambda p, x: jnp.mean(mlp_apply(p, x) ** 2), cfg)

    @jax.jit
    def step(params, state, x):
        value, g = grad(prepare(params), x)
        lora, base = jlora.split(params)
        updates, state = tx.update(g, state, lora)
        return jlora.combine(optax.apply_updates(lora, updates), base), state, value

    return step


def memory(step, args):
    """(argument, temporary) bytes of the compiled step."""
    stats = step.lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes, stats.temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    args = ap.parse_args()
    base = mlp(args.d, args.layers, jax.random.key(0))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0)
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d))
    want = np.asarray(mlp_apply(base, x), np.float64)
    params = jlora.init_lora(jax.random.key(2), base, cfg)
    tx = optax.adam(1e-3)
    state = tx.init(jlora.split(params)[0])
    step = step_fn(cfg, tx, lambda p: p)  # jlora.lora dequantises quantised kernels in-step
    runs = {"float32": params}
    for kind in ("int8", "nf4"):
        runs[kind] = jlora.quantize(params, cfg, kind=kind, block_size=args.block)
    times = interleaved({k: (step, (p, state, x)) for k, p in runs.items()})
    mb = 2**20
    print(
        f"d={args.d}, {args.layers} layers, {args.tokens} tokens, block {args.block}, "
        f"{jax.devices()[0].platform}"
    )
    print("| base | bits/param | rel. output error | step time | step args MB | step temp MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, p in runs.items():
        nodes = [
            n
            for n in jax.tree.leaves(p, is_leaf=lambda n: hasattr(n, "codes"))
            if hasattr(n, "codes")
        ]
        if nodes:
            size = sum(np.prod(n.shape) for n in nodes)
            bits = sum(n.bits_per_parameter * np.prod(n.shape) for n in nodes) / size
        else:
            bits = 32.0
        got = np.asarray(mlp_apply(jlora.split(jlora.dequantize(p))[1], x), np.float64)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        arg_b, tmp_b = memory(step, (p, state, x))
        ratio = times[kind] / times["float32"]
        print(
            f"| {kind} | {bits:.2f} | {err:.2e} | {ratio:.2f}x ({times[kind] * 1e3:.1f} ms) "
            f"| {arg_b / mb:.1f} | {tmp_b / mb:.1f} |"
        )


if __name__ == "__main__":
    main()
