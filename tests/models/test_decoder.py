"""The decoder on its own: cache, packing, LoRA on stacked kernels, layouts and refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    Decoder,
    DecoderConfig,
    causal_lm_loss,
    init_cache,
)
from jlora.models.decoder_weights import hf_to_params, param_layout, params_to_hf
from jlora.models.rope import rope_inv_freq

SMALL = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def config(**kw):
    return DecoderConfig(**{**SMALL, **kw})


@functools.cache
def model_and_params(**kw):
    c = config(**kw)

    @jax.jit
    def init():
        params = Decoder(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        # norms and biases away from 1 and 0, so that every parameter matters
        return jax.tree.map(
            lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params
        )

    return c, init()


@functools.cache
def jitted(c):
    return jax.jit(Decoder(c).apply)


TOKENS = np.random.default_rng(0).integers(0, 101, (2, 9)).astype(np.int32)


# layout


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(tie_word_embeddings=True),
        dict(attention_bias=True),
        dict(qk_norm=True, head_dim=16),
    ],
)
def test_param_layout_is_the_tree_init_makes(kw):
    c = config(**kw)
    shapes = jax.eval_shape(Decoder(c).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    flat = {
        jax.tree_util.keystr(k, simple=True, separator="/"): x.shape
        for k, x in jax.tree.flatten_with_path(shapes["params"])[0]
    }
    assert flat == {"/".join(e.path): e.shape for e in param_layout(c)}


def test_a_7b_shaped_tree_is_traced_without_allocating():
    c = DecoderConfig(architecture="LlamaForCausalLM", dtype=jnp.bfloat16)
    shapes = jax.eval_shape(Decoder(c).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert 6.4e9 < n < 7e9  # Llama-2-7B's shape: 6.74e9


def test_hf_decoder_mapping_gives_the_decoder_axis_rules():
    assert jlora.peft.HF_DECODER.axis_rules == DECODER_AXIS_RULES
    assert jlora.peft.HF_DECODER.module_for("params/model/layers/mlp/down_proj/kernel")[0] == (
        "model.layers.{layer}.mlp.down_proj"
    )


def test_weights_round_trip_in_any_order_and_through_place():
    c, params = model_and_params()
    tensors = list(params_to_hf(c, params))
    placed = []
    again = hf_to_params(
        c, reversed(tensors), place=lambda path, x: placed.append(path) or jnp.asarray(x)
    )
    assert sorted(placed) == sorted("/".join(e.path) for e in param_layout(c))
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_params_are_loaded_in_param_dtype():
    c, params = model_and_params()
    c16 = config(param_dtype=jnp.bfloat16)
    loaded = hf_to_params(c16, params_to_hf(c, params))
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}


# forward: cache, padding, packing, scan options


def test_cached_decoding_equals_the_uncached_forward_with_traced_index():
    c, params = model_and_params()
    full = jitted(c)({"params": params}, TOKENS)
    step = jax.jit(
        lambda p, tok, cache, i: Decoder(c).apply(p, tok, cache=cache, cache_index=i)
    )  # i traced: one compilation for every step
    logits, cache = step({"params": params}, TOKENS[:, :5], init_cache(c, 2, 12), 0)
    out = [logits]
    for t in range(5, 9):
        logits, cache = step({"params": params}, TOKENS[:, t : t + 1], cache, jnp.int32(t))
        out.append(logits)
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, rtol=1e-5, atol=1e-5)
    assert step._cache_size() == 2  # prefill and one-token shapes


@pytest.mark.parametrize("window", [None, 3])
def test_left_padded_rows_with_kv_mask_equal_unpadded_rows(window):
    c, params = model_and_params(sliding_window=window)
    pad, n = 3, 6
    rows = TOKENS[:, : pad + n].copy()
    rows[0, :pad] = 0  # row 0: a prompt of n tokens, left-padded; row 1: unpadded
    rows[0, pad:] = TOKENS[0, :n]
    kv_mask = np.ones((2, 12), bool)
    kv_mask[0, :pad] = False
    positions = np.stack([np.r_[np.zeros(pad), np.arange(n)], np.arange(pad + n)]).astype(np.int32)

    @jax.jit
    def step(p, tok, pos, cache, i):
        return Decoder(c).apply(p, tok, pos, cache=cache, cache_index=i, kv_mask=kv_mask)

    p = {"params": params}
    logits, cache = step(p, rows[:, :7], positions[:, :7], init_cache(c, 2, 12), 0)
    out = [logits]
    for t in range(7, pad + n):
        logits, cache = step(p, rows[:, t : t + 1], positions[:, t : t + 1], cache, t)
        out.append(logits)
    out = np.concatenate(out, axis=1)
    # the window counts slots; padding only shifts the real tokens' slots, all by `pad`
    alone = jitted(c)(p, rows[:1, pad:])[0]
    np.testing.assert_allclose(out[0, pad:], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], jitted(c)(p, rows[1:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_packed_segments_equal_each_segment_alone(window):
    c, params = model_and_params(sliding_window=window)
    p = {"params": params}
    a, b = TOKENS[0, :5], TOKENS[1, :4]
    row = np.r_[a, b][None]
    segments = np.r_[np.ones(5), 2 * np.ones(4)].astype(np.int32)[None]
    positions = np.r_[np.arange(5), np.arange(4)].astype(np.int32)[None]
    packed = jax.jit(lambda p, t, pos, s: Decoder(c).apply(p, t, pos, segment_ids=s))(
        p, row, positions, segments
    )
    np.testing.assert_allclose(packed[0, :5], jitted(c)(p, a[None])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:], jitted(c)(p, b[None])[0], rtol=1e-5, atol=1e-5)


def test_padding_segment_is_never_seen_by_real_tokens():
    c, params = model_and_params()
    p = {"params": params}
    row = TOKENS[:1, :6].copy()
    segments = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
    out = Decoder(c).apply(p, row, segment_ids=segments)
    assert np.isfinite(np.asarray(out)).all()  # padding queries see padding only: finite
    np.testing.assert_allclose(out[0, :4], jitted(c)(p, row[:, :4])[0], rtol=1e-5, atol=1e-5)


def test_unscanned_and_remat_layers_give_the_same_logits_and_grads():
    c, params = model_and_params()
    p = {"params": params}

    def loss(cfg, p):
        logits = Decoder(cfg).apply(p, TOKENS)
        return causal_lm_loss(logits[:, :-1], TOKENS[:, 1:])

    expected = jax.jit(jax.value_and_grad(functools.partial(loss, c)))(p)
    for options in (dict(scan_layers=False), dict(remat=True)):
        got = jax.jit(jax.value_and_grad(functools.partial(loss, config(**options))))(p)
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got, expected
        )
    text = jax.jit(Decoder(config(scan_layers=False)).apply).lower(p, TOKENS).as_text()
    assert "while" not in text  # unrolled: straight-line code


def test_lora_on_every_stacked_projection_equals_merge_then_apply():
    c, params = model_and_params(tie_word_embeddings=True, attention_bias=True)
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=r".*_proj/kernel",
        axis_rules=DECODER_AXIS_RULES,
    )
    p = jlora.init_lora(jax.random.key(1), {"params": params}, cfg)
    assert p["params"]["model"]["layers"]["mlp"]["down_proj"]["kernel_lora_a"].shape == (2, 48, 4)
    p = jax.tree.map_with_path(
        lambda k, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(k) else x, p
    )
    got = jax.jit(jlora.lora(Decoder(c).apply, cfg))(p, TOKENS)
    expected = jitted(c)(jlora.merge_params(p, cfg), TOKENS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(expected) - jitted(c)({"params": params}, TOKENS))) > 1e-3


def test_stacked_kernels_need_the_decoder_axis_rules():
    _, params = model_and_params()
    with pytest.raises(ValueError, match="no axis rule says which"):
        jlora.init_lora(
            jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=r".*q_proj/kernel")
        )


def test_causal_lm_loss_with_mask():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    targets = jnp.array([[0, 1]])
    full = causal_lm_loss(logits, targets)
    np.testing.assert_allclose(full, (np.log(2) - np.log(0.1)) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        causal_lm_loss(logits, targets, jnp.array([[1, 0]])), np.log(2), rtol=1e-6
    )
    assert causal_lm_loss(logits, targets, jnp.zeros((1, 2))) == 0.0


def test_llama3_rope_scales_only_low_frequencies():
    base, _ = rope_inv_freq(8, 10000.0)
    scaled, _ = rope_inv_freq(
        8,
        10000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    assert scaled[0] < base[0]  # wavelength 6.3: between 4 and 16, smoothed
    np.testing.assert_allclose(scaled[1:], base[1:] / 8, rtol=1e-6)
    linear, _ = rope_inv_freq(8, 10000.0, {"type": "linear", "factor": 2.0})
    np.testing.assert_allclose(linear, base / 2, rtol=1e-7)


# refusals


def test_from_hf_defaults_and_options():
    c = DecoderConfig.from_hf(
        {"architectures": ["MistralForCausalLM"], "hidden_size": 64}, dtype=jnp.bfloat16
    )
    assert (c.sliding_window, c.num_key_value_heads, c.head_dim, c.dtype) == (
        4096,
        8,
        2,
        jnp.bfloat16,
    )
    assert DecoderConfig.from_hf({"model_type": "qwen3"}).qk_norm
    q2 = {
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": True,
        "sliding_window": 8,
        "num_hidden_layers": 2,
    }
    assert DecoderConfig.from_hf({**q2, "max_window_layers": 0}).sliding_window == 8
    assert (
        DecoderConfig.from_hf(q2).sliding_window is None
    )  # max_window_layers 28: both layers full
    assert hash(config(rope_scaling={"rope_type": "linear", "factor": 2.0}, eos_token_id=[1, 2]))


@pytest.mark.parametrize(
    ("hf", "match"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM, MistralForCausalLM",
        ),
        (
            {"model_type": "gpt2"},
            r"neither 'architectures' nor a known 'model_type' \(found 'gpt2'\)",
        ),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "llama", "mlp_bias": True}, "mlp_bias true is not supported"),
        ({"model_type": "llama", "attention_bias": True}, "adds an o_proj bias"),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "num_hidden_layers": 4,
                "max_window_layers": 2,
            },
            r"some layers only \(2 of 4",
        ),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "su", "factor": 2.0}},
            r"type 'su' \(key 'rope_type'\) is not supported \(supported: \('default'",
        ),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"lacks keys \['low_freq_factor'",
        ),
        (
            {"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4},
            "must be a multiple of num_key_value_heads 4",
        ),
        ({"model_type": "llama", "head_dim": 7}, "head_dim 7 must be even"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be a positive int"),
    ],
)
def test_bad_configs_are_refused(hf, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig.from_hf(hf)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match=r"unknown options \['dropout'\]"):
        DecoderConfig.from_hf({"model_type": "llama"}, dropout=0.1)


def test_direct_config_with_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="'BertModel' is not supported"):
        config(architecture="BertModel")


@functools.cache
def hf_tensors():
    c, params = model_and_params()
    return c, dict(params_to_hf(c, params))


def test_wrong_shape_is_refused():
    c, tensors = hf_tensors()
    bad = {**tensors, "model.layers.1.mlp.up_proj.weight": np.zeros((48, 30), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"'model.layers.1.mlp.up_proj.weight' has shape \(48, 30\), expected \(48, 32\)",
    ):
        hf_to_params(c, bad.items())


def test_missing_tensors_are_listed():
    c, tensors = hf_tensors()
    bad = {
        k: v
        for k, v in tensors.items()
        if k not in ("model.norm.weight", "model.layers.1.self_attn.k_proj.weight")
    }
    with pytest.raises(
        ValueError, match=r"missing .*model.layers.1.self_attn.k_proj.weight, model.norm.weight"
    ):
        hf_to_params(c, bad.items())


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "model.layers.0.self_attn.q_norm.weight",
            r"'model.layers.0.self_attn.q_norm.weight' is not a parameter of LlamaForCausalLM",
        ),
        ("transformer.h.0.attn.weight", "'transformer.h.0.attn.weight' is not a parameter"),
        (
            "model.layers.2.mlp.up_proj.weight",
            r"is for layer 2, but the config has num_hidden_layers=2",
        ),
    ],
)
def test_unknown_tensor_names_are_refused(name, match):
    c, tensors = hf_tensors()
    with pytest.raises(ValueError, match=match):
        hf_to_params(c, [*tensors.items(), (name, np.zeros((48, 32), np.float32))])


def test_duplicates_are_refused_and_buffers_skipped():
    c, tensors = hf_tensors()
    items = [*tensors.items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", np.zeros(4))]
    hf_to_params(c, items)
    with pytest.raises(ValueError, match=r"'model.norm.weight' is given twice"):
        hf_to_params(c, [*items, ("model.norm.weight", tensors["model.norm.weight"])])


@pytest.mark.parametrize("head_first", [True, False])
def test_tied_lm_head_is_dropped_if_equal_refused_if_not(head_first):
    c, params = model_and_params(tie_word_embeddings=True)
    tensors = list(params_to_hf(c, params))
    embed = tensors[0][1]
    same = [("lm_head.weight", embed.copy())]
    order = (lambda t, h: h + t) if head_first else (lambda t, h: t + h)
    hf_to_params(c, order(tensors, same))
    with pytest.raises(ValueError, match=r"lm_head.weight differs from model.embed_tokens.weight"):
        hf_to_params(c, order(tensors, [("lm_head.weight", embed + 1)]))


def test_params_to_hf_refuses_adapters_and_wrong_shapes():
    c, params = model_and_params()
    cfg = jlora.LoraConfig(rank=2, targets=r".*q_proj/kernel", axis_rules=DECODER_AXIS_RULES)
    with pytest.raises(ValueError, match=r"not parameters of this decoder.*merge_params"):
        list(params_to_hf(c, jlora.init_lora(jax.random.key(0), params, cfg)))
    with pytest.raises(ValueError, match=r"'model/norm/scale' has shape None, expected \(32,\)"):
        list(
            params_to_hf(
                c, {**params, "model": {k: v for k, v in params["model"].items() if k != "norm"}}
            )
        )
    with pytest.raises(ValueError, match=r"leaves \['lm_head/kernel'\] are not parameters"):
        list(params_to_hf(config(tie_word_embeddings=True), params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(tokens=np.zeros(3, np.int32)),
            r"tokens must be \[batch, seq\] int; got shape \(3,\)",
        ),
        (
            dict(positions=np.zeros((2, 3), np.int32)),
            r"positions must have the tokens' shape \(2, 4\)",
        ),
        (dict(cache_index=0), "cache and cache_index go together"),
        (dict(kv_mask=np.ones((2, 5), bool)), r"without a cache, kv_mask must be \[batch, seq\]"),
        (
            dict(cache="ok", cache_index=0, segment_ids=np.ones((2, 4), np.int32)),
            "segment_ids .* cannot be used with a cache",
        ),
        (
            dict(cache="ok", cache_index=0, kv_mask=np.ones((2, 4), bool)),
            r"with a cache, kv_mask must be \[batch, max_len\] = \(2, 8\)",
        ),
        (
            dict(cache="batch3", cache_index=0),
            r"cache\['k'\] has shape \(2, 3, 8, 2, 8\); expected",
        ),
    ],
)
def test_bad_call_arguments_are_refused(kwargs, match):
    c, params = model_and_params()
    kwargs = {"tokens": np.zeros((2, 4), np.int32), **kwargs}
    if kwargs.get("cache") == "ok":
        kwargs["cache"] = init_cache(c, 2, 8)
    elif kwargs.get("cache") == "batch3":
        kwargs["cache"] = init_cache(c, 3, 8)
    tokens = kwargs.pop("tokens")
    with pytest.raises(ValueError, match=match):
        Decoder(c).apply({"params": params}, tokens, **kwargs)
