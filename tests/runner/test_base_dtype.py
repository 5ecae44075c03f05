"""``model.base_dtype``: the frozen base held in bf16 while adapters and Adam stay float32."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import DEFAULT, write_checkpoint
from safetensors import safe_open

import jlora
from jlora.cli import main
from jlora.models.formats.stored_dtype import float_dtype, stored_dtype
from jlora.models.pretrained import load_pretrained, save_pretrained
from jlora.runner.base_dtype import resolve_base_dtype
from jlora.runner.config import ModelSection, load_config
from jlora.runner.finetune import finetune
from jlora.runner.tasks.causal_lm import CausalLMTask, checkpoint_config

TARGETS = r".*(q_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights saved in float32 and in bfloat16 (exactly representable)."""
    root = tmp_path_factory.mktemp("ckpt")
    f32 = write_checkpoint(root / "f32")
    pre = load_pretrained(f32)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), pre.params)
    save_pretrained(f32, pre._replace(params=rounded))  # float32 holding bf16 values
    save_pretrained(root / "bf16", load_pretrained(f32), dtype=jnp.bfloat16)
    return f32, root / "bf16"


def overrides(run_dir, path, steps=2, **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": path,
        "model.dtype": "bfloat16",
        "lora.targets": f"['{TARGETS}']",
        "data.seq_len": 32,
        "train.steps": steps,
        "train.batch_size": 2,
        "train.learning_rate": 1e-2,
        "train.warmup_steps": 1,
        "train.eval_every": steps,
        "train.eval_batches": 1,
        "train.checkpoint_every": 1,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 2,
        "generate.temperature": 0.0,
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize(
    ("dtype", "base", "stored", "expected"),
    [
        ("bfloat16", "auto", "bfloat16", "bfloat16"),
        ("bfloat16", "auto", "float16", "bfloat16"),
        ("bfloat16", "auto", "Q4_K", "bfloat16"),
        ("bfloat16", "auto", "float32", "float32"),
        ("bfloat16", "auto", "F32", "float32"),
        ("float32", "auto", "bfloat16", "float32"),
        ("float32", "bfloat16", "float32", "bfloat16"),
        ("bfloat16", "float32", "bfloat16", "float32"),
    ],
)
def test_auto_holds_a_16_bit_checkpoint_in_bf16_under_bf16_compute(dtype, base, stored, expected):
    section = ModelSection(dtype=dtype, base_dtype=base)
    assert resolve_base_dtype(section, stored)[0] == expected


def test_stored_dtype_from_headers_or_config(checkpoints, tmp_path):
    f32, bf16 = checkpoints
    assert (stored_dtype(str(f32)), stored_dtype(str(bf16))) == ("float32", "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert stored_dtype(str(tmp_path)) == "float16"
    assert float_dtype("F16") == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    with pytest.raises(ValueError, match=r"torch_dtype 'int8' is not a float dtype jlora reads"):
        stored_dtype(str(tmp_path))


def test_checkpoint_config_and_task_hold_the_base_in_the_resolved_dtype(checkpoints, tmp_path):
    _, bf16 = checkpoints
    config = load_config(DEFAULT, overrides(tmp_path / "r", bf16))
    assert checkpoint_config(config.model)[0].param_dtype == jnp.bfloat16
    base = CausalLMTask(config).base
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    config = load_config(DEFAULT, overrides(tmp_path / "r", bf16, **{"model.dtype": "float32"}))
    assert checkpoint_config(config.model)[0].param_dtype == jnp.float32


@pytest.fixture(scope="module")
def bf16_run(checkpoints, tmp_path_factory):
    """A bf16-held base run and the same run with a float32 copy of the same values."""
    f32, bf16 = checkpoints
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, path in (("bf16", bf16), ("f32", f32)):
        runs[name] = root / name
        finetune(load_config(DEFAULT, overrides(runs[name], path)), log=lambda _: 0)
    return runs


def test_a_bf16_base_trains_as_its_float32_copy_with_float32_adapters(bf16_run, checkpoints):
    np.testing.assert_allclose(losses(bf16_run["bf16"]), losses(bf16_run["f32"]), rtol=1e-6)
    params, _ = jlora.load_adapter(
        bf16_run["bf16"] / "adapter", load_pretrained(checkpoints[1]).params
    )
    lora, _ = jlora.split(params)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype("float32")}
    saved = jlora.checkpoint_steps(bf16_run["bf16"] / "checkpoints")
    assert saved  # the optimizer state was written as float32 (restored below on resume)


def test_a_bf16_base_run_resumes_with_the_same_losses(bf16_run, checkpoints, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(bf16_run["bf16"], run)
    shutil.rmtree(run / "checkpoints" / "2")  # as if killed after step 1
    logs = []
    finetune(load_config(DEFAULT, overrides(run, checkpoints[1])), log=logs.append)
    assert logs == [f"resuming {run} from the checkpoint of step 1"]
    assert losses(run) == losses(bf16_run["bf16"])


def test_merge_hf_writes_the_checkpoints_dtype(bf16_run, checkpoints, capsys):
    run = bf16_run["bf16"]
    assert main(["merge", str(run), "--format", "hf"]) == 0
    assert "in bfloat16 as the checkpoint" in capsys.readouterr().out
    merged = run / "merged_hf"
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(merged / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    base = load_pretrained(checkpoints[1], param_dtype=jnp.bfloat16)
    params, cfg = jlora.load_adapter(run / "adapter", base.params)
    tokens = jnp.asarray([[5, 17, 3, 99, 42]])
    want = jlora.lora(base.model.apply, cfg)({"params": params}, tokens)
    loaded = load_pretrained(merged, param_dtype=jnp.bfloat16)
    got = loaded.model.apply({"params": loaded.params}, tokens)
    # the merged kernels are W + s·A·B rounded once to bf16: bf16-sized differences
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)


def test_qlora_quantises_a_bf16_base_and_dequantises_to_bf16(checkpoints, tmp_path, capsys):
    run = tmp_path / "q"
    over = overrides(run, checkpoints[1], steps=1, **{"lora.quantize": "nf4"})
    results = finetune(load_config(DEFAULT, over), log=lambda _: 0)
    assert np.isfinite(results["after"]["eval_loss"])
    task = CausalLMTask(load_config(DEFAULT, over))
    from jlora.runner.variants import prepare_base

    quantised = prepare_base(task.config, task.base)
    q = quantised["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert jlora.is_quantized(q) and q.dtype == "bfloat16"
    assert jlora.dequantize(quantised)["model"]["norm"]["scale"].dtype == jnp.bfloat16
    assert main(["merge", str(run), "--format", "hf"]) == 0
    assert "in bfloat16" in capsys.readouterr().out
