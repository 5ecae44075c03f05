"""``jlora merge RUN_DIR --format hf``: refused for encoder runs, a HF directory for decoders."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.cli import build_parser, main
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig
from jlora.models.pretrained import load_pretrained, save_pretrained
from jlora.runner.rundir import directory as rundir


def test_format_defaults_to_safetensors():
    assert build_parser().parse_args(["merge", "runs/x"]).format == "safetensors"
    assert build_parser().parse_args(["merge", "runs/x", "--format", "hf"]).format == "hf"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "runs/x", "--format", "gguf"])


def test_hf_format_is_refused_for_an_encoder_run(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model: {kind: bert}\n")
    assert main(["merge", str(tmp_path), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert (
        "--format hf writes a decoder as a Hugging Face model directory; this run uses "
        "model.kind=bert. Use --format safetensors"
    ) in err
    assert not (tmp_path / "merged_hf").exists()


def test_hf_format_writes_merged_hf_for_a_pretrained_run(tmp_path, monkeypatch, capsys):
    # A stand-in run config that carries only the model section, as a hand-made run would.
    config = DecoderConfig.from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 40,
        }
    )
    base = Decoder(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    save_pretrained(tmp_path / "base", (config, base, None))
    lora = jlora.LoraConfig(rank=2, targets=r".*(q|v)_proj/kernel", axis_rules=DECODER_AXIS_RULES)
    params = jlora.init_lora(jax.random.key(1), base, lora)
    params = jax.tree.map_with_path(
        lambda p, x: x + 0.1 if jlora.path_str(p).endswith("_lora_b") else x, params
    )
    run = tmp_path / "run"
    jlora.save_adapter(run / "adapter", params, lora)
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(kind="llama", decoder=str(tmp_path / "base"))
    )
    monkeypatch.setattr(rundir, "load_run_config", lambda run_dir: fake)
    assert main(["merge", str(run), "--format", "hf"]) == 0
    assert "merged_hf" in capsys.readouterr().out
    merged = load_pretrained(run / "merged_hf")
    tokens = jnp.asarray([[1, 2, 3, 4, 5]])
    want = jlora.lora(merged.model.apply, lora)({"params": params}, tokens)
    got = merged.model.apply({"params": merged.params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
