"""The GPU run (``python -m benchmarks --device gpu``: llama_step) on tiny models, on the CPU.

``--quick --platform cpu`` takes every path the GPU run takes: LoRA, QLoRA, full fine-tuning
and the limit run; a case halves its batch and is reported as not fitting; an out-of-memory
error is reported and the run goes on; the results file and the page. No timing is asserted.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bench_helpers import load_benchmark

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks import render  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    cmd = [sys.executable, "-m", "benchmarks", "--device", "gpu", "--quick", "--platform", "cpu"]
    got = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("llama_step")


@pytest.fixture(scope="module")
def case():
    return load_benchmark("_llama_case")


def test_every_path_runs_or_is_reported(results):
    assert list(results["benchmarks"]) == ["llama_step"]  # --device gpu runs it alone
    assert results["machine"]["platform"] == "cpu" and "gpu" not in results["machine"]
    entry = results["benchmarks"]["llama_step"]
    assert (
        entry["returncode"] == 0 and entry["command"] == "python benchmarks/llama_step.py --quick"
    )
    cases = entry["results"]["cases"]
    for method in ("full", "lora", "qlora", "limit"):
        r = cases["tiny"][method]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # a CPU has no peak in the table
        assert r["batch"] == 2 and r["needed_bytes"] > 0
        assert r["loss"] is None if method == "limit" else math.isfinite(r["loss"])
    assert cases["tiny"]["lora"]["trained_params"] < cases["tiny"]["full"]["trained_params"]
    # full FT of the untied model: its state fits the 7 MB device, its step at 2 or 1 row not
    full = cases["tiny-untied"]["full"]
    assert full["status"] == "does not fit"
    assert [t["batch"] for t in full["tries"]] == [2, 1]
    assert full["state_bytes"] < 0.95 * full["capacity_bytes"] < full["needed_bytes"]
    oom = cases["tiny-untied"]["lora"]
    assert oom["status"] == "out of memory" and "RESOURCE_EXHAUSTED" in oom["error"]


def test_the_table_and_the_page(results):
    entry = results["benchmarks"]["llama_step"]
    (table,) = entry["tables"]
    assert table["name"] == "llama_step" and table["header"][:4] == [
        "model",
        "method",
        "batch",
        "tokens/s",
    ]
    status = {(r[0], r[1]): r[-1] for r in table["rows"]}
    assert len(status) == 6
    assert status[("tiny, tied (1B's layout)", "QLoRA (NF4 base)")] == "ok"
    assert status[("tiny, untied (8B's layout)", "LoRA (bf16 base)")] == "out of memory"
    assert status[("tiny, untied (8B's layout)", "full fine-tune (bf16, f32 Adam)")].startswith(
        "does not fit: needs 0.0"
    )
    assert "6·N + A" in table["note"] and "n/a" in table["note"]
    page = render.render({"gpu": results})
    assert table["title"] in page and "does not fit: needs" in page
    assert render.PENDING not in page.replace("\n", " ")


def test_the_page_says_gpu_numbers_are_pending_without_a_gpu_run(results):
    cpu = {**results, "benchmarks": {}}
    page = " ".join(render.render({"cpu": cpu}).split())
    assert "## " + render.TITLES["llama_step"] in page
    assert " ".join(render.PENDING.split()) in page


def test_runner_defaults_and_refusals(capsys):
    assert runner.parse_args(["--device", "gpu"]).names == ["llama_step"]
    assert runner.parse_args(["--device", "gpu", "--all"]).names == list(runner.BENCHMARKS)
    args = runner.parse_args(["--device", "gpu", "--platform", "cpu"])
    assert args.out.name == "gpu-on-cpu.json"  # never the published gpu.json
    assert runner.environment("llama_step", "gpu", "cpu")["JAX_PLATFORMS"] == "cpu"
    assert runner.environment("llama_step", "gpu")["JAX_PLATFORMS"] == "cuda"
    with pytest.raises(SystemExit):
        runner.parse_args(["--device", "gpu", "--platform", "cpu", "--render"])
    assert "--render publishes the results" in capsys.readouterr().err


def test_arguments(bench, capsys):
    args = bench.parse_args(["--batch", "1b=4"])
    assert args.batches == {"1b": 4, "8b": 8}
    assert args.pairs[:2] == [("1b", "lora"), ("1b", "qlora")]
    assert bench.parse_args(["--cases", "8b:full", "--batch", "2"]).batches == {"8b": 2}
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "70b:lora"])
    assert "models: unknown ['70b']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])
    assert "rows must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows must be >= 1"):
        bench.batches("1b=0", ["1b"])


def test_a_dead_case_is_classified(bench):
    oom = bench.classify(-9, "...\njaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: ")
    assert oom["status"] == "out of memory" and oom["returncode"] == -9
    assert bench.classify(1, "Segmentation fault")["status"] == "failed"


def test_peak_flops_by_device_kind(case):
    assert case.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert case.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert case.peak_flops("NVIDIA H200") == 989e12
    assert case.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert case.peak_flops("NVIDIA L40S") == 362e12 and case.peak_flops("NVIDIA L4") == 121e12
    assert case.peak_flops("TPU v5 lite") == 197e12
    assert case.peak_flops("cpu") is None


def test_flops_per_token_formula(case):
    c = case.decoder_config("8b", 2048, "none", None)
    n = case.matmul_params(c)
    # Llama-3.1-8B: 8.03B parameters, of which 0.53B the embedding a token only looks up
    assert round(n["total"] / 1e9, 2) == 8.03 and round(n["matmul"] / 1e9, 2) == 7.5
    attention = 6 * 32 * 32 * 128 * 2048
    assert case.flops_per_token(c, 2048, "full", 0) == 6 * n["matmul"] + attention
    assert case.flops_per_token(c, 2048, "limit", 0) == 4 * n["matmul"] + attention
    assert case.flops_per_token(c, 2048, "lora", 10) == 4 * n["matmul"] + attention + 60
    one = case.matmul_params(case.decoder_config("1b", 2048, "none", None))
    assert round(one["total"] / 1e9, 2) == 1.24  # Llama-3.2-1B, tied


def test_adam_f32_keeps_f32_state_and_matches_adam(case):
    params = {"w": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)}
    grads = {"w": jnp.full(8, 0.5, jnp.bfloat16)}
    tx = case.adam_f32(0.1)
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(grads, state, params)
    f32 = optax.adam(0.1)
    want, _ = f32.update(
        {"w": grads["w"].astype(jnp.float32)}, f32.init({"w": jnp.zeros(8, jnp.float32)})
    )
    np.testing.assert_allclose(updates["w"], want["w"])
    assert updates["w"].dtype == jnp.float32


def test_random_params_match_the_abstract_tree(case):
    model = case.Decoder(case.decoder_config("tiny", 16, "none", None))
    cfg = case.jlora.LoraConfig(rank=2, targets=case.DECODER_TARGETS)
    for quantize in (False, True):
        abstract = case.abstract_params(model, cfg, quantize)
        made = case.random_params(abstract, jax.random.key(0))
        assert jax.tree.structure(made) == jax.tree.structure(abstract)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), made)
        assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    q = made["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert case.jlora.is_quantized(q) and q.kind == "nf4"
    dense = q.dequantize()
    assert dense.shape == (2, 64, 128) and float(jnp.std(dense.astype(jnp.float32))) > 0.01
    layers = made["model"]["layers"]
    assert bool(jnp.all(layers["input_layernorm"]["scale"] == 1))


def test_the_chunked_loss_equals_the_full_logits_one(case):
    c = case.decoder_config("tiny", 16, "none", None)
    model = case.Decoder(c)
    params = case.random_params(case.abstract_params(model, None, False), jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, c.vocab_size)

    def apply(p, *args, **kwargs):
        return model.apply({"params": p}, *args, **kwargs)

    full = case.make_loss(c, "0")(apply, params, toks)
    chunked = case.make_loss(c, "8")(apply, params, toks)
    np.testing.assert_allclose(chunked, full, rtol=1e-4)  # bf16 head products
    with pytest.raises(SystemExit, match="--loss-chunk x: no chunked LM-head loss here"):
        case.make_loss(c, "x")
