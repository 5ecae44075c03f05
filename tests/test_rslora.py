"""rsLoRA: scale alpha/sqrt(r), rank and alpha patterns resolved independently per path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

CFG = jlora.LoraConfig(
    rank=4,
    alpha=8.0,
    use_rslora=True,
    targets=r".*kernel",
    rank_pattern={r"attn/.*": 2},  # attn: rank 2, default alpha
    alpha_pattern={r"stacked/.*": 3.0},  # stacked: default rank, alpha 3
    axis_rules=[("stacked/kernel", ("stack", "in", "out"))],
)
# (rank, alpha) each path must resolve to: the two patterns never borrow from each other.
WANT = {"dense/kernel": (4, 8.0), "attn/query/kernel": (2, 8.0), "stacked/kernel": (4, 3.0)}


def base_params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (6, 4)) / 2, "bias": jnp.zeros(4)},
        "attn": {"query": {"kernel": jax.random.normal(k[1], (6, 2, 3)) / 2}},
        "stacked": {"kernel": jax.random.normal(k[2], (3, 4, 4)) / 2},
    }


def adapted(cfg=CFG):
    p = jlora.init_lora(jax.random.key(1), base_params(), cfg)
    return jax.tree.map_with_path(
        lambda q, x: x + 0.3 if q[-1].key.endswith("_lora_b") else x, p
    )  # B != 0


def apply(p, x):
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    q = jnp.einsum("bi,ihd->bhd", x, p["attn"]["query"]["kernel"]).reshape(x.shape[0], -1)
    h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stacked"]["kernel"])[0]
    return jnp.concatenate([h, q], axis=-1)


X = jax.random.normal(jax.random.key(2), (5, 6))


def reference_merge(p):
    """W + alpha/sqrt(r)·A·B computed by hand in float64, per kernel layout."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), base_params())
    d, a = p["dense"], p["attn"]["query"]
    s = WANT
    out["dense"]["kernel"] += (
        (8.0 / math.sqrt(4)) * np.asarray(d["kernel_lora_a"]) @ np.asarray(d["kernel_lora_b"])
    )
    out["attn"]["query"]["kernel"] += (s["attn/query/kernel"][1] / math.sqrt(2)) * np.einsum(
        "ir,rhd->ihd", np.asarray(a["kernel_lora_a"]), np.asarray(a["kernel_lora_b"])
    )
    st = p["stacked"]
    out["stacked"]["kernel"] += (3.0 / math.sqrt(4)) * np.einsum(
        "lir,lro->lio", np.asarray(st["kernel_lora_a"]), np.asarray(st["kernel_lora_b"])
    )
    return out


def test_rank_alpha_and_scale_resolve_independently():
    for path, (rank, alpha) in WANT.items():
        assert CFG.rank_for(path) == rank and CFG.alpha_for(path) == alpha
        assert CFG.scale_for(path) == pytest.approx(alpha / math.sqrt(rank))
        plain = jlora.LoraConfig(**{**CFG.to_dict(), "use_rslora": False})
        assert plain.scale_for(path) == pytest.approx(alpha / rank)
    p = adapted()
    assert p["attn"]["query"]["kernel_lora_a"].shape == (6, 2)
    assert p["stacked"]["kernel_lora_b"].shape == (3, 4, 4)


def test_merge_path_uses_alpha_over_sqrt_rank(maybe_jit):
    p = adapted()
    merged = maybe_jit(jlora.merge_params, static_argnums=1)(p, CFG)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
        merged,
        reference_merge(p),
    )


def test_factorised_path_equals_merge_and_reference():
    p = adapted()
    got = jax.jit(jlora.lora(apply, CFG))(p, X)
    np.testing.assert_allclose(got, apply(jlora.merge_params(p, CFG), X), rtol=1e-5, atol=1e-6)
    ref = apply(jax.tree.map(jnp.asarray, reference_merge(p)), X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rslora_delta_is_sqrt_rank_times_plain():
    p = adapted()
    plain_cfg = jlora.LoraConfig(**{**CFG.to_dict(), "use_rslora": False})
    base = base_params()
    d_rs = jax.tree.map(jnp.subtract, jlora.merge_params(p, CFG), base)
    d_plain = jax.tree.map(jnp.subtract, jlora.merge_params(p, plain_cfg), base)
    for part, rank in ((("dense",), 4), (("attn", "query"), 2), (("stacked",), 4)):
        a, b = d_rs, d_plain
        for k in part:
            a, b = a[k], b[k]
        np.testing.assert_allclose(a["kernel"], math.sqrt(rank) * b["kernel"], rtol=1e-4, atol=1e-6)
