"""PiSSA / OLoRA: the model is unchanged at step 0, the factors are principal, and conversion
to a plain rank-2r adapter against the original base keeps outputs."""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import zoo

import jlora

ZOO = ("linen_attention", "linen_scan", "linen_conv", "plain_dict")


@functools.cache
def models():
    return {m.name: m for m in zoo()}


def close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def perturb(p, seed=3, scale=0.05):
    """A stand-in for training: every adapter leaf moves."""

    def fill(path, x):
        if not jlora.is_adapter_path(path):
            return x
        k = jax.random.fold_in(jax.random.key(seed), zlib.crc32(jlora.path_str(path).encode()))
        return x + jax.random.normal(k, x.shape, x.dtype) * scale

    return jax.tree.map_with_path(fill, p)


@pytest.mark.parametrize(
    "name, method",
    [(n, "pissa") for n in ZOO] + [("linen_attention", "olora"), ("linen_scan", "olora")],
)
def test_unchanged_at_step_zero_and_conversion_keeps_outputs(name, method):
    m = models()[name]
    cfg = dataclasses.replace(m.config, use_rslora=name == "linen_scan")
    p = jlora.init_pissa(m.params, cfg, method=method)
    want = m.apply(m.params, m.x)
    # Step 0: merge path and factorised path both give the original model (1e-6).
    close(m.apply(jlora.merge_params(p, cfg), m.x), want, 1e-6)
    close(jax.jit(jlora.lora(m.apply, cfg))(p, m.x), want, 1e-6)
    # The residual really replaced the kernels (B != 0, unlike plain LoRA).
    assert any(np.any(b) for b in jax.tree.leaves(jlora.split(p)[0]))
    # Train, convert, and run the plain adapter against the ORIGINAL base.
    initial = jlora.split(p)[0]
    trained = perturb(p)
    plain = jlora.pissa_to_lora(trained, initial, cfg)
    assert plain.config.rank == 2 * cfg.rank
    trained_out = m.apply(jlora.merge_params(trained, cfg), m.x)
    converted = jlora.combine(plain.lora, m.params)
    close(m.apply(jlora.merge_params(converted, plain.config), m.x), trained_out, 1e-6)
    close(jlora.lora(m.apply, plain.config)(converted, m.x), trained_out, 1e-5)


def test_pissa_takes_the_principal_part_and_olora_an_orthonormal_b():
    w = jax.random.normal(jax.random.key(0), (12, 9))
    cfg = jlora.LoraConfig(rank=3, alpha=6.0)
    p = jlora.init_pissa({"d": {"kernel": w}}, cfg)
    sv = np.linalg.svd(np.asarray(w), compute_uv=False)
    res = np.linalg.svd(np.asarray(p["d"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(res[:6], sv[3:], rtol=1e-5)  # the top 3 went to the adapter
    q = jlora.init_pissa({"d": {"kernel": w}}, cfg, method="olora")
    b = np.asarray(q["d"]["kernel_lora_b"])
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-6)


def test_stacked_kernels_are_factorised_per_layer():
    w = jax.random.normal(jax.random.key(1), (3, 8, 6))
    cfg = jlora.LoraConfig(rank=2, targets="w", axis_rules=[("w", ("stack", "in", "out"))])
    p = jlora.init_pissa({"w": w}, cfg)
    for layer in range(3):
        sv = np.linalg.svd(np.asarray(w[layer]), compute_uv=False)
        res = np.linalg.svd(np.asarray(p["w"][layer]), compute_uv=False)
        np.testing.assert_allclose(res[:4], sv[2:], rtol=1e-5)


def test_errors():
    params = {"d": {"kernel": jnp.ones((4, 3))}}
    cfg = jlora.LoraConfig(rank=2)
    with pytest.raises(ValueError, match=r"method must be one of \('pissa', 'olora'\).*'svd'"):
        jlora.init_pissa(params, cfg, method="svd")
    with pytest.raises(ValueError, match=r"rank 4 for 'd/kernel' exceeds"):
        jlora.init_pissa(params, jlora.LoraConfig(rank=4))
    p = jlora.init_pissa(params, cfg)
    with pytest.raises(ValueError, match=r"already has LoRA adapters"):
        jlora.init_pissa(p, cfg)
    with pytest.raises(ValueError, match=r"not held by a dict"):
        jlora.init_pissa({"d": [jnp.ones((4, 3))]}, jlora.LoraConfig(rank=2, targets="d/0"))
    two = jlora.init_pissa(
        {"d": {"kernel": jnp.ones((4, 3))}, "e": {"kernel": jnp.ones((4, 3))}}, cfg
    )
    only_d = {"d": jlora.split(two)[0]["d"]}
    with pytest.raises(ValueError, match=r"initial adapters cover \['d/kernel'\] but the trained"):
        jlora.pissa_to_lora(two, only_d, cfg)


def test_dora_on_pissa_cannot_be_converted():
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    cfg = jlora.LoraConfig(rank=2)
    p = jlora.add_magnitudes(jlora.init_pissa(params, cfg), cfg)
    # DoRA over PiSSA starts exactly at the model too (m = current norm).
    np.testing.assert_allclose(
        jlora.merge_params(p, cfg)["d"]["kernel"], params["d"]["kernel"], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"pissa_to_lora: \['d/kernel'\] are DoRA kernels"):
        jlora.pissa_to_lora(p, jlora.split(p)[0], cfg)


def test_converted_adapter_round_trips_through_peft_files():
    """PEFT's PiSSA export: the rank-2r adapter against the original base, as PEFT files."""
    import tempfile

    k = jax.random.split(jax.random.key(5), 3)
    base = {
        "fc": {"kernel": jax.random.normal(k[0], (8, 6))},
        "proj": {"kernel": jax.random.normal(k[1], (6, 4))},
    }
    cfg = jlora.LoraConfig(rank=2, alpha=4.0)
    p = jlora.init_pissa(base, cfg)
    trained = perturb(p)
    plain = jlora.pissa_to_lora(trained, jlora.split(p)[0], cfg)
    path = tempfile.mkdtemp()
    jlora.export_peft(path, jlora.combine(plain.lora, base), plain.config, jlora.peft.LLAMA)
    loaded, loaded_cfg = jlora.import_peft(path, base, jlora.peft.LLAMA)

    def f(q):
        return jnp.tanh(jax.random.normal(k[2], (5, 8)) @ q["fc"]["kernel"]) @ q["proj"]["kernel"]

    close(f(jlora.merge_params(loaded, loaded_cfg)), f(jlora.merge_params(trained, cfg)), 1e-6)
