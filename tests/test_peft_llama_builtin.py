"""jlora's built-in Llama <-> Hugging Face LlamaForCausalLM, with adapters through PEFT.

The built-in decoder rotates interleaved channel pairs; Hugging Face's Llama rotates half-split
ones, so query and key output features are reordered per head (base weights by
``llama_hf.hf_state_dict``, adapters by ``BUILTIN_LLAMA``'s ``out_permutation``). The first
half of the file checks that torch-free (the rotary maths, exact round trips, PEFT's
``s·lora_B@lora_A`` against the converted merged weights, the errors); the second against real
``transformers`` and ``peft`` (marker ``peft``), logits to 1e-5.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._tensorfile import decode
from jlora.models import llama_hf
from jlora.models.llama import Llama, LlamaConfig, init_params, rotary
from jlora.models.weights import load_params
from jlora.peft import BUILTIN_LLAMA, ModuleRule, PeftMapping, builtin_llama
from jlora.peft._format import factor_key

TOL = 1e-5
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48, max_len=16)
MAPPING = builtin_llama(CFG.n_heads)
IDS = np.array([[3, 14, 15, 9, 2, 6, 5, 35, 200, 7], [8, 9, 7, 9, 3, 2, 38, 4, 255, 1]])
TARGETS = r"layer_\d+/(attn/(query|key|value|out)|mlp/(gate|up|down))/kernel"  # the runner's
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    params = init_params(CFG, seed=1)
    # Norm scales of 1 would hide a misplaced norm weight: give every leaf some noise.
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) / 10, x.dtype), params)


def _randomise(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map_with_path(
        lambda p, v: (
            jnp.asarray(rng.normal(size=v.shape) / 10, v.dtype) if jlora.is_adapter_path(p) else v
        ),
        params,
    )


def _logits(params):
    return np.asarray(Llama(CFG).apply({"params": params}, jnp.asarray(IDS)))


# ------------------------------------------------------------------------------- torch-free


def test_rotary_permutation_turns_interleaved_pairs_into_rotate_half():
    x = np.random.default_rng(1).normal(size=(1, 6, 2, 8)).astype(np.float32)
    ours = np.asarray(rotary(jnp.asarray(x), 10000.0))
    # Hugging Face: x·cos + rotate_half(x)·sin, cos/sin of the same angles repeated twice.
    perm = llama_hf.rotary_permutation(16, 2)
    xh = x.reshape(1, 6, 16)[..., perm].reshape(x.shape)
    half = 4
    freqs = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.arange(6)[:, None] * freqs[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, -1)[None, :, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[None, :, None, :]
    rotated = np.concatenate([-xh[..., half:], xh[..., :half]], -1)
    theirs = xh * cos + rotated * sin
    np.testing.assert_allclose(ours.reshape(1, 6, 16)[..., perm].reshape(x.shape), theirs, atol=TOL)


def test_builtin_llama_heads_match_the_shipped_base():
    _, meta = load_params(
        os.path.join(os.path.dirname(jlora.__file__), "assets", "llama_pydoc.safetensors")
    )
    shipped = LlamaConfig(**json.loads(meta["config"]))
    assert shipped.n_heads == LlamaConfig().n_heads == 4
    perm = BUILTIN_LLAMA.permutation("layer_0/attn/query/kernel", shipped.dim)
    np.testing.assert_array_equal(perm, llama_hf.rotary_permutation(shipped.dim, 4))


def test_export_is_pefts_delta_of_the_converted_weights(base, tmp_path):
    """PEFT's ``s·lora_B@lora_A`` per module equals hf(merged) - hf(base): torch-free oracle."""
    cfg = jlora.LoraConfig(rank=3, alpha=6.0, targets=TARGETS + "|embed/embedding|lm_head/kernel")
    params = _randomise(jlora.init_lora(jax.random.key(0), base, cfg), 2)
    modules = jlora.export_peft(tmp_path, params, cfg, MAPPING)
    assert len(modules) == 7 * CFG.n_layers + 2
    tensors = decode((tmp_path / "adapter_model.safetensors").read_bytes(), "exported")
    merged = jlora.merge_params(params, cfg)
    before = llama_hf.hf_state_dict(base, CFG)
    after = llama_hf.hf_state_dict(merged, CFG)
    for module in modules:
        embedding = module == "model.embed_tokens"
        lora_a = tensors[factor_key(module, "A", embedding)]
        lora_b = tensors[factor_key(module, "B", embedding)]
        delta = 2.0 * lora_b @ lora_a  # lora_alpha / r
        if embedding:  # PEFT's embedding delta is (lora_B @ lora_A).T: (vocab, dim)
            delta = delta.T
        np.testing.assert_allclose(
            delta, after[module + ".weight"] - before[module + ".weight"], atol=TOL, err_msg=module
        )

    imported, icfg = jlora.import_peft(tmp_path, base, MAPPING)
    for (path, x), y in zip(
        jax.tree.flatten_with_path(params)[0], jax.tree.leaves(imported), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jlora.path_str(path))
    assert icfg.rank == 3 and icfg.alpha == 6.0


