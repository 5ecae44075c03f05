"""Llama 1B and 8B shapes on one accelerator: LoRA and QLoRA against full fine-tuning and the limit.

What a user about to rent a GPU for a fine-tune wants to know: at 2,048 tokens a row, in bf16,
how many tokens per second each way of training gets, what share of the chip's bf16 peak that
is (model FLOP utilisation), and how much memory it takes. Two decoders with random weights
(``jlora.models.decoder``): Llama-3.2-1B's shapes (tied 128k head) and Llama-3.1-8B's. Per
model four methods, each in its own process (``_llama_case.py`` says what each one runs):
full fine-tuning (bf16 weights, f32 Adam state), LoRA rank 16 on all seven projections (bf16
base), QLoRA (the same over an NF4 base) and the limit (forward plus backward to the
activations, every weight frozen). A case whose step XLA says will not fit gets its batch
halved; if one row does not fit it is reported as not fitting, with what it would need, and
is never run. An out-of-memory error or a crash in one case is reported and the others go on;
a time budget keeps the whole run under ten minutes.

Each case's process holds 95% of the accelerator's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
unless set); peak memory is the allocator's ``peak_bytes_in_use`` where the device reports it,
else ``-`` (the compiled step's needs are beside it). The knobs that decide the fit are one
argument each: ``--remat``, ``--attention`` (``DecoderConfig.attention`` where the tree has it)
and ``--loss-chunk`` (the chunked LM-head loss where the tree has it).

    python benchmarks/llama_step.py [--models 1b,8b] [--methods full,lora,qlora,limit]
        [--seq 2048] [--batch 8] [--steps 3] [--rank 16] [--remat full] [--json F]
    python -m benchmarks --device gpu           # this, into benchmarks/results/gpu.json

``--quick`` runs the tiny stand-ins on any backend (a test of every path, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import add_runner_flags, parse, report, write_json
from _llama_case import FORMULA, GB, METHODS, MODELS, OOM_WORDS

LABELS = {
    "full": "full fine-tune (bf16, f32 Adam)",
    "lora": "LoRA (bf16 base)",
    "qlora": "QLoRA (NF4 base)",
    "limit": "limit (frozen, no weight grads)",
}
QUICK = {  # every path once: four methods run, one halves its batch and does not fit, one OOM
    "cases": "tiny:lora,tiny:qlora,tiny:limit,tiny:full,tiny-untied:full,tiny-untied:lora",
    "seq": 32,
    "batch": "2",
    "steps": 2,
    "budget_s": 600,
    # tiny-untied's full FT state fits in this, its step at 1 row does not; tiny's steps do
    "device_memory_gb": 0.007,
    "inject_oom": "tiny-untied:lora",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,8b", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument(
        "--methods", default="lora,qlora,limit,full", help="in this order: " + ",".join(METHODS)
    )
    parser.add_argument("--cases", help="MODEL:METHOD,... instead of every model x method")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument(
        "--batch", default="1b=8,8b=4", help="rows, N or MODEL=N,...; halved until a step fits"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--remat", default="full", help="DecoderConfig.remat (none, full, dots, offload)"
    )
    parser.add_argument("--attention", help="DecoderConfig.attention (default: the model's)")
    parser.add_argument(
        "--loss-chunk", default="auto", help="tokens per LM-head chunk: N, auto, or 0 (full logits)"
    )
    parser.add_argument("--device-memory-gb", type=float, help="instead of what jax reports")
    parser.add_argument("--fit-fraction", type=float, default=0.95, help="of device memory")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if not in the table")
    parser.add_argument("--budget-s", type=float, default=540, help="start no case after this")
    parser.add_argument("--case-timeout-s", type=float, default=240)
    parser.add_argument("--inject-oom", default="", help=argparse.SUPPRESS)  # MODEL:METHOD,...
    parser.add_argument("--case", help=argparse.SUPPRESS)  # MODEL:METHOD, in this process
    parser.add_argument("--case-out", help=argparse.SUPPRESS)
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    if args.cases:
        pairs = [p.split(":", 1) if ":" in p else [p, "?"] for p in args.cases.split(",")]
    else:
        pairs = [[m, k] for m in args.models.split(",") for k in args.methods.split(",")]
    args.pairs = [(m, k) for m, k in pairs]
    for flag, names, known in (
        ("models", [m for m, _ in args.pairs], MODELS),
        ("methods", [k for _, k in args.pairs], METHODS),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {','.join(known)}")
    try:
        args.batches = batches(args.batch, list(dict.fromkeys(m for m, _ in args.pairs)))
    except ValueError as e:
        parser.error(f"--batch {args.batch}: {e}")
    return args


def batches(spec: str, models: list[str]) -> dict[str, int]:
    """Rows per model from ``N`` (every model) or ``MODEL=N,...`` (8 where a model is left out).

    Raises:
      ValueError: for a count that is not a positive int.
    """
    if "=" not in spec:
        spec = ",".join(f"{m}={spec}" for m in models)
    given = dict(part.split("=", 1) for part in spec.split(","))
    out = {m: int(given.get(m, 8)) for m in models}
    if min(out.values()) < 1:
        raise ValueError(f"rows must be >= 1; got {out}")
    return out


def classify(returncode: int, stderr: str) -> dict[str, Any]:
    """What a case's process that wrote no result died of: memory, or something else."""
    tail = "\n".join(stderr.strip().splitlines()[-12:])
    oom = any(word in stderr.lower() for word in OOM_WORDS)
    return {"status": "out of memory" if oom else "failed", "returncode": returncode, "error": tail}


