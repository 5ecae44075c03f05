"""A mixture-of-experts decoder's LoRA step: factorised against merged per expert, and the limit.

``jlora.models``' decoder as ``Qwen3MoeForCausalLM`` with random weights, at Qwen3-30B-A3B's
shape ratios scaled down (the defaults: 16 experts, top 4, d=256, experts 3/8 d wide, 4 query
heads of 128 sharing one key/value head, 2 layers; the real model has 128 experts, top 8,
d=2048, 48 layers). Every layer's experts are stacked ``[L, E, in, out]`` and dispatched
densely (every token through every expert, weighted by the sparse top-k weights), so each
expert is one adapter with the ``stack`` axis role. LoRA rank 8 on q,k,v,o and every expert's
gate, up and down (not the router); Adam; the next-token loss (no auxiliary router loss).

Rows, all compiled ahead of time and timed in interleaved rounds in a fresh random order:
``jlora.lora`` (the factorised path through ``jlora.value_and_grad``); the same step merging
``W + s·A·B`` for every expert (and attention kernel) inside the step with
``jlora.merge_params`` and differentiating through it; full fine-tuning (Adam on every
parameter); and the limit (forward plus backward to the embedding output with every weight
constant: no weight gradient at all). Memory is XLA's ``memory_analysis()`` of each compiled
step.

    .venv/bin/python benchmarks/moe_step.py [--experts 16 --top-k 4] [--d 256] [--layers 2]
        [--batch 4 --seq 128] [--rank 8] [--rounds 20] [--quick] [--json F]

``--quick`` (what ``python -m benchmarks`` runs) took 30 s on two idle CPU cores.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import optax
from _common import (
    add_runner_flags,
    compile_timed,
    medians_interleaved,
    parse,
    platform,
    report,
    write_json,
)
from real_model import MB, lora_config, split_adapted, steps, token_loss

import jlora
from jlora.models.decoder import Decoder, DecoderConfig
from jlora.models.moe import MoeConfig

QUICK = {"rounds": 10}
#: Qwen3-30B-A3B (config.json): the shapes the defaults scale down.
QWEN3_30B_A3B = dict(
    hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
)  # fmt: skip


def config(args: argparse.Namespace) -> DecoderConfig:
    """A Qwen3-MoE decoder at Qwen3-30B-A3B's ratios, ``args.d`` wide."""
    q = QWEN3_30B_A3B
    scale = args.d / q["hidden_size"]
    moe = MoeConfig(
        "Qwen3MoeForCausalLM",
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        expert_size=round(q["moe_intermediate_size"] * scale),
        norm_topk_prob=True,
    )
    heads = max(1, round(q["num_attention_heads"] * scale))
    return DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.d,
        intermediate_size=moe.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads * q["num_key_value_heads"] // q["num_attention_heads"]),
        head_dim=max(2, 2 * args.d // heads),  # q is 2d wide, as 32 x 128 on d=2048
        max_position_embeddings=max(args.seq, 2),
        qk_norm=True,
        architecture="Qwen3MoeForCausalLM",
        moe=moe,
    )


def merged_loss(model: Decoder, cfg: jlora.LoraConfig) -> Any:
    """``(adapters, frozen, tokens) -> loss`` of ``jlora.merge_params`` of the adapted tree."""

    def loss(a: Any, frozen: Any, toks: jax.Array) -> jax.Array:
        merged = jlora.merge_params(jlora.combine(a, frozen), cfg)
        return token_loss(lambda p, t: model.apply({"params": p}, t), merged, toks)

    return loss


def merge_step(model: Decoder, cfg: jlora.LoraConfig, tx: optax.GradientTransformation) -> Any:
    """The adapters' Adam step through :func:`merged_loss`: every ``W + s·A·B`` formed."""
    loss = merged_loss(model, cfg)

    @jax.jit
    def step(a: Any, state: Any, frozen: Any, toks: jax.Array) -> Any:
        value, grads = jax.value_and_grad(loss)(a, frozen, toks)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    return step


