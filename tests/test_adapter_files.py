"""save_adapter / load_adapter: round trips, atomic saves, and every bad input refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _adapter_files, _atomic
from jlora._tensorfile import decode, encode

CFG = jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/(query|value|Dense_0)/kernel")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        return nn.Dense(5)(h)


def _base():
    x = jnp.ones((1, 3, 8))
    return {"params": Block().init(jax.random.key(0), x)["params"]}, x


def _trained(base, config=CFG, seed=1):
    p = jlora.init_lora(jax.random.key(0), base, config)
    key = jax.random.key(seed)

    def bump(path, x):
        if jlora.is_adapter_path(path):
            return x + jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype)
        return x

    return jax.tree.map_with_path(bump, p)


def _apply(params, x):
    return Block().apply({"params": params["params"]}, x)


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_and_outputs_match(tmp_path):
    base, x = _base()
    p = _trained(base)
    jlora.save_adapter(tmp_path / "ad", p, CFG)
    loaded, cfg = jlora.load_adapter(tmp_path / "ad", base)
    assert cfg == CFG
    _same(loaded, p)
    out = _apply(jlora.merge_params(loaded, cfg), x)
    np.testing.assert_array_equal(out, _apply(jlora.merge_params(p, CFG), x))
    assert not np.allclose(out, _apply(base, x))  # the adapter does something


def test_files_hold_only_adapters_and_readable_json(tmp_path):
    base, _ = _base()
    jlora.save_adapter(tmp_path, _trained(base), CFG)
    manifest = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = tmp_path / manifest["weights"]["file"]
    tensors = decode(weights.read_bytes(), "w")
    assert all(k.endswith(("_lora_a", "_lora_b")) for k in tensors)
    assert "params/MultiHeadDotProductAttention_0/query/kernel_lora_a" in tensors
    assert len(tensors) == 2 * len(manifest["adapters"]) == 6
    assert manifest["lora_config"] == CFG.to_dict()
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter_config.json", weights.name])


def test_bfloat16_adapters_and_list_containers(tmp_path):
    cfg = jlora.LoraConfig(rank=1, dtype="bfloat16")
    base = {"layers": [{"kernel": jnp.ones((3, 2))}, {"kernel": jnp.ones((2, 2))}]}
    p = _trained(base, cfg)
    jlora.save_adapter(tmp_path, p, cfg)
    loaded, _ = jlora.load_adapter(tmp_path, base)
    _same(loaded, p)
    assert loaded["layers"][0]["kernel_lora_a"].dtype == jnp.bfloat16


def test_adapters_follow_a_sharded_kernel(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh(
        (1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )
    cfg = jlora.LoraConfig(rank=2)
    base = {"d": {"kernel": jnp.ones((4, 6))}}
    jlora.save_adapter(tmp_path, _trained(base, cfg), cfg)
    sharded = {
        "d": {
            "kernel": jax.device_put(
                base["d"]["kernel"], NamedSharding(mesh, PartitionSpec("data", "model"))
            )
        }
    }
    loaded, _ = jlora.load_adapter(tmp_path, sharded)
    assert loaded["d"]["kernel_lora_a"].sharding == NamedSharding(mesh, PartitionSpec("data", None))
    assert loaded["d"]["kernel_lora_b"].sharding == NamedSharding(
        mesh, PartitionSpec(None, "model")
    )


def test_base_is_untouched(tmp_path):
    base, _ = _base()
    before = jax.tree.map(np.array, base)
    jlora.save_adapter(tmp_path, _trained(base), CFG)
    jlora.load_adapter(tmp_path, base)
    _same(base, before)


def test_overwrite_keeps_one_weights_file(tmp_path):
    base, _ = _base()
    jlora.save_adapter(tmp_path, _trained(base, seed=1), CFG)
    p2 = _trained(base, seed=2)
    jlora.save_adapter(tmp_path, p2, CFG)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 1
    _same(jlora.load_adapter(tmp_path, base)[0], p2)


@pytest.mark.parametrize("fail_on", ["weights", "json"])
def test_crash_mid_save_leaves_previous_adapter(tmp_path, monkeypatch, fail_on):
    base, _ = _base()
    p1 = _trained(base, seed=1)
    jlora.save_adapter(tmp_path, p1, CFG)
    before = sorted(os.listdir(tmp_path))
    real_fdopen = os.fdopen

    class Torn:
        """A file that writes half its bytes, then the 'process dies'."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash mid-write")

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        target = "adapter_config.json" if fail_on == "json" else "adapter-"
        return Torn(f) if target in os.path.basename(name) else f

    monkeypatch.setattr(_atomic.os, "fdopen", fdopen)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        jlora.save_adapter(tmp_path, _trained(base, seed=2), CFG)
    monkeypatch.undo()
    leftover = sorted(os.listdir(tmp_path))
    assert not [f for f in leftover if f.endswith(".tmp")]  # temp files removed
    if fail_on == "weights":
        assert leftover == before
    _same(jlora.load_adapter(tmp_path, base)[0], p1)


