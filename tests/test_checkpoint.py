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


_SHARDED_SCRIPT = r"""
import os, sys, tempfile
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import jlora

mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
mesh2 = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
cfg = jlora.LoraConfig(rank=2)
base = {"d": {"kernel": jnp.arange(64.0).reshape(8, 8)}}
specs = {"d": {"kernel": NamedSharding(mesh, P(None, "model"))}}
base = jax.device_put(base, specs)
params = jlora.init_lora(jax.random.key(0), base, cfg)
params = jax.tree.map_with_path(lambda p, x: x + 1.0 if jlora.is_adapter_path(p) else x, params)
lora, _ = jlora.split(params)
lora = jax.device_put(lora, {"d": {"kernel_lora_a": NamedSharding(mesh, P()),
                                   "kernel_lora_b": NamedSharding(mesh, P(None, "model"))}})
tx = optax.adam(1e-2)
state = {"lora": lora, "opt": tx.init(lora), "rng": jax.random.key(1)}
d = tempfile.mkdtemp()
jlora.save_checkpoint(d, 5, state, metadata={"pos": 3})

# restore onto another mesh layout
to = NamedSharding(mesh2, P("data", "model"))
rep = NamedSharding(mesh2, P())
like = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=to if x.ndim == 2 else rep), state
)
r = jlora.restore_checkpoint(d, like)
b = r.state["lora"]["d"]["kernel_lora_b"]
assert b.sharding == to, b.sharding
np.testing.assert_array_equal(np.asarray(b), np.asarray(lora["d"]["kernel_lora_b"]))
assert r.metadata == {"pos": 3}

# jlora adapter files from and onto sharded trees
jlora.save_adapter(os.path.join(d, "ad"), params, cfg)
loaded, _ = jlora.load_adapter(os.path.join(d, "ad"), base)
assert loaded["d"]["kernel_lora_b"].sharding == NamedSharding(mesh, P(None, "model"))
np.testing.assert_array_equal(np.asarray(loaded["d"]["kernel_lora_b"]),
                              np.asarray(params["d"]["kernel_lora_b"]))
print("OK", len(jax.devices()))
"""


def test_sharded_state_on_four_devices(tmp_path):
    """Sharded save, restore onto another mesh, and adapter files, in a 4-device process."""
    import subprocess
    import sys

    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


def test_python_scalars_in_state(tmp_path):
    jlora.save_checkpoint(tmp_path, 1, {"w": jnp.ones(2), "position": 5, "lr": np.float32(0.5)})
    r = jlora.restore_checkpoint(tmp_path, {"w": jnp.ones(2), "position": 0, "lr": np.float32(0)})
    assert int(r.state["position"]) == 5 and float(r.state["lr"]) == 0.5


def flip_bytes(step_dir):
    """Flips 16 bytes in the middle of every data file orbax wrote for a step."""
    files = list(step_dir.glob("state/**/d/*"))
    assert files
    for path in files:
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))


def _checksums_file(directory, step):
    import os

    return os.path.join(directory, str(step), "checksums", "metadata")


def test_values_that_differ_from_their_checksum_are_refused(tmp_path):
    import json

    jlora.save_checkpoint(tmp_path, 1, {"x": jnp.arange(4.0), "rng": jax.random.key(3)})
    path = _checksums_file(tmp_path, 1)
    with open(path) as f:
        saved = json.load(f)
    assert set(saved["sha256"]) == {"x", "rng"}
    saved["sha256"]["x"] = "0" * 64  # as if the data files had changed under it
    with open(path, "w") as f:
        json.dump(saved, f)
    like = {"x": jnp.zeros(4), "rng": jax.random.key(0)}
    with pytest.raises(ValueError, match=r"step 1 of .* is corrupted: the values of 'x' do not"):
        jlora.restore_checkpoint(tmp_path, like)
    r = jlora.restore_checkpoint(tmp_path, like, verify=False)
    np.testing.assert_array_equal(r.state["x"], np.arange(4.0))


def test_flipped_bytes_in_the_data_files_are_refused(tmp_path):
    jlora.save_checkpoint(tmp_path, 1, {"x": jnp.linspace(0.0, 1.0, 4096)})
    flip_bytes(tmp_path / "1")
    # Caught from the files' checksums, before orbax reads a damaged chunk.
    with pytest.raises(ValueError, match=r"step 1 of .* is corrupted: its file 'state/.*' differs"):
        jlora.restore_checkpoint(tmp_path, {"x": jnp.zeros(4096)})


def test_damaged_files_without_file_checksums_are_still_refused(tmp_path):
    jlora.save_checkpoint(tmp_path, 1, {"x": jnp.linspace(0.0, 1.0, 4096)})
    (tmp_path / "1" / "files.sha256.json").unlink()  # as a multi-process save leaves it
    flip_bytes(tmp_path / "1")
    with pytest.raises(ValueError, match=r"step 1 of .* is corrupted"):
        jlora.restore_checkpoint(tmp_path, {"x": jnp.zeros(4096)})


def test_a_missing_state_file_is_refused(tmp_path):
    jlora.save_checkpoint(tmp_path, 1, {"x": jnp.arange(8.0)})
    victim = next((tmp_path / "1").glob("state/**/d/*"))
    victim.unlink()
    with pytest.raises(ValueError, match=r"is corrupted: its file 'state/.*' is missing"):
        jlora.restore_checkpoint(tmp_path, {"x": jnp.zeros(8)})


def test_checkpoints_saved_without_checksums_still_restore(tmp_path):
    import shutil

    jlora.save_checkpoint(tmp_path, 2, {"x": jnp.ones(3)})
    shutil.rmtree(tmp_path / "2" / "checksums")  # as saved before checksums existed
    r = jlora.restore_checkpoint(tmp_path, {"x": jnp.zeros(3)})
    np.testing.assert_array_equal(r.state["x"], np.ones(3))
