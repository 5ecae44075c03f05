"""Train-step and inference timing of LoRA approaches on a GPT-style decoder, side by side.

Every approach trains the same Flax Linen decoder (NNX for ``nnx.LoRALinear``) with Adam, all
jitted, timed interleaved in one process; the table gives medians after warm-up and each
ratio to full fine-tuning and to the limit (forward plus backward to the activations with every
weight constant: no weight gradient at all). Memory is XLA's compiled ``memory_analysis()``.

    .venv/bin/python benchmarks/train_step.py [--json out.json] [--rounds 30] [--keep-freed-memory]
        [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _common import add_runner_flags, parse, report, write_json
from flax import nnx

import jlora
from jlora.runner.host_memory import keep_freed_memory

TARGETS = r".*/(query|key|value|out|up|down)/kernel"


class LoraDense(nn.Module):
    """A hand-written factorised LoRA Dense: 2-D thin matmuls, scale on the rank-r product."""

    features: int
    rank: int = 0
    scale: float = 2.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d, self.features))
        y = x @ kernel
        if not self.rank:
            return y
        a = self.param("kernel_lora_a", nn.initializers.lecun_normal(), (d, self.rank))
        b = self.param("kernel_lora_b", nn.initializers.zeros, (self.rank, self.features))
        x2 = x.reshape(-1, d)
        return y + (((x2 @ a) * self.scale) @ b).reshape(y.shape)


class Block(nn.Module):
    d_model: int
    heads: int
    rank: int = 0

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        dense = lambda n, name: LoraDense(n, self.rank, name=name)  # noqa: E731
        b, t, d = h.shape
        x = nn.LayerNorm(name="ln1")(h)
        q, k, v = (
            dense(d, name)(x).reshape(b, t, self.heads, d // self.heads)
            for name in ("query", "key", "value")
        )
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
        h = h + dense(d, "out")(o)
        x = nn.LayerNorm(name="ln2")(h)
        return h + dense(d, "down")(nn.gelu(dense(4 * d, "up")(x)))


class GPT(nn.Module):
    vocab: int
    d_model: int
    layers: int
    heads: int
    rank: int = 0

    def setup(self) -> None:
        self.embed = nn.Embed(self.vocab, self.d_model)
        self.pos = self.param("pos", nn.initializers.normal(0.02), (1024, self.d_model))
        self.blocks = [Block(self.d_model, self.heads, self.rank) for _ in range(self.layers)]
        self.ln_f = nn.LayerNorm()
        self.head = nn.Dense(self.vocab, use_bias=False)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens) + self.pos[: tokens.shape[1]]

    def decode(self, h: jax.Array) -> jax.Array:
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.decode(self.embed_tokens(tokens))


class NnxBlock(nnx.Module):
    def __init__(self, d: int, heads: int, rank: int, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, use_bias=False, rngs=rngs)  # noqa: E731
        self.heads = heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.up, self.down = lin(d, 4 * d), lin(4 * d, d)

    def __call__(self, h: jax.Array) -> jax.Array:
        b, t, d = h.shape
        x = self.ln1(h)
        q, k, v = (m(x).reshape(b, t, self.heads, -1) for m in (self.query, self.key, self.value))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
        h = h + self.out(o)
        return h + self.down(nnx.gelu(self.up(self.ln2(h))))


class NnxGPT(nnx.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, rank: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1024, d)) * 0.02)
        self.blocks = nnx.List([NnxBlock(d, heads, rank, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def adam_step(tx: optax.GradientTransformation, loss: Callable[[Any], Any]) -> Callable:
    """A jitted ``(trainable, opt_state, frozen, tokens) -> (trainable, opt_state, loss)`` step.

    The frozen weights are an argument (not closed-over constants) in every approach.
    """

    @jax.jit
    def step(trainable: Any, state: Any, frozen: Any, toks: jax.Array) -> Any:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, toks)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    return step


def build(args: argparse.Namespace) -> tuple[dict[str, tuple[Callable, tuple]], dict[str, Any]]:
    """Every approach as ``name -> (jitted fn, args)``; train steps first, then inference."""
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, args.seq), 0, args.vocab)
    model = GPT(args.vocab, args.d_model, args.layers, args.heads)
    params = model.init(key, tokens)
    cfg = jlora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    p = jax.tree.map_with_path(  # non-zero B, so no approach can skip its adapter products
        lambda path, x: x + 0.01 if jlora.path_str(path).endswith("_lora_b") else x, p
    )
    lora_half, base = jlora.split(p)
    tx = optax.adam(1e-4)

    def loss(q: Any, toks: jax.Array) -> jax.Array:
        return xent(model.apply(q, toks), toks)

    def full_loss(q: Any, _: Any, toks: jax.Array) -> jax.Array:
        return loss(q, toks)

    def merge_loss(a: Any, frozen: Any, toks: jax.Array) -> jax.Array:
        return loss(jlora.merge_params(jlora.combine(a, frozen), cfg), toks)

    @jax.jit
    def jlora_step(a: Any, state: Any, frozen: Any, toks: jax.Array) -> Any:
        value, grads = jlora.value_and_grad(loss, cfg)(jlora.combine(a, frozen), toks)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    hand = GPT(args.vocab, args.d_model, args.layers, args.heads, rank=args.rank)
    hand_lora, hand_base = jlora.split(hand.init(key, tokens))
    hand_lora = jax.tree.map(lambda x: x + 0.01, hand_lora)

    def hand_loss(a: Any, frozen: Any, toks: jax.Array) -> jax.Array:
        return xent(hand.apply(jlora.combine(a, frozen), toks), toks)

    nnx_model = NnxGPT(args.vocab, args.d_model, args.layers, args.heads, args.rank, nnx.Rngs(0))
    graphdef, nnx_lora, nnx_rest = nnx.split(nnx_model, nnx.LoRAParam, ...)

    def nnx_loss(a: Any, frozen: Any, toks: jax.Array) -> jax.Array:
        return xent(nnx.merge(graphdef, a, frozen)(toks), toks)

    @jax.jit
    def limit(frozen: Any, toks: jax.Array) -> Any:
        h0 = model.apply(frozen, toks, method=GPT.embed_tokens)
        return jax.grad(lambda h: xent(model.apply(frozen, h, method=GPT.decode), toks))(h0)

    merged = jlora.merge_params(p, cfg)
    forward = jax.jit(model.apply)
    run = {
        "full fine-tune": (adam_step(tx, full_loss), (params, tx.init(params), {}, tokens)),
        "merge W+sAB in step": (
            adam_step(tx, merge_loss),
            (lora_half, tx.init(lora_half), base, tokens),
        ),
        "jlora.lora": (jlora_step, (lora_half, tx.init(lora_half), base, tokens)),
        "hand-written factorised": (
            adam_step(tx, hand_loss),
            (hand_lora, tx.init(hand_lora), hand_base, tokens),
        ),
        "nnx.LoRALinear": (
            adam_step(tx, nnx_loss),
            (nnx_lora, tx.init(nnx_lora), nnx_rest, tokens),
        ),
        "limit (no weight grads)": (limit, (params, tokens)),
        "infer: base forward": (forward, (params, tokens)),
        "infer: merged forward": (forward, (merged, tokens)),  # the same program as the base
        "infer: jlora.lora forward": (jax.jit(jlora.lora(model.apply, cfg)), (p, tokens)),
    }
    return run, {
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "lora_params": sum(x.size for x in jax.tree.leaves(lora_half)),
    }


def memory(fn: Any, fn_args: tuple) -> dict[str, int]:
    m = fn.lower(*fn_args).compile().memory_analysis()
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def measure(run: dict[str, tuple[Callable, tuple]], rounds: int, warmup: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in run}
    names, order = list(run), random.Random(0)
    for r in range(rounds + warmup):
        # Interleaved, in a fresh random order every round, so drift and whichever step ran just
        # before (cache state: a light step after a heavy one pays for the evictions) hit every
        # row alike. A fixed or rotated order always gives a row the same predecessor.
        order.shuffle(names)
        for name in names:
            fn, fn_args = run[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The decoder's size flags, shared with ``op_profile.py``."""
    for flag, default in [
        ("d-model", 256),
        ("layers", 4),
        ("heads", 4),
        ("seq", 128),
        ("batch", 16),
        ("rank", 8),
        ("vocab", 512),
    ]:
        parser.add_argument(f"--{flag}", type=int, default=default)


