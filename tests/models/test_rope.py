"""Every rope_scaling type against transformers: frequencies, logits and cached decoding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.decoder import Decoder, DecoderConfig, init_cache
from jlora.models.decoder_weights import hf_to_params
from jlora.models.rope import (
    check_rope_scaling,
    rope_inv_freq,
    rope_scaling_from_hf,
    rope_scaling_to_hf,
)

SHORT = [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0]
LONG = [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
# rope_scaling, top-level config.json keys; max_position_embeddings is 16 in every case
SCALINGS = {
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, {}),
    "yarn-mscale": (
        {
            "type": "yarn",
            "factor": 8.0,
            "beta_fast": 8.0,
            "beta_slow": 0.5,
            "mscale": 0.8,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
        {},
    ),
    "yarn-attention-factor": ({"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.3}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {}),
    "dynamic-odd-factor": ({"type": "dynamic", "factor": 1.7}, {}),
    "longrope": (
        {"rope_type": "longrope", "factor": 2.0, "short_factor": SHORT, "long_factor": LONG}, {}
    ),
    "longrope-phi3": (
        {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
        {"original_max_position_embeddings": 8},
    ),
}  # fmt: skip


def hf_config(name, scaling, top, arch="LlamaConfig", **extra):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, arch)(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        rope_scaling=dict(scaling),
        attn_implementation="eager",
        **top,
        **extra,
    )


@pytest.mark.peft
@pytest.mark.parametrize("name", list(SCALINGS))
def test_inv_freq_equals_transformers(name):
    torch = pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling, top = SCALINGS[name]
    hf = hf_config(name, scaling, top)
    ours = rope_scaling_from_hf(json.loads(hf.to_json_string()))
    kind = scaling.get("rope_type", scaling.get("type"))
    traced = jax.jit(
        lambda n: rope_inv_freq(16, 10000.0, ours, max_position_embeddings=16, seq_len=n)[0]
    )
    for seq_len in (None, 5, 8, 9, 16, 17, 40):
        # transformers' update path passes max(position_ids) + 1 as a tensor
        theirs, their_factor = ROPE_INIT_FUNCTIONS[kind](
            hf, None, seq_len=None if seq_len is None else torch.tensor(seq_len)
        )
        inv, factor = rope_inv_freq(16, 10000.0, ours, max_position_embeddings=16, seq_len=seq_len)
        if kind == "dynamic" and seq_len is not None and seq_len <= 16:
            theirs, _ = ROPE_INIT_FUNCTIONS[kind](hf, None)  # no update below the maximum
        np.testing.assert_allclose(inv, theirs.numpy(), rtol=2e-7, err_msg=str(seq_len))
        assert factor == pytest.approx(their_factor, rel=1e-12)
        if seq_len is not None:
            np.testing.assert_allclose(traced(jnp.int32(seq_len)), inv, rtol=3e-7)
    assert factor != 1.0 or kind == "dynamic"  # the attention factor is exercised


def test_scaled_frequencies_differ_where_they_should():
    base, _ = rope_inv_freq(16, 10000.0)
    yarn, factor = rope_inv_freq(16, 10000.0, SCALINGS["yarn"][0])
    assert yarn[0] == base[0] and np.allclose(yarn[2:], base[2:] / 4) and factor > 1
    dyn = SCALINGS["dynamic"][0]
    assert np.array_equal(rope_inv_freq(16, 1e4, dyn, max_position_embeddings=16)[0], base)
    grown, _ = rope_inv_freq(16, 1e4, dyn, max_position_embeddings=16, seq_len=32)
    assert grown[0] == base[0] and np.all(grown[1:] < base[1:])
    divided, _ = rope_inv_freq(16, 1e4, freq_factors=[1, 2, 4, 8, 8, 8, 8, 8])
    np.testing.assert_allclose(divided, base / [1, 2, 4, 8, 8, 8, 8, 8], rtol=1e-7)


def jlora_of(model):
    config = DecoderConfig.from_hf(json.loads(model.config.to_json_string()))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return config, hf_to_params(config, state.items())


def hf_model(name, arch="LlamaConfig", seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    scaling, top = SCALINGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name, scaling, top, arch))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            base = 1.0 if pname.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()


def close(actual, expected, rtol=1e-4):
    """Max difference relative to the largest reference logit."""
    err = np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"
    return err


# 24 positions: past max_position_embeddings (16) and every original length used above
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 24)).astype(np.int32)


@pytest.mark.peft
@pytest.mark.parametrize(
    ("name", "arch"),
    [(n, "LlamaConfig") for n in ("yarn-mscale", "dynamic", "longrope-phi3")]
    + [("yarn", "Qwen2Config")],
)
def test_logits_equal_transformers(name, arch):
    torch = pytest.importorskip("torch")
    model = hf_model(name, arch)
    config, params = jlora_of(model)
    assert config.rope_scaling == rope_scaling_from_hf(json.loads(model.config.to_json_string()))
    with torch.no_grad():
        expected = model(torch.as_tensor(TOKENS)).logits.float().numpy()
    apply = jax.jit(Decoder(config).apply)
    close(apply({"params": params}, TOKENS), expected)
    # packed rows: the length transformers sees is max(position_ids) + 1, here 12
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 2))
    with torch.no_grad():
        second = torch.as_tensor(TOKENS[:, 12:])
        packed = model(second, position_ids=torch.as_tensor(positions[:, :12]))
    got = apply({"params": params}, TOKENS, positions, segment_ids=np.repeat([[0, 1]] * 2, 12, 1))
    close(got[:, 12:], packed.logits.float().numpy())


@pytest.mark.peft
@pytest.mark.parametrize("name", ["dynamic", "longrope-phi3"])
def test_cached_decoding_matches_transformers(name):
    """Prefill 6 tokens, then one per step across the length where the frequencies switch."""
    torch = pytest.importorskip("torch")
    model = hf_model(name)
    config, params = jlora_of(model)
    apply = jax.jit(Decoder(config).apply)
    cache = init_cache(config, 2, 20)
    logits, cache = apply({"params": params}, TOKENS[:, :6], cache=cache, cache_index=0)
    ours = [logits]
    for t in range(6, 20):
        logits, cache = apply({"params": params}, TOKENS[:, t : t + 1], cache=cache, cache_index=t)
        ours.append(logits)
    with torch.no_grad():  # a fresh module: transformers' dynamic state only grows here
        out = model(torch.as_tensor(TOKENS[:, :6]), use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for t in range(6, 20):
            out = model(torch.as_tensor(TOKENS[:, t : t + 1]), past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
    theirs_np = torch.cat(theirs, dim=1).float().numpy()
    close(np.concatenate(ours, axis=1), theirs_np)
    # cached keys keep the frequencies of their own step: not what one call over all gives
    whole = jax.jit(Decoder(config).apply)({"params": params}, TOKENS[:, :20])
    assert np.max(np.abs(np.asarray(whole) - theirs_np)) > 1e-3


def test_longrope_original_length_lives_at_the_top_level():
    top = {"original_max_position_embeddings": 8}
    hf = {"rope_scaling": {**SCALINGS["longrope-phi3"][0], "original_max_position_embeddings": 4}}
    assert "original_max_position_embeddings" not in rope_scaling_from_hf(hf)  # ignored there
    scaling = rope_scaling_from_hf({**hf, **top})
    assert scaling["original_max_position_embeddings"] == 8
    assert rope_scaling_to_hf(scaling)["original_max_position_embeddings"] == 8
    c = DecoderConfig(hidden_size=64, num_attention_heads=4, rope_scaling=scaling)
    assert DecoderConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize(
    ("scaling", "kwargs", "match"),
    [
        ({"rope_type": "su", "factor": 2.0}, {}, r"type 'su' \(key 'rope_type'\) is not supported"),
        ({"type": "yarn"}, {}, r"of type 'yarn' lacks keys \['factor'\]"),
        ({"rope_type": "dynamic"}, {}, r"of type 'dynamic' lacks keys \['factor'\]"),
        (
            {"rope_type": "longrope", "long_factor": LONG},
            {},
            r"of type 'longrope' lacks keys \['short_factor'\]",
        ),
        (
            {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
            {},
            r"of type 'longrope' lacks keys \['factor'\]",
        ),
        (
            {
                "rope_type": "longrope",
                "factor": 2.0,
                "short_factor": SHORT[:3],
                "long_factor": LONG,
            },
            {"head_dim": 16},
            r"rope_scaling\['short_factor'\] has 3 entries; .* head_dim / 2 = 8",
        ),
        (
            {"rope_type": "longrope", "factor": 2.0, "short_factor": SHORT, "long_factor": 2.0},
            {"head_dim": 16},
            r"rope_scaling\['long_factor'\] has 2\.0; longrope needs a list",
        ),
        (
            {"rope_type": "dynamic", "factor": 2.0},
            {},
            r"type 'dynamic' needs max_position_embeddings",
        ),
        ({"rope_type": "yarn", "factor": 2.0}, {}, r"type 'yarn' needs max_position_embeddings"),
    ],
)
def test_bad_scalings_are_refused(scaling, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_rope_scaling(scaling, **kwargs)


def test_bad_freq_factors_are_refused():
    with pytest.raises(ValueError, match=r"freq_factors must be 8 positive .* shape \(3,\)"):
        rope_inv_freq(16, 1e4, freq_factors=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"freq_factors must be 2 positive .* minimum 0\.0"):
        DecoderConfig(hidden_size=8, num_attention_heads=2, rope_freq_factors=[1.0, 0.0])
    c = DecoderConfig(hidden_size=8, num_attention_heads=2, rope_freq_factors=[1.0, 8.0])
    assert c.rope_freq_factors == (1.0, 8.0) and hash(c)
    with pytest.raises(ValueError, match=r"freq_factors .* not a llama3 rope scaling have no"):
        c.to_hf()  # one pair each side of the band: the llama3 lengths are not determined


def test_llama3_freq_factors_export_as_their_rope_scaling():
    """llama.cpp's factors for Llama 3.1 8B's and 3.2 1B's heads give back their rope_scaling."""
    for head_dim, factor in ((128, 8.0), (64, 32.0)):
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        base, _ = rope_inv_freq(head_dim, 500000.0)
        llama3, _ = rope_inv_freq(head_dim, 500000.0, scaling)
        factors = (base / llama3).tolist()  # what the converter stores, to float32 rounding
        exported = rope_scaling_to_hf(None, factors, head_dim=head_dim, theta=500000.0)
        assert exported == {"rope_scaling": scaling}
        c = DecoderConfig(
            hidden_size=head_dim * 2,
            num_attention_heads=2,
            rope_theta=500000.0,
            rope_freq_factors=factors,
            max_position_embeddings=131072,
        )
        assert c.to_hf()["rope_scaling"] == scaling
    with pytest.raises(ValueError, match=r"not a llama3 rope scaling"):
        rope_scaling_to_hf(None, np.linspace(1, 8, 64).tolist(), head_dim=128, theta=500000.0)


@pytest.mark.peft
@pytest.mark.parametrize("name", ["dynamic"])
def test_generate_matches_transformers_generate(name):
    """Left-padded prompts decoded past the switching length: the sampler's positions are HF's."""
    torch = pytest.importorskip("torch")
    from jlora.models.sampling import generate

    model = hf_model(name)
    model.generation_config.eos_token_id = None
    config, params = jlora_of(model)
    prompts = [TOKENS[0, :4].tolist(), TOKENS[1, :7].tolist()]

    def step(p, tokens, positions, cache, index, kv_mask):
        return Decoder(config).apply(
            {"params": p}, tokens, positions, cache=cache, cache_index=index, kv_mask=kv_mask
        )

    ours = generate(
        step, params, prompts, init_cache=lambda b, n: init_cache(config, b, n), max_new_tokens=14
    )
    ids = torch.zeros((2, 7), dtype=torch.long)
    mask = torch.zeros((2, 7), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 7 - len(prompt) :] = torch.as_tensor(prompt)
        mask[row, 7 - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0
        )
    assert ours == out[:, 7:].tolist()
