"""``jlora plan``: the run's train step compiled from abstract shapes, checked against the run."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from runner_helpers import ROOT, hf_config, write_checkpoint

from jlora.cli import main
from jlora.models.decoder import DecoderConfig
from jlora.runner.config import load_config, read_config
from jlora.runner.plan import abstract_batch, format_plan, plan_loaded, plan_run
from jlora.runner.tasks.causal_lm import checkpoint_config

SMALL = ["train.batch_size=2", "data.seq_len=32"]


def plan(*overrides, path=None):
    return plan_run(*read_config(path, [*SMALL, *overrides]))


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A directory holding a bf16 model's config.json and nothing else."""
    d = tmp_path_factory.mktemp("config_only")
    (d / "config.json").write_text(json.dumps(hf_config(300) | {"torch_dtype": "bfloat16"}))
    return str(d)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint whose chat template renders a prompt as a prefix of its answer."""
    template = (
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", chat_template=template)


def test_the_plan_equals_the_loaded_runs_compiled_step():
    """Shapes alone give the same step as the run's own weights and batches (grad_accum too)."""
    over = [*SMALL, "train.grad_accum=2"]
    planned = plan_run(*read_config(None, over))
    loaded = plan_loaded(load_config(None, over))
    assert planned.parts == loaded.parts and planned.total == loaded.total
    assert planned.rows == 2 and planned.parts["temporaries"] > 0
    # the parts are the whole peak, less the step number and the PRNG key's few bytes
    assert 0 <= planned.total - sum(planned.parts.values()) <= 16


def test_a_dpo_plan_equals_the_loaded_pair_run(checkpoint):
    over = [
        f"model.path={checkpoint}",
        "train.objective=dpo",
        "data.train=builtin:stdlib_modules/train.jsonl",
        *SMALL,
    ]
    planned = plan_run(*read_config(None, over))
    loaded = plan_loaded(load_config(None, over))
    assert planned.parts == loaded.parts and planned.rows == loaded.rows == 4  # pairs x 2


def test_a_config_json_alone_plans_a_bf16_base(config_only):
    p = plan(f"model.path={config_only}", "model.dtype=bfloat16", "model.remat=dots")
    decoder = checkpoint_config(read_config(None, [f"model.path={config_only}"])[0].model)[0]
    assert p.base_dtype[0] == "bfloat16" and p.counts["base"] > 0
    assert p.parts["base"] == 2 * p.counts["base"]  # two bytes a parameter
    assert p.parts["adapters"] == 4 * p.counts["adapters"]  # float32 adapters
    assert decoder.param_dtype == jnp.float32  # model.dtype float32: auto keeps float32
    text = format_plan(p, 2**40)
    assert "(from config.json: no weight, tokenizer or data read)" in text
    assert "remat dots" in text and "fits in 1024.00 GiB" in text


def test_qlora_plans_a_quantised_base(config_only):
    float_base = plan(f"model.path={config_only}", "model.dtype=bfloat16")
    nf4 = plan(f"model.path={config_only}", "model.dtype=bfloat16", "lora.quantize=nf4")
    assert nf4.counts == float_base.counts
    assert nf4.parts["base"] < float_base.parts["base"]


def test_a_grpo_plan_has_rollouts_and_their_cache(config_only):
    p = plan(
        f"model.path={config_only}",
        "train.objective=grpo",
        "train.rewards=['exact_match:answer']",
        "train.num_generations=3",
        "train.num_iterations=2",
        "data.train=prompts.jsonl",  # never read
    )
    config = DecoderConfig.from_hf(hf_config(300))
    # k and v, [layers, rows, seq, kv heads, head dim], float32
    assert p.kv_cache == 2 * 2 * 6 * 32 * 2 * config.head_dim * 4
    assert p.rows == 6 and "KV cache" in format_plan(p)
    batch = abstract_batch(p.config)
    assert batch["advantages"].shape == (6,) and batch["old_logps"].shape == (6, 32)


def test_a_step_that_does_not_fit_says_what_to_try():
    text = format_plan(plan(), 1024)
    assert "does not fit in 1.00 KiB:" in text
    assert "model.remat=full" in text and "lora.quantize=nf4" in text


def test_jlora_plan_prints_the_plan(config_only, capsys):
    args = ["plan", f"model.path={config_only}", *SMALL, "--device-memory", "16GiB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2] == "== memory per device =="
    assert "fits in 16.00 GiB" in out and "estimated by XLA's cpu compiler" in out


def test_jlora_plan_lays_a_mesh_out_per_device(config_only, tmp_path):
    """In a fresh process jlora plan asks the CPU for the mesh's devices itself."""

    def base_line(*extra):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "jlora.cli",
                "plan",
                f"model.path={config_only}",
                *SMALL,
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        ).stdout
        return next(line for line in out.splitlines() if line.startswith("base weights"))

    one, two = base_line(), base_line("mesh.fsdp=2")
    assert "one device" not in two
    kib = lambda line: float(line.split()[2])  # noqa: E731
    assert kib(two) < 0.6 * kib(one)  # the kernels' input axes split over fsdp


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.kind=bert"], r"jlora plan plans decoder runs \(model.kind=llama\)"),
        (["data.seq_len=4096"], r"data.seq_len 4096 exceeds model.path 'builtin:llama_pydoc'"),
        (["mesh.fsdp=2"], r"config mesh: data\*fsdp\*tensor = 2 devices; JAX sees 1"),
    ],
)
def test_plans_the_run_would_refuse_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_run(*read_config(None, overrides))


def test_an_auto_seq_len_of_instruction_data_is_refused(config_only):
    over = [f"model.path={config_only}", "data.train=chats.jsonl"]
    with pytest.raises(ValueError, match=r"data.seq_len is auto, measured from data.train's"):
        plan_run(*read_config(None, over))


def test_plan_loaded_refuses_grpo(config_only):
    config, _ = read_config(
        None,
        [
            f"model.path={config_only}",
            "train.objective=grpo",
            "train.rewards=['exact_match:answer']",
            "data.train=prompts.jsonl",
            *SMALL,
        ],
    )
    with pytest.raises(ValueError, match=r"plan_loaded: train.objective=grpo samples its batches"):
        plan_loaded(config)


def test_jlora_plan_refuses_a_bad_device_size_and_path(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--device-memory", "lots"])
    assert "expected a memory size such as 80GiB" in capsys.readouterr().err
    assert main(["plan", "model.path=no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
