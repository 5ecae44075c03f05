"""Mixture-of-experts decoders against transformers: logits, aux loss, weights, PEFT adapters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, DECODER_TARGETS, Decoder, DecoderConfig
from jlora.models.decoder_weights import hf_to_params, params_to_hf
from jlora.models.moe import load_balancing_loss, router_logits

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.peft

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
QWEN = dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4)
CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(QWEN, norm_topk_prob=False)),
    "qwen3_moe-norm-window": (
        "Qwen3MoeConfig",
        dict(QWEN, norm_topk_prob=True, use_sliding_window=True, sliding_window=4),
    ),
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4)),
    "mixtral-window-tied": (
        "MixtralConfig",
        dict(intermediate_size=24, num_local_experts=4, sliding_window=3, tie_word_embeddings=True),
    ),
}
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 10)).astype(np.int32)


def hf_model(kind, seed=0):
    """A tiny random transformers MoE; every weight (norms and router too) randomised."""
    name, extra = CASES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(**SMALL, **extra, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(float(pname.endswith("norm.weight")) + 0.2 * torch.randn_like(p))
    return model


def state_dict_np(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def jlora_model(model):
    config = DecoderConfig.from_hf(json.loads(model.config.to_json_string()))
    return config, hf_to_params(config, state_dict_np(model).items())


def close(actual, expected, rtol):
    """Max difference relative to the largest reference value."""
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


@pytest.mark.parametrize("kind", list(CASES))
def test_logits_and_aux_loss_equal_transformers(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    assert config.architecture == type(model).__name__ and config.moe is not None
    mask = np.ones_like(TOKENS).astype(bool)
    mask[1, 7:] = False  # right padding in row 1: transformers' attention_mask
    with torch.no_grad():
        out = model(
            torch.as_tensor(TOKENS),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            output_router_logits=True,
        )
    apply = jax.jit(
        lambda p, m: Decoder(config).apply(p, TOKENS, kv_mask=m, mutable=["intermediates"])
    )
    logits, state = apply({"params": params}, mask)
    close(np.asarray(logits)[mask], out.logits.numpy()[mask], 1e-4)
    aux = load_balancing_loss(router_logits(state), config.moe.num_experts_per_tok, mask)
    np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral-window-tied"])
def test_params_to_hf_round_trips_the_state_dict(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    expected = state_dict_np(model)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = list(params_to_hf(config, params))
    assert [k for k, _ in got] == list(expected)  # HF's order: layer, then expert
    for name, value in got:
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_config_round_trips_through_transformers():
    for kind in CASES:
        config, _ = jlora_model(hf_model(kind))
        again = transformers.AutoConfig.for_model(**config.to_hf())
        assert DecoderConfig.from_hf(json.loads(again.to_json_string())) == config, kind


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_expert_adapters_export_to_peft_and_back(tmp_path, kind):
    from peft import PeftModel

    model = hf_model(kind)
    config, params = jlora_model(model)
    cfg = jlora.LoraConfig(
        rank=2, alpha=4.0, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES
    )
    p = jlora.init_lora(jax.random.key(1), {"params": params}, cfg)
    p = jax.tree.map_with_path(  # a trained-looking adapter: B away from zero
        lambda k, x: (
            x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape))
            if jlora.path_str(k).endswith("_lora_b")
            else x
        ),
        p,
    )
    names = jlora.export_peft(tmp_path, p, cfg, jlora.models.decoder.PEFT_MAPPING)
    block, (_, _, down) = config.moe.block, config.moe.projections
    assert f"model.layers.1.{block}.experts.3.{down}" in names
    assert not any(n.endswith(".gate") for n in names)  # the router is not adapted
    served = PeftModel.from_pretrained(model, tmp_path).eval()
    with torch.no_grad():
        expected = served(torch.as_tensor(TOKENS)).logits.numpy()
    merged = jax.jit(Decoder(config).apply)(jlora.merge_params(p, cfg), TOKENS)
    close(merged, expected, 1e-4)
    base = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    assert np.max(np.abs(np.asarray(base) - expected)) > 1e-2  # the adapters matter
    again, cfg2 = jlora.import_peft(tmp_path, {"params": params}, jlora.models.decoder.PEFT_MAPPING)
    jax.tree.map(np.testing.assert_array_equal, jlora.split(again)[0], jlora.split(p)[0])
    assert cfg2.scale_for("x", 2) == cfg.scale_for("x", 2)


def test_import_peft_from_a_torch_expert_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = hf_model("mixtral")
    config, params = jlora_model(model)
    torch.manual_seed(3)
    peft_cfg = LoraConfig(  # PEFT matches every expert's w1 and w2 by module name
        r=2, lora_alpha=8, target_modules=["w1", "w2", "q_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, peft_cfg).eval()
    with torch.no_grad():
        expected = peft_model(torch.as_tensor(TOKENS)).logits.numpy()
    peft_model.save_pretrained(tmp_path)
    p, cfg = jlora.import_peft(tmp_path, {"params": params}, jlora.models.decoder.PEFT_MAPPING)
    experts = p["params"]["model"]["layers"]["block_sparse_moe"]["experts"]
    assert (
        experts["w2"]["kernel_lora_a"].shape == (2, 4, 24, 2)
        and "kernel_lora_a" not in experts["w3"]
    )
    got = jax.jit(jlora.lora(Decoder(config).apply, cfg))(p, TOKENS)
    close(got, expected, 1e-4)
