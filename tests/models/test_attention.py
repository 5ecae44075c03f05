"""Attention's implementations against the decoder's einsum path, in every mask case.

The oracle is the decoder's attention as it was before ``jlora.models.attention`` existed: a
dense ``[B, T, S]`` mask built per layer kind, then einsum scores and a float32 softmax.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.attention import (
    MaskSpec,
    attend,
    attend_per_kind,
    check_attention,
    resolve_implementation,
)
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig, init_cache
from jlora.models.sampling import generate, mixed_step

IMPLEMENTATIONS = ("einsum", "fused", "blockwise")
RNG = np.random.default_rng(0)


def oracle_mask(window, batch, t, segment_ids, cache_len, cache_index, kv_mask):
    """The decoder's ``_attention_mask`` before this module: ``[batch, T, S]`` bool."""
    if cache_len is None:
        q_slot = jnp.arange(t)
        k_slot = jnp.arange(t)
    else:
        q_slot = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        k_slot = jnp.arange(cache_len, dtype=jnp.int32)
    allowed = k_slot[None, :] <= q_slot[:, None]
    if window is not None:
        allowed &= k_slot[None, :] > q_slot[:, None] - window
    allowed = allowed[None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if kv_mask is not None:
        allowed = allowed & jnp.asarray(kv_mask, bool)[:, None, :]
    return jnp.broadcast_to(allowed, (batch, *allowed.shape[1:]))


def oracle(q, k, v, mask, scalar, softcap):
    """The decoder's attention before this module, on ``[B, T, H, hd]`` queries."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(scalar**-0.5, q.dtype)
    if softcap is not None:
        cap = jnp.asarray(softcap, q.dtype)
        scores = jnp.tanh(scores / cap) * cap
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


B, T, H, KV, HD = 2, 11, 4, 2, 8
SEGMENTS = np.array([[1] * 4 + [2] * 5 + [0] * 2, [3] * 11], np.int32)
LEFT_PAD = np.arange(16)[None, :] >= np.array([[5], [0]])  # row 0: 5 hidden slots
# name: (window, segment_ids, cache_len, cache_index, kv_mask); the cache cases have S = 16
CASES = {
    "causal": (None, None, None, None, None),
    "window": (3, None, None, None, None),
    "segments": (None, SEGMENTS, None, None, None),
    "segments-window-kv_mask": (2, SEGMENTS, None, None, LEFT_PAD[:, 5:]),
    "kv_mask-dead-rows": (None, None, None, None, LEFT_PAD[:, :11]),
    "cache-prefill-left-pad": (None, None, 16, 0, LEFT_PAD),
    "cache-decode-window": (4, None, 16, 13, LEFT_PAD),
    "cache-decode-one": (None, None, 16, 15, LEFT_PAD),
}


def inputs(case, dtype=jnp.float32):
    window, segments, cache_len, index, kv_mask = CASES[case]
    t = T if cache_len is None or index == 0 else 16 - index
    s = T if cache_len is None else cache_len
    q = jnp.asarray(RNG.normal(size=(B, t, H, HD)), dtype)
    k, v = (jnp.asarray(RNG.normal(size=(B, s, KV, HD)), dtype) for _ in range(2))
    seg = None if segments is None else jnp.asarray(segments)
    kvm = None if kv_mask is None else jnp.asarray(kv_mask)
    spec = MaskSpec(None if cache_len is None else jnp.int32(index), seg, kvm)
    dense = oracle_mask(window, B, t, seg, cache_len, index, kvm)
    return (q, k, v), spec, dense, window


def close(got, want, tol):
    """``|got - want| <= tol · max|want|`` leaf by leaf: float32 rounding of another summation
    order, grown through layers of large random weights."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(np.max(np.abs(np.asarray(w, np.float32))))
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=0, atol=tol * scale
        )


