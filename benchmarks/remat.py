"""Remat policies measured: the LoRA train step's temp memory and time, per ``model.remat``.

A small Llama-family decoder (``jlora.models.decoder``, random weights, layers scanned) at a
long-ish sequence, where the activations the backward pass keeps are most of the step's
memory. The step is the runner's: LoRA on every attention and MLP projection through
``jlora.value_and_grad``, Adam on the adapters, the mean next-token loss. Per policy
(``none``, ``full``, ``dots``, ``offload``; :mod:`jlora.models.remat`): XLA's
``memory_analysis()`` temp bytes of the compiled step and the median step time of interleaved
rounds, each against ``none``; the losses of every policy agree (printed). On CPU ``offload``
runs (the CPU lists a pinned-host memory space), but there host and device are the same
memory, so it saves nothing there; the GPU run (``--device gpu``) measures it for real.

    .venv/bin/python benchmarks/remat.py [--batch 1 --seq 2048] [--d 256 --layers 4]
        [--rounds 5] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import optax
from _common import add_runner_flags, compile_timed, medians_interleaved, parse, report, write_json

import jlora
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    DECODER_TARGETS,
    Decoder,
    DecoderConfig,
    causal_lm_loss,
)
from jlora.models.remat import REMAT_POLICIES

MB = 2**20


def step_for(config: DecoderConfig, cfg: jlora.LoraConfig, tx: optax.GradientTransformation):
    """The jitted LoRA train step ``(lora, opt_state, base, tokens) -> (lora, opt_state, loss)``."""
    model = Decoder(config)

    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, tokens[:, :-1])
        return causal_lm_loss(logits, tokens[:, 1:])

    grad = jlora.value_and_grad(loss, cfg)

    @jax.jit
    def step(lora: Any, state: Any, base: Any, tokens: jax.Array) -> Any:
        value, g = grad(jlora.combine(lora, base), tokens)
        updates, state = tx.update(g, state, lora)
        return optax.apply_updates(lora, updates), state, value

    return step


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.d,
        intermediate_size=4 * args.d,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.seq + 1,
    )
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, args.vocab)
    base_config = DecoderConfig(**shape)
    params = jax.jit(Decoder(base_config).init)(jax.random.key(0), tokens[:, :8])["params"]
    cfg = jlora.LoraConfig(rank=8, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES)
    lora, base = jlora.split(jlora.init_lora(jax.random.key(2), params, cfg))
    tx = optax.adam(1e-3)
    state = tx.init(lora)
    rows, runs, losses = {}, {}, {}
    for policy in REMAT_POLICIES:
        step = step_for(DecoderConfig(**shape, remat=policy), cfg, tx)
        compiled, info = compile_timed(step, (lora, state, base, tokens))
        losses[policy] = float(compiled(lora, state, base, tokens)[2])
        runs[policy] = lambda c=compiled: c(lora, state, base, tokens)
        rows[policy] = {"temp_mb": info["temp_bytes"] / MB, "compile_s": info["compile_s"]}
    times = medians_interleaved(runs, args.rounds)
    for policy, row in rows.items():
        row["ms"] = 1000 * times[policy]
        row["x_time"] = times[policy] / times["none"]
        row["x_temp"] = row["temp_mb"] / rows["none"]["temp_mb"]
    spread = max(losses.values()) - min(losses.values())
    return {
        "rows": rows,
        "losses": losses,
        "loss_spread": spread,
        "backend": jax.devices()[0].platform,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    add_runner_flags(parser, {"seq": 1024, "rounds": 3})
    args = parse(parser, argv)
    res = measure(args)
    title = (
        f"Remat policies: LoRA train step of a {args.layers}-layer decoder (d={args.d}), "
        f"{args.batch} x {args.seq} tokens"
    )
    header = ["model.remat", "ms", "x none", "temp MB", "x none temp", "compile s"]
    rows = [
        [
            policy,
            f"{r['ms']:.0f}",
            f"{r['x_time']:.2f}",
            f"{r['temp_mb']:.1f}",
            f"{r['x_temp']:.2f}",
            f"{r['compile_s']:.1f}",
        ]
        for policy, r in res["rows"].items()
    ]
    note = f"Losses of the four policies agree to {res['loss_spread']:.1e}."
    if res["backend"] == "cpu":
        note += (
            " On CPU `offload` keeps the products in the CPU's pinned-host memory space, which "
            "is the same RAM: it runs, and saves nothing."
        )
    tables: list[dict[str, Any]] = []
    report(tables, "remat", title, header, rows, note)
    write_json(args.json, args, tables, **res)
    return res


if __name__ == "__main__":
    main()
