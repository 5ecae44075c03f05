"""Named adapters: add/select/delete, weighted combination (cat/linear/svd), mixed batches."""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import zoo

import jlora

ZOO = ("linen_attention", "linen_scan", "linen_conv", "linen_embed", "plain_dict")


@functools.cache
def models():
    return {m.name: m for m in zoo()}


def randomize(p, seed, scale=0.3):
    def fill(path, x):
        if not jlora.is_adapter_path(path):
            return x
        k = jax.random.fold_in(jax.random.key(seed), zlib.crc32(jlora.path_str(path).encode()))
        return jax.random.normal(k, x.shape, x.dtype) * scale

    return jax.tree.map_with_path(fill, p)


@functools.cache
def bank(name):
    """Two adapters on one base: different seeds, ranks, scales (and targets for plain_dict)."""
    m = models()[name]
    cfg2 = dataclasses.replace(m.config, rank=max(1, m.config.rank - 1), alpha=3.0)
    if name == "plain_dict":
        cfg2 = dataclasses.replace(cfg2, targets="mlp/w_in")
    out = {}
    for i, (n, cfg) in enumerate((("x", m.config), ("y", cfg2))):
        lora, base = jlora.split(randomize(jlora.init_lora(jax.random.key(i), m.params, cfg), i))
        out = jlora.add_adapter(out, n, lora, cfg)
    return m, base, out


def delta(base, adapter):
    params, cfg = jlora.select_adapter(base, {"a": adapter}, "a")
    return jax.tree.map(jnp.subtract, jlora.merge_params(params, cfg), base)


def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def test_add_select_delete():
    m, base, adapters = bank("plain_dict")
    assert list(adapters) == ["x", "y"]
    params, cfg = jlora.select_adapter(base, adapters, "y")
    assert cfg is adapters["y"].config
    assert sorted(params["mlp"]) == ["scale", "w_in", "w_in_lora_a", "w_in_lora_b", "w_out"]
    assert jlora.select_adapter(base, adapters, None) == (base, None)
    # Switching adapters switches outputs; the base alone is the base.
    ys = {n: jlora.lora(m.apply, adapters[n].config)(*_sel(base, adapters, n), m.x) for n in "xy"}
    assert not np.allclose(ys["x"], ys["y"])
    assert list(jlora.delete_adapter(adapters, "x")) == ["y"]
    assert list(adapters) == ["x", "y"]  # pure: the input mapping is unchanged


def _sel(base, adapters, name):
    return (jlora.select_adapter(base, adapters, name)[0],)


@pytest.mark.parametrize("name", ["linen_attention", "linen_scan", "plain_dict"])
def test_cat_is_exact_sum_in_merge_and_factorised_paths(name):
    m, base, adapters = bank(name)
    w = {"x": 0.7, "y": -1.5}
    cat = jlora.combine_adapters(base, adapters, w, method="cat")
    want = jax.tree.map(
        lambda b, dx, dy: b + 0.7 * dx - 1.5 * dy,
        base,
        delta(base, adapters["x"]),
        delta(base, adapters["y"]),
    )
    merged = jlora.merge_params(jlora.combine(cat.lora, base), cat.config)
    jax.tree.map(close, merged, want)
    out = jax.jit(jlora.lora(m.apply, cat.config))(jlora.combine(cat.lora, base), m.x)
    close(out, m.apply(want, m.x), 1e-4)


@pytest.mark.parametrize("name", ["linen_scan", "plain_dict"])
def test_svd_at_full_rank_equals_cat_and_truncates_optimally(name):
    _, base, adapters = bank(name)
    w = {"x": 1.0, "y": 0.5}
    cat = jlora.combine_adapters(base, adapters, w, method="cat")
    full = jlora.combine_adapters(base, adapters, w, method="svd", rank=64)
    jax.tree.map(close, delta(base, full), delta(base, cat))
    low = jlora.combine_adapters(base, adapters, {"x": 1.0}, method="svd", rank=1)
    for path, leaf in jax.tree.leaves_with_path(low.lora):
        if path[-1].key.endswith("_lora_a"):
            assert leaf.shape[-1] == 1
    # Rank-1 SVD of one adapter = its best rank-1 part: the error is the dropped singular values.
    for d_low, d_x in zip(
        jax.tree.leaves(delta(base, low)), jax.tree.leaves(delta(base, adapters["x"])), strict=True
    ):
        if not np.any(d_x):
            continue
        mat = np.asarray(d_x).reshape(-1, d_x.shape[-1]) if d_x.ndim == 2 else None
        if mat is not None:
            s = np.linalg.svd(mat, compute_uv=False)
            err = np.linalg.norm(np.asarray(d_low) - np.asarray(d_x))
            np.testing.assert_allclose(err, np.sqrt(np.sum(s[1:] ** 2)), rtol=1e-4)


def test_linear_of_one_adapter_split_in_two_halves_is_that_adapter():
    _, base, adapters = bank("linen_attention")
    same = {"x": adapters["x"], "x2": adapters["x"]}
    lin = jlora.combine_adapters(base, same, {"x": 0.25, "x2": 0.25}, method="linear")
    jax.tree.map(close, delta(base, lin), delta(base, adapters["x"]))


@pytest.mark.parametrize("name", ZOO)
def test_mixed_batch_rows_equal_each_adapter_alone(name):
    m, base, adapters = bank(name)
    rows = (["x", None, "y", "x", "y", None] * 3)[: m.x.shape[0]]
    got = jax.jit(lambda x: jlora.mixed_batch(m.apply, base, adapters, rows, x))(m.x)
    for i, row in enumerate(rows):
        xi = m.x[i : i + 1]
        if row is None:
            want = m.apply(base, xi)
        else:
            params, cfg = jlora.select_adapter(base, adapters, row)
            want = jlora.lora(m.apply, cfg)(params, xi)
        close(got[i : i + 1], want, 1e-5)


