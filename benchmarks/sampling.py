"""SmolLM2-135M sampling through the live adapters against a merged model (issue 22).

The KV-cache sampler (``jlora.models.sampling.generate``, greedy) on one adapted tree three ways,
LoRA rank 8 on q,k,v,o,gate,up,down with B non-zero (``real_model.py``'s ``split_adapted``):

- **merged**: ``jlora.merge_params`` once, then the plain decoder step: the cost of the base
  model alone, what a serving engine reaches after merging.
- **live**: ``jlora.lora(step, config)`` on the adapted tree, A and B beside the kernels: every
  token through the factorised path, nothing merged (what GRPO rollouts sample through).
- **per-row**: ``jlora.models.sampling.mixed_step`` with the one adapter in a bank, named on
  every row (the base and the bank as the parameters): what one adapter per row costs.

Each batch size is compiled (one call, not timed), then every row of every batch is timed in
interleaved rounds (a fresh random order per round, medians), once with ``--new`` tokens and
once with one: their difference over ``new - 1`` is the time of one decode step (prefill
excluded), of which a token is ``1 / batch``. Whether each way chose the merged model's tokens
is read from the compile call's output.

    .venv/bin/python benchmarks/sampling.py [--batches 1,8,32] [--prompt 64 --new 64]
        [--rank 8] [--rounds 5] [--quick] [--json out.json]

``--quick`` (what ``python -m benchmarks`` runs) takes about a minute and a half on two CPU
cores.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

from _common import (
    add_runner_flags,
    medians_interleaved,
    parse,
    pretrained_parser,
    report,
    run_on_pretrained,
)
from real_model import decoders, lora_config, prompts_for, split_adapted

import jlora
from jlora.models.decoder import init_cache
from jlora.models.pretrained import Pretrained
from jlora.models.sampling import generate, mixed_step

QUICK = {"batches": "1,8", "prompt": 16, "new": 16, "rounds": 3}
MERGED, LIVE, PER_ROW = "merged", "live", "per-row"
WAYS = (MERGED, LIVE, PER_ROW)
GOAL = 1.15  # issue 22: live within 1.15x of merged per token


def samplers(pre: Pretrained, rank: int, batches: list[int]) -> dict[tuple[str, int], tuple]:
    """``(way, batch) -> (step, params)``; each step object made once, so each compiles once."""
    cfg = lora_config(rank)
    step, _ = decoders(pre.model)
    a, base = split_adapted(pre.params, cfg)
    adapted = jlora.combine(a, base)
    merged = jlora.merge_params(adapted, cfg)
    live = jlora.lora(step, cfg)
    bank = jlora.add_adapter({}, "adapter", a, cfg)
    out = {}
    for b in batches:
        out[MERGED, b] = (step, merged)
        out[LIVE, b] = (live, adapted)
        out[PER_ROW, b] = (mixed_step(step, ["adapter"] * b), (base, bank))
    return out


def measure(pre: Pretrained, args: argparse.Namespace) -> dict[str, Any]:
    batches = [int(b) for b in args.batches.split(",")]
    cache = functools.partial(init_cache, pre.config)  # one object: generate compiles per cache fn
    ways = samplers(pre, args.rank, batches)
    run: dict[str, Callable[[], Any]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    first_s: dict[str, float] = {}
    for (way, b), (step, params) in ways.items():
        prompts = prompts_for(pre, b, args.prompt)
        for new in (args.new, 1):
            name = f"{way} b{b} n{new}"
            call = functools.partial(
                generate, step, params, prompts, init_cache=cache, max_new_tokens=new
            )
            start = time.perf_counter()
            got = call()  # compiles
            first_s[name] = time.perf_counter() - start
            if new == args.new:
                tokens[way, b] = got
            run[name] = call
    med = medians_interleaved(run, args.rounds)
    rows = {}
    for b in batches:
        row: dict[str, Any] = {}
        for way in WAYS:
            total, prefill = med[f"{way} b{b} n{args.new}"], med[f"{way} b{b} n1"]
            decode = max(total - prefill, 1e-9) / (args.new - 1)  # one step: b tokens
            row[way] = {
                "total_s": total,
                "prefill_s": prefill,
                "decode_step_ms": 1e3 * decode,
                "decode_tok_s": b / decode,
                "compile_and_first_s": first_s[f"{way} b{b} n{args.new}"],
            }
        want = [t for r in tokens[MERGED, b] for t in r]
        for way in (LIVE, PER_ROW):
            got = [t for r in tokens[way, b] for t in r]
            same = [x == y for x, y in zip(got, want, strict=True)]
            row[way]["same_tokens"] = all(same) and len(got) == len(want)
            row[way]["same_fraction"] = sum(same) / len(same)
            row[way]["x_merged"] = row[way]["decode_step_ms"] / row[MERGED]["decode_step_ms"]
        rows[f"batch {b}"] = row
    sample = None
    if pre.tokenizer is not None:
        sample = pre.tokenizer.decode(tokens[LIVE, batches[0]][0])
    return {"rows": rows, "sample": sample}


def _same(r: dict[str, Any]) -> str:
    return "yes" if r["same_tokens"] else f"no ({100 * r['same_fraction']:.0f}%)"


def print_table(res: dict[str, Any], args: argparse.Namespace) -> list:
    tables: list = []
    title = (
        f"SmolLM2-135M greedy sampling, LoRA rank {args.rank} on q,k,v,o,gate,up,down: "
        f"{args.prompt}-token prompts + {args.new} new tokens; decode only (prefill "
        f"subtracted), medians of {args.rounds} interleaved rounds, compile excluded"
    )
    header = [
        "batch",
        "merged tok/s",
        "live tok/s",
        "live / merged time per token",
        "per-row tok/s",
        "per-row / merged",
        "same tokens (live, per-row)",
    ]
    rows = [
        [
            name,
            f"{r[MERGED]['decode_tok_s']:.1f}",
            f"{r[LIVE]['decode_tok_s']:.1f}",
            f"{r[LIVE]['x_merged']:.2f}",
            f"{r[PER_ROW]['decode_tok_s']:.1f}",
            f"{r[PER_ROW]['x_merged']:.2f}",
            f"{_same(r[LIVE])}, {_same(r[PER_ROW])}",
        ]
        for name, r in res["rows"].items()
    ]
    note = (
        f"(goal: live within {GOAL}x of merged per token; vLLM's LoRA decoding is 1.33-1.39x "
        "of merged. live: `jlora.lora(step, config)` on the adapted tree; per-row: "
        "`mixed_step` with the adapter named on every row)"
    )
    report(tables, "sampling", title, header, rows, note)
    if res["sample"] is not None:
        print(f"(first row's live continuation: {res['sample']!r})")
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = pretrained_parser(__doc__)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row (>= 2)")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    if args.new < 2:
        parser.error(f"--new must be >= 2 (the decode step is timed from new - 1), not {args.new}")
    return run_on_pretrained(args, measure, print_table)


if __name__ == "__main__":
    main()
