"""SmolLM2-135M preference-tuning (DPO) step measured (issue 21): every row side by side in one run.

Rows, all LoRA rank 8 on q,k,v,o,gate,up,down with Adam on the adapters, over the same
``2B x T`` tokens (``B`` pairs: the chosen rows, then the rejected rows; the second half of
each row is the completion the losses score):

- **SFT**: the next-token loss of the completions of all ``2B`` rows (``jlora.value_and_grad``):
  what DPO costs more than plain fine-tuning on the same tokens.
- **DPO, reference = adapters off**: :func:`jlora.dpo_loss` as the runner runs it, the
  reference forward inside the step on the same base arrays (no second copy).
- **DPO, precomputed reference**: the same loss with ``reference_logps`` given (the runner's
  ``train.precompute_ref_log_probs``): no reference forward in the step.
- **DPO, second reference copy**: the reference is a separate copy of the weights, passed to
  the step beside the policy's base, as peers that keep a frozen reference model do.
- **limit**: forward plus backward to the embedding output of the ``2B`` rows with every weight
  constant (``real_model.py``'s definition): no step can be faster.

Medians of interleaved rounds in a fresh random order, compiled ahead of time; memory from XLA's
``memory_analysis()``: arguments (the weights, adapters, optimizer state, batch), temp, and
their total with the outputs: the step's device footprint.

    .venv/bin/python benchmarks/preference_step.py [--pairs 2 --seq 128] [--rounds 5] [--quick]
        [--json out.json]

``--quick`` (what ``python -m benchmarks`` runs) takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import (
    add_runner_flags,
    compile_timed,
    medians_interleaved,
    parse,
    pretrained_parser,
    report,
    run_on_pretrained,
)
from real_model import MB, lora_config, prompts_for, split_adapted, steps

import jlora
from jlora.models.decoder import Decoder, causal_lm_loss
from jlora.models.pretrained import Pretrained

QUICK = {"pairs": 1, "seq": 64, "rounds": 3}
SFT, IN_STEP, PRECOMPUTED, COPY, LIMIT = (
    "SFT on the same tokens",
    "DPO, reference = adapters off",
    "DPO, precomputed reference",
    "DPO, second reference copy",
    "limit",
)


def pair_batch(pre: Pretrained, pairs: int, seq: int) -> dict[str, jax.Array]:
    """``2·pairs`` rows of real text; the second half of each row is its completion."""
    tokens = jnp.asarray(prompts_for(pre, 2 * pairs, seq + 1), jnp.int32)
    mask = jnp.broadcast_to(jnp.arange(seq) >= seq // 2, (2 * pairs, seq))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def _masked_loss(apply: Callable, p: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return causal_lm_loss(apply(p, batch["tokens"]), batch["targets"], batch["loss_mask"])


def build(pre: Pretrained, args: argparse.Namespace) -> dict[str, tuple[Callable, tuple]]:
    """Every row as ``name -> (jitted step, args)``."""
    cfg, tx = lora_config(args.rank), optax.adam(1e-4)
    model = Decoder(pre.config)
    batch = pair_batch(pre, args.pairs, args.seq)
    a, base = split_adapted(pre.params, cfg)
    state = tx.init(a)

    def apply(p: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": p}, tokens)

    def update(a: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state

    sft_grad = jlora.value_and_grad(functools.partial(_masked_loss, apply), cfg)

    @jax.jit
    def sft(a: Any, state: Any, frozen: Any, batch: dict[str, jax.Array]) -> Any:
        value, grads = sft_grad(jlora.combine(a, frozen), batch)
        return *update(a, state, grads), value

    def dpo(a: Any, state: Any, frozen: Any, batch: Any, reference: Any) -> Any:
        def loss(a: Any) -> tuple[jax.Array, Any]:
            params = jlora.combine(a, frozen)
            return jlora.dpo_loss(apply, params, cfg, batch, reference_logps=reference)

        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(a)
        return *update(a, state, grads), value

    @jax.jit
    def in_step(a: Any, state: Any, frozen: Any, batch: Any) -> Any:
        return dpo(a, state, frozen, batch, None)

    @jax.jit
    def precomputed(a: Any, state: Any, frozen: Any, batch: Any, reference: Any) -> Any:
        return dpo(a, state, frozen, batch, reference)

    @jax.jit
    def second_copy(a: Any, state: Any, frozen: Any, ref_params: Any, batch: Any) -> Any:
        logits = apply(jax.lax.stop_gradient(ref_params), batch["tokens"])
        ref = jlora.sequence_logps(logits, batch["targets"], batch["loss_mask"])
        return dpo(a, state, frozen, batch, (ref[: args.pairs], ref[args.pairs :]))

    ref = jax.jit(jlora.sequence_logps)(
        apply(base, batch["tokens"]), batch["targets"], batch["loss_mask"]
    )
    reference = (ref[: args.pairs], ref[args.pairs :])
    ref_params = jax.tree.map(jnp.copy, base)  # its own buffers: a second copy of the weights
    limit = steps(model, cfg, tx, _masked_loss)["limit"]
    return {
        SFT: (sft, (a, state, base, batch)),
        IN_STEP: (in_step, (a, state, base, batch)),
        PRECOMPUTED: (precomputed, (a, state, base, batch, reference)),
        COPY: (second_copy, (a, state, base, ref_params, batch)),
        LIMIT: (limit, (pre.params, batch)),
    }


def measure(pre: Pretrained, args: argparse.Namespace) -> dict[str, Any]:
    run = build(pre, args)
    compiled, info, losses = {}, {}, {}
    for name, (fn, fn_args) in run.items():
        exe, info[name] = compile_timed(fn, fn_args)
        compiled[name] = functools.partial(exe, *fn_args)
    for name, fn in compiled.items():  # a warm-up call each; a step's loss is its last output
        out = jax.block_until_ready(fn())
        if name != LIMIT:
            losses[name] = float(out[-1])
    med = medians_interleaved(compiled, args.rounds)
    return {name: {"ms": 1e3 * med[name], "loss": losses.get(name), **info[name]} for name in run}


def print_tables(rows: dict[str, Any], args: argparse.Namespace) -> list:
    tables: list = []
    sft, in_step, limit = rows[SFT], rows[IN_STEP], rows[LIMIT]

    def total(r: dict[str, Any]) -> float:
        return (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]) / MB

    report(
        tables,
        "preference_step",
        f"SmolLM2-135M DPO step: {args.pairs} pair(s) = {2 * args.pairs} x {args.seq} tokens, "
        f"f32, Adam; LoRA rank {args.rank} on q,k,v,o,gate,up,down; medians of {args.rounds} "
        "interleaved rounds",
        ["step", "ms", "x SFT", "x limit", "x DPO in step", "args MB", "temp MB", "total MB"],
        [
            [
                name,
                f"{r['ms']:.0f}",
                f"{r['ms'] / sft['ms']:.2f}",
                f"{r['ms'] / limit['ms']:.2f}",
                f"{r['ms'] / in_step['ms']:.2f}",
                f"{r['argument_bytes'] / MB:.0f}",
                f"{r['temp_bytes'] / MB:.0f}",
                f"{total(r):.0f}",
            ]
            for name, r in rows.items()
        ],
        f"(the reference as the adapters-off base saves {total(rows[COPY]) - total(in_step):.0f}"
        f" MB against a second reference copy, {total(in_step) / total(rows[COPY]):.2f}x its "
        f"footprint; the three DPO rows compute one loss: {in_step['loss']:.6f}, "
        f"{rows[PRECOMPUTED]['loss']:.6f}, {rows[COPY]['loss']:.6f})",
    )
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = pretrained_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    res = run_on_pretrained(
        args, lambda pre, a: {"rows": measure(pre, a)}, lambda r, a: print_tables(r["rows"], a)
    )
    return res["rows"]


if __name__ == "__main__":
    main()
