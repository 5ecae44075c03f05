"""One GRPO step on SmolLM2-135M measured (issue 22): where its time goes, and its memory.

LoRA rank 8 on q,k,v,o,gate,up,down with B non-zero (``real_model.py``'s ``split_adapted``),
Adam on the adapters. A step, as ``train.objective=grpo`` runs it in the runner: sample
``G`` completions of each of ``P`` prompts (``L`` tokens) through the live adapters
(``jlora.models.sampling.generate`` with ``jlora.lora(step, config)`` over the adapted tree,
temperature 1, ``N`` new tokens, no EOS so every row is ``L + N`` long), then one policy
update on the ``[P·G, L + N]`` rows (``jax.value_and_grad`` of :func:`jlora.grpo_policy_loss`
with respect to the adapters, then Adam). Timed side by side in one run:

- **sampling, live adapters**: the rollouts, compile excluded (the first call compiles).
- **reference forward**: the base with the adapters off on the rows, the log-probabilities the
  KL term needs for ``beta > 0`` (a part of the ``beta > 0`` update, timed alone).
- **policy update, beta > 0**: the reference forward inside the step, as the runner runs it.
- **policy update, beta = 0**: no reference.
- **merge + sampling merged**: what peers do instead: ``jlora.merge_params`` every step,
  then sample with the plain step from the merged copy (the same key: whether the tokens
  match the live ones is reported).

Each time is a median of interleaved rounds in a fresh random order, compiled first; shares
are of a step = sampling + update. Memory is XLA's ``memory_analysis()`` (arguments + outputs
+ temp) of the compiled update, and the bytes a merged copy for sampling adds (the merged
tree's arrays: the base's f32 weights), which sampling through the live adapters saves.

    .venv/bin/python benchmarks/grpo_step.py [--prompts 4 --generations 8] [--prompt-len 64]
        [--new 64] [--beta 0.04] [--rank 8] [--rounds 5] [--quick] [--json out.json]

``--quick`` (what ``python -m benchmarks`` runs) takes under two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import time
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
from real_model import MB, decoders, lora_config, prompts_for, split_adapted

import jlora
from jlora.models.decoder import Decoder, init_cache
from jlora.models.pretrained import Pretrained
from jlora.models.sampling import generate

QUICK = {"prompts": 2, "generations": 4, "prompt_len": 32, "new": 8, "rounds": 3}
SAMPLE, REFERENCE, UPDATE_KL, UPDATE = (
    "sampling, live adapters",
    "reference forward (adapters off)",
    "policy update, beta > 0 (reference inside)",
    "policy update, beta = 0",
)
MERGE, SAMPLE_MERGED = "merge (jlora.merge_params)", "sampling, merged copy"
TEMPERATURE = 1.0


def rollout_batch(
    prompts: list[list[int]], completions: list[list[int]], generations: int, seed: int = 0
) -> dict[str, jax.Array]:
    """The runner's rows: prompt then completion, targets shifted, the completion's targets marked.

    Rewards are random (the reward functions are not what is measured), turned into group
    advantages as the runner does.
    """
    rows = np.asarray([p + c for p, c in zip(prompts, completions, strict=True)], np.int32)
    n, seq = rows.shape
    start = len(prompts[0])
    targets = np.concatenate([rows[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    mask = np.zeros((n, seq), bool)
    mask[:, start - 1 : seq - 1] = True  # target t is token t + 1
    rewards = np.random.default_rng(seed).random(n).astype(np.float32)
    advantages = jlora.group_advantages(rewards, generations).advantages
    return {
        "tokens": jnp.asarray(rows),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.asarray(mask),
        "advantages": advantages,
    }


def build(pre: Pretrained, args: argparse.Namespace) -> dict[str, Any]:
    """Every timed part as ``name -> fn()``, the compile info of the jitted ones, the tokens."""
    cfg, tx = lora_config(args.rank), optax.adam(1e-4)
    model = Decoder(pre.config)
    step, _ = decoders(model)
    a, base = split_adapted(pre.params, cfg)
    adapted = jlora.combine(a, base)
    state = tx.init(a)
    live = jlora.lora(step, cfg)  # one object each: generate compiles once per step object
    cache = functools.partial(init_cache, pre.config)
    rows = [
        p for p in prompts_for(pre, args.prompts, args.prompt_len) for _ in range(args.generations)
    ]
    sample = functools.partial(
        generate,
        prompts=rows,
        init_cache=cache,
        max_new_tokens=args.new,
        temperature=TEMPERATURE,
        key=jax.random.key(0),
        cache_len=args.prompt_len + args.new,
        pad_to=args.prompt_len,
    )

    def apply(p: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": p}, tokens)

    def update_step(beta: float) -> Callable:
        @jax.jit
        def update(a: Any, state: Any, base: Any, batch: dict[str, jax.Array]) -> Any:
            def loss(a: Any) -> tuple[jax.Array, Any]:
                params = jlora.combine(a, base)
                return jlora.grpo_policy_loss(
                    apply, params, cfg, batch, beta=beta, temperature=TEMPERATURE
                )

            (value, _), grads = jax.value_and_grad(loss, has_aux=True)(a)
            updates, state = tx.update(grads, state, a)
            return optax.apply_updates(a, updates), state, value

        return update

    @jax.jit
    def reference(base: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = jlora.lora(apply, cfg)(base, batch["tokens"])  # what grpo_policy_loss runs
        return jlora.token_logps(logits, batch["targets"], temperature=TEMPERATURE)

    merge = jax.jit(lambda p: jlora.merge_params(p, cfg))

    info: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    live_tokens = sample(live, adapted)  # compiles
    info[SAMPLE] = {"compile_and_first_s": time.perf_counter() - start}
    batch = rollout_batch(rows, live_tokens, args.generations)
    merge_exe, info[MERGE] = compile_timed(merge, (adapted,))
    merged = merge_exe(adapted)
    start = time.perf_counter()
    merged_tokens = sample(step, merged)  # compiles
    info[SAMPLE_MERGED] = {"compile_and_first_s": time.perf_counter() - start}
    jitted = {
        REFERENCE: (reference, (base, batch)),
        UPDATE_KL: (update_step(args.beta), (a, state, base, batch)),
        UPDATE: (update_step(0.0), (a, state, base, batch)),
    }
    run: dict[str, Callable[[], Any]] = {
        SAMPLE: functools.partial(sample, live, adapted),
        MERGE: functools.partial(merge_exe, adapted),
        SAMPLE_MERGED: functools.partial(sample, step, merged),
    }
    losses = {}
    for name, (fn, fn_args) in jitted.items():
        exe, info[name] = compile_timed(fn, fn_args)
        run[name] = functools.partial(exe, *fn_args)
        out = jax.block_until_ready(run[name]())  # a warm-up call; a loss is the last output
        if name != REFERENCE:
            losses[name] = float(out[-1])
    pairs = zip(live_tokens, merged_tokens, strict=True)  # no EOS: every row is N tokens
    flat = [x == y for r, s in pairs for x, y in zip(r, s, strict=True)]
    same = sum(flat) / max(len(flat), 1)
    copy_bytes = sum(x.nbytes for x in jax.tree.leaves(merged))  # what a sampler would hold
    return {
        "run": run,
        "info": info,
        "losses": losses,
        "same_fraction": same,
        "merged_copy_bytes": copy_bytes,
    }


def measure(pre: Pretrained, args: argparse.Namespace) -> dict[str, Any]:
    built = build(pre, args)
    med = medians_interleaved(built["run"], args.rounds)
    ms = {name: 1e3 * s for name, s in med.items()}
    info = built["info"]
    step_kl, step = ms[SAMPLE] + ms[UPDATE_KL], ms[SAMPLE] + ms[UPDATE]
    split = {
        SAMPLE: {"ms": ms[SAMPLE], "share_kl": ms[SAMPLE] / step_kl, "share": ms[SAMPLE] / step},
        REFERENCE: {"ms": ms[REFERENCE], "share_kl": ms[REFERENCE] / step_kl, "share": None},
        UPDATE_KL: {"ms": ms[UPDATE_KL], "share_kl": ms[UPDATE_KL] / step_kl, "share": None},
        UPDATE: {"ms": ms[UPDATE], "share_kl": None, "share": ms[UPDATE] / step},
    }
    for name in split:
        split[name].update(info[name])
    merged_ms = ms[MERGE] + ms[SAMPLE_MERGED]
    sampling = {
        SAMPLE: {"ms": ms[SAMPLE], "x_live": 1.0, **info[SAMPLE]},
        MERGE: {"ms": ms[MERGE], "x_live": ms[MERGE] / ms[SAMPLE], **info[MERGE]},
        SAMPLE_MERGED: {
            "ms": ms[SAMPLE_MERGED],
            "x_live": ms[SAMPLE_MERGED] / ms[SAMPLE],
            **info[SAMPLE_MERGED],
        },
        "merge + sampling merged": {"ms": merged_ms, "x_live": merged_ms / ms[SAMPLE]},
    }
    u = info[UPDATE_KL]
    update_bytes = u["argument_bytes"] + u["output_bytes"] + u["temp_bytes"]
    copy_bytes = built["merged_copy_bytes"]
    memory = {
        "update_bytes": update_bytes,
        "merged_copy_bytes": copy_bytes,
        "live_bytes": update_bytes,
        "with_merged_copy_bytes": update_bytes + copy_bytes,
        "saving_bytes": copy_bytes,
    }
    return {
        "step_ms": {"beta > 0": step_kl, "beta = 0": step},
        "split": split,
        "sampling": sampling,
        "memory": memory,
        "losses": built["losses"],
        "same_tokens_fraction": built["same_fraction"],
    }


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_tables(res: dict[str, Any], args: argparse.Namespace) -> list:
    tables: list = []
    rows, new = args.prompts * args.generations, args.new
    sizes = (
        f"{args.prompts} prompts x {args.generations} generations = {rows} rows of "
        f"{args.prompt_len} + {new} tokens, f32, Adam; LoRA rank {args.rank} on q,k,v,o,gate,up,"
        f"down; medians of {args.rounds} interleaved rounds, compile excluded"
    )
    split, steps = res["split"], res["step_ms"]
    report(
        tables,
        "grpo_step",
        f"SmolLM2-135M GRPO step, time split: {sizes}",
        ["part", "ms", "share of step, beta > 0", "share of step, beta = 0"],
        [
            [name, f"{r['ms']:.0f}", _share(r["share_kl"]), _share(r["share"])]
            for name, r in split.items()
        ]
        + [
            ["step, beta > 0 (sampling + update)", f"{steps['beta > 0']:.0f}", "1.00", "-"],
            ["step, beta = 0 (sampling + update)", f"{steps['beta = 0']:.0f}", "-", "1.00"],
        ],
        f"(beta = {args.beta}; the reference forward is a part of the beta > 0 update, timed "
        f"alone; losses: {res['losses'][UPDATE_KL]:.6f} with beta > 0, "
        f"{res['losses'][UPDATE]:.6f} without)",
    )
    sampling = res["sampling"]
    report(
        tables,
        "grpo_step_sampling",
        f"SmolLM2-135M GRPO rollouts: through the live adapters against merging every step "
        f"and sampling the merged copy: {rows} rows of {args.prompt_len} + {new} tokens, "
        f"temperature {TEMPERATURE}; medians of {args.rounds} interleaved rounds",
        ["way", "ms", "x live"],
        [[name, f"{r['ms']:.0f}", f"{r['x_live']:.2f}"] for name, r in sampling.items()],
        f"(the same key: {100 * res['same_tokens_fraction']:.0f}% of the merged copy's tokens "
        "are the live adapters' tokens)",
    )
    m, u = res["memory"], split[UPDATE_KL]
    report(
        tables,
        "grpo_step_memory",
        f"SmolLM2-135M GRPO step memory: XLA memory_analysis() of the beta > 0 update "
        f"({rows} x {args.prompt_len + new} tokens), and a merged copy kept for sampling",
        [
            "sampling from",
            "args MB",
            "outputs MB",
            "temp MB",
            "merged copy MB",
            "total MB",
            "x live",
        ],
        [
            [
                name,
                f"{u['argument_bytes'] / MB:.0f}",
                f"{u['output_bytes'] / MB:.0f}",
                f"{u['temp_bytes'] / MB:.0f}",
                f"{extra / MB:.0f}",
                f"{total / MB:.0f}",
                f"{total / m['live_bytes']:.2f}",
            ]
            for name, extra, total in (
                ("live adapters (jlora.lora)", 0, m["live_bytes"]),
                ("a merged copy (peers)", m["merged_copy_bytes"], m["with_merged_copy_bytes"]),
            )
        ],
        f"(sampling through the live adapters saves {m['saving_bytes'] / MB:.0f} MB, the base's "
        "f32 weights, that a merged copy for sampling would add)",
    )
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = pretrained_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (L)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per completion (N)")
    parser.add_argument("--beta", type=float, default=0.04, help="the KL weight (> 0)")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    if args.beta <= 0:
        parser.error(f"--beta must be > 0 (beta = 0 is measured beside it), not {args.beta}")
    if args.new < 1:
        parser.error(f"--new must be >= 1 (the completion the loss scores), not {args.new}")
    return run_on_pretrained(args, measure, print_tables)


if __name__ == "__main__":
    main()
