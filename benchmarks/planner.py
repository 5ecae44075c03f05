"""``jlora plan`` measured: its estimate against a run it planned, and Llama-3.1-8B planned.

Two parts, each a markdown table (and both in ``--json``):

- **check**: a small run (the built-in model, f32, no remat) planned from abstract shapes
  (``jlora.runner.plan.plan_run``), the same step compiled from the loaded run
  (``plan_loaded``: its weights and first batch) and the run measured: in a fresh process the
  runner's own step (task, adapters, optimizer, objective as ``jlora finetune`` builds them)
  is compiled, then called once; before the call the live jax arrays are its arguments (the
  base, the state, the batch), and the process's resident-memory high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) grows during the call by what it
  allocates and touches: its outputs and temporaries (XLA's CPU keeps them for the next
  call, so only the first call shows them), plus what the runtime sets up on a first call.
  On a GPU the allocator's ``peak_bytes_in_use`` over the call replaces the high-water mark.
  The error is the plan's total against arguments plus that growth.
- **llama8b**: Llama-3.1-8B planned from a config.json alone (written from the published
  values: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab 128256,
  llama3 rope scaling; bf16 as the checkpoint stores it) at batch 2 x 2,048 tokens with
  torchtune's single-device settings: LoRA rank 8, alpha 16 on q, v, o and the MLP's gate,
  up and down (``8B_lora_single_device.yaml`` / ``8B_qlora_single_device.yaml``: q_proj,
  v_proj, output_proj with ``apply_lora_to_mlp``), bf16, activation checkpointing
  (``model.remat=full``); LoRA over a bf16 base and QLoRA over NF4 (jlora quantises the
  adapted kernels; torchtune every linear but the output head, and its scales too). Beside
  torchtune's README figures for the same model and method (batch 2, packed 2,048 tokens,
  torch.compile): 30.3 GiB for LoRA (A6000 row; its 4090 row says 16.2 GiB) and 7.4 GiB for
  QLoRA (4090), with the ratio.

    .venv/bin/python benchmarks/planner.py [--parts check,llama8b] [--batch 16 --seq 256]
        [--llama-seq 2048] [--quick] [--json out.json]
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

from jlora.runner.config import TrainSection, load_config, read_config
from jlora.runner.plan import format_plan, plan_loaded, plan_run

PARTS = ("check", "llama8b")
GIB, MIB = 2**30, 2**20
#: Llama-3.1-8B's config.json, as published (meta-llama/Llama-3.1-8B).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
#: torchtune's 8B single-device LoRA/QLoRA targets: q_proj, v_proj, output_proj and the MLP.
TORCHTUNE_TARGETS = r".*(self_attn/(q|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
#: torchtune's README, "Memory and training speed" (batch 2, packed 2,048 tokens, compiled).
TORCHTUNE_GIB = {"LoRA, bf16 base": 30.3, "QLoRA, NF4 base": 7.4}

# The child that runs the planned step for real: argv[1] is the overrides as JSON.
_CHILD = r"""
import json, sys
import jax
from jlora.runner.config import load_config
from jlora.runner.finetune import _initial_state
from jlora.runner.objectives import make_objective
from jlora.runner.optimizer import make_optimizer
from jlora.runner.tasks import lora_config, make_task
from jlora.runner.trainer.step import make_train_step
from jlora.runner.variants import adapt, prepare_base
import jlora

def status(key):
    with open("/proc/self/status") as f:
        return 1024 * int(next(l.split()[1] for l in f if l.startswith(key + ":")))

config = load_config(None, json.loads(sys.argv[1]))
task = make_task(config)
cfg, tx = lora_config(config), make_optimizer(config)
key = jax.random.key(config.train.seed)
lora, base = jlora.split(adapt(jax.random.fold_in(key, 0), prepare_base(config, task.base), config))
state = _initial_state(lora, {}, tx, key)
objective = make_objective(config, task, cfg)
step = make_train_step(objective.loss, objective.batch_weight, tx, config.train.grad_accum)
batch = jax.tree.map(jax.numpy.asarray, task.train_batch(0))
compiled = step.lower(state, base, batch, 1).compile()
jax.block_until_ready((state, base, batch))
live = sum(x.nbytes for x in jax.live_arrays())
device = jax.devices()[0]
if device.memory_stats():  # an accelerator: its allocator's own peak
    before = device.memory_stats()["bytes_in_use"]
    state, out = compiled(state, base, batch, 1)
    jax.block_until_ready((state, out))
    growth = device.memory_stats()["peak_bytes_in_use"] - before
else:
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    state, out = compiled(state, base, batch, 1)
    jax.block_until_ready((state, out))
    growth = status("VmHWM") - before