def run_child(argv: list[str], case: str, timeout: float) -> dict[str, Any]:
    """One case in a fresh process: its result, or how it failed."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--case", case, "--case-out", out]
        start = time.perf_counter()
        try:
            got = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "timed out", "error": f"killed after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        if got.returncode or not os.path.exists(out):
            return classify(got.returncode, got.stderr) | {"seconds": seconds}
        with open(out) as f:
            return json.load(f) | {"seconds": seconds}


def child_main(args: argparse.Namespace) -> None:
    """``--case``: runs it here, writes its result; an error becomes a status, not a crash."""
    from _llama_case import run_case

    model, method = args.case.split(":")
    try:
        res = run_case(model, method, args)
    except Exception as e:  # every failure is reported, and the run goes on
        text = f"{type(e).__name__}: {e}"
        oom = any(word in text.lower() for word in OOM_WORDS)
        res = {"status": "out of memory" if oom else "failed", "error": text[-2000:]}
    with open(args.case_out, "w") as f:
        json.dump(res, f)


def _gb(value: Any) -> str:
    return "-" if value is None else f"{value / GB:.3g}"


def row(model: str, method: str, r: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """A table row: the case's numbers, or its status and '-'."""
    label = [MODELS[model][0], LABELS[method]]
    batch = f"{r['batch']} x {r['seq']}" if "batch" in r else "-"
    if r.get("status") != "ok":
        status = r.get("status", "?")
        if status == "does not fit":
            cap = r.get("capacity_bytes")
            status += f": needs {_gb(r['needed_bytes'])} of {_gb(cap)} GB"
        elif status == "skipped":
            status += f" ({r['reason']})"
        compiled = _gb(r.get("needed_bytes"))
        return [*label, batch, "-", "-", "-", "-", "-", compiled, "-", _compile_s(r), status]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    limit = ref.get("limit", {})
    x_limit = (
        f"{limit['tokens_per_s'] / r['tokens_per_s']:.2f}" if limit.get("status") == "ok" else "-"
    )
    return [
        *label,
        batch,
        f"{r['tokens_per_s']:,.0f}",
        f"{1e3 * r['step_s']:.0f}",
        mfu,
        f"{r['model_flops_per_s'] / 1e12:.1f}",
        _gb(r.get("peak_bytes")),
        _gb(r["needed_bytes"]),
        x_limit,
        _compile_s(r),
        "ok",
    ]


def _compile_s(r: dict[str, Any]) -> str:
    """Seconds spent compiling, every batch tried."""
    return f"{sum(t['compile_s'] for t in r['tries']):.0f}" if "tries" in r else "-"


def print_table(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    tables: list[dict[str, Any]] = []
    ok = [r for m in res["cases"].values() for r in m.values() if "device_kind" in r]
    kind = ok[0]["device_kind"] if ok else "?"
    peak = ok[0]["peak_flops"] if ok else None
    attention = ok[0]["attention"] if ok else args.attention or "?"
    title = (
        f"Train steps on one {kind}: {args.seq} tokens a row, bf16, LoRA rank {args.rank} on "
        f"q,k,v,o,gate,up,down, remat {args.remat}, attention {attention}, loss "
        f"{'over full logits' if args.loss_chunk == '0' else f'chunked ({args.loss_chunk})'}; "
        f"medians of {args.steps} steps after {args.warmup}"
    )
    rows = [  # full FT, LoRA, QLoRA, the limit, in whatever order they ran
        row(model, method, cases[method], cases)
        for model, cases in res["cases"].items()
        for method in METHODS
        if method in cases
    ]
    header = ["model", "method", "batch", "tokens/s", "step ms", "MFU", "TFLOP/s", "peak GB",
              "compiled GB", "x limit", "compile s", "status"]  # fmt: skip
    note = (
        f"(MFU: model FLOPs per second over the dense bf16 peak, "
        f"{'n/a: the device is not in the table' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}"
        f"; {FORMULA}. peak GB: the allocator's peak in the case's process; compiled GB: XLA's "
        "arguments + outputs + temporaries of the step; x limit: time per token over the "
        "limit's)"
    )
    report(tables, "llama_step", title, header, rows, note)
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.case:
        child_main(args)
        return {}
    begin = time.perf_counter()
    passed = [a for i, a in enumerate(argv) if a != "--json" and argv[i - 1 : i] != ["--json"]]
    res: dict[str, Any] = {"cases": {}}
    for model, method in args.pairs:
        left = args.budget_s - (time.perf_counter() - begin)
        if left < 5:
            got = {"status": "skipped", "reason": f"past the {args.budget_s:.0f} s budget"}
        else:
            got = run_child(passed, f"{model}:{method}", min(args.case_timeout_s, left))
        res["cases"].setdefault(model, {})[method] = got
        shown = {k: got.get(k) for k in ("status", "batch", "tokens_per_s", "mfu", "error")}
        print(f"{model} {method}: {shown}", flush=True)
    res["seconds"] = time.perf_counter() - begin
    res["formula"] = FORMULA
    tables = print_table(res, args)
    ok = [r for m in res["cases"].values() for r in m.values() if "device_kind" in r]
    where = f"{ok[0]['platform']} ({ok[0]['device_kind']})" if ok else "unknown"
    write_json(args.json, args, tables, platform_name=where, **res)
    return res


if __name__ == "__main__":
    main()
