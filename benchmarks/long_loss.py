"""The memory-bounded loss measured: a Gemma 3 270M-shaped LoRA train step, full logits vs chunked.

The train step of a decoder shaped as Gemma 3 270M (vocabulary 262,144, hidden 640, 18
layers, tied head; random weights), LoRA rank 8 on attention and MLP (``DECODER_TARGETS``),
Adam on the adapters through ``jlora.lora``, at ``--batch × --seq`` tokens, with three losses:

- **full logits**: ``Decoder`` then ``causal_lm_loss`` (``train.loss_chunk: 0``): the
  ``[B, T, V]`` float32 logits, and their gradient, are live;
- **chunked**: the hidden states through :func:`jlora.chunked_cross_entropy`'s path
  (:func:`jlora.models.lm_head.decoder_scores`, ``--chunk`` tokens a chunk, default
  :func:`jlora.auto_chunk_size`), every token learned;
- **chunked, answers only**: the same with half of each row masked (a prompt), whose positions
  never reach the head.

Temporary memory is XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled step at
``--batch × --seq``; time is the median of interleaved rounds at ``--time-batch × --seq``
(on 2 CPU cores a step at 4 × 1,024 tokens takes minutes and the full-logit one needs 22 GiB
of temporaries; the time ratio does not depend on the batch), each step's outputs fed
back as a training loop does.

    .venv/bin/python benchmarks/long_loss.py [--batch 4 --seq 1024 --time-batch 1]
        [--layers 18] [--chunk N] [--rounds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import (
    add_runner_flags,
    carried,
    compile_timed,
    medians_interleaved,
    parse,
    report,
    write_json,
)

import jlora
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    DECODER_TARGETS,
    Decoder,
    DecoderConfig,
    causal_lm_loss,
)
from jlora.models.lm_head import decoder_scores, mean_nll

QUICK = {"batch": 1, "seq": 128, "time_batch": 1, "layers": 2, "rounds": 2}
ROWS = ("full logits", "chunked", "chunked, answers only")
GIB = 2**30


def gemma3_270m(layers: int, vocab: int = 262144) -> DecoderConfig:
    """Gemma 3 270M's config.json values (sliding window 512 on five layers of six)."""
    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    hf = {
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "layer_types": (kinds * (layers // 6 + 1))[:layers],
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    }
    return DecoderConfig.from_hf(hf)


def steps(config: DecoderConfig, chunk: int | None, rank: int) -> tuple[dict, Any, Any]:
    """``name -> jitted step(adapters, opt_state, base, tokens, mask)``, and the trees."""
    model = Decoder(config)
    cfg = jlora.LoraConfig(rank=rank, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES)
    base = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    adapters, base = jlora.split(jlora.init_lora(jax.random.key(1), base, cfg))
    tx = optax.adam(1e-4)

    def full(p: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        logits = model.apply({"params": p}, tokens)
        return causal_lm_loss(logits, jnp.roll(tokens, -1, 1), mask)

    def chunked(p: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        targets = jnp.roll(tokens, -1, 1)
        scores = decoder_scores(model, p, tokens, targets, mask, chunk_size=chunk)
        return mean_nll(scores, mask)

    def make(loss: Any) -> Any:
        grad = jax.value_and_grad(
            lambda a, b, t, m: jlora.lora(loss, cfg)(jlora.combine(a, b), t, m)
        )

        def step(a: Any, state: Any, b: Any, tokens: jax.Array, mask: jax.Array) -> Any:
            value, g = grad(a, b, tokens, mask)
            updates, state = tx.update(g, state, a)
            return optax.apply_updates(a, updates), state, value

        return jax.jit(step, donate_argnums=(0, 1))

    fns = {ROWS[0]: make(full), ROWS[1]: make(chunked), ROWS[2]: make(chunked)}
    return fns, adapters, base


def batch_of(batch: int, seq: int, vocab: int, answers_only: bool) -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, vocab)
    mask = jnp.ones((batch, seq), bool)
    if answers_only:  # the first half of each row is a prompt: not learned
        mask = mask & (jnp.arange(seq) >= seq // 2)[None]
    return tokens, mask


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = gemma3_270m(args.layers, args.vocab)
    chunk = args.chunk or jlora.auto_chunk_size(config.vocab_size)
    fns, adapters, base = steps(config, chunk, args.rank)
    tx = optax.adam(1e-4)
    rows: dict[str, dict[str, Any]] = {}
    timed = {}
    for name, fn in fns.items():
        answers = name == ROWS[2]
        copy = jax.tree.map(jnp.copy, adapters)
        # memory at the full size: compiled from shapes, nothing run
        shapes = (
            jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
            jax.ShapeDtypeStruct((args.batch, args.seq), jnp.bool_),
        )
        _, info = compile_timed(fn, (copy, tx.init(copy), base, *shapes))
        small = batch_of(args.time_batch, args.seq, config.vocab_size, answers)
        exe, timing = compile_timed(fn, (copy, tx.init(copy), base, *small))
        timed[name] = carried(exe, (copy, tx.init(copy)), (base, *small))
        rows[name] = {**info, "time_temp_bytes": timing["temp_bytes"]}
        print(f"{name}: compiled ({info['compile_s']:.0f} s + {timing['compile_s']:.0f} s)")
    for fn in timed.values():
        jax.block_until_ready(fn())
    med = medians_interleaved(timed, args.rounds)
    full = rows[ROWS[0]]
    for name, row in rows.items():
        row["s"] = med[name]
        row["x_time"] = med[name] / med[ROWS[0]]
        row["x_temp"] = row["temp_bytes"] / full["temp_bytes"]
    logits = args.batch * args.seq * config.vocab_size * 4
    return {
        "batch": args.batch,
        "seq": args.seq,
        "time_batch": args.time_batch,
        "layers": args.layers,
        "vocab": config.vocab_size,
        "chunk": chunk,
        "logits_bytes": logits,
        "rows": rows,
    }


def print_tables(res: dict[str, Any]) -> list[dict[str, Any]]:
    tables: list[dict[str, Any]] = []
    full = res["rows"][ROWS[0]]
    body = [
        [
            name,
            f"{row['temp_bytes'] / GIB:.2f}",
            f"{row['x_temp']:.3f}",
            f"{(full['temp_bytes'] - row['temp_bytes']) / res['logits_bytes']:.2f}",
            f"{row['s']:.2f}",
            f"{row['x_time']:.3f}",
        ]
        for name, row in res["rows"].items()
    ]
    report(
        tables,
        "long_loss",
        f"Gemma 3 270M-shaped LoRA step ({res['layers']} layers, vocab {res['vocab']:,}): "
        f"temp memory at {res['batch']} × {res['seq']} tokens, time at {res['time_batch']} × "
        f"{res['seq']}; chunks of {res['chunk']} tokens",
        ["loss", "temp GiB", "x full", "saved / logits", "step s", "x full time"],
        body,
        note=(
            f"saved / logits: temp memory saved over the size of the float32 logits "
            f"({res['logits_bytes'] / GIB:.2f} GiB): 1 means the logits' share is gone, above 1 "
            "their gradient's too."
        ),
    )
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--time-batch", type=int, default=1, help="rows of the timed steps")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=0, help="tokens a chunk; 0: auto")
    parser.add_argument("--rounds", type=int, default=3)
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    begin = time.perf_counter()
    res = measure(args)
    tables = print_tables(res)
    res["seconds"] = time.perf_counter() - begin
    print(f"({res['seconds']:.0f} s)")
    write_json(args.json, args, tables, **res)
    return res


if __name__ == "__main__":
    main()
