"""PEFT files without PyTorch: exact round trips (N-d, stacked, transposed) and bad input.

The comparison with real PEFT is in test_peft_interop.py; here every error path of
export_peft / import_peft and of the mappings is exercised.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._layout import adapter_shapes
from jlora._tensorfile import decode, encode
from jlora.peft import ModuleRule, PeftMapping
from jlora.peft._convert import orientation

STACKED = {
    "layers": {
        "attn": {
            "query": {"kernel": jnp.ones((3, 8, 2, 4))},
            "out": {"kernel": jnp.ones((3, 2, 4, 8))},
        },
        "mlp": {"kernel": jnp.ones((3, 8, 6))},
    },
    "head": {"kernel": jnp.ones((6, 8))},
}
STACKED_CFG = jlora.LoraConfig(
    rank=2,
    alpha=3.0,
    rank_pattern={".*/out/kernel": 1},
    alpha_pattern={"head/kernel": 5.0},
    axis_rules=[(r"layers/mlp/kernel", ("stack", "in", "out")), (r"head/kernel", ("out", "in"))],
)
# What a mapping without axes for the 3-D mlp kernel (no jlora default) looks like.
NO_AXES_MAP = PeftMapping(
    "no-axes", (ModuleRule(r"layers/(mlp|attn/query|attn/out)/kernel", r"layers.{layer}.\1"),)
)
STACKED_MAP = PeftMapping(
    "toy",
    (
        ModuleRule(r"layers/attn/(query|out)/kernel", r"layers.{layer}.\1"),
        ModuleRule(r"layers/mlp/kernel", "layers.{layer}.mlp", ("stack", "in", "out")),
        ModuleRule(r"head/kernel", "head", ("out", "in")),
    ),
)


def _random(params):
    key = jax.random.key(1)
    return jax.tree.map_with_path(
        lambda p, x: (
            jax.random.normal(jax.random.fold_in(key, x.size + len(p)), x.shape)
            if jlora.is_adapter_path(p)
            else x
        ),
        params,
    )


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dense_delta(merged, base):
    return jax.tree.map(lambda m, b: np.asarray(m) - np.asarray(b), merged, base)


@pytest.fixture
def exported(tmp_path):
    p = _random(jlora.init_lora(jax.random.key(0), STACKED, STACKED_CFG))
    modules = jlora.export_peft(tmp_path, p, STACKED_CFG, STACKED_MAP)
    return tmp_path, p, modules


def test_stacked_nd_round_trip_is_exact(exported):
    path, p, modules = exported
    assert modules[:4] == ["head", "layers.0.out", "layers.1.out", "layers.2.out"]  # tree order
    assert len(modules) == 3 * 3 + 1
    tensors = decode((path / "adapter_model.safetensors").read_bytes(), "x")
    assert tensors["base_model.model.layers.1.query.lora_A.weight"].shape == (2, 8)
    assert tensors["base_model.model.layers.1.query.lora_B.weight"].shape == (8, 2)  # 2*4 out
    assert tensors["base_model.model.layers.1.out.lora_A.weight"].shape == (1, 8)  # 2*4 in
    assert tensors["base_model.model.head.lora_A.weight"].shape == (2, 8)  # (out, in) kernel
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 3.0
    assert cfg["rank_pattern"] == {r"layers\.0\.out": 1, r"layers\.1\.out": 1, r"layers\.2\.out": 1}
    assert cfg["alpha_pattern"] == {"head": 5.0}

    params, config = jlora.import_peft(path, STACKED, STACKED_MAP)
    _same(params, p)
    _same(jlora.merge_params(params, config), jlora.merge_params(p, STACKED_CFG))


def test_peft_factors_give_the_same_delta(exported):
    """lora_B @ lora_A * scale, laid back into the kernel, equals jlora's merged delta."""
    path, p, _ = exported
    tensors = decode((path / "adapter_model.safetensors").read_bytes(), "x")
    delta = _dense_delta(jlora.merge_params(p, STACKED_CFG), STACKED)
    k = "base_model.model.layers.2.query.lora_"
    w = tensors[k + "B.weight"] @ tensors[k + "A.weight"] * (3.0 / 2)  # (out=8, in=8)
    np.testing.assert_allclose(
        w.T.reshape(8, 2, 4), delta["layers"]["attn"]["query"]["kernel"][2], rtol=1e-5
    )
    k = "base_model.model.head.lora_"
    w = tensors[k + "B.weight"] @ tensors[k + "A.weight"] * (5.0 / 2)  # torch (out, in) = (6, 8)
    np.testing.assert_allclose(w, delta["head"]["kernel"], rtol=1e-5, atol=1e-6)


