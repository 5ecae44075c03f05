"""Attention's implementations measured: one causal attention's forward and backward, per length.

``jlora.models.attention.attend`` on ``q`` ``[1, T, heads, head_dim]`` and grouped-query ``k``,
``v`` ``[1, T, kv_heads, head_dim]`` (``--dtype``, causal mask, random values), differentiated
with respect to all three (``jax.grad`` of ``sum(out · w)``): ``einsum`` (the decoder's path
before ``jlora.models.attention``, ``[H, T, T]`` scores), ``fused``
(``jax.nn.dot_product_attention``; XLA's version on CPU, cuDNN's on a GPU in bfloat16) and
``blockwise`` (online softmax over blocks of ``--block`` slots with a recomputing backward
pass). Per length and implementation:
XLA's ``memory_analysis()`` temp bytes of the compiled gradient, and the median time of
interleaved rounds, each against ``einsum``. An implementation whose compiled temp memory
exceeds ``--run-limit-gib`` is compiled and reported, not run. The gradients of the ones run
agree with the first one run (the largest difference is printed).

    .venv/bin/python benchmarks/attention.py [--seqs 1024,4096,16384] [--heads 8 --kv-heads 2]
        [--head-dim 64] [--block 512] [--dtype float32] [--rounds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
from _common import add_runner_flags, compile_timed, medians_interleaved, parse, report, write_json

from jlora.models.attention import MaskSpec, attend

IMPLEMENTATIONS = ("einsum", "fused", "blockwise")
MIB = 2**20


def gradient(implementation: str, block: int) -> Any:
    """``(q, k, v, w) -> d sum(attend(q, k, v) · w) / d(q, k, v)``, jitted."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array) -> jax.Array:
        out = attend(q, k, v, MaskSpec(), implementation=implementation, block=block)
        return jnp.sum(out * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure_length(args: argparse.Namespace, seq: int) -> dict[str, dict[str, Any]]:
    keys = jax.random.split(jax.random.key(seq), 4)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (1, seq, args.heads, args.head_dim), dtype)
    kv_shape = (1, seq, args.kv_heads, args.head_dim)
    k, v = (jax.random.normal(key, kv_shape, dtype) for key in keys[1:3])
    w = jax.random.normal(keys[3], q.shape, dtype)
    rows: dict[str, dict[str, Any]] = {}
    runs, grads = {}, {}
    for impl in IMPLEMENTATIONS:
        compiled, info = compile_timed(gradient(impl, args.block), (q, k, v, w))
        row = {"temp_mib": info["temp_bytes"] / MIB, "compile_s": info["compile_s"]}
        row["ran"] = info["temp_bytes"] <= args.run_limit_gib * 2**30
        if row["ran"]:
            grads[impl] = compiled(q, k, v, w)
            runs[impl] = lambda c=compiled: c(q, k, v, w)
        rows[impl] = row
    times = medians_interleaved(runs, args.rounds)
    first = next(iter(grads), None)
    for impl, row in rows.items():
        row["ms"] = 1000 * times[impl] if impl in times else None
        row["x_temp"] = row["temp_mib"] / rows["einsum"]["temp_mib"]
        row["x_time"] = times[impl] / times["einsum"] if "einsum" in times and row["ran"] else None
        if impl in grads:
            diffs = jax.tree.map(
                lambda a, b: jnp.max(jnp.abs(a.astype(float) - b.astype(float))),
                grads[impl],
                grads[first],
            )
            row["max_grad_diff"] = float(max(jax.tree.leaves(diffs)))
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    by_seq = {str(seq): measure_length(args, seq) for seq in args.seqs}
    return {"rows": by_seq, "backend": jax.devices()[0].platform}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1024, 4096, 16384])  # fmt: skip
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-limit-gib", type=float, default=6.0)
    add_runner_flags(parser, {"seqs": "1024,4096", "rounds": 3})
    args = parse(parser, argv)
    if isinstance(args.seqs, str):  # a --quick default arrives as its string
        args.seqs = [int(x) for x in args.seqs.split(",")]
    res = measure(args)
    title = (
        f"Attention forward + backward, {args.heads} heads x {args.head_dim} (GQA: "
        f"{args.kv_heads} kv heads), causal, {args.dtype}, batch 1, blockwise blocks of "
        f"{args.block}"
    )
    header = ["tokens", "attention", "ms", "x einsum", "temp MiB", "x einsum temp", "compile s"]
    rows = []
    for seq, by_impl in res["rows"].items():
        for impl, r in by_impl.items():
            ran = r["ran"]
            rows.append(
                [
                    f"{int(seq):,}",
                    impl,
                    f"{r['ms']:.0f}" if ran else "not run",
                    f"{r['x_time']:.2f}" if r["x_time"] is not None else "-",
                    f"{r['temp_mib']:,.1f}",
                    f"{r['x_temp']:.3f}",
                    f"{r['compile_s']:.1f}",
                ]
            )
    diff = max(
        r.get("max_grad_diff", 0.0) for by_impl in res["rows"].values() for r in by_impl.values()
    )
    note = (
        f"Gradients of the implementations run agree to {diff:.1e}. Not run: compiled temp "
        f"memory over {args.run_limit_gib:g} GiB (reported from the compiled program)."
    )
    if res["backend"] == "cpu":
        note += (
            " On CPU `fused` is JAX's XLA version of `dot_product_attention` (scores "
            "materialised); on a GPU in bfloat16 it is cuDNN's flash kernel."
        )
    tables: list[dict[str, Any]] = []
    report(tables, "attention", title, header, rows, note)
    write_json(args.json, args, tables, **res)
    return res


if __name__ == "__main__":
    main()
