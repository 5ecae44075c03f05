"""optimizer_shardings: the optimizer state laid out like the adapters, for fixed out_shardings."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

_EIGHT_DEVICES = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jlora

    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    named = lambda spec: NamedSharding(mesh, spec)
    params = {f"l{i}": {"kernel": jnp.ones((16, 16)) / 16, "bias": jnp.zeros(16)} for i in range(3)}
    specs = {k: {"kernel": named(P("fsdp", "tensor")), "bias": named(P("tensor"))} for k in params}
    cfg = jlora.LoraConfig(rank=4)
    shardings = jlora.lora_shardings(params, specs, cfg)
    p = jax.jit(lambda k, t: jlora.init_lora(k, t, cfg, shardings=specs), out_shardings=shardings)(
        jax.random.key(0), jax.device_put(params, specs))
    x = jax.device_put(jnp.ones((8, 16)), named(P("fsdp", None)))

    def loss(t, x):
        merged = jlora.merge_params(t, cfg)
        for k in sorted(merged):
            x = jnp.tanh(x @ merged[k]["kernel"] + merged[k]["bias"])
        return (x ** 2).mean()

    def run(tx, trainable, tree_shardings, full_tree):
        state_shardings = jlora.optimizer_shardings(tx, trainable, tree_shardings)
        state = jax.jit(tx.init, out_shardings=state_shardings)(trainable)

        def step(t, s, x):
            g = jax.grad(lambda t: loss(full_tree(t), x))(t)
            updates, s = tx.update(g, s, t)
            return optax.apply_updates(t, updates), s

        step = jax.jit(step, out_shardings=(tree_shardings, state_shardings))
        for _ in range(2):
            trainable, state = step(trainable, state, x)
        leaves = jax.tree.leaves(state)
        return {
            "specs": sorted({tuple(l.sharding.spec) for l in leaves if l.ndim}, key=str),
            "count": [tuple(l.sharding.spec) for l in leaves if not l.ndim],
            "count_devices": [len(l.sharding.device_set) for l in leaves if not l.ndim],
            "finite": all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(trainable)),
        }

    lora, base = jlora.split(p)
    lora_shardings, _ = jlora.split(shardings)
    out = {
        "adam": run(optax.adam(1e-2), lora, lora_shardings, lambda t: jlora.combine(t, base)),
        "partitioned": run(jlora.lora_optimizer(optax.adam(1e-2), p), p, shardings, lambda t: t),
    }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["adam", "partitioned"])
def test_a_step_with_fixed_state_shardings_compiles_and_runs(eight_devices, optimizer):
    report = eight_devices[optimizer]
    assert report["finite"]
    # A follows the kernel's input axis, B its output axis; the rank axis is replicated
    assert report["specs"] == [["fsdp", None], [None, "tensor"]]
    assert report["count"] == [[]] and report["count_devices"] == [8]


def test_partition_specs_in_partition_specs_out():
    p = jlora.init_lora(
        jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, jlora.LoraConfig(rank=2)
    )
    specs = {"d": {"kernel": P("x"), "kernel_lora_a": P("x", None), "kernel_lora_b": None}}
    out = jlora.optimizer_shardings(optax.adam(1e-3), p, specs)
    assert out[0].mu["d"] == {"kernel": P("x"), "kernel_lora_a": P("x", None), "kernel_lora_b": P()}
    assert out[0].count == P()


def test_placed_arrays_give_their_own_shardings():
    mesh = jax.make_mesh((1,), ("x",))
    lora = {"a": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P("x")))}
    out = jlora.optimizer_shardings(optax.sgd(1e-3, momentum=0.9), lora)
    assert out[0].trace["a"] == NamedSharding(mesh, P("x"))


def test_mismatched_or_missing_shardings_are_refused():
    lora = {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}
    tx = optax.adam(1e-3)
    with pytest.raises(
        ValueError, match=r"not shaped like params: entries for \['c'\].*none for \['b'\]"
    ):
        jlora.optimizer_shardings(tx, lora, {"a": P(), "c": P()})
    with pytest.raises(TypeError, match=r"the sharding of 'b' is str; expected a NamedSharding"):
        jlora.optimizer_shardings(tx, lora, {"a": P(), "b": "tensor"})
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)
    with pytest.raises(ValueError, match=r"'a' has no sharding; pass shardings"):
        jlora.optimizer_shardings(tx, shapes)