def test_crash_between_weights_and_json_replace(tmp_path, monkeypatch):
    base, _ = _base()
    p1 = _trained(base, seed=1)
    jlora.save_adapter(tmp_path, p1, CFG)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("simulated crash before commit")
        real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        jlora.save_adapter(tmp_path, _trained(base, seed=2), CFG)
    monkeypatch.undo()
    _same(jlora.load_adapter(tmp_path, base)[0], p1)
    p3 = _trained(base, seed=3)
    jlora.save_adapter(tmp_path, p3, CFG)  # the stale weights file is cleaned up
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 1
    _same(jlora.load_adapter(tmp_path, base)[0], p3)


# ---------------------------------------------------------------- bad input


def test_save_refuses_tree_without_adapters(tmp_path):
    base, _ = _base()
    with pytest.raises(ValueError, match="hold no LoRA adapters"):
        jlora.save_adapter(tmp_path, base, CFG)


def test_save_refuses_predicate_config(tmp_path):
    cfg = jlora.LoraConfig(rank=1, targets=lambda p, x: p.endswith("kernel"))
    p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((2, 2))}}, cfg)
    with pytest.raises(ValueError, match="Python predicate"):
        jlora.save_adapter(tmp_path, p, cfg)


def test_save_refuses_file_path(tmp_path):
    base, _ = _base()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        jlora.save_adapter(tmp_path / "f", _trained(base), CFG)


@pytest.fixture
def saved(tmp_path):
    base, _ = _base()
    jlora.save_adapter(tmp_path, _trained(base), CFG)
    return tmp_path, base


def _manifest(path):
    return json.loads((path / "adapter_config.json").read_text())


