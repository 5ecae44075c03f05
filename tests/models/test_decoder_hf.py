"""The decoder against transformers: logits, weight round trips and PEFT adapters both ways."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig, init_cache
from jlora.models.decoder_weights import hf_to_params, params_to_hf

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.peft

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
CASES = {
    "llama-gqa-llama3-rope": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500.0)),
    "mistral-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=3)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm-head_dim": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "qwen2-window-all-layers": (
        "Qwen2Config",
        dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=4, max_window_layers=0),
    ),
}


def hf_model(kind, seed=0):
    """A tiny random transformers model; every weight (norms and biases too) randomised."""
    name, extra = CASES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(**SMALL, **extra, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def state_dict_np(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def jlora_model(model, **options):
    config = DecoderConfig.from_hf(json.loads(model.config.to_json_string()), **options)
    params = hf_to_params(config, state_dict_np(model).items())
    return config, params


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


def close(actual, expected, rtol):
    """Max difference relative to the largest reference logit."""
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 10)).astype(np.int32)


@pytest.mark.parametrize("kind", list(CASES))
def test_logits_equal_transformers(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    assert config.architecture == type(model).__name__
    expected = torch_logits(model, TOKENS)
    got = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    assert got.dtype == jnp.float32
    close(got, expected, 1e-4)


@pytest.mark.parametrize("kind", ["llama-gqa-llama3-rope", "qwen3-qknorm-head_dim"])
def test_bfloat16_within_tolerance(kind):
    model = hf_model(kind)
    config, params = jlora_model(model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params["model"]["norm"]["scale"].dtype == jnp.bfloat16
    got = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    expected = torch_logits(model, TOKENS)
    err = np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected)
    assert err < 3e-2, err


@pytest.mark.parametrize("kind", list(CASES))
def test_params_to_hf_round_trips_the_state_dict(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    expected = state_dict_np(model)
    if config.tie_word_embeddings:  # save_pretrained drops the tied copy too
        expected.pop("lm_head.weight")
    got = list(params_to_hf(config, params))
    assert [k for k, _ in got] == list(expected)  # HF's order, layer by layer
    for name, value in got:
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_config_round_trips_through_transformers():
    for kind in CASES:
        model = hf_model(kind)
        config, _ = jlora_model(model)
        again = transformers.AutoConfig.for_model(**config.to_hf())
        assert DecoderConfig.from_hf(json.loads(again.to_json_string())) == config, kind


def test_cached_decoding_matches_transformers_with_window():
    model = hf_model("mistral-window")
    config, params = jlora_model(model)
    apply = jax.jit(Decoder(config).apply)
    cache = init_cache(config, 2, 12)
    logits, cache = apply({"params": params}, TOKENS[:, :6], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(6, 10):
        logits, cache = apply({"params": params}, TOKENS[:, t : t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    close(np.concatenate(steps, axis=1), torch_logits(model, TOKENS), 1e-4)


# PEFT: a jlora adapter served by PEFT, and a PEFT adapter imported into jlora


def _lora_targets():
    return r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel|.*lm_head/kernel"


def test_export_peft_loads_onto_transformers(tmp_path):
    from peft import PeftModel

    model = hf_model("llama-gqa-llama3-rope")
    config, params = jlora_model(model)
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=_lora_targets() + "|.*embed_tokens/embedding",
        axis_rules=DECODER_AXIS_RULES,
    )
    p = jlora.init_lora(jax.random.key(1), {"params": params}, cfg)
    # a trained-looking adapter: B (and the embedding's A) away from zero
    p = jax.jit(
        lambda p: jax.tree.map_with_path(
            lambda k, x: (
                x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape))
                if "lora" in jax.tree_util.keystr(k)
                else x
            ),
            p,
        )
    )(p)
    names = jlora.export_peft(tmp_path, p, cfg, jlora.peft.HF_DECODER)
    assert "model.layers.1.self_attn.q_proj" in names and "model.embed_tokens" in names
    served = PeftModel.from_pretrained(model, tmp_path).eval()
    expected = torch_logits(served, TOKENS)
    got = jax.jit(jlora.lora(Decoder(config).apply, cfg))(p, TOKENS)
    close(got, expected, 1e-4)
    merged = jax.jit(Decoder(config).apply)(jlora.merge_params(p, cfg), TOKENS)
    close(merged, expected, 1e-4)


def test_import_peft_from_a_torch_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = hf_model("qwen2-bias-tied")
    config, params = jlora_model(model)
    peft_cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        init_lora_weights=False,  # random A and B, so the adapter changes the logits
    )
    torch.manual_seed(3)
    peft_model = get_peft_model(model, peft_cfg).eval()
    expected = torch_logits(peft_model, TOKENS)
    peft_model.save_pretrained(tmp_path)
    p, cfg = jlora.import_peft(tmp_path, {"params": params}, jlora.peft.HF_DECODER)
    base = Decoder(config).apply({"params": params}, TOKENS)
    assert np.max(np.abs(np.asarray(base) - expected)) > 1e-2  # the adapter matters
    got = jax.jit(jlora.lora(Decoder(config).apply, cfg))(p, TOKENS)
    close(got, expected, 1e-4)
