"""``jlora export-peft RUN_DIR``: a run's adapter as a PEFT directory that names its base."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models.test_gguf import hf_weights, write_gguf
from runner_helpers import DEFAULT, write_checkpoint

import jlora
from jlora.cli import main
from jlora.models.decoder import DECODER_AXIS_RULES
from jlora.models.pretrained import builtin_models, load_pretrained
from jlora.runner.config import ModelSection, RunConfig, load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir import directory as rundir

TARGETS = r".*(q_proj|v_proj|down_proj)/kernel"


def finetune_and_export(run_dir, *over):
    """A short run in ``run_dir``, then ``jlora export-peft``; the adapter config it wrote."""
    tiny = ["train.batch_size=2", "data.seq_len=16", "train.eval_batches=1"]
    tiny += ["train.progress=false", "generate.max_new_tokens=1", f"train.eval_every={10**6}"]
    finetune(load_config(DEFAULT, [f"run_dir={run_dir}", *tiny, *over]), log=lambda _: 0)
    assert main(["export-peft", str(run_dir)]) == 0
    return json.loads((run_dir / "peft" / "adapter_config.json").read_text())


def random_adapter(run_dir, base):
    """An adapter with non-zero B, saved where a run keeps it."""
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, axis_rules=DECODER_AXIS_RULES)
    params = jlora.init_lora(jax.random.key(1), base, cfg)
    params = jax.tree.map_with_path(
        lambda p, x: x + 0.05 if jlora.path_str(p).endswith("_lora_b") else x, params
    )
    jlora.save_adapter(run_dir / "adapter", params, cfg)
    return params, cfg


def test_a_gguf_base_is_written_as_a_hugging_face_directory(tmp_path, monkeypatch, capsys):
    gguf = write_gguf(tmp_path / "base.gguf", hf_weights())
    config = RunConfig(run_dir=str(tmp_path / "run"), model=ModelSection(path=str(gguf)))
    monkeypatch.setattr(rundir, "load_run_config", lambda run_dir: config)
    params, cfg = random_adapter(tmp_path / "run", load_pretrained(gguf).params)

    assert main(["export-peft", str(tmp_path / "run")]) == 0
    assert "AutoPeftModelForCausalLM" in capsys.readouterr().out
    base_hf = tmp_path / "run" / "base_hf"
    written = json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base_hf)
    assert written["task_type"] == "CAUSAL_LM"
    # The adapter read back onto the written base merges to what the run's adapter merges to.
    base = load_pretrained(base_hf).params
    again, again_cfg = jlora.import_peft(tmp_path / "run" / "peft", base, jlora.peft.HF_DECODER)
    expected = jlora.merge_params(params, cfg)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        jlora.merge_params(again, again_cfg),
        expected,
    )


@pytest.mark.peft
def test_the_exported_run_serves_from_auto_peft_model(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    ckpt = write_checkpoint(tmp_path / "ckpt")
    written = finetune_and_export(
        tmp_path / "run",
        f"model.path={ckpt}",
        f"lora.targets=['{TARGETS}']",
        "train.steps=3",
        "train.learning_rate=3e-2",
    )
    assert written["base_model_name_or_path"] == str(ckpt)  # an HF directory is named as is

    pretrained = load_pretrained(ckpt)
    params, cfg = jlora.load_adapter(tmp_path / "run" / "adapter", pretrained.params)
    tokens = jnp.arange(1, 17)[None] % 250
    expected = pretrained.model.apply({"params": jlora.merge_params(params, cfg)}, tokens)
    served = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run" / "peft")).eval()
    with torch.no_grad():
        got = served(torch.tensor(np.array(tokens))).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)
    base_logits = pretrained.model.apply({"params": pretrained.params}, tokens)
    assert np.abs(np.asarray(expected) - np.asarray(base_logits)).max() > 1e-4


def test_a_builtin_model_run_names_the_shipped_directory_as_its_base(tmp_path):
    written = finetune_and_export(tmp_path / "run", "train.steps=1")
    assert written["base_model_name_or_path"] == builtin_models()["llama_pydoc"]
    assert written["task_type"] == "CAUSAL_LM"
    assert any("self_attn.q_proj" in m for m in written["target_modules"])


@pytest.mark.peft
def test_the_default_run_serves_from_auto_peft_model(tmp_path):
    # The built-in model is a Hugging Face directory: PEFT loads it as the base, with no
    # mapping or conversion of its own.
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    run = tmp_path / "run"
    written = finetune_and_export(run, "train.steps=2", "generate.max_new_tokens=2")
    assert written["base_model_name_or_path"] == builtin_models()["llama_pydoc"]

    builtin = load_pretrained("builtin:llama_pydoc")
    params, cfg = jlora.load_adapter(run / "adapter", builtin.params)
    tokens = jnp.asarray(list("Shall I compare thee to a summer's day? Été".encode()))[None]
    expected = jlora.lora(lambda p: builtin.model.apply({"params": p}, tokens), cfg)(params)
    served = peft.AutoPeftModelForCausalLM.from_pretrained(str(run / "peft")).eval()
    with torch.no_grad():
        got = served(torch.tensor(np.array(tokens))).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)
    base_logits = builtin.model.apply({"params": builtin.params}, tokens)
    assert np.abs(np.asarray(expected) - np.asarray(base_logits)).max() > 1e-4  # B moved


@pytest.mark.peft
def test_transformers_reads_the_builtin_tokenizer_as_utf8_bytes():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(builtin_models()["llama_pydoc"])
    assert (
        tok("Shall é")["input_ids"]
        == list("Shall é".encode())
        == [83, 104, 97, 108, 108, 32, 195, 169]
    )
    assert tok.decode(list("Shall é".encode())) == "Shall é"


def test_export_peft_of_a_missing_run_is_one_error_line(tmp_path, capsys):
    assert main(["export-peft", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
