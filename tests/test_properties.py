"""Hypothesis properties of the core transform, over random kernel shapes, roles and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora

ROLE_LAYOUTS = [
    ("in", "out"),
    ("stack", "in", "out"),
    ("in", "out", "out"),
    ("in", "in", "out"),
    ("stack", "in", "in", "out"),
    ("in", "stack", "out"),
]


@st.composite
def adapted_trees(draw, dtypes=(jnp.float32,)):
    """A dict with one or two kernels of random layouts, its config and an initialised tree."""
    rules, params = [], {}
    for name in draw(st.sets(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2)):
        roles = draw(st.sampled_from(ROLE_LAYOUTS))
        shape = tuple(draw(st.integers(2, 5)) for _ in roles)
        dtype = draw(st.sampled_from(dtypes))
        seed = draw(st.integers(0, 2**16))
        params[name] = {"kernel": jax.random.normal(jax.random.key(seed), shape).astype(dtype)}
        rules.append((f"{name}/kernel", roles))
    cfg = jlora.LoraConfig(
        rank=draw(st.integers(1, 2)),
        alpha=draw(st.floats(0.5, 8.0)),
        use_rslora=draw(st.booleans()),
        axis_rules=rules,
    )
    key = jax.random.key(draw(st.integers(0, 2**16)))
    return params, cfg, jlora.init_lora(key, params, cfg)


def with_b(p, fill):
    return jax.tree.map_with_path(
        lambda q, x: fill(q, x) if jlora.path_str(q).endswith("_lora_b") else x, p
    )


def random_b(seed):
    return lambda q, x: jax.random.normal(jax.random.key(seed), x.shape, x.dtype)


SETTINGS = settings(max_examples=10, deadline=None)


@SETTINGS
@given(adapted_trees(dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)))
def test_identity_at_init(case):
    params, cfg, p = case
    merged = jlora.merge_params(p, cfg)
    for u, v in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


@SETTINGS
@given(adapted_trees(), st.integers(0, 100))
def test_split_combine_round_trip(case, seed):
    _, _, p = case
    p = with_b(p, random_b(seed))
    lora, base = jlora.split(p)
    back = jlora.combine(lora, base)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(p), strict=True):
        np.testing.assert_array_equal(u, v)


@SETTINGS
@given(adapted_trees(), st.integers(0, 100), st.integers(101, 200))
def test_merge_is_linear_in_b(case, s1, s2):
    params, cfg, p = case
    p1, p2 = with_b(p, random_b(s1)), with_b(p, random_b(s2))
    p12 = jax.tree.map_with_path(
        lambda q, x, y, z: y + z if jlora.path_str(q).endswith("_lora_b") else x, p, p1, p2
    )
    d = [
        jax.tree.map(lambda m, w: m - w, jlora.merge_params(t, cfg), params) for t in (p1, p2, p12)
    ]
    for x1, x2, x12 in zip(*(jax.tree.leaves(t) for t in d), strict=True):
        np.testing.assert_allclose(x12, x1 + x2, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(adapted_trees(dtypes=(jnp.float32, jnp.bfloat16)))
def test_init_is_deterministic_per_path(case):
    params, cfg, _ = case
    again = jlora.init_lora(jax.random.key(0), params, cfg)
    other = jlora.init_lora(jax.random.key(0), params, cfg)
    for u, v in zip(jax.tree.leaves(again), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))
    # a tree with one more target keeps the existing adapters bit for bit
    bigger = {**params, "extra": {"kernel": jnp.ones((3, 3))}}
    grown = jlora.init_lora(jax.random.key(0), bigger, cfg)
    for name in params:
        np.testing.assert_array_equal(grown[name]["kernel_lora_a"], again[name]["kernel_lora_a"])


@SETTINGS
@given(adapted_trees(dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)), st.integers(0, 100))
def test_merge_preserves_dtypes_and_structure(case, seed):
    params, cfg, p = case
    merged = jlora.merge_params(with_b(p, random_b(seed)), cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for u, v in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