def vjp_all(fn, args, cotangent):
    out, pull = jax.vjp(fn, *args)
    return out, pull(cotangent)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_outputs_and_gradients_equal_the_einsum_oracle(case, implementation, softcap):
    if implementation == "fused" and softcap is not None:
        pytest.skip("fused has no softcapping (refused: test_bad_settings_are_refused)")
    args, spec, dense, window = inputs(case)
    scalar = 24.0  # Gemma's query_pre_attn_scalar in place of head_dim
    got = jax.jit(
        functools.partial(
            attend,
            mask=spec,
            window=window,
            implementation=implementation,
            scale=scalar**-0.5,
            softcap=softcap,
            block=4,  # blocks that do not divide T=11 or S=16
        )
    )
    want = functools.partial(oracle, mask=dense, scalar=scalar, softcap=softcap)
    cot = jnp.asarray(RNG.normal(size=args[0].shape), jnp.float32)
    out, grads = vjp_all(got, args, cot)
    out_want, grads_want = vjp_all(want, args, cot)
    np.testing.assert_allclose(out, out_want, rtol=2e-6, atol=2e-6)
    for g, w in zip(grads, grads_want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_bfloat16_is_as_accurate_as_the_einsum_path_for_any_block(block):
    args, spec, dense, window = inputs("segments-window-kv_mask")
    exact = oracle(*args, dense, HD, None)
    half = [x.astype(jnp.bfloat16) for x in args]

    def error(impl):
        got = attend(*half, spec, window=window, implementation=impl, block=block)
        assert got.dtype == jnp.bfloat16
        return float(jnp.mean(jnp.abs(got.astype(jnp.float32) - exact)))

    einsum = error("einsum")
    assert 0 < einsum < 5e-3
    for impl in ("fused", "blockwise"):
        assert error(impl) < 1.1 * einsum


def test_attend_per_kind_picks_each_kinds_window_under_a_traced_kind():
    args, spec, _, _ = inputs("causal")
    windows = (3, None, 3)
    for implementation in IMPLEMENTATIONS:
        run = jax.jit(
            lambda kind, impl=implementation: attend_per_kind(
                *args, spec, kind=kind, windows=windows, implementation=impl, block=4
            )
        )
        for kind, window in enumerate(windows):
            dense = oracle_mask(window, B, T, None, None, None, None)
            want = oracle(*args, dense, HD, None)
            np.testing.assert_allclose(run(kind), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    ("queries", "dtype", "backend", "softcap", "expected"),
    [
        (4096, jnp.bfloat16, "gpu", None, "fused"),  # cuDNN's kernel
        (4096, jnp.float32, "gpu", None, "blockwise"),  # no cuDNN in float32
        (4096, jnp.bfloat16, "gpu", 50.0, "blockwise"),  # softcapped: no fused kernel
        (4096, jnp.bfloat16, "tpu", None, "blockwise"),
        (513, jnp.float32, "cpu", None, "blockwise"),
        (512, jnp.float32, "cpu", None, "einsum"),  # one block: the row itself
        (1, jnp.float32, "cpu", 50.0, "einsum"),  # cached decoding
    ],
)
def test_auto_picks_cudnn_then_blockwise_past_one_block(queries, dtype, backend, softcap, expected):
    got = resolve_implementation(
        "auto", softcap, queries=queries, block=512, dtype=dtype, backend=backend
    )
    assert got == expected
    assert resolve_implementation("einsum", None, queries=queries, backend=backend) == "einsum"


def test_mask_blocks_tile_the_dense_mask():
    _, spec, dense, window = inputs("cache-decode-window")
    rows = [
        jnp.concatenate([spec.block(window, i, 2, j, 4) for j in range(0, 16, 4)], axis=2)
        for i in range(0, 3, 2)
    ]
    np.testing.assert_array_equal(jnp.concatenate(rows, axis=1)[:, :3], dense)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("flash", 512, None), "attention 'flash' is not one of"),
        (("blockwise", 0, None), "attention_block must be a positive int; got 0"),
        (("blockwise", True, None), "attention_block must be a positive int; got True"),
        (("fused", 512, 50.0), "has no logit softcapping"),
    ],
)
def test_bad_settings_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        check_attention(*args, "here")
    with pytest.raises(ValueError, match=match):
        attend(
            *inputs("causal")[0], MaskSpec(), implementation=args[0], block=args[1], softcap=args[2]
        )


def test_decoder_config_refuses_fused_with_softcapping_and_takes_the_options():
    with pytest.raises(ValueError, match="DecoderConfig: attention 'fused'"):
        DecoderConfig(
            architecture="Gemma2ForCausalLM",
            hidden_activation="gelu_pytorch_tanh",
            attn_logit_softcapping=50.0,
            attention="fused",
        )
    with pytest.raises(ValueError, match="DecoderConfig: attention_block"):
        DecoderConfig(attention_block=-1)
    c = DecoderConfig.from_hf(
        {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2},
        attention="blockwise",
        attention_block=128,
    )
    assert (c.attention, c.attention_block) == ("blockwise", 128)