def _rewrite(path, edit_manifest=None, edit_tensors=None):
    """Edits an adapter consistently (sha updated), to reach the later checks."""
    m = _manifest(path)
    weights = path / m["weights"]["file"]
    tensors = decode(weights.read_bytes(), "w")
    if edit_tensors:
        edit_tensors(tensors)
    data = encode(tensors)
    weights.write_bytes(data)
    m["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    if edit_manifest:
        edit_manifest(m)
    (path / "adapter_config.json").write_text(json.dumps(m))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json is missing"):
        jlora.load_adapter(tmp_path / "nope", {})


def test_peft_directory_hint(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="import_peft"):
        jlora.load_adapter(tmp_path, {})


def test_corrupted_json(saved):
    path, base = saved
    (path / "adapter_config.json").write_text('{"format": "jlora-ad')
    with pytest.raises(ValueError, match="not valid JSON"):
        jlora.load_adapter(path, base)


def test_wrong_format(saved):
    path, base = saved
    (path / "adapter_config.json").write_text('{"format": "peft"}')
    with pytest.raises(ValueError, match="expected format 'jlora-adapter', found 'peft'"):
        jlora.load_adapter(path, base)


def test_wrong_version(saved):
    path, base = saved
    _rewrite(path, lambda m: m.update(version=99))
    with pytest.raises(ValueError, match="version 99"):
        jlora.load_adapter(path, base)


def test_manifest_missing_key(saved):
    path, base = saved
    _rewrite(path, lambda m: m.pop("adapters"))
    with pytest.raises(ValueError, match="missing the key 'adapters'"):
        jlora.load_adapter(path, base)


def test_manifest_malformed_entries(saved):
    path, base = saved
    _rewrite(path, lambda m: m["adapters"][0].pop("kernel_shape"))
    with pytest.raises(ValueError, match="'adapters' must be a list of entries"):
        jlora.load_adapter(path, base)


def test_invalid_weights_name(saved):
    path, base = saved
    _rewrite(path, lambda m: m["weights"].update(file="../evil.safetensors"))
    with pytest.raises(ValueError, match="invalid weights file"):
        jlora.load_adapter(path, base)


def test_weights_missing(saved):
    path, base = saved
    os.unlink(path / _manifest(path)["weights"]["file"])
    with pytest.raises(FileNotFoundError, match="Copy the whole adapter directory"):
        jlora.load_adapter(path, base)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_weights(saved, damage):
    path, base = saved
    weights = path / _manifest(path)["weights"]["file"]
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        jlora.load_adapter(path, base)


def test_invalid_lora_config(saved):
    path, base = saved
    _rewrite(path, lambda m: m["lora_config"].update(rnak=3))
    with pytest.raises(ValueError, match=r"invalid LoraConfig.*did you mean 'rank'"):
        jlora.load_adapter(path, base)


def test_missing_tensor(saved):
    path, base = saved
    name = "params/Dense_0/kernel_lora_b"
    _rewrite(path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"tensor '{name}' is listed .* but missing"):
        jlora.load_adapter(path, base)


def test_extra_tensor(saved):
    path, base = saved
    _rewrite(path, edit_tensors=lambda t: t.update({"params/x_lora_a": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match="extra tensor 'params/x_lora_a'"):
        jlora.load_adapter(path, base)


def test_tensor_shape_disagrees_with_manifest(saved):
    path, base = saved
    name = "params/Dense_0/kernel_lora_b"
    _rewrite(path, edit_tensors=lambda t: t.update({name: np.zeros((3, 5), np.float32)}))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \[3, 5\].*lists shape \[2, 5\]"):
        jlora.load_adapter(path, base)


def test_base_from_another_model(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"adapts 'params/.*which base_params does not have"):
        jlora.load_adapter(path, {"params": {"other": {"kernel": jnp.ones((2, 2))}}})


def test_base_of_another_size(saved):
    path, base = saved
    bigger = jax.tree.map(lambda x: x, base)
    bigger["params"]["Dense_0"]["kernel"] = jnp.ones((8, 7))
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel' of shape \(8, 5\).*\(8, 7\)"):
        jlora.load_adapter(path, bigger)


def test_adapter_of_another_rank(saved):
    path, base = saved
    _rewrite(path, lambda m: m["lora_config"].update(rank=4))
    with pytest.raises(ValueError, match=r"\(rank 4\) expects A \(8, 4\)"):
        jlora.load_adapter(path, base)


def test_base_already_adapted(saved):
    path, base = saved
    with pytest.raises(ValueError, match="already holds adapters"):
        jlora.load_adapter(path, _trained(base))


# ---- the recorded scale: a config of another alpha is refused where a file meets it --------------


def test_load_with_the_training_config_or_an_equivalent_one(saved):
    path, base = saved
    params, cfg = jlora.load_adapter(path, base, config=CFG)
    assert cfg == CFG
    # Other targets, same scale everywhere adapted (alpha 4 / r 2 = 2): accepted.
    same_scale = dataclasses.replace(CFG, targets=".*kernel", alpha_pattern={".*Dense_0.*": 4.0})
    params2, cfg2 = jlora.load_adapter(path, base, config=same_scale)
    assert cfg2 == CFG  # the recorded config is what comes back
    _same(params, params2)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(alpha=8.0),
            r"adapter '.*': kernel 'params/Dense_0/kernel' was trained with scale "
            r"2 \(alpha 4 / r, r = 2\), but the config given has scale 4 there \(alpha 8 / r, "
            r"r = 2\); merging or applying with it would scale the update by 2\. Use the config",
        ),
        (
            dict(use_rslora=True),
            r"scale 2 \(alpha 4 / r, r = 2\), but the config given has scale 2\.82843 there "
            r"\(alpha 4 / sqrt\(r\), r = 2\)",
        ),
        (
            dict(alpha_pattern={".*Dense_0.*": 1.0}),
            r"'params/Dense_0/kernel' was trained with scale 2 .*has scale 0\.5 there",
        ),
        (
            dict(rank_pattern={".*Dense_0.*": 4}, alpha_pattern={".*Dense_0.*": 8.0}),
            r"'params/Dense_0/kernel' was trained with scale 2 \(alpha 4 / r, r = 2\), but the "
            r"config given has scale 2 there \(alpha 8 / r, r = 4\)",
        ),
        (
            dict(axis_rules=[(".*/query/kernel", ("in", "in", "out"))]),
            r"'params/MultiHeadDotProductAttention_0/query/kernel' was adapted with axis roles "
            r"\('in', 'out', 'out'\), but the config given lays it out as \('in', 'in', 'out'\)",
        ),
    ],
)
def test_load_refuses_a_config_of_another_scale(saved, change, match):
    path, base = saved
    with pytest.raises(ValueError, match=match):
        jlora.load_adapter(path, base, config=dataclasses.replace(CFG, **change))


def test_load_refuses_a_config_that_is_not_one(saved):
    path, base = saved
    with pytest.raises(TypeError, match=r"load_adapter: config must be a LoraConfig or None; got"):
        jlora.load_adapter(path, base, config={"alpha": 4.0})


def test_load_refuses_a_manifest_whose_scales_disagree_with_its_config(saved):
    path, base = saved
    # A hand-edited alpha: the per-kernel scales recorded at save time no longer follow from it.
    _rewrite(path, lambda m: m["lora_config"].update(alpha=16.0))
    with pytest.raises(
        ValueError,
        match=r"was trained with scale 2 \(alpha 16 / r, r = 2\), but its adapter_config\.json's "
        r"lora_config has scale 8 there",
    ):
        jlora.load_adapter(path, base)


