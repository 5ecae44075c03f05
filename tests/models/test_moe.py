"""Mixture-of-experts decoders without transformers: routing, LoRA per expert, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    DECODER_TARGETS,
    PEFT_MAPPING,
    Decoder,
    DecoderConfig,
)
from jlora.models.decoder_weights import hf_to_params, param_layout, params_to_hf
from jlora.models.moe import (
    MoeConfig,
    SparseMoe,
    load_balancing_loss,
    moe_from_hf,
    router_logits,
    routing_weights,
)
from jlora.peft._convert import module_names

ARCHS = ["Qwen3MoeForCausalLM", "MixtralForCausalLM"]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 6)), jnp.int32)


def tiny(arch, **moe):
    m = MoeConfig(arch, **{"num_experts": 4, "num_experts_per_tok": 2, "expert_size": 12, **moe})
    return DecoderConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        architecture=arch,
        qk_norm=arch == "Qwen3MoeForCausalLM",
        moe=m,
    )


_PARAMS = {}


def init(config):
    """The config's random params, made once per config (init is slow on a loaded CPU)."""
    if config not in _PARAMS:
        _PARAMS[config] = jax.jit(Decoder(config).init)(jax.random.key(0), TOKENS)["params"]
    return _PARAMS[config]


def test_routing_weights_keep_top_k_and_mixtral_is_softmax_of_top_logits():
    logits = jax.random.normal(jax.random.key(0), (5, 6))
    w = routing_weights(logits, 2, normalize=True)
    assert np.all(np.sum(np.asarray(w) > 0, axis=-1) == 2)
    top, chosen = jax.lax.top_k(logits, 2)
    expected = np.zeros((5, 6), np.float32)
    np.put_along_axis(expected, np.asarray(chosen), np.asarray(jax.nn.softmax(top)), axis=-1)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-7)
    raw = routing_weights(logits, 2, normalize=False)  # Qwen3-MoE's default: softmax, then top-k
    np.testing.assert_allclose(
        np.sort(raw, axis=-1)[:, -2:], np.sort(jax.nn.softmax(logits), axis=-1)[:, -2:], rtol=1e-6
    )


def test_layout_stacks_experts_and_round_trips():
    config = tiny("MixtralForCausalLM")  # Qwen3-MoE's against transformers in test_moe_hf.py
    params = init(config)
    block = config.moe.block
    gate_name, _, down_name = config.moe.projections
    layers = params["model"]["layers"][block]
    assert layers["gate"]["kernel"].shape == (2, 16, 4)
    assert layers["experts"][gate_name]["kernel"].shape == (2, 4, 16, 12)
    assert layers["experts"][down_name]["kernel"].shape == (2, 4, 12, 16)
    tensors = list(params_to_hf(config, params))
    names = [n for n, _ in tensors]
    assert f"model.layers.1.{block}.experts.3.{down_name}.weight" in names
    assert f"model.layers.0.{block}.gate.weight" in names
    assert len(names) == len(set(names)) == sum(len(e.names(2)) for e in param_layout(config))
    again = hf_to_params(config, reversed(tensors))  # any order
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_hf_to_params_refuses_an_expert_beyond_the_config():
    config = tiny("Qwen3MoeForCausalLM")
    tensors = dict(params_to_hf(config, init(config)))
    tensors["model.layers.0.mlp.experts.4.up_proj.weight"] = np.zeros((12, 16), np.float32)
    with pytest.raises(ValueError, match=r"is for expert 4, but the config has 4 experts"):
        hf_to_params(config, tensors.items())
    del tensors["model.layers.0.mlp.experts.4.up_proj.weight"]
    del tensors["model.layers.1.mlp.experts.2.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.experts\.2\.gate_proj"):
        hf_to_params(config, tensors.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapts_each_expert_factorised(arch):
    config = tiny(arch)
    cfg = jlora.LoraConfig(
        rank=2, alpha=4.0, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES
    )
    p = jlora.init_lora(jax.random.key(1), {"params": init(config)}, cfg)
    p = jax.tree.map_with_path(  # a trained-looking adapter: B away from zero, per expert
        lambda k, x: (
            x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape))
            if jlora.path_str(k).endswith("_lora_b")
            else x
        ),
        p,
    )
    block = p["params"]["model"]["layers"][config.moe.block]
    assert "kernel_lora_a" not in block["gate"]  # the router is not a default target
    up = block["experts"][config.moe.projections[1]]
    assert up["kernel_lora_a"].shape == (2, 4, 16, 2)  # one adapter per layer and expert
    assert up["kernel_lora_b"].shape == (2, 4, 2, 12)
    apply = jax.jit(jlora.lora(Decoder(config).apply, cfg, on_unsupported="raise"))
    got = apply(p, TOKENS)
    plain = jax.jit(Decoder(config).apply)
    want = plain(jlora.merge_params(p, cfg), TOKENS)
    base = plain({"params": init(config)}, TOKENS)
    assert np.max(np.abs(np.asarray(want) - np.asarray(base))) > 1e-3  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_router_logits_are_sown_per_layer_and_feed_the_aux_loss():
    config = tiny("Qwen3MoeForCausalLM")
    params = init(config)
    sown = jax.jit(lambda p: Decoder(config).apply(p, TOKENS, mutable=["intermediates"]))
    logits, state = sown({"params": params})
    plain = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    np.testing.assert_array_equal(logits, plain)
    routed = router_logits(state)
    assert routed.shape == (2, 2, 6, 4)
    loss = load_balancing_loss(routed, 2)
    assert loss.shape == () and np.isfinite(loss) and float(loss) > 0
    masked = load_balancing_loss(routed, 2, jnp.ones((2, 6)).at[:, 4:].set(0))
    trimmed = load_balancing_loss(routed[:, :, :4], 2)
    np.testing.assert_allclose(masked, trimmed, rtol=1e-6)