def build(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, tuple]], dict[str, Any]]:
    """Every row as ``name -> (jitted fn, args)``, and the sizes the titles give."""
    c = config(args)
    model = Decoder(c)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, c.vocab_size)
    params = jax.jit(model.init)(jax.random.key(2), tokens)["params"]
    cfg, tx = lora_config(args.rank), optax.adam(1e-4)
    a, base = split_adapted(params, cfg)
    fns = steps(model, cfg, tx)
    lora_args = (a, tx.init(a), base, tokens)
    run = {
        "jlora.lora": (fns["lora"], lora_args),
        "merge W+sAB in step": (merge_step(model, cfg, tx), lora_args),
        "full fine-tune": (fns["full"], (params, tx.init(params), tokens)),
        "limit (no weight grads)": (fns["limit"], (params, tokens)),
    }
    experts = params["model"]["layers"]["mlp"]["experts"]
    sizes = {
        "config": {
            "experts": c.moe.num_experts,
            "top_k": c.moe.num_experts_per_tok,
            "expert_size": c.moe.expert_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
        },
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "lora_params": sum(x.size for x in jax.tree.leaves(a)),
        "expert_bytes": sum(x.nbytes for x in jax.tree.leaves(experts)),
    }
    return run, sizes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    run, sizes = build(args)
    compiled, info = {}, {}
    for name, (fn, fn_args) in run.items():
        exe, info[name] = compile_timed(fn, fn_args)
        compiled[name] = functools.partial(exe, *fn_args)
    for fn in compiled.values():  # one warm-up call each
        jax.block_until_ready(fn())
    med = medians_interleaved(compiled, args.rounds)
    limit, merge = med["limit (no weight grads)"], med["merge W+sAB in step"]
    merge_temp = info["merge W+sAB in step"]["temp_bytes"]
    rows = {
        name: {
            "ms": 1e3 * med[name],
            "x_limit": med[name] / limit,
            "x_merge": med[name] / merge,
            "temp_x_merge": info[name]["temp_bytes"] / merge_temp,
            **info[name],
        }
        for name in run
    }
    return {**sizes, "rows": rows}


def print_table(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    m = res["config"]
    title = (
        f"Qwen3-MoE decoder (Qwen3-30B-A3B's ratios): {m['experts']} experts, top {m['top_k']}, "
        f"d={args.d}, experts {m['expert_size']} wide, heads {m['heads']}/{m['kv_heads']} x "
        f"{m['head_dim']}, {args.layers} layers, vocab {args.vocab}; {args.batch} x {args.seq} "
        f"tokens, f32, Adam; LoRA rank {args.rank} on q,k,v,o and every expert's gate,up,down "
        f"({res['lora_params']:,} of {res['params']:,} params); medians of {args.rounds} "
        f"interleaved rounds"
    )
    rows = [
        [
            name,
            f"{r['ms']:.1f}",
            f"{r['x_limit']:.2f}",
            f"{r['x_merge']:.2f}",
            f"{r['temp_bytes'] / MB:.1f}",
            f"{r['temp_x_merge']:.2f}",
            f"{(r['temp_bytes'] + r['output_bytes'] + r['argument_bytes']) / MB:.1f}",
        ]
        for name, r in res["rows"].items()
    ]
    header = ["step", "ms", "x limit", "time x merge", "temp MB", "temp x merge", "total MB"]
    note = (
        f"(dense dispatch: every token through all {m['experts']} experts; the expert kernels "
        f"are {res['expert_bytes'] / MB:.1f} MB, which the merged step forms a second time; "
        "total = arguments + outputs + temp)"
    )
    tables: list[dict[str, Any]] = []
    report(tables, "moe_step", title, header, rows, note)
    return tables


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [
        ("experts", 16),
        ("top-k", 4),
        ("d", 256),
        ("layers", 2),
        ("vocab", 1024),
        ("batch", 4),
        ("seq", 128),
        ("rank", 8),
        ("rounds", 20),
    ]:
        parser.add_argument(f"--{flag}", type=int, default=default)
    add_runner_flags(parser, QUICK)
    return parse(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(f"jax {jax.__version__} on {platform()}")
    res = measure(args)
    tables = print_table(res, args)
    write_json(args.json, args, tables, **res)
    return res


if __name__ == "__main__":
    main()