print(json.dumps({"live": live, "growth": growth}))
"""


def measure_run(overrides: list[str]) -> dict[str, int]:
    """Arguments (live arrays) and the high-water growth of the planned run's step, measured."""
    got = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(overrides)],
        capture_output=True,
        text=True,
        check=False,
    )
    if got.returncode:
        raise RuntimeError(f"the measured run failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def check(args: argparse.Namespace) -> dict[str, Any]:
    over = [f"train.batch_size={args.batch}", f"data.seq_len={args.seq}", "model.remat=false"]
    begin = time.perf_counter()
    planned = plan_run(*read_config(None, over))
    plan_s = time.perf_counter() - begin
    loaded = plan_loaded(load_config(None, over))
    measured = measure_run(over)
    p = planned.parts
    rows = {
        "planned (abstract shapes)": {
            "args": planned.total - p["outputs"] - p["temporaries"],
            "step": p["outputs"] + p["temporaries"],
            "total": planned.total,
        },
        "same step, from the loaded run": {
            "args": loaded.total - loaded.parts["outputs"] - loaded.parts["temporaries"],
            "step": loaded.parts["outputs"] + loaded.parts["temporaries"],
            "total": loaded.total,
        },
        "measured (live arrays + the call's peak growth)": {
            "args": measured["live"],
            "step": measured["growth"],
            "total": measured["live"] + measured["growth"],
        },
    }
    truth = rows["measured (live arrays + the call's peak growth)"]["total"]
    for row in rows.values():
        row["error"] = row["total"] / truth - 1
    return {"rows": rows, "plan_seconds": plan_s, "overrides": over}


def llama8b(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        hf = {**LLAMA_3_1_8B, "num_hidden_layers": args.llama_layers}
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f)
        common = [
            f"model.path={d}",
            "model.dtype=bfloat16",
            "model.remat=full",
            f"lora.targets=['{TORCHTUNE_TARGETS}']",
            "lora.rank=8",
            "lora.alpha=16",
            "train.batch_size=2",
            f"data.seq_len={args.llama_seq}",
        ]
        cases = {"LoRA, bf16 base": [], "QLoRA, NF4 base": ["lora.quantize=nf4"]}
        if "loss_chunk" in {f for f in TrainSection.__dataclass_fields__}:
            cases["LoRA, bf16 base, full logits"] = ["train.loss_chunk=0"]
        rows, texts = {}, {}
        for name, extra in cases.items():
            begin = time.perf_counter()
            plan = plan_run(*read_config(None, [*common, *extra]))
            seconds = time.perf_counter() - begin
            texts[name] = format_plan(plan, 80 * GIB)
            print(f"\n$ jlora plan {' '.join(extra) or '(LoRA)'}\n{texts[name]}", flush=True)
            published = TORCHTUNE_GIB.get(name)
            rows[name] = {
                "base": plan.parts["base"],
                "adapters_optimizer": plan.parts["adapters"] + plan.parts["optimizer"],
                "temporaries": plan.parts["temporaries"],
                "total": plan.total,
                "here": plan.here,
                "torchtune_gib": published,
                "ratio": None if published is None else plan.total / GIB / published,
                "seconds": seconds,
            }
    return {"rows": rows, "layers": args.llama_layers, "seq": args.llama_seq}


def print_check(res: dict[str, Any], tables: list) -> None:
    title = (
        "Planner check: the built-in model's LoRA step ("
        + ", ".join(res["overrides"])
        + "), planned against measured"
    )
    header = ["", "arguments MB", "outputs + temps MB", "total MB", "x measured - 1"]
    rows = [
        [
            name,
            f"{r['args'] / MIB:.1f}",
            f"{r['step'] / MIB:.1f}",
            f"{r['total'] / MIB:.1f}",
            f"{r['error']:+.1%}",
        ]
        for name, r in res["rows"].items()
    ]
    note = f"The plan took {res['plan_seconds']:.1f} s (compile included)."
    report(tables, "planner_check", title, header, rows, note)


def print_llama(res: dict[str, Any], tables: list) -> None:
    title = (
        f"Llama-3.1-8B planned from config.json ({res['layers']} layers), batch 2 x "
        f"{res['seq']} tokens, LoRA r8 on q,v,o,gate,up,down, bf16, remat full"
    )
    header = [
        "", "base GiB", "adapters + Adam MiB", "temps GiB", "total GiB", "on this CPU GiB",
        "torchtune GiB", "x torchtune",
    ]  # fmt: skip
    rows = [
        [
            name,
            f"{r['base'] / GIB:.2f}",
            f"{r['adapters_optimizer'] / MIB:.0f}",
            f"{r['temporaries'] / GIB:.2f}",
            f"{r['total'] / GIB:.2f}",
            "-" if r["here"] is None else f"{r['here'] / GIB:.2f}",
            "-" if r["torchtune_gib"] is None else f"{r['torchtune_gib']:.1f}",
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
        ]
        for name, r in res["rows"].items()
    ]
    note = (
        "Planned by XLA's CPU compiler: weights, adapters and Adam state are exact, the "
        "temporaries are the CPU's schedule with its float32 copies of bf16 kernels left out "
        "(the 'on this CPU' column keeps them). torchtune's figures are measured peaks on GPUs "
        "with torch.compile and a chunked cross-entropy."
    )
    report(tables, "planner_llama8b", title, header, rows, note)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--llama-seq", type=int, default=2048)
    parser.add_argument("--llama-layers", type=int, default=32, help="32: Llama-3.1-8B itself")
    add_runner_flags(parser, {})
    args = parse(parser, argv)
    parts = args.parts.split(",")
    res: dict[str, Any] = {}
    tables: list[dict[str, Any]] = []
    if "check" in parts:
        res["check"] = check(args)
        print_check(res["check"], tables)
    if "llama8b" in parts:
        res["llama8b"] = llama8b(args)
        print_llama(res["llama8b"], tables)
    write_json(args.json, args, tables, **res)
    return res


if __name__ == "__main__":
    main()