def test_import_peft_refuses_a_config_of_another_scale(tmp_path):
    base, _ = _base()
    jlora.export_peft(tmp_path, _trained(base), CFG, jlora.peft.hf_mapping("flax"))
    mapping = jlora.peft.hf_mapping("flax")
    _, cfg = jlora.import_peft(tmp_path, base, mapping, config=CFG)
    assert cfg.scale_for("params/Dense_0/kernel") == 2.0
    with pytest.raises(
        ValueError,
        match=r"PEFT adapter .*: kernel 'params/.*' was trained with scale 2 \(alpha 4 / r, "
        r"r = 2\), but the config given has scale 1 there \(alpha 2 / r, r = 2\)",
    ):
        jlora.import_peft(tmp_path, base, mapping, config=dataclasses.replace(CFG, alpha=2.0))
    with pytest.raises(TypeError, match=r"import_peft: config must be a LoraConfig or None"):
        jlora.import_peft(tmp_path, base, mapping, config=4.0)


def test_merge_params_cannot_see_alpha_in_the_tree(saved):
    # The documented limit: the tree holds A and B only, so merge_params with another alpha
    # cannot be refused; a rank shows in A's shape and is.
    path, base = saved
    params, _ = jlora.load_adapter(path, base)
    jlora.merge_params(params, dataclasses.replace(CFG, alpha=8.0))  # no error possible
    with pytest.raises(ValueError, match=r"do not fit this config"):
        jlora.merge_params(params, dataclasses.replace(CFG, rank=3))


def test_kernel_in_non_dict_container(tmp_path):
    cfg = jlora.LoraConfig(rank=1)
    base = {"d": {"kernel": jnp.ones((2, 2))}}
    jlora.save_adapter(tmp_path, _trained(base, cfg), cfg)
    with pytest.raises(ValueError, match="not held by a dict"):
        jlora.load_adapter(tmp_path, {"d": _Box(jnp.ones((2, 2)))})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Box:
    kernel: jax.Array


def test_decode_rejects_garbage_and_unknown_dtype():
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        decode(b"garbage", "x.safetensors")
    data = encode({"c": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="tensor 'c' has dtype C64"):
        decode(data, "x.safetensors")


def test_module_constants():
    assert _adapter_files.CONFIG_FILE == "adapter_config.json"


def test_every_config_field_round_trips(tmp_path):
    cfg = jlora.LoraConfig(
        rank=3,
        alpha=5.0,
        targets=[r"a/kernel", r"b/kernel"],
        exclude=r"c/.*",
        rank_pattern={"b/kernel": 1},
        alpha_pattern={"a/kernel": 2.0},
        use_rslora=True,
        init="gaussian",
        dtype="bfloat16",
        dropout=0.1,
        axis_rules=[("b/kernel", ("stack", "out", "in"))],
    )
    base = {"a": {"kernel": jnp.ones((4, 5))}, "b": {"kernel": jnp.ones((2, 3, 4))}}
    p = _trained(base, cfg)
    jlora.save_adapter(tmp_path, p, cfg)
    loaded, got = jlora.load_adapter(tmp_path, base)
    assert got == cfg
    _same(loaded, p)
    _same(jlora.merge_params(loaded, got), jlora.merge_params(p, cfg))


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jlora._layout import adapter_shapes  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([("in", "out"), ("stack", "in", "out"), ("in", "out", "out")]),
            st.lists(st.integers(1, 4), min_size=3, max_size=3),
            st.integers(1, 3),
            st.sampled_from(["float32", "bfloat16", "float16"]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_save_load_round_trip_is_exact(tmp_path_factory, kernels):
    rng = np.random.default_rng(0)
    base, params, rules, ranks = {}, {}, [], {}
    for i, (roles, sizes, rank, dtype) in enumerate(kernels):
        shape = tuple(sizes[: len(roles)])
        base[f"k{i}"] = {"kernel": np.zeros(shape, np.float32)}
        rules.append((f"k{i}/kernel", roles))
        ranks[f"k{i}/kernel"] = rank
        a_shape, b_shape = adapter_shapes(shape, roles, rank)
        params[f"k{i}"] = {
            "kernel": base[f"k{i}"]["kernel"],
            "kernel_lora_a": jnp.asarray(rng.normal(size=a_shape), dtype),
            "kernel_lora_b": jnp.asarray(rng.normal(size=b_shape), dtype),
        }
    cfg = jlora.LoraConfig(rank=1, rank_pattern=ranks, axis_rules=rules)
    path = tmp_path_factory.mktemp("prop")
    jlora.save_adapter(path, params, cfg)
    loaded, got = jlora.load_adapter(path, base)
    assert got == cfg
    _same(loaded, params)
