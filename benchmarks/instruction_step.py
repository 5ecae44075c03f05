"""SmolLM2-135M instruction fine-tuning step measured (issue 14): all rows side by side in one run.

Three tables, every number from one set of interleaved rounds (a fresh random order per round,
medians, compiled ahead of time; memory from XLA's ``memory_analysis()``):

- **step**: tokens/s of the LoRA train step (rank 8 on q,k,v,o,gate,up,down, Adam on the
  adapters, through ``jlora.value_and_grad``) against full fine-tuning (Adam on every
  parameter) and the limit (forward plus backward to the embedding output with every weight
  constant, as ``real_model.py`` defines it), and the LoRA step's temp memory with and without
  ``remat``. The step functions are ``real_model.py``'s.
- **bf16**: the LoRA step with bf16 compute (f32 parameters, adapters, optimizer state and loss)
  against f32: tokens/s and the difference of the loss both compute on the same batch.
- **packing**: the LoRA step on ``jlora.runner.data.chats.pack`` rows (several examples per
  row; attention kept inside each through ``segment_ids``, positions restarting) against padded
  rows (one example per row, padded to the same ``--pack-seq``), in tokens/s of real
  (non-padding) tokens. The examples are synthetic: lengths drawn uniformly from
  ``--min-len..--max-len`` with a fixed seed, random token ids, every target learnt.

    .venv/bin/python benchmarks/instruction_step.py [--batch 4 --seq 256] [--pack-seq 512]
        [--min-len 20 --max-len 300] [--rounds 5] [--quick] [--json out.json]

The defaults took 9.5 minutes on two CPU cores shared with other jobs; ``--quick`` (what
``python -m benchmarks`` runs) about one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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

from jlora.models.decoder import Decoder, causal_lm_loss
from jlora.models.pretrained import Pretrained
from jlora.runner.data.chats import Packed, pack

_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")  # Packed's arrays
QUICK = {
    "batch": 2,
    "seq": 64,
    "pack_seq": 128,
    "min_len": 8,
    "max_len": 80,
    "rounds": 3,
}


def packed_loss(apply: Callable, p: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The masked next-token loss of :class:`Packed` rows, segments kept apart."""
    logits = apply(p, batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    return causal_lm_loss(logits, batch["targets"], batch["loss_mask"])


def examples(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[tuple]:
    """``n`` synthetic ``(ids, loss_mask)`` examples, lengths uniform in ``low..high``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, n)
    return [(rng.integers(1, vocab, k), np.ones(k, bool)) for k in lengths]


def as_batch(p: Packed, rows: int) -> dict[str, jax.Array]:
    return {f: jnp.asarray(getattr(p, f)[:rows]) for f in _FIELDS}


def packed_and_padded(
    vocab: int, rows: int, seq: int, low: int, high: int
) -> dict[str, dict[str, jax.Array]]:
    """``rows`` rows of ``seq`` tokens, packed from the examples and one example per row."""
    if high > seq:
        raise ValueError(f"--max-len {high} does not fit --pack-seq {seq}; lower it or raise seq")
    # enough examples to fill `rows` packed rows: at least seq / mean length per row
    need = rows * (2 * seq // (low + high) + 2) + rows
    ex = examples(need, low, high, vocab)
    packed = pack(ex, seq)
    if len(packed.tokens) < rows:
        raise ValueError(f"{need} examples packed into {len(packed.tokens)} < {rows} rows")
    padded = [pack([e], seq) for e in ex[:rows]]
    one_per_row = Packed(*(np.concatenate([getattr(p, f) for p in padded]) for f in _FIELDS))
    return {"packed": as_batch(packed, rows), "padded": as_batch(one_per_row, rows)}


def build(
    pre: Pretrained, args: argparse.Namespace
) -> tuple[dict[str, tuple[Any, tuple]], dict[str, Any]]:
    """Every row as ``name -> (jitted fn, args)``, and what each row's tokens/s counts."""
    cfg, tx = lora_config(args.rank), optax.adam(1e-4)
    params = pre.params
    # real text (real_model.py's decode prompts), so the losses compared are a model's losses
    tokens = jnp.asarray(prompts_for(pre, args.batch, args.seq), jnp.int32)
    a, base = split_adapted(params, cfg)
    lora_state = tx.init(a)
    config = pre.config

    def model(**options: Any) -> Decoder:
        return Decoder(dataclasses.replace(config, **options))

    f32 = steps(model(remat=False), cfg, tx)
    remat = steps(model(remat=True), cfg, tx)
    bf16 = steps(model(remat=False, dtype=jnp.bfloat16), cfg, tx)
    packing = steps(model(remat=False), cfg, tx, packed_loss)
    batches = packed_and_padded(
        config.vocab_size, args.batch, args.pack_seq, args.min_len, args.max_len
    )
    lora_args = (a, lora_state, base)
    run = {
        "full fine-tune": (f32["full"], (params, tx.init(params), tokens)),
        "jlora.lora": (f32["lora"], (*lora_args, tokens)),
        "jlora.lora, remat": (remat["lora"], (*lora_args, tokens)),
        "limit": (f32["limit"], (params, tokens)),
        "jlora.lora, bf16 compute": (bf16["lora"], (*lora_args, tokens)),
        "packed": (packing["lora"], (*lora_args, batches["packed"])),
        "padded": (packing["lora"], (*lora_args, batches["padded"])),  # the same program
    }
    real = {name: args.batch * args.seq for name in run}
    for name in ("packed", "padded"):
        real[name] = int(jnp.sum(batches[name]["segment_ids"] > 0))
    return run, {"real_tokens": real, "slots": args.batch * args.pack_seq}


def measure(pre: Pretrained, args: argparse.Namespace) -> dict[str, Any]:
    run, counts = build(pre, args)
    compiled, info, losses = {}, {}, {}
    for name, (fn, fn_args) in run.items():
        if name == "padded":  # same shapes as "packed": one executable
            exe = compiled["packed"].func
            info[name] = info["packed"]
        else:
            exe, info[name] = compile_timed(fn, fn_args)
        compiled[name] = functools.partial(exe, *fn_args)
    for name, fn in compiled.items():  # one warm-up call each; a step's loss is its last output
        out = jax.block_until_ready(fn())
        if name != "limit":
            losses[name] = float(out[-1])
    med = medians_interleaved(compiled, args.rounds)
    rows = {}
    for name in run:
        rows[name] = {
            "ms": 1e3 * med[name],
            "tokens_per_s": counts["real_tokens"][name] / med[name],
            "real_tokens": counts["real_tokens"][name],
            "loss": losses.get(name),
            **info[name],
        }
    return {"rows": rows, "slots": counts["slots"]}


def print_tables(res: dict[str, Any], args: argparse.Namespace) -> list:
    rows, tables = res["rows"], []
    full, limit = rows["full fine-tune"], rows["limit"]
    sizes = f"{args.batch} x {args.seq} tokens"
    step_rows = [
        [
            name,
            f"{r['tokens_per_s']:.0f}",
            f"{r['ms']:.0f}",
            f"{r['ms'] / full['ms']:.2f}",
            f"{r['ms'] / limit['ms']:.2f}",
            f"{r['temp_bytes'] / MB:.0f}",
        ]
        for name, r in rows.items()
        if name in ("full fine-tune", "jlora.lora", "jlora.lora, remat", "limit")
    ]
    report(
        tables,
        "instruction_step",
        f"SmolLM2-135M train step: {sizes}, f32, Adam; LoRA rank {args.rank} on q,k,v,o,gate,up,"
        f"down; medians of {args.rounds} interleaved rounds",
        ["step", "tokens/s", "ms", "time x full FT", "time x limit", "temp MB"],
        step_rows,
        "(the limit: forward plus backward to the embedding output, no weight gradient at all)",
    )
    f32, bf16 = rows["jlora.lora"], rows["jlora.lora, bf16 compute"]
    report(
        tables,
        "instruction_bf16",
        f"SmolLM2-135M LoRA step, bf16 compute against f32: {sizes}; parameters, adapters, "
        f"optimizer state and loss f32",
        ["compute", "tokens/s", "x f32 tokens/s", "temp MB", "loss", "loss - f32 loss"],
        [
            [
                name,
                f"{r['tokens_per_s']:.0f}",
                f"{r['tokens_per_s'] / f32['tokens_per_s']:.2f}",
                f"{r['temp_bytes'] / MB:.0f}",
                f"{r['loss']:.4f}",
                f"{r['loss'] - f32['loss']:+.4f}",
            ]
            for name, r in (("f32", f32), ("bf16", bf16))
        ],
    )
    padded = rows["padded"]
    report(
        tables,
        "instruction_packing",
        f"SmolLM2-135M LoRA step on instruction rows: {args.batch} rows x {args.pack_seq} tokens; "
        f"synthetic examples of {args.min_len}..{args.max_len} tokens (seed 0)",
        ["rows", "real tokens", "fill", "ms", "real tokens/s", "x padded"],
        [
            [
                label,
                r["real_tokens"],
                f"{100 * r['real_tokens'] / res['slots']:.0f}%",
                f"{r['ms']:.0f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}",
            ]
            for label, r in (
                ("packed (segment ids)", rows["packed"]),
                ("padded (one example per row)", padded),
            )
        ],
        "(padded rows are padded to the packed rows' length, so both run the same program)",
    )
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = pretrained_parser(__doc__)
    parser.add_argument("--batch", type=int, default=4, help="rows per step (packed rows too)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row of the step tables")
    parser.add_argument("--pack-seq", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--min-len", type=int, default=20, help="shortest synthetic example")
    parser.add_argument("--max-len", type=int, default=300, help="longest synthetic example")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    return run_on_pretrained(args, measure, print_tables)


if __name__ == "__main__":
    main()
