"""save_checkpoint / restore_checkpoint: training state round trips, keep-last-N, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

CFG = jlora.LoraConfig(rank=2)
X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)


def _params(rank=2):
    base = {"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    return jlora.init_lora(jax.random.key(0), base, jlora.LoraConfig(rank=rank))


def _step(state, tx):
    def loss(p):
        return jnp.sum(jnp.tanh(X @ jlora.merge_params(p, CFG)["d"]["kernel"]) ** 2)

    grads = jax.grad(loss)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    rng, _ = jax.random.split(state["rng"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "rng": rng}


def _state():
    p = _params()
    tx = jlora.lora_optimizer(optax.adam(0.1), p)
    return {"params": p, "opt": tx.init(p), "rng": jax.random.key(7)}, tx


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_continues_exactly(tmp_path):
    state, tx = _state()
    state = _step(state, tx)
    jlora.save_checkpoint(tmp_path, 1, state, metadata={"data_position": 32, "epoch": 0})
    uninterrupted = _step(_step(state, tx), tx)

    restored = jlora.restore_checkpoint(tmp_path, jax.eval_shape(lambda: state))
    assert restored.step == 1 and restored.metadata == {"data_position": 32, "epoch": 0}
    _same(restored.state, state)
    _same(_step(_step(restored.state, tx), tx), uninterrupted)


def test_keep_last_n_and_pick_step(tmp_path):
    for s in range(5):
        jlora.save_checkpoint(tmp_path, s, {"x": jnp.full(2, float(s))}, keep=2)
    assert jlora.checkpoint_steps(tmp_path) == [3, 4]
    r = jlora.restore_checkpoint(tmp_path, {"x": jnp.zeros(2)}, step=3)
    assert r.step == 3 and r.metadata == {}
    np.testing.assert_array_equal(r.state["x"], [3.0, 3.0])


def test_restore_places_with_like_sharding(tmp_path):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    lora, _ = jlora.split(_params())
    jlora.save_checkpoint(tmp_path, 0, lora)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), lora)
    r = jlora.restore_checkpoint(tmp_path, like)
    assert all(x.sharding == sharding for x in jax.tree.leaves(r.state))
    _same(r.state, lora)


def test_bad_step_and_keep(tmp_path):
    with pytest.raises(ValueError, match="step must be an int >= 0; got -1"):
        jlora.save_checkpoint(tmp_path, -1, {"x": jnp.ones(1)})
    with pytest.raises(ValueError, match="keep must be an int >= 1 or None; got 0"):
        jlora.save_checkpoint(tmp_path, 0, {"x": jnp.ones(1)}, keep=0)


def test_step_never_overwritten(tmp_path):
    jlora.save_checkpoint(tmp_path, 3, {"x": jnp.ones(1)})
    with pytest.raises(ValueError, match="step 3 already exists"):
        jlora.save_checkpoint(tmp_path, 3, {"x": jnp.zeros(1)})


def test_restore_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        jlora.restore_checkpoint(tmp_path / "none", {})
    jlora.save_checkpoint(tmp_path, 1, {"x": jnp.ones(1)})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 9 .* found steps \[1\]"):
        jlora.restore_checkpoint(tmp_path, {"x": jnp.ones(1)}, step=9)


def test_restore_like_mismatch(tmp_path):
    lora, _ = jlora.split(_params(rank=2))
    jlora.save_checkpoint(tmp_path, 0, lora)
    other_rank, _ = jlora.split(_params(rank=1))
    with pytest.raises(
        ValueError, match=r"'d/kernel_lora_a' .* shape \(4, 2\), but `like` expects"
    ):
        jlora.restore_checkpoint(tmp_path, other_rank)
    with pytest.raises(ValueError, match="has no leaf 'd/extra'"):
        jlora.restore_checkpoint(tmp_path, {"d": {**lora["d"], "extra": jnp.ones(1)}})
    with pytest.raises(ValueError, match="holds 'd/kernel_lora_b', which `like` lacks"):
        jlora.restore_checkpoint(tmp_path, {"d": {"kernel_lora_a": lora["d"]["kernel_lora_a"]}})