QUICK = {"batch": 8, "rounds": 5, "warmup": 1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call jlora.runner.host_memory.keep_freed_memory() first, as `jlora finetune` does",
    )
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    if args.keep_freed_memory:
        keep_freed_memory()  # before the first computation
    run, sizes = build(args)
    medians = measure(run, args.rounds, args.warmup)
    full, lim = medians["full fine-tune"], medians["limit (no weight grads)"]
    base = medians["infer: base forward"]
    rows, cells = {}, []
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for name, (fn, fn_args) in run.items():
        mem = memory(fn, fn_args)
        t = medians[name]
        infer = name.startswith("infer")
        row = {
            "ms": 1e3 * t,
            "x_full": None if infer else t / full,
            "x_limit": None if infer else t / lim,
            "x_base_forward": t / base if infer else None,
            **mem,
        }
        rows[name] = row
        cells.append(
            [
                name,
                f"{row['ms']:.1f}",
                fmt(row["x_full"]),
                fmt(row["x_limit"]),
                fmt(row["x_base_forward"]),
                f"{mem['temp_bytes'] / 2**20:.1f}",
                f"{mem['argument_bytes'] / 2**20:.1f}",
                f"{mem['output_bytes'] / 2**20:.1f}",
            ]
        )
    tables: list[dict[str, Any]] = []
    header = ["approach", "ms", "x full FT", "x limit", "x base fwd", "temp MB", "arg MB", "out MB"]
    title = (
        f"Train step and inference: GPT decoder d={args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, {args.batch} x {args.seq} tokens, vocab {args.vocab}, rank "
        f"{args.rank} on q/k/v/out/up/down ({sizes['lora_params']:,} of {sizes['params']:,} "
        f"params), f32, Adam; medians of {args.rounds} interleaved rounds after {args.warmup} "
        f"warm-up"
    )
    report(tables, "train_step", title, header, cells)
    write_json(args.json, args, tables, **sizes, rows=rows)
    return {"config": vars(args), **sizes, "rows": rows}


if __name__ == "__main__":
    main()