# the decoder with each implementation against its einsum path

SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MODELS = {
    "llama-gqa": dict(num_hidden_layers=2),
    "mistral-window": dict(num_hidden_layers=2, sliding_window=3),
    "gemma2": dict(
        model_type="gemma2",
        num_hidden_layers=2,
        head_dim=16,
        sliding_window=3,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=3,
        head_dim=16,
        sliding_window=3,
        rope_local_base_freq=50.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    ),
}
TOKENS = RNG.integers(1, 61, (2, 10)).astype(np.int32)


def model_config(name, **options):
    hf = {"model_type": "llama", **SMALL, **MODELS[name]}
    return DecoderConfig.from_hf(hf, **options)


@functools.cache
def model_params(name):
    c = model_config(name)
    params = Decoder(c).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)


def implementations(name):
    softcap = model_config(name).attn_logit_softcapping is not None
    return [i for i in IMPLEMENTATIONS if not (softcap and i == "fused")]


def loss_and_grads(c, params, **call):
    def loss(p):
        logits = Decoder(c).apply({"params": p}, TOKENS, **call)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_logits_and_grads_match_einsum(name):
    params = model_params(name)
    segments = np.repeat([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]], 2, axis=0).astype(np.int32)
    positions = np.repeat([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], 2, axis=0).astype(np.int32)
    hidden = np.arange(10)[None, :] >= np.array([[2], [0]])  # row 0: two dead queries
    for call in ({}, dict(positions=positions, segment_ids=segments, kv_mask=hidden)):
        (_, want), grads_want = loss_and_grads(
            model_config(name, attention="einsum"), params, **call
        )
        for impl in implementations(name):
            c = model_config(name, attention=impl, attention_block=4)
            (_, got), grads = loss_and_grads(c, params, **call)
            close(got, want, 2e-5)
            close(grads, grads_want, 5e-5)  # fused's XLA kernel differs from einsum as much


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_with_left_padding_matches_einsum(name):
    params = {"params": model_params(name)}
    kv_mask = np.arange(12)[None, :] >= np.array([[3], [0]])
    positions = np.maximum(np.arange(10)[None, :] - np.array([[3], [0]]), 0).astype(np.int32)

    def decode(c):
        step = jax.jit(
            lambda p, tok, pos, cache, i: Decoder(c).apply(
                p, tok, pos, cache=cache, cache_index=i, kv_mask=kv_mask
            )
        )
        logits, cache = step(params, TOKENS[:, :6], positions[:, :6], init_cache(c, 2, 12), 0)
        out = [logits]
        for t in range(6, 10):
            logits, cache = step(params, TOKENS[:, t : t + 1], positions[:, t : t + 1], cache, t)
            out.append(logits)
        return np.concatenate(out, axis=1)

    want = decode(model_config(name, attention="einsum"))
    for impl in implementations(name):
        got = decode(model_config(name, attention=impl, attention_block=4))
        close(got, want, 2e-5)


def test_bfloat16_decoders_are_as_accurate_as_the_einsum_path():
    params = {"params": model_params("gemma3")}
    exact = Decoder(model_config("gemma3", attention="einsum")).apply(params, TOKENS)

    def error(impl):
        c = model_config("gemma3", attention=impl, attention_block=4, dtype=jnp.bfloat16)
        return float(jnp.mean(jnp.abs(Decoder(c).apply(params, TOKENS) - exact)))

    einsum = error("einsum")
    assert 0 < einsum < 0.1
    for impl in ("fused", "blockwise"):  # rounding differences grow chaotically through layers
        assert error(impl) < 2 * einsum


def lora_setup(name, rank=2):
    cfg = jlora.LoraConfig(
        rank=rank,
        alpha=4.0,
        targets=r".*(q_proj|k_proj|v_proj)/kernel",
        axis_rules=DECODER_AXIS_RULES,
    )
    p = jlora.init_lora(jax.random.key(1), model_params(name), cfg)
    lora, base = jlora.split(p)
    lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.2, lora)
    return cfg, lora, base