def test_default_targets_still_match_dense_mlps():
    import re

    assert re.fullmatch(DECODER_TARGETS, "model/layers/mlp/gate_proj/kernel")
    assert re.fullmatch(DECODER_TARGETS, "model/layers/mlp/experts/down_proj/kernel")
    assert re.fullmatch(DECODER_TARGETS, "model/layers/block_sparse_moe/experts/w2/kernel")
    assert not re.fullmatch(DECODER_TARGETS, "model/layers/mlp/gate/kernel")
    assert not re.fullmatch(DECODER_TARGETS, "model/layers/block_sparse_moe/gate/kernel")


def test_peft_module_names_per_expert():
    template, axes = PEFT_MAPPING.module_for("model/layers/mlp/experts/up_proj/kernel")
    assert axes == ("stack", "stack", "in", "out")
    names = module_names("k", template, (2, 3, 4, 5), axes)
    assert names[0] == ((0, 0), "model.layers.0.mlp.experts.0.up_proj")
    assert names[-1] == ((1, 2), "model.layers.1.mlp.experts.2.up_proj")
    with pytest.raises(ValueError, match=r"2 stack axes .* '\{layer\}' and '\{expert\}'"):
        module_names("k", "model.layers.{layer}.up", (2, 3, 4, 5), axes)
    with pytest.raises(ValueError, match=r"3 stack axes"):
        module_names("k", "l.{layer}.{expert}", (2, 2, 3, 4, 5), ("stack",) * 3 + ("in", "out"))


def test_moe_config_errors():
    with pytest.raises(ValueError, match=r"num_experts_per_tok 5 must be in 1..num_experts \(4\)"):
        MoeConfig("MixtralForCausalLM", 4, 5, 8)
    with pytest.raises(ValueError, match=r"'LlamaForCausalLM' has no sparse MLP"):
        MoeConfig("LlamaForCausalLM", 4, 2, 8)
    with pytest.raises(ValueError, match=r"needs a MoeConfig of the same architecture"):
        DecoderConfig(hidden_size=16, num_attention_heads=2, architecture="MixtralForCausalLM")
    with pytest.raises(ValueError, match=r"needs moe=None as moe"):
        DecoderConfig(hidden_size=16, num_attention_heads=2, moe=tiny("MixtralForCausalLM").moe)