def test_mixed_batch_takes_traced_indices():
    m, base, adapters = bank("plain_dict")
    idx = jnp.array([1, -1, 0, 0, 1, -1])
    got = jax.jit(lambda i, x: jlora.mixed_batch(m.apply, base, adapters, i, x))(idx, m.x)
    by_name = jlora.mixed_batch(m.apply, base, adapters, ["y", None, "x", "x", "y", None], m.x)
    close(got, by_name)
    bad = jax.jit(lambda i, x: jlora.mixed_batch(m.apply, base, adapters, i, x))(
        jnp.array([0, 5, 0, 0, 0, 0]), m.x
    )
    assert np.isnan(bad[1]).all() and not np.isnan(bad[0]).any()


# ---- errors ------------------------------------------------------------------------------------


def test_errors():
    m, base, adapters = bank("plain_dict")
    lora = adapters["x"].lora
    with pytest.raises(ValueError, match=r"adapter named 'x' already exists; delete_adapter"):
        jlora.add_adapter(adapters, "x", lora, m.config)
    with pytest.raises(TypeError, match=r"adapter names are strings; got 3"):
        jlora.add_adapter(adapters, 3, lora, m.config)
    with pytest.raises(TypeError, match=r"config must be a LoraConfig; got dict"):
        jlora.add_adapter(adapters, "z", lora, {})
    with pytest.raises(ValueError, match=r"holds no adapter leaves; pass the lora half"):
        jlora.add_adapter(adapters, "z", {}, m.config)
    with pytest.raises(KeyError, match=r"no adapter named 'z'; the adapters are \['x', 'y'\]"):
        jlora.delete_adapter(adapters, "z")
    with pytest.raises(KeyError, match=r"select_adapter: no adapter named 'z'"):
        jlora.select_adapter(base, adapters, "z")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="ties"), ValueError, r"method must be one of \('cat', 'linear', 'svd'\)"),
        (dict(method="svd", rank=0), ValueError, r"method='svd'\): rank must be a positive int"),
        (dict(method="cat", rank=4), ValueError, r"rank= only applies to method='svd'"),
        (dict(method="linear"), ValueError, r"same rank at each kernel; at 'mlp/w_in' the ranks"),
        (dict(weights={"q": 1.0}), KeyError, r"no adapter named 'q'"),
        (dict(weights={"x": "1"}), TypeError, r"weight of 'x' must be a number"),
        (dict(weights=[]), TypeError, r"weights must be a non-empty mapping"),
    ],
)
def test_combination_errors(kwargs, error, match):
    _, base, adapters = bank("plain_dict")
    weights = kwargs.pop("weights", {"x": 1.0, "y": 1.0})
    with pytest.raises(error, match=match):
        jlora.combine_adapters(base, adapters, weights, **kwargs)


def test_roles_must_agree():
    _, base, adapters = bank("linen_scan")
    path = r".*/layers/Dense_0/kernel"
    other = dataclasses.replace(adapters["x"].config, axis_rules=[(path, ("in", "in", "out"))])
    lora, _ = jlora.split(jlora.init_lora(jax.random.key(3), base, other))
    two = jlora.add_adapter({"x": adapters["x"]}, "z", lora, other)
    with pytest.raises(ValueError, match=r"adapters 'x' and 'z' lay out kernel .*Dense_0/kernel"):
        jlora.combine_adapters(base, two, {"x": 1.0, "z": 1.0})


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([0, 2, -1, 0, 0, 0], IndexError, r"adapter index 2 in row 1 is out of range: found 2"),
        ([0, -2, 0, 0, 0, 0], IndexError, r"index -2 in row 1 .* must be in \[-1, 1\]"),
        (["x", "q", None, "x", "x", "x"], KeyError, r"row 1 names adapter 'q'"),
        (np.zeros((6, 1), np.int32), TypeError, r"1-D int array"),
        (["x", "y"], ValueError, r"has shape \(6, 10\), but rows name 2 rows"),
    ],
)
def test_mixed_batch_errors(rows, error, match):
    m, base, adapters = bank("plain_dict")
    with pytest.raises(error, match=match):
        jlora.mixed_batch(m.apply, base, adapters, rows, m.x)
    with pytest.raises(ValueError, match=r"no adapters given"):
        jlora.mixed_batch(m.apply, base, {}, [None], m.x[:1])


def test_dora_adapters_mix_by_name_but_do_not_combine():
    m = models()["plain_dict"]
    p = jlora.init_dora(jax.random.key(0), m.params, m.config)
    p = randomize(p, 4)
    p = jax.tree.map_with_path(
        lambda q, x: jnp.abs(x) + 1 if jlora.path_str(q).endswith("_lora_m") else x, p
    )
    lora, base = jlora.split(p)
    bank = jlora.add_adapter({}, "d", lora, m.config)
    rows = ["d", None, "d", "d", None, "d"]
    got = jlora.mixed_batch(m.apply, base, bank, rows, m.x)
    want = m.apply(jlora.merge_params(p, m.config), m.x)
    close(got[0], want[0])
    close(got[1], m.apply(base, m.x[1:2])[0])
    with pytest.raises(ValueError, match=r"combine_adapters: adapter 'd' is DoRA at \['mlp/w_in'"):
        jlora.combine_adapters(base, bank, {"d": 1.0})
    with pytest.raises(ValueError, match=r"mixed_batch with traced indices: adapter 'd' is DoRA"):
        jax.jit(lambda i: jlora.mixed_batch(m.apply, base, bank, i, m.x))(jnp.zeros(6, int))
