"""LoRA+: B factors get the learning rate times the ratio; A and the base are as plain LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

# A 2-D kernel, an N-d attention kernel and a stacked (scanned-layers) kernel.
CFG = jlora.LoraConfig(
    rank=2, targets=r".*kernel", axis_rules=[("stacked/kernel", ("stack", "in", "out"))]
)


def params():
    k = jax.random.split(jax.random.key(0), 3)
    tree = {
        "dense": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jnp.zeros(4)},
        "attn": {"query": {"kernel": jax.random.normal(k[1], (6, 2, 3))}},
        "stacked": {"kernel": jax.random.normal(k[2], (3, 4, 4))},
    }
    return jlora.init_lora(jax.random.key(1), tree, CFG)


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize("make", [lambda: optax.adam(1e-2), lambda: optax.sgd(1e-2, 0.9)])
def test_b_updates_are_ratio_times_plain_and_a_updates_equal(make):
    p = params()
    plain = jlora.lora_optimizer(make(), p)
    plus = jlora.lora_optimizer(make(), p, loraplus_lr_ratio=16.0)
    s_plain, s_plus = plain.init(p), plus.init(p)
    for step in range(3):  # several steps: the states must evolve identically too
        g = random_like(p, step)
        u_plain, s_plain = jax.jit(plain.update)(g, s_plain, p)
        u_plus, s_plus = jax.jit(plus.update)(g, s_plus, p)
    flat = jax.tree.leaves_with_path(jlora.loraplus_labels(p))
    assert sorted(lab for _, lab in flat).count("lora_b") == 3
    updates = zip(flat, jax.tree.leaves(u_plain), jax.tree.leaves(u_plus), strict=True)
    for (path, lab), a, b in updates:
        if lab == "lora_b":
            assert path[-1].key.endswith("_lora_b")
            np.testing.assert_allclose(b, 16.0 * a, rtol=1e-6, atol=1e-12)
        elif lab == "lora_a":
            assert path[-1].key.endswith("_lora_a")
            np.testing.assert_array_equal(b, a)
        else:
            assert not np.any(b)


def test_equals_adam_with_ratio_times_lr_on_b_under_jit():
    p = params()
    g = random_like(p, 5)
    tx = jlora.lora_optimizer(optax.adam(1e-3), p, loraplus_lr_ratio=4)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    ref = optax.adam(4e-3)
    want, _ = ref.update(g, ref.init(p), p)
    for part in (("dense",), ("attn", "query"), ("stacked",)):
        got_b, want_b = u, want
        for k in part:
            got_b, want_b = got_b[k], want_b[k]
        np.testing.assert_allclose(got_b["kernel_lora_b"], want_b["kernel_lora_b"], rtol=1e-6)


@pytest.mark.parametrize(
    "ratio, error, match",
    [
        (0.0, ValueError, r"loraplus_lr_ratio must be > 0.*got 0.0"),
        (-2, ValueError, r"must be > 0"),
        ("16", TypeError, r"loraplus_lr_ratio must be a positive number.*'16'"),
        (True, TypeError, r"must be a positive number"),
    ],
)
def test_bad_ratio_is_refused(ratio, error, match):
    with pytest.raises(error, match=match):
        jlora.lora_optimizer(optax.adam(1e-3), params(), loraplus_lr_ratio=ratio)
