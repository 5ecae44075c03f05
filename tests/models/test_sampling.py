"""KV-cache sampling (jlora.models.sampling) against uncached decoding, merged trees and PEFT."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.sampling import filter_logits, generate, mixed_step

# A tiny stand-in decoder with exactly the cache API of jlora.models.decoder: grouped-query
# attention over a [L, B, S, n_kv, hd] cache, learned position embeddings (so wrong positions
# change the tokens), plain dict params with 2-D kernels.
V, D, H, KV, HD, L, P = 48, 16, 4, 2, 4, 2, 64
PROMPTS = [[5, 17, 3, 9, 22, 40, 1], [8], [30, 2, 11, 47]]


def init_standin(seed: int = 0) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 32))

    def normal(shape, scale):
        return jax.random.normal(next(keys), shape) * scale

    params = {"embed": {"embedding": normal((V, D), 1.0)}, "pos": normal((P, D), 0.5)}
    for i in range(L):
        params[f"layer_{i}"] = {
            "q": {"kernel": normal((D, H * HD), D**-0.5)},
            "k": {"kernel": normal((D, KV * HD), D**-0.5)},
            "v": {"kernel": normal((D, KV * HD), D**-0.5)},
            "o": {"kernel": normal((H * HD, D), (H * HD) ** -0.5)},
            "up": {"kernel": normal((D, 2 * D), D**-0.5)},
            "down": {"kernel": normal((2 * D, D), (2 * D) ** -0.5)},
        }
    params["head"] = {"kernel": normal((D, V), 2 * D**-0.5)}
    return params


def _norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6)


def standin_apply(params, tokens, positions=None, cache=None, cache_index=0, kv_mask=None):
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = params["embed"]["embedding"][tokens] + params["pos"][positions]
    ks, vs = [], []
    for i in range(L):
        lp = params[f"layer_{i}"]
        h = _norm(x)
        q = (h @ lp["q"]["kernel"]).reshape(b, t, H, HD)
        k = (h @ lp["k"]["kernel"]).reshape(b, t, KV, HD)
        v = (h @ lp["v"]["kernel"]).reshape(b, t, KV, HD)
        if cache is None:
            allowed = jnp.tril(jnp.ones((t, t), bool))[None]
        else:
            k = jax.lax.dynamic_update_slice(cache["k"][i], k, (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"][i], v, (0, cache_index, 0, 0))
            ks.append(k)
            vs.append(v)
            slots = jnp.arange(k.shape[1])
            causal = slots[None, :] <= cache_index + jnp.arange(t)[:, None]
            allowed = causal[None] & kv_mask[:, None, :]
        kk, vv = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, kk) / HD**0.5
        # A finite floor: a pad query that sees no slot gets uniform weights, never NaN.
        weights = jax.nn.softmax(jnp.where(allowed[:, None], scores, -1e30), axis=-1)
        att = jnp.einsum("bhts,bshd->bthd", weights, vv).reshape(b, t, H * HD)
        x = x + att @ lp["o"]["kernel"]
        x = x + jnp.tanh(_norm(x) @ lp["up"]["kernel"]) @ lp["down"]["kernel"]
    logits = _norm(x) @ params["head"]["kernel"]
    if cache is None:
        return logits
    return logits, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def standin_step(params, tokens, positions, cache, cache_index, kv_mask):
    return standin_apply(params, tokens, positions, cache, cache_index, kv_mask)


def standin_cache(batch: int, max_len: int) -> dict:
    return {
        "k": jnp.zeros((L, batch, max_len, KV, HD)),
        "v": jnp.zeros((L, batch, max_len, KV, HD)),
    }


_uncached = jax.jit(standin_apply)


def last_logits(params, seq, apply=_uncached, width=32):
    """Logits for the token after ``seq``, recomputing the whole sequence without a cache.

    Right-padded to one width (the model is causal), so the reference compiles once.
    """
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(seq)] = seq
    return np.asarray(apply(params, jnp.asarray(tokens))[0, len(seq) - 1])


def greedy_uncached(params, prompt, n, eos=(), apply=_uncached):
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(np.argmax(last_logits(params, seq, apply)))
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out


@pytest.fixture(scope="module")
def params():
    return init_standin(0)


@pytest.fixture(scope="module")
def reference(params):
    return [greedy_uncached(params, p, 8) for p in PROMPTS]


def test_greedy_cached_equals_uncached_loop(params, reference):
    got = generate(
        standin_step, params, PROMPTS, init_cache=standin_cache, max_new_tokens=8, pad_id=7
    )
    assert got == reference
    assert len({tuple(r) for r in reference}) == 3, "the rows should differ to test anything"


def test_a_larger_cache_and_one_token(params, reference):
    long = generate(
        standin_step, params, PROMPTS, init_cache=standin_cache, max_new_tokens=8, cache_len=40
    )
    assert long == reference
    one = generate(standin_step, params, PROMPTS, init_cache=standin_cache, max_new_tokens=1)
    assert one == [r[:1] for r in reference]


def test_zero_new_tokens():
    never = pytest.fail  # max_new_tokens=0 must not run the model at all
    assert generate(never, None, [[1], [2, 3]], init_cache=never, max_new_tokens=0) == [[], []]


def test_eos_stops_a_row_while_the_others_continue(params, reference):
    eos = reference[0][1]
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in reference]
    assert max(map(len, expected)) > len(expected[0]) == 2, "row 0 should stop first"
    got = generate(
        standin_step, params, PROMPTS, init_cache=standin_cache, max_new_tokens=8, eos_ids=eos
    )
    assert got == expected
    # Several ids, and a batch in which every row stops early: the loop ends early too.
    eos_all = {r[0] for r in reference}
    got = generate(
        standin_step,
        params,
        PROMPTS,
        init_cache=standin_cache,
        max_new_tokens=8,
        eos_ids=np.asarray(sorted(eos_all)),  # numpy ids too
    )
    assert got == [r[:1] for r in reference]


def test_top_k_1_is_greedy(params, reference):
    got = generate(
        standin_step,
        params,
        PROMPTS,
        init_cache=standin_cache,
        max_new_tokens=8,
        temperature=1.3,
        top_k=1,
        key=jax.random.key(3),
    )
    assert got == reference


def test_top_p_only_emits_tokens_inside_the_nucleus(params):
    top_p, temperature = 0.8, 1.5
    wider = 0
    for seed in range(3):
        got = generate(
            standin_step,
            params,
            PROMPTS,
            init_cache=standin_cache,
            max_new_tokens=6,
            temperature=temperature,
            top_p=top_p,
            key=jax.random.key(seed),
        )
        for prompt, row in zip(PROMPTS, got, strict=True):
            assert len(row) == 6
            for j, token in enumerate(row):
                logits = last_logits(params, prompt + row[:j])
                kept = np.isfinite(filter_logits(logits, temperature=temperature, top_p=top_p))
                assert kept[token], (seed, prompt, j, token, np.flatnonzero(kept))
                wider += int(kept.sum() > 1)
    assert wider > 10, "the nuclei should hold several tokens, or the test proves nothing"


def test_sampling_is_deterministic_for_a_key(params):
    def sample(seed):
        return generate(
            standin_step,
            params,
            PROMPTS,
            init_cache=standin_cache,
            max_new_tokens=8,
            temperature=1.0,
            top_k=20,
            top_p=0.95,
            key=jax.random.key(seed),
        )

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first


def test_filter_logits_top_k_keeps_ties_and_top_p_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.2, 0.1]]))
    assert np.isfinite(filter_logits(logits, top_k=2)).tolist() == [
        [False, True, True, True, False]
    ]
    assert np.isfinite(filter_logits(logits, top_k=99)).all()
    # 0.4 + 0.2 = 0.6 >= 0.5: two tokens; the stable ascending sort drops the first 0.2.
    assert np.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [
        [False, True, False, True, False]
    ]
    # The most likely token always stays, however small top_p.
    assert np.isfinite(filter_logits(logits, top_p=1e-9)).sum() == 1
    assert np.isfinite(filter_logits(logits, top_p=1.0)).all()
    # Temperature first: it sharpens before the nucleus is cut.
    assert np.isfinite(filter_logits(logits, temperature=0.1, top_p=0.9)).sum() == 1


def test_decode_loop_compiles_once(params):
    traces = {"prefill": 0, "decode": 0}

    def counting(p, tokens, *rest):
        traces["decode" if tokens.shape[1] == 1 else "prefill"] += 1
        return standin_step(p, tokens, *rest)

    kw = dict(init_cache=standin_cache, max_new_tokens=8)
    generate(counting, params, [[1, 2, 3], [4]], **kw)
    generate(counting, params, [[7, 7, 7], [9]], **kw)
    assert traces == {"prefill": 1, "decode": 1}


@pytest.fixture(scope="module")
def adapted(params):
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*/(q|v|up)/kernel")
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    # Non-zero B, large enough to change the greedy tokens.
    keys = iter(jax.random.split(jax.random.key(2), 16))
    p = jax.tree.map_with_path(
        lambda path, x: (
            jax.random.normal(next(keys), x.shape) * 0.5
            if jlora.path_str(path).endswith("_lora_b")
            else x
        ),
        p,
    )
    return p, cfg


def test_unmerged_through_lora_equals_merged(params, adapted, reference):
    p, cfg = adapted
    merged = jlora.merge_params(p, cfg)
    kw = dict(init_cache=standin_cache, max_new_tokens=8)
    want = generate(standin_step, merged, PROMPTS, **kw)
    assert want != reference, "the adapter should change the tokens"
    assert generate(jlora.lora(standin_step, cfg), p, PROMPTS, **kw) == want
    assert want == [greedy_uncached(merged, prompt, 8) for prompt in PROMPTS]
    kw.update(temperature=1.0, top_p=0.9, key=jax.random.key(5))
    want = generate(standin_step, merged, PROMPTS, **kw)
    assert generate(jlora.lora(standin_step, cfg), p, PROMPTS, **kw) == want


def test_mixed_step_gives_each_row_its_adapter(params, adapted):
    p, cfg = adapted
    lora_a, base = jlora.split(p)
    lora_b = jax.tree.map(lambda x: -x, lora_a)
    bank = jlora.add_adapter(jlora.add_adapter({}, "a", lora_a, cfg), "b", lora_b, cfg)
    rows = ["b", None, "a"]
    kw = dict(init_cache=standin_cache, max_new_tokens=8)
    got = generate(mixed_step(standin_step, rows), (base, bank), PROMPTS, **kw)
    alone = []
    for name, prompt in zip(rows, PROMPTS, strict=True):
        tree, c = jlora.select_adapter(base, bank, name)
        alone.append(greedy_uncached(tree if c is None else jlora.merge_params(tree, c), prompt, 8))
    assert got == alone
    assert len({tuple(r) for r in alone}) == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(prompts=[]), "no prompts given"),
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, found -1"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=0.7), "needs a PRNG key"),
        (dict(cache_len=9), "need 10 cache slots, but cache_len is 9"),
    ],
)
def test_refusals(change, match):
    kw = dict(
        step=standin_step,
        params=None,
        prompts=[[1, 2, 3], [4]],
        init_cache=standin_cache,
        max_new_tokens=8,
    )
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        generate(**kw)


# The real decoder (jlora.models.decoder) on a tiny random config: layers stacked on the cache's
# axis 0 (L=2) next to 3 rows, so a mixed batch slicing the wrong axis could not pass.
@pytest.fixture(scope="module")
def decoder():
    from jlora.models.decoder import Decoder, DecoderConfig, init_cache

    config = DecoderConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Decoder(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # Weights of 0.2 rather than 0.02: decisive logits, so greedy ties cannot flip on rounding.
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)

    def step(p, tokens, positions, cache, cache_index, kv_mask):
        return model.apply(
            {"params": p}, tokens, positions, cache=cache, cache_index=cache_index, kv_mask=kv_mask
        )

    uncached = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
    return step, functools.partial(init_cache, config), uncached, params


def test_decoder_greedy_cached_equals_uncached_loop(decoder):
    step, init_cache, uncached, params = decoder
    want = [greedy_uncached(params, p, 8, apply=uncached) for p in PROMPTS]
    assert len({tuple(r) for r in want}) == 3
    got = generate(step, params, PROMPTS, init_cache=init_cache, max_new_tokens=8, cache_len=64)
    assert got == want


def test_decoder_lora_and_mixed_step(decoder):
    from jlora.models.decoder import DECODER_AXIS_RULES

    step, init_cache, uncached, params = decoder
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=r".*(q_proj|v_proj|up_proj)/kernel",
        axis_rules=DECODER_AXIS_RULES,
    )
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    lora_a, base = jlora.split(p)
    lora_a = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.3, lora_a
    )
    lora_b = jax.tree.map(lambda x: -x, lora_a)
    bank = jlora.add_adapter(jlora.add_adapter({}, "a", lora_a, cfg), "b", lora_b, cfg)
    kw = dict(init_cache=init_cache, max_new_tokens=8)
    merged = jlora.merge_params(jlora.combine(lora_a, base), cfg)
    want = [greedy_uncached(merged, prompt, 8, apply=uncached) for prompt in PROMPTS]
    assert generate(jlora.lora(step, cfg), jlora.combine(lora_a, base), PROMPTS, **kw) == want
    rows = ["b", None, "a"]
    alone = []
    for name, prompt in zip(rows, PROMPTS, strict=True):
        tree, c = jlora.select_adapter(base, bank, name)
        tree = tree if c is None else jlora.merge_params(tree, c)
        alone.append(greedy_uncached(tree, prompt, 8, apply=uncached))
    assert len({tuple(r) for r in alone}) == 3
    assert generate(mixed_step(step, rows), (base, bank), PROMPTS, **kw) == alone


@pytest.mark.peft
def test_decoder_greedy_equals_transformers_generate():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from jlora.models.decoder import Decoder, DecoderConfig, init_cache
    from jlora.models.decoder_weights import hf_to_params

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, w in hf.named_parameters():
            w.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(w))
    config = DecoderConfig.from_hf(hf_config.to_dict())
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = hf_to_params(config, state.items())
    model = Decoder(config)

    def step(p, tokens, positions, cache, cache_index, kv_mask):
        return model.apply(
            {"params": p}, tokens, positions, cache=cache, cache_index=cache_index, kv_mask=kv_mask
        )

    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])

    def hf_generate(eos):
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=8,
                pad_token_id=0,
                eos_token_id=eos,
            )[:, width:].tolist()
        return [r[: r.index(eos) + 1] if eos in r else r for r in out]

    kw = dict(init_cache=functools.partial(init_cache, config), max_new_tokens=8)
    want = hf_generate(eos=V - 1)
    assert generate(step, params, PROMPTS, eos_ids=V - 1, **kw) == want
    eos = want[0][2]  # a token row 0 emits, so some row stops early
    want = hf_generate(eos=eos)
    assert min(map(len, want)) < 8
    assert generate(step, params, PROMPTS, eos_ids=eos, **kw) == want


@pytest.mark.parametrize(
    "sampling",
    [dict(), dict(top_k=5), dict(top_k=12, top_p=0.8)],
    ids=["plain", "top_k", "top_k_and_top_p"],
)
def test_decoder_sampling_through_live_adapters_equals_merged(decoder, sampling):
    # Issue 22: rollouts sample through jlora.lora on the adapted tree; with the same key they
    # must be the merged model's samples, row by row, whatever the prompt lengths.
    from jlora.models.decoder import DECODER_AXIS_RULES

    step, init_cache, _, params = decoder
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=r".*(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)/kernel",
        axis_rules=DECODER_AXIS_RULES,
    )
    p = jlora.init_lora(jax.random.key(1), params, cfg)
    p = jax.tree.map_with_path(  # B non-zero: the adapter changes the distribution
        lambda path, x: (
            jax.random.normal(jax.random.key(x.size), x.shape) * 0.3
            if jlora.path_str(path).endswith("_lora_b")
            else x
        ),
        p,
    )
    merged = jlora.merge_params(p, cfg)
    prompts = [*PROMPTS, [12, 40, 3, 3, 19, 26, 8, 45, 1, 33, 2, 14]]  # lengths 7, 1, 4, 12
    kw = dict(init_cache=init_cache, max_new_tokens=10, temperature=1.0, **sampling)
    live = jlora.lora(step, cfg)
    draws = []
    for seed in range(3):
        want = generate(step, merged, prompts, key=jax.random.key(seed), **kw)
        assert generate(live, p, prompts, key=jax.random.key(seed), **kw) == want, seed
        assert [len(r) for r in want] == [10] * len(prompts)
        draws.append(want)
    assert len({str(d) for d in draws}) == 3, "each key should draw other tokens"
    # The adapter changes what is drawn, so the equality says something about it.
    base = generate(step, jlora.split(p)[1], prompts, key=jax.random.key(0), **kw)
    assert base != draws[0]