@pytest.mark.parametrize(
    "extra",
    [{"decoder_sparse_step": 2}, {"mlp_only_layers": [1]}, {"num_experts": 0}],
)
def test_dense_layers_in_a_qwen3_moe_are_refused(extra):
    hf = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 16, "num_attention_heads": 2}
    with pytest.raises(ValueError, match=r"has dense MLP layers; jlora supports only all-sparse"):
        DecoderConfig.from_hf({**hf, **extra})


def test_router_jitter_is_refused():
    with pytest.raises(ValueError, match=r"router_jitter_noise 0.1 .* set it to 0.0"):
        moe_from_hf("MixtralForCausalLM", {"router_jitter_noise": 0.1}, 16)


def test_aux_loss_input_errors():
    with pytest.raises(ValueError, match=r"logits must be \[layers, batch, seq, experts\]"):
        load_balancing_loss(jnp.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match=r"mask must be \[batch, seq\] = \(1, 3\); got \(3,\)"):
        load_balancing_loss(jnp.zeros((1, 1, 3, 4)), 2, jnp.ones(3))
    with pytest.raises(ValueError, match=r"expected one sown 'router_logits' entry, found 0"):
        router_logits({"intermediates": {}})


def _reference_with_drops(params, m, x, capacity):
    """Token by token, choice by choice: an expert whose ``capacity`` slots are taken is skipped."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = x @ np.asarray(params["gate"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ex = {k: np.asarray(v["kernel"], np.float64) for k, v in params["experts"].items()}
    gate, up, down = m.projections
    used = np.zeros(m.num_experts, int)
    out = np.zeros_like(x)
    for n, row in enumerate(probs):
        chosen = np.argsort(-row)[: m.num_experts_per_tok]
        weights = row[chosen] / (row[chosen].sum() if m.norm_topk_prob else 1.0)
        for e, w in zip(chosen, weights, strict=True):
            if used[e] < capacity:
                used[e] += 1
                g, u = x[n] @ ex[gate][e], x[n] @ ex[up][e]
                out[n] += w * ((g / (1 + np.exp(-g)) * u) @ ex[down][e])
    return out


@pytest.mark.parametrize(("factor", "capacity"), [(2.0, 10), (1.0, 5), (0.5, 3)])
def test_grouped_dispatch_drops_only_overflowing_tokens(factor, capacity):
    m = MoeConfig("Qwen3MoeForCausalLM", 4, 2, 8, norm_topk_prob=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    params = SparseMoe(m, jnp.float32, jnp.float32).init(jax.random.key(1), x)["params"]
    grouped = SparseMoe(dataclasses.replace(m, capacity_factor=factor), jnp.float32, jnp.float32)
    got = jax.jit(grouped.apply)({"params": params}, x)
    want = _reference_with_drops(params, m, x, capacity)  # ceil(factor * 10 * 2 / 4) slots
    np.testing.assert_allclose(np.asarray(got).reshape(10, 16), want, rtol=1e-5, atol=1e-6)
    if factor >= 2.0:  # E/k: no buffer can overflow, so it is the dense dispatch
        dense = SparseMoe(m, jnp.float32, jnp.float32).apply({"params": params}, x)
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)


def test_grouped_dispatch_adapts_each_expert_factorised():
    config = tiny("MixtralForCausalLM")
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=1.0))
    cfg = jlora.LoraConfig(rank=2, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES)
    p = jlora.init_lora(jax.random.key(1), {"params": init(config)}, cfg)
    p = jax.tree.map_with_path(
        lambda k, x: x + 0.1 if jlora.path_str(k).endswith("_lora_b") else x, p
    )
    got = jax.jit(jlora.lora(Decoder(config).apply, cfg, on_unsupported="raise"))(p, TOKENS)
    want = jax.jit(Decoder(config).apply)(jlora.merge_params(p, cfg), TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_capacity_factor_must_be_positive():
    with pytest.raises(ValueError, match=r"capacity_factor must be positive .* got 0"):
        MoeConfig("MixtralForCausalLM", 4, 2, 8, capacity_factor=0)