def test_blockwise_trains_through_jlora_lora_like_einsum():
    cfg, lora, base = lora_setup("gemma2")

    def grads(c):
        def loss(a):
            logits = jlora.lora(Decoder(c).apply, cfg)({"params": jlora.combine(a, base)}, TOKENS)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.grad(loss))(lora)

    want = grads(model_config("gemma2", attention="einsum"))
    got = grads(model_config("gemma2", attention="blockwise", attention_block=4))
    close(got, want, 2e-5)


def test_blockwise_training_memory_does_not_grow_with_the_square_of_the_length():
    c = DecoderConfig(
        vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    cfg = jlora.LoraConfig(rank=2, targets=r".*q_proj/kernel", axis_rules=DECODER_AXIS_RULES)
    tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    params = jax.eval_shape(lambda: Decoder(c).init(jax.random.key(0), jnp.zeros((1, 2), int)))
    p = jax.eval_shape(lambda: jlora.init_lora(jax.random.key(1), params["params"], cfg))

    def temp(impl):
        model = Decoder(DecoderConfig(**{**c.__dict__, "attention": impl, "attention_block": 128}))

        def loss(lora, base, tokens):
            out = jlora.lora(model.apply, cfg)({"params": jlora.combine(lora, base)}, tokens)
            return jnp.sum(out)

        lora, base = jlora.split(p)
        compiled = jax.jit(jax.grad(loss)).lower(lora, base, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 4 * 2048 * 2048 * 4  # one layer's float32 scores [H, T, T]
    assert temp("einsum") > scores
    assert temp("blockwise") < scores / 8


def test_generate_and_mixed_step_match_einsum():
    name = "mistral-window"
    cfg, lora, base = lora_setup(name, rank=2)
    bank = jlora.add_adapter({}, "a", lora, cfg)
    prompts = [[5, 17, 3, 9, 22, 40, 1], [8], [30, 2, 11, 47]]

    def run(impl):
        c = model_config(name, attention=impl, attention_block=4)
        model = Decoder(c)

        def step(p, tokens, positions, cache, cache_index, kv_mask):
            return model.apply(
                {"params": p}, tokens, positions, cache=cache, cache_index=cache_index,
                kv_mask=kv_mask,
            )  # fmt: skip

        kw = dict(init_cache=functools.partial(init_cache, c), max_new_tokens=6)
        one = generate(jlora.lora(step, cfg), jlora.combine(lora, base), prompts, **kw)
        mixed = generate(mixed_step(step, ["a", None, "a"]), (base, bank), prompts, **kw)
        return one, mixed

    want = run("einsum")
    for impl in ("fused", "blockwise"):
        assert run(impl) == want


# the runner's model.attention and model.attention_block


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (dict(attention="flash"), ValueError, r"config model.attention: expected one of \("),
        (dict(attention_block=0), ValueError, "config model.attention_block: must be >= 1"),
        (dict(attention_block="big"), TypeError, "config model.attention_block: expected int"),
        (
            dict(kind="bert", attention="blockwise"),
            ValueError,
            "config model.attention describes a decoder",
        ),
    ],
)
def test_runner_refuses_bad_attention_settings(model, error, match):
    from jlora.runner.config import RunConfig, from_dict

    with pytest.raises(error, match=match):
        from_dict(RunConfig, {"model": model})


def test_runner_choices_are_the_librarys():
    from jlora.models.attention import ATTENTION_IMPLEMENTATIONS
    from jlora.runner.config import CHOICES

    assert CHOICES["model.attention"] == ATTENTION_IMPLEMENTATIONS


def test_runner_passes_attention_to_the_decoder(tmp_path):
    import json

    from jlora.models.pretrained import load_pretrained
    from jlora.runner.config import ModelSection
    from jlora.runner.tasks.causal_lm import checkpoint_config

    hf = {"model_type": "gemma2", "hidden_size": 8, "num_attention_heads": 2, "head_dim": 4}
    hf.update(num_key_value_heads=1, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    section = ModelSection(path=str(tmp_path), attention="blockwise", attention_block=64)
    c, _ = checkpoint_config(section)
    assert (c.attention, c.attention_block) == ("blockwise", 64)
    with pytest.raises(ValueError, match=r"config model.attention: .*has no logit softcapping"):
        checkpoint_config(ModelSection(path=str(tmp_path), attention="fused"))
    loaded = load_pretrained("builtin:llama_pydoc", attention="einsum", attention_block=32)
    assert (loaded.config.attention, loaded.config.attention_block) == ("einsum", 32)