def test_hf_state_dict_names_and_shapes(base):
    sd = llama_hf.hf_state_dict(base, CFG)
    assert len(sd) == 3 + 9 * CFG.n_layers
    assert sd["lm_head.weight"].shape == (256, 32)
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (32, 48)
    q = np.asarray(base["layer_0"]["attn"]["query"]["kernel"]).T
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.q_proj.weight"][1], q[2])
    np.testing.assert_array_equal(
        sd["model.layers.0.self_attn.v_proj.weight"],
        np.asarray(base["layer_0"]["attn"]["value"]["kernel"]).T,
    )


def test_hf_config_describes_the_model():
    kw = llama_hf.hf_config(CFG)
    assert kw["num_key_value_heads"] == kw["num_attention_heads"] == 2
    assert (kw["rms_norm_eps"], kw["rope_theta"], kw["max_position_embeddings"]) == (
        1e-5,
        10000.0,
        16,
    )


def test_errors(base, tmp_path):
    with pytest.raises(ValueError, match="do not split into 3 heads of even size"):
        llama_hf.rotary_permutation(32, 3)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        builtin_llama(0)
    attn = {k: v for k, v in base["layer_1"]["attn"].items() if k != "key"}
    broken = {**base, "layer_1": {**base["layer_1"], "attn": attn}}
    with pytest.raises(ValueError, match=r"missing \['layer_1/attn/key/kernel'\]"):
        llama_hf.hf_state_dict(broken, CFG)
    with pytest.raises(ValueError, match="unexpected"):
        cfg = jlora.LoraConfig(rank=2, targets=TARGETS)
        llama_hf.hf_state_dict(jlora.init_lora(jax.random.key(0), base, cfg), CFG)
    with pytest.raises(ValueError, match=r"'embed/embedding' has shape \(256, 32\).*\(256, 64\)"):
        llama_hf.hf_state_dict(base, LlamaConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=48))

    bad = PeftMapping("bad", (ModuleRule("fc/kernel", "fc", out_permutation=lambda n: [0] * n),))
    with pytest.raises(ValueError, match=r"out_permutation\(3\) must return a permutation"):
        bad.permutation("fc/kernel", 3)
    floats = ModuleRule("fc/kernel", "fc", out_permutation=lambda n: np.arange(n) * 1.0)
    with pytest.raises(ValueError, match="integers"):
        floats.permutation(3)
    cfg = jlora.LoraConfig(rank=2)
    fc = jlora.init_lora(jax.random.key(0), {"fc": {"kernel": jnp.ones((4, 3))}}, cfg)
    with pytest.raises(ValueError, match="must return a permutation"):
        jlora.export_peft(tmp_path / "bad", fc, cfg, bad)

    # An adapter for 2 heads read with the 4-head mapping cannot be placed (wrong split).
    cfg = jlora.LoraConfig(rank=2, targets=TARGETS)
    params = _randomise(jlora.init_lora(jax.random.key(0), base, cfg), 3)
    jlora.export_peft(tmp_path / "two", params, cfg, MAPPING)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        jlora.import_peft(tmp_path / "two", base, builtin_llama(3))


# --------------------------------------------------------------------- real transformers + PEFT


@pytest.fixture(scope="module")
def hf(base):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def fresh():  # PEFT wraps a model in place: a new one each time
        return llama_hf.to_hf(base, CFG)

    def logits(m):
        with torch.no_grad():
            return m(torch.tensor(IDS)).logits.numpy()

    return torch, peft, fresh, logits


@pytest.mark.peft
def test_base_logits_equal_transformers(base, hf):
    _, _, fresh, logits = hf
    np.testing.assert_allclose(logits(fresh()), _logits(base), atol=TOL, rtol=TOL)