def test_missing_layers_import_as_zero(exported):
    path, p, _ = exported
    tensors = decode((path / "adapter_model.safetensors").read_bytes(), "x")
    for k in [k for k in tensors if ".layers.1.mlp." in k]:
        del tensors[k]
    (path / "adapter_model.safetensors").write_bytes(encode(tensors))
    params, _ = jlora.import_peft(path, STACKED, STACKED_MAP)
    b = params["layers"]["mlp"]["kernel_lora_b"]
    assert not np.asarray(b[1]).any()
    np.testing.assert_array_equal(b[0], p["layers"]["mlp"]["kernel_lora_b"][0])


# ---------------------------------------------------------------- mapping errors


def test_module_rule_validation():
    with pytest.raises(ValueError, match=r"'\(' is not a valid regex"):
        ModuleRule("(", "x")
    with pytest.raises(ValueError, match=r"axes \('in', 'in'\) must use only"):
        ModuleRule("x", "x", ("in", "in"))
    with pytest.raises(TypeError, match="rules must be ModuleRule objects"):
        PeftMapping("m", ("x",))


def test_orientation_refuses_mixed_roles():
    with pytest.raises(ValueError, match="differ by more than exchanging in and out"):
        orientation("k", ("in", "in", "out"), ("in", "out", "in"))


# ---------------------------------------------------------------- export errors


def _small(cfg=None):
    cfg = cfg or jlora.LoraConfig(rank=1)
    base = {"fc": {"kernel": jnp.ones((4, 3))}, "other": {"kernel": jnp.ones((3, 3))}}
    return _random(jlora.init_lora(jax.random.key(0), base, cfg)), cfg, base


def test_export_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="params hold no LoRA adapters"):
        jlora.export_peft(tmp_path, STACKED, STACKED_CFG, STACKED_MAP)


def test_export_unmapped_kernel(tmp_path):
    p, cfg, _ = _small()
    mapping = PeftMapping("partial", (ModuleRule("fc/kernel", "fc"),))
    with pytest.raises(ValueError, match="kernel 'other/kernel' is adapted, but mapping 'partial'"):
        jlora.export_peft(tmp_path, p, cfg, mapping)
    assert not list(tmp_path.iterdir())  # nothing written


def test_export_axes_of_wrong_length(tmp_path):
    p, cfg, _ = _small()
    mapping = PeftMapping("bad", (ModuleRule("(.*)/kernel", r"\1", ("stack", "in", "out")),))
    with pytest.raises(ValueError, match=r"gives 'fc/kernel' axes .* shape \(4, 3\)"):
        jlora.export_peft(tmp_path, p, cfg, mapping)


def test_export_layer_placeholder_must_match_stacking(tmp_path):
    p = jlora.init_lora(jax.random.key(0), STACKED, STACKED_CFG)
    no_layer = PeftMapping("m", (ModuleRule(r"(.*)/kernel", r"\1"),))
    with pytest.raises(ValueError, match=r"holds a stack axis .* lacks a '\{layer\}'"):
        jlora.export_peft(tmp_path, p, STACKED_CFG, no_layer)
    q, cfg, _ = _small()
    with pytest.raises(ValueError, match=r"has no stack axis .* has a '\{layer\}'"):
        jlora.export_peft(tmp_path, q, cfg, PeftMapping("m", (ModuleRule(".*", "x.{layer}"),)))


def test_export_two_stack_axes(tmp_path):
    cfg = jlora.LoraConfig(rank=1, axis_rules=[("k/kernel", ("stack", "stack", "in", "out"))])
    p = jlora.init_lora(jax.random.key(0), {"k": {"kernel": jnp.ones((2, 2, 3, 3))}}, cfg)
    mapping = PeftMapping("m", (ModuleRule("k/kernel", "k.{layer}"),))
    with pytest.raises(ValueError, match="has 2 stack axes"):
        jlora.export_peft(tmp_path, p, cfg, mapping)


def test_export_two_kernels_one_module(tmp_path):
    p, cfg, _ = _small()
    with pytest.raises(ValueError, match="both map to module 'same'"):
        jlora.export_peft(tmp_path, p, cfg, PeftMapping("m", (ModuleRule(".*", "same"),)))


# ---------------------------------------------------------------- import errors


@pytest.fixture
def small_peft(tmp_path):
    p, cfg, base = _small()
    jlora.export_peft(tmp_path, p, cfg, jlora.peft.LLAMA)
    return tmp_path, base


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = decode((path / "adapter_model.safetensors").read_bytes(), "x")
    fn(tensors)
    (path / "adapter_model.safetensors").write_bytes(encode(tensors))


