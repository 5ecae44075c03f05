"""Every error jlora raises on bad input: clear, with the path, and never a silent no-op."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

import jlora
from jlora._layout import einsum_spec

KEY = jax.random.key(0)


def dense(shape=(4, 3)):
    return {"dense": {"kernel": jnp.ones(shape), "bias": jnp.zeros(shape[-1])}}


# ---- LoraConfig ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": 3}, TypeError, "targets must be a regex string"),
        ({"targets": ["ok", 3]}, TypeError, "targets entries must be regex strings"),
        ({"exclude": "("}, ValueError, "exclude: '\\(' is not a valid regex"),
        ({"rank": 2.0}, TypeError, "rank must be int"),
        ({"rank": True}, TypeError, "rank must be int"),
        ({"rank": 0}, ValueError, "rank must be > 0"),
        ({"alpha": "16"}, TypeError, "alpha must be float"),
        ({"alpha": -1.0}, ValueError, "alpha must be > 0"),
        ({"dropout": -0.1}, ValueError, "dropout must be >= 0"),
        ({"dropout": 1.0}, ValueError, "dropout must be in \\[0, 1\\)"),
        ({"rank_pattern": [("a", 1)]}, TypeError, "rank_pattern must map path regexes"),
        ({"rank_pattern": {1: 2}}, TypeError, "rank_pattern keys must be regex strings"),
        ({"rank_pattern": {"a": 0}}, ValueError, "rank_pattern\\['a'\\] must be > 0"),
        ({"alpha_pattern": {"[": 1.0}}, ValueError, "is not a valid regex"),
        ({"axis_rules": "x"}, TypeError, "axis_rules must be a list of \\(regex, roles\\)"),
        ({"axis_rules": [("x", "in")]}, TypeError, "entries must be \\(regex, roles\\) pairs"),
        ({"axis_rules": [("x", ("in", "in"))]}, ValueError, "at least one 'in' and one 'out'"),
        ({"axis_rules": [("x", ("in", "up"))]}, ValueError, "must use only"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be bool"),
        ({"init": "pissa"}, ValueError, "init must be one of"),
        ({"dtype": "floaty"}, TypeError, "dtype 'floaty' is not a dtype"),
        ({"dtype": "int8"}, ValueError, "dtype must be a float dtype; got int8"),
        ({"embed_pattern": None}, TypeError, "embed_pattern must be a regex string"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        jlora.LoraConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = jlora.LoraConfig(rank_pattern={"a": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 3
    assert hash(cfg) == hash(jlora.LoraConfig(rank_pattern={"a": 2}))


def test_predicate_config_cannot_be_saved():
    cfg = jlora.LoraConfig(targets=lambda path, leaf: leaf.ndim == 2)
    with pytest.raises(ValueError, match="targets holds a Python predicate"):
        cfg.to_dict()


def test_from_dict_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(KeyError, match="unknown LoraConfig key 'rnak'; did you mean 'rank'"):
        jlora.LoraConfig.from_dict({"rnak": 4})
    with pytest.raises(KeyError, match="known keys"):
        jlora.LoraConfig.from_dict({"zzzzzz": 4})
    with pytest.raises(TypeError, match="from_dict expects a mapping; got list"):
        jlora.LoraConfig.from_dict([("rank", 4)])


# ---- selecting kernels and axis roles -------------------------------------------------------


def test_targets_matching_nothing_list_real_paths():
    with pytest.raises(ValueError, match=r"match no kernel(.|\n)*dense/kernel \(4, 3\)"):
        jlora.init_lora(KEY, dense(), jlora.LoraConfig(targets=r".*/query/kernel"))


def test_excluding_everything_is_an_error_too():
    with pytest.raises(ValueError, match="match no kernel"):
        jlora.init_lora(KEY, dense(), jlora.LoraConfig(exclude=r"dense/.*"))


def test_targets_matching_a_bias_are_refused():
    with pytest.raises(ValueError, match=r"selected 'dense/bias'.*rank >= 2"):
        jlora.init_lora(KEY, dense(), jlora.LoraConfig(targets=r"dense/.*"))


def test_nd_kernel_without_axis_rule_shows_shape_and_example():
    params = {"mlp": {"kernel": jnp.ones((3, 4, 5))}}
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\).*axis_rules=\[\('mlp/kernel'"):
        jlora.init_lora(KEY, params, jlora.LoraConfig())


def test_axis_rule_with_wrong_number_of_axes():
    params = {"mlp": {"kernel": jnp.ones((3, 4, 5))}}
    cfg = jlora.LoraConfig(axis_rules=[("mlp/kernel", ("in", "out"))])
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\) \(3 axes, the rule names 2\)"):
        jlora.init_lora(KEY, params, cfg)


def test_axis_rule_makes_a_stacked_kernel_work():
    params = {"mlp": {"kernel": jnp.ones((3, 4, 5))}}
    cfg = jlora.LoraConfig(rank=2, axis_rules=[("mlp/kernel", ("stack", "in", "out"))])
    p = jlora.init_lora(KEY, params, cfg)
    assert p["mlp"]["kernel_lora_a"].shape == (3, 4, 2)
    assert p["mlp"]["kernel_lora_b"].shape == (3, 2, 5)


# ---- init_lora ------------------------------------------------------------------------------


def test_rank_larger_than_the_kernel_allows():
    with pytest.raises(ValueError, match=r"rank 4 for 'dense/kernel'.*so rank <= 3"):
        jlora.init_lora(KEY, dense(), jlora.LoraConfig(rank=4))


def test_kernel_under_a_non_string_key():
    with pytest.raises(ValueError, match="non-string key 0"):
        jlora.init_lora(KEY, {"d": {0: jnp.ones((3, 3))}}, jlora.LoraConfig(rank=1, targets="d/0"))


def test_adapting_twice_is_refused():
    cfg = jlora.LoraConfig(rank=2)
    p = jlora.init_lora(KEY, dense(), cfg)
    with pytest.raises(ValueError, match="'dense/kernel' already has LoRA adapters"):
        jlora.init_lora(KEY, p, cfg)


@dataclasses.dataclass
class Box:
    kernel: jax.Array


jax.tree_util.register_dataclass(Box, data_fields=["kernel"], meta_fields=[])


@pytest.mark.parametrize(
    ("params", "container"),
    [
        ({"layers": [jnp.ones((3, 3))]}, "list or tuple"),
        ({"layers": (jnp.ones((3, 3)),)}, "list or tuple"),
        ({"layers": Box(jnp.ones((3, 3)))}, "dataclass or object"),
    ],
)
def test_kernels_in_non_dict_containers_are_refused(params, container):
    with pytest.raises(ValueError, match=f"held by a {container} container.*nested dicts"):
        jlora.init_lora(KEY, params, jlora.LoraConfig(rank=1, targets="layers/.*"))


# ---- trees with adapters --------------------------------------------------------------------


def test_adapters_without_their_kernel():
    cfg = jlora.LoraConfig(rank=2)
    lora, _ = jlora.split(jlora.init_lora(KEY, dense(), cfg))
    with pytest.raises(ValueError, match=r"'dense/kernel_lora_a' has no kernel 'kernel'.*combine"):
        jlora.merge_params(lora, cfg)


def test_adapter_without_its_partner():
    p = jlora.init_lora(KEY, dense(), jlora.LoraConfig(rank=2))
    del p["dense"]["kernel_lora_b"]
    with pytest.raises(ValueError, match="has no partner 'kernel_lora_b'"):
        jlora.split(p)


def test_merge_with_a_different_config_names_the_path():
    p = jlora.init_lora(KEY, dense(), jlora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapters of 'dense/kernel' do not fit.*A \(4, 2\)"):
        jlora.merge_params(p, jlora.LoraConfig(rank=3))


def test_combine_rejects_halves_of_different_trees():
    cfg = jlora.LoraConfig(rank=1)
    p = jlora.init_lora(KEY, dense(), cfg)
    lora, base = jlora.split(p)
    with pytest.raises(ValueError, match="lora holds a non-adapter leaf at 'dense/kernel'"):
        jlora.combine(p, base)
    with pytest.raises(ValueError, match="lora has 'dense/extra', which is neither an adapter"):
        jlora.combine({"dense": {**lora["dense"], "extra": jnp.ones(2)}}, base)
    with pytest.raises(ValueError, match="lora has a dict at 'dense' where base has list"):
        jlora.combine(lora, {"dense": [1]})
    listed = jlora.init_lora(KEY, {"l": [dense()]}, cfg)
    lora_l, _ = jlora.split(listed)
    with pytest.raises(ValueError, match="at 'l' lora is PyTreeDef"):
        jlora.combine(lora_l, {"l": (dense(),)})


def test_optimizer_on_a_tree_without_adapters():
    with pytest.raises(ValueError, match=r"holds no LoRA adapters.*init_lora"):
        jlora.lora_optimizer(optax.adam(1e-3), dense())


def test_kernels_of_more_than_25_axes():
    with pytest.raises(ValueError, match="kernels of rank 26 > 25"):
        einsum_spec(("in",) * 25 + ("out",))