@pytest.mark.peft
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
def test_jax_adapter_serves_from_peft(base, hf, tmp_path):
    _, peft, fresh, logits = hf
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=TARGETS + "|embed/embedding|lm_head/kernel",
        rank_pattern={r"layer_1/.*": 2},
    )
    params = _randomise(jlora.init_lora(jax.random.key(0), base, cfg), 4)
    # The README's path: the runner's adapter/ directory -> PEFT directory -> PeftModel.
    jlora.save_adapter(tmp_path / "adapter", params, cfg)
    params, cfg = jlora.load_adapter(tmp_path / "adapter", base)
    modules = jlora.export_peft(tmp_path / "peft", params, cfg, MAPPING)

    expected = _logits(jlora.merge_params(params, cfg))
    served = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "peft")).eval()
    got = logits(served)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(got - _logits(base)).max() > 1e-3, "the adapter did not change PEFT's output"
    lora_modules = {n for n, m in served.named_modules() if hasattr(m, "lora_A")}
    assert {f"base_model.model.{m}" for m in modules} == lora_modules


@pytest.mark.peft
def test_peft_adapter_imports_onto_builtin_llama(base, hf, tmp_path):
    _, peft, fresh, logits = hf
    lcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=HF_TARGETS,
        init_lora_weights=False,  # random A and B: the adapter changes the output
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(fresh(), lcfg).eval()
    pm.save_pretrained(str(tmp_path))
    expected = logits(pm)

    params, cfg = jlora.import_peft(tmp_path, base, MAPPING)
    got = _logits(jlora.merge_params(params, cfg))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(got - _logits(base)).max() > 1e-3

    # jlora -> PEFT again gives back PEFT's own tensors (the permutation is undone exactly).
    jlora.export_peft(tmp_path / "again", params, cfg, MAPPING)
    ours = decode((tmp_path / "again" / "adapter_model.safetensors").read_bytes(), "again")
    theirs = decode((tmp_path / "adapter_model.safetensors").read_bytes(), "peft")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.peft
def test_dora_adapter_serves_from_peft(base, hf, tmp_path):
    """DoRA magnitudes are per output feature: reordered with lora_B's rows, both ways."""
    torch, peft, fresh, logits = hf
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=r"layer_\d+/attn/(query|key|value)/kernel")
    params = _randomise(jlora.init_dora(jax.random.key(0), base, cfg), 5)  # m random too
    jlora.export_peft(tmp_path / "jax", params, cfg, MAPPING)

    expected = _logits(jlora.merge_params(params, cfg))
    got = logits(peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "jax")).eval())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(got - _logits(base)).max() > 1e-3

    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_dora=True)
    pm = peft.get_peft_model(fresh(), lcfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_" in name:  # magnitudes too: a permuted m would show
                param.add_(0.3 * torch.randn_like(param))
    pm.save_pretrained(str(tmp_path / "peft"))
    imported, icfg = jlora.import_peft(tmp_path / "peft", base, MAPPING)
    got = _logits(jlora.merge_params(imported, icfg))
    np.testing.assert_allclose(got, logits(pm), atol=TOL, rtol=TOL)
    assert np.abs(got - _logits(base)).max() > 1e-3


@pytest.mark.peft
def test_shipped_base_and_runner_adapter_serve_from_peft(hf, tmp_path):
    """The ``jlora finetune`` default: the shipped 4-head base, BUILTIN_LLAMA, its targets."""
    _, peft, _, logits = hf
    base, meta = load_params(
        os.path.join(os.path.dirname(jlora.__file__), "assets", "llama_pydoc.safetensors")
    )
    config = LlamaConfig(**json.loads(meta["config"]))
    cfg = jlora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    params = _randomise(jlora.init_lora(jax.random.key(0), base, cfg), 6)
    jlora.export_peft(tmp_path, params, cfg, BUILTIN_LLAMA)

    def jax_logits(p):
        return np.asarray(Llama(config).apply({"params": p}, jnp.asarray(IDS)))

    np.testing.assert_allclose(
        logits(llama_hf.to_hf(base, config)), jax_logits(base), atol=TOL, rtol=TOL
    )
    served = peft.PeftModel.from_pretrained(llama_hf.to_hf(base, config), str(tmp_path)).eval()
    got = logits(served)
    # PEFT runs x·W + s·(x·A)·B unmerged; so does jlora.lora (merged weights round differently
    # by ~2e-5 on this 4-layer model with adapters this large).
    want = np.asarray(jlora.lora(Llama(config).apply, cfg)({"params": params}, jnp.asarray(IDS)))
    # Relative to the largest logit (~4), as the rest of the suite measures closeness.
    np.testing.assert_allclose(got, want, atol=TOL * np.abs(want).max(), rtol=TOL)
    assert np.abs(got - jax_logits(base)).max() > 1e-3