def test_import_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no PEFT adapter at .*adapter_config\.json"):
        jlora.import_peft(tmp_path, {}, jlora.peft.LLAMA)


def test_import_corrupted_config(small_peft):
    path, base = small_peft
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_refuses_jlora_adapter(tmp_path):
    p, cfg, base = _small()
    jlora.save_adapter(tmp_path, p, cfg)
    with pytest.raises(ValueError, match="is a jlora adapter, not a PEFT one"):
        jlora.import_peft(tmp_path, base, jlora.peft.LLAMA)


def test_import_other_peft_type(small_peft):
    path, base = small_peft
    _edit_config(path, peft_type="IA3")
    with pytest.raises(ValueError, match="expected peft_type 'LORA', found 'IA3'"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lora_bias", True),
        ("modules_to_save", ["classifier"]),
        ("layer_replication", [[0, 1]]),
        ("target_parameters", ["w"]),
        ("trainable_token_indices", [1]),
    ],
)
def test_import_unsupported_option(small_peft, option, value):
    path, base = small_peft
    _edit_config(path, **{option: value})
    with pytest.raises(ValueError, match=f"sets {option}=.*cannot hold"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_dora_config_without_magnitudes(small_peft):
    path, base = small_peft
    _edit_config(path, use_dora=True)
    with pytest.raises(ValueError, match=r"use_dora is True but kernel .* lora_magnitude_vector"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_bias(small_peft):
    path, base = small_peft
    _edit_config(path, bias="all")
    with pytest.raises(ValueError, match="bias='all': trained biases"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_bad_rank_value(small_peft):
    path, base = small_peft
    _edit_config(path, r="8")
    with pytest.raises(ValueError, match="'r' must be a number; found '8'"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_missing_weights_and_pickle_hint(small_peft):
    path, base = small_peft
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="a pickle, which jlora never reads"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_truncated_weights(small_peft):
    path, base = small_peft
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_extra_key(small_peft):
    path, base = small_peft
    _edit_tensors(path, lambda t: t.update({"base_model.model.fc.weight": t[next(iter(t))]}))
    with pytest.raises(ValueError, match=r"key 'base_model\.model\.fc\.weight' is not a LoRA"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_refuses_base_weights_of_a_linear_that_differ(small_peft):
    path, base = small_peft
    key = "base_model.model.fc.base_layer.weight"
    _edit_tensors(path, lambda t: t.update({key: np.ones((3, 4), np.float32)}))
    jlora.import_peft(path, base, jlora.peft.LLAMA)  # PEFT's copy of the (all-ones) base: fine
    _edit_tensors(path, lambda t: t.update({key: np.full((3, 4), 2.0, np.float32)}))
    with pytest.raises(
        ValueError,
        match=r"fc\.base_layer\.weight' holds full base weights, PEFT's copy of the kernel "
        r"'fc/kernel' that differs from base_params' by up to 1",
    ):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_embedding_copy_must_be_the_base(tmp_path):
    cfg = jlora.LoraConfig(rank=2, targets=r"emb/embedding")
    base = {"emb": {"embedding": jnp.arange(15.0).reshape(5, 3)}}
    p = _random(jlora.init_lora(jax.random.key(0), base, cfg))
    jlora.export_peft(tmp_path, p, cfg, jlora.peft.LLAMA)
    key = "base_model.model.emb.base_layer.weight"
    _edit_tensors(
        tmp_path, lambda t: t.update({key: np.arange(15.0, dtype=np.float32).reshape(5, 3)})
    )
    params, _ = jlora.import_peft(tmp_path, base, jlora.peft.LLAMA)  # the base's own copy: fine
    _same(params, p)
    _edit_tensors(tmp_path, lambda t: t.update({key: np.zeros((6, 3), np.float32)}))
    with pytest.raises(
        ValueError, match=r"copy of the embedding table 'emb/embedding' that differs"
    ):
        jlora.import_peft(tmp_path, base, jlora.peft.LLAMA)


def test_import_factor_not_2d(small_peft):
    path, base = small_peft
    key = "base_model.model.fc.lora_A.weight"
    _edit_tensors(path, lambda t: t.update({key: np.zeros((1, 4, 1), np.float32)}))
    with pytest.raises(ValueError, match=r"has shape \(1, 4, 1\); LoRA factors are 2-D"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_missing_key(small_peft):
    path, base = small_peft
    _edit_tensors(path, lambda t: t.pop("base_model.model.fc.lora_B.weight"))
    with pytest.raises(ValueError, match=r"'base_model\.model\.fc\.lora_B\.weight' is missing"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_module_not_in_base(small_peft):
    path, _ = small_peft
    other = {"fc": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(
        ValueError, match="names module 'other', but mapping 'llama' maps no kernel"
    ):
        jlora.import_peft(path, other, jlora.peft.LLAMA)


def test_import_other_rank(small_peft):
    path, base = small_peft
    _edit_config(path, r=4)
    with pytest.raises(ValueError, match=r"has rank 1, but the adapter's config gives module"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_shape_mismatch(small_peft):
    path, base = small_peft
    bigger = {**base, "fc": {"kernel": jnp.ones((5, 3))}}
    with pytest.raises(ValueError, match=r"kernel 'fc/kernel' of shape \(5, 3\).*lora_A \(1, 5\)"):
        jlora.import_peft(path, bigger, jlora.peft.LLAMA)


def test_import_stacked_ranks_differ(exported):
    path, _, _ = exported
    _edit_config(path, rank_pattern={r"layers\.0\.out": 1, r"layers\.1\.out": 1})
    _edit_tensors(
        path,
        lambda t: t.update(
            {
                "base_model.model.layers.2.out.lora_A.weight": np.zeros((2, 8), np.float32),
                "base_model.model.layers.2.out.lora_B.weight": np.zeros((8, 2), np.float32),
            }
        ),
    )
    with pytest.raises(
        ValueError, match=r"stacked kernel 'layers/attn/out/kernel' have ranks (1 and 2|2 and 1)"
    ):
        jlora.import_peft(path, STACKED, STACKED_MAP)


def test_import_no_factors(small_peft):
    path, base = small_peft
    _edit_tensors(path, lambda t: t.clear())
    with pytest.raises(ValueError, match="holds no LoRA factors"):
        jlora.import_peft(path, base, jlora.peft.LLAMA)


def test_import_onto_adapted_base(small_peft):
    path, _ = small_peft
    with pytest.raises(ValueError, match="already holds adapters"):
        jlora.import_peft(path, _small()[0], jlora.peft.LLAMA)


def test_import_leaves_base_untouched(small_peft):
    path, base = small_peft
    before = jax.tree.map(np.array, base)
    jlora.import_peft(path, base, jlora.peft.LLAMA)
    _same(base, before)
    assert sorted(base["fc"]) == ["kernel"]


def test_import_kernel_without_axes(exported):
    path, _, _ = exported
    with pytest.raises(
        ValueError, match=r"'layers/mlp/kernel' of shape \(3, 8, 6\): mapping 'no-axes'"
    ):
        jlora.import_peft(path, STACKED, NO_AXES_MAP)


def test_transposed_kernel_with_default_roles_swaps_factors(tmp_path):
    """A (out, in) kernel adapted with jlora's default (in, out) roles still exports exactly."""
    cfg = jlora.LoraConfig(rank=2, alpha=3.0)  # no axis rule: jlora sees head as (in, out)
    base = {"head": {"kernel": jnp.ones((6, 8))}}
    p = _random(jlora.init_lora(jax.random.key(0), base, cfg))
    mapping = PeftMapping("t", (ModuleRule("head/kernel", "head", ("out", "in")),))
    jlora.export_peft(tmp_path, p, cfg, mapping)
    tensors = decode((tmp_path / "adapter_model.safetensors").read_bytes(), "x")
    lora_a = tensors["base_model.model.head.lora_A.weight"]
    lora_b = tensors["base_model.model.head.lora_B.weight"]
    assert lora_a.shape == (2, 8) and lora_b.shape == (6, 2)
    delta = _dense_delta(jlora.merge_params(p, cfg), base)["head"]["kernel"]
    np.testing.assert_allclose(lora_b @ lora_a * 1.5, delta, rtol=1e-5, atol=1e-6)
    params, config = jlora.import_peft(tmp_path, base, mapping)  # back with the mapping's roles
    np.testing.assert_allclose(
        jlora.merge_params(params, config)["head"]["kernel"],
        jlora.merge_params(p, cfg)["head"]["kernel"],
        rtol=1e-6,
    )


def test_import_shards_adapters_like_their_kernel(exported):
    from jax.sharding import NamedSharding, PartitionSpec

    path, _, _ = exported
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    spec = NamedSharding(mesh, PartitionSpec(None, None, "model", None))
    base = jax.tree.map(lambda x: x, STACKED)
    base["layers"]["attn"]["query"]["kernel"] = jax.device_put(
        STACKED["layers"]["attn"]["query"]["kernel"], spec
    )
    params, _ = jlora.import_peft(path, base, STACKED_MAP)
    b = params["layers"]["attn"]["query"]["kernel_lora_b"]
    assert b.sharding == NamedSharding(mesh, PartitionSpec(None, None, "model", None))


def test_import_per_layer_alpha_of_stacked_kernel_is_folded_into_b(exported):
    path, p, _ = exported
    _edit_config(path, alpha_pattern={r"layers\.1\.query": 6.0, "head": 5.0})  # 2x the default
    params, cfg = jlora.import_peft(path, STACKED, STACKED_MAP)
    got = _dense_delta(jlora.merge_params(params, cfg), STACKED)["layers"]["attn"]["query"]
    want = _dense_delta(jlora.merge_params(p, STACKED_CFG), STACKED)["layers"]["attn"]["query"]
    np.testing.assert_allclose(got["kernel"][0], want["kernel"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["kernel"][1], 2 * want["kernel"][1], rtol=1e-5, atol=1e-6)


def test_import_layer_placeholder_on_unstacked_kernel(small_peft):
    path, base = small_peft
    mapping = PeftMapping("m", (ModuleRule(r"(fc|other)/kernel", r"\1.{layer}"),))
    with pytest.raises(ValueError, match=r"'fc/kernel' has no stack axis .* has a '\{layer\}'"):
        jlora.import_peft(path, base, mapping)


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _kernels(draw):
    """A tree of 1-3 kernels: 2-D, DenseGeneral-like 3-D, optionally stacked, with ranks."""
    kernels, rules, ranks = {}, [], {}
    for i in range(draw(st.integers(1, 3))):
        n_in = draw(st.integers(1, 2))
        n_out = draw(st.integers(1, 3 - n_in))
        stacked = draw(st.booleans())
        roles = ("stack",) * stacked + ("in",) * n_in + ("out",) * n_out
        shape = tuple(draw(st.integers(1, 4)) for _ in roles)
        kernels[f"k{i}"] = {"kernel": np.zeros(shape, np.float32)}
        rules.append((f"k{i}/kernel", roles))
        fan = min(
            int(np.prod([s for s, r in zip(shape, roles, strict=True) if r == "in"])),
            int(np.prod([s for s, r in zip(shape, roles, strict=True) if r == "out"])),
        )
        ranks[f"k{i}/kernel"] = draw(st.integers(1, fan))
    return kernels, tuple(rules), ranks


@settings(max_examples=20, deadline=None)
@given(_kernels(), st.floats(0.5, 16.0), st.booleans())
def test_export_import_round_trip_is_exact(tmp_path_factory, tree, alpha, rslora):
    base, rules, ranks = tree
    cfg = jlora.LoraConfig(
        rank=1,
        alpha=alpha,
        rank_pattern=ranks,
        use_rslora=rslora,
        axis_rules=rules,
        init="gaussian",
    )
    mapping = PeftMapping(  # axes as jlora's roles; import needs them for 3-D kernels
        "prop",
        tuple(
            ModuleRule(p, p.replace("/kernel", "") + (".{layer}" if r[0] == "stack" else ""), r)
            for p, r in rules
        ),
    )
    rng = np.random.default_rng(0)
    p = {}  # adapters drawn with numpy: no per-shape compilation
    for key, leaf in base.items():
        roles = dict(rules)[f"{key}/kernel"]
        a_shape, b_shape = adapter_shapes(leaf["kernel"].shape, roles, ranks[f"{key}/kernel"])
        a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
        p[key] = {**leaf, "kernel_lora_a": np.float32(a), "kernel_lora_b": np.float32(b)}
    path = tmp_path_factory.mktemp("prop")
    jlora.export_peft(path, p, cfg, mapping)
    params, got = jlora.import_peft(path, base, mapping)
    _same(params, p)
    for name in ranks:
        assert got.scale_for(name) == pytest.approx(cfg.scale_for(name), rel=1e-12)


def test_export_to_new_directory_is_all_or_nothing(tmp_path, monkeypatch):
    from jlora import _atomic

    p, cfg, _ = _small()
    real = _atomic.os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        jlora.export_peft(tmp_path / "new", p, cfg, jlora.peft.LLAMA)
    monkeypatch.undo()
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # no half-written directory
    jlora.export_peft(tmp_path / "new", p, cfg, jlora.peft.LLAMA)
    jlora.export_peft(tmp_path / "new", p, cfg, jlora.peft.LLAMA)  # over an existing one
    assert sorted(f.name for f in (tmp_path / "new").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
