"""LoRA on stacked (per-expert) kernels: the ``jlora.lora`` train step against its limit.

A mixture-of-experts MLP with its tokens already dispatched: ``x [experts, tokens, d]`` times
``up [experts, d, 4d]``, gelu, times ``down [experts, 4d, d]``, every kernel adapted with its
``stack`` axis. The step (Adam, jitted) and the limit (gradient to the input with every weight
constant) are timed interleaved in one process; medians after warm-up.

    .venv/bin/python benchmarks/experts_step.py [--experts 8] [--tokens 256] [--d 256]
        [--quick] [--json F]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import add_runner_flags, parse, report, write_json
from train_step import measure

import jlora


def apply(q: Any, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(jnp.einsum("etd,edf->etf", x, q["up"]))
    return x + jnp.einsum("etf,efd->etd", h, q["down"])


def loss(q: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(apply(q, x) ** 2)


QUICK = {"rounds": 5}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("experts", 8), ("tokens", 256), ("d", 256), ("rank", 8), ("rounds", 30)]:
        parser.add_argument(f"--{flag}", type=int, default=default)
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    e, t, d = args.experts, args.tokens, args.d
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "up": jax.random.normal(k[0], (e, d, 4 * d)) / d**0.5,
        "down": jax.random.normal(k[1], (e, 4 * d, d)) / (4 * d) ** 0.5,
    }
    x = jax.random.normal(k[2], (e, t, d))
    cfg = jlora.LoraConfig(
        rank=args.rank,
        alpha=2.0 * args.rank,
        targets="up|down",
        axis_rules=[("up|down", ("stack", "in", "out"))],
    )
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    p = jax.tree.map_with_path(  # non-zero B, so the adapter products cannot be skipped
        lambda path, a: a + 0.01 if jlora.path_str(path).endswith("_lora_b") else a, p
    )
    adapters, base = jlora.split(p)
    tx = optax.adam(1e-3)

    @jax.jit
    def step(a: Any, state: Any, frozen: Any, xs: jax.Array) -> Any:
        value, grads = jlora.value_and_grad(loss, cfg)(jlora.combine(a, frozen), xs)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    limit = jax.jit(jax.grad(lambda xs, q: loss(q, xs)))
    run = {
        "jlora.lora step": (step, (adapters, tx.init(adapters), base, x)),
        "limit (no weight grads)": (limit, (x, params)),
    }
    medians = measure(run, args.rounds, 3)
    lim = medians["limit (no weight grads)"]
    tables: list[dict[str, Any]] = []
    title = (
        f"Stacked (per-expert) kernels: {e} experts x {t} tokens, d={d}, rank {args.rank}; "
        f"medians of {args.rounds} interleaved rounds"
    )
    rows = [[name, f"{s * 1e3:.2f}", f"{s / lim:.2f}"] for name, s in medians.items()]
    report(tables, "experts_step", title, ["step", "ms", "x limit"], rows)
    write_json(args.json, args, tables, seconds=medians)
    return medians


if __name__ == "__main__":
    main()
