"""What targets may select: float kernels of plain trees; integer leaves and Flax boxes refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jlora


@pytest.mark.parametrize(
    ("leaf", "targets", "dtype"),
    [
        (jnp.ones((4, 3), jnp.int32), r".*/kernel", "int32"),
        (jnp.ones((4, 3), jnp.uint8), r".*", "uint8"),
        (jnp.ones((4, 3), bool), lambda path, leaf: leaf.ndim == 2, "bool"),
        (jax.ShapeDtypeStruct((4, 3), jnp.int8), r"d/kernel", "int8"),
    ],
)
def test_integer_and_boolean_kernels_are_refused(leaf, targets, dtype):
    params = {"d": {"kernel": leaf}}
    cfg = jlora.LoraConfig(rank=2, targets=targets)
    match = rf"targets selected 'd/kernel', a {dtype} array of shape \(4, 3\).*exclude"
    with pytest.raises(ValueError, match=match):
        jlora.init_lora(jax.random.key(0), params, cfg)
    with pytest.raises(ValueError, match=match):
        jlora.lora_shardings(params, {"d": {"kernel": None}}, cfg)


def test_integer_leaves_outside_targets_are_left_alone():
    params = {"d": {"kernel": jnp.ones((4, 3), jnp.bfloat16), "ids": jnp.ones((4, 3), jnp.int32)}}
    p = jlora.init_lora(jax.random.key(0), params, jlora.LoraConfig(rank=2))
    assert sorted(p["d"]) == ["ids", "kernel", "kernel_lora_a", "kernel_lora_b"]


def _boxed_dense():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", "tensor"))
    model = nn.Dense(4, kernel_init=init)
    return model, model.init(jax.random.key(0), jnp.ones((2, 8)))


def test_linen_boxed_params_are_refused_with_the_way_to_unbox():
    _, boxed = _boxed_dense()
    with pytest.raises(TypeError, match=r"Partitioned at 'params/kernel'.*flax.linen.meta.unbox"):
        jlora.init_lora(jax.random.key(0), boxed, jlora.LoraConfig(rank=2))


def test_linen_boxed_params_through_the_recipe_the_error_gives():
    model, boxed = _boxed_dense()
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params = nn.meta.unbox(boxed)
    specs = nn.get_partition_spec(boxed)
    cfg = jlora.LoraConfig(rank=2)
    with jax.set_mesh(mesh):
        p = jax.jit(lambda k, t: jlora.init_lora(k, t, cfg, shardings=specs))(
            jax.random.key(0), params
        )
    wanted = jlora.lora_shardings(params, specs, cfg)["params"]
    assert (wanted["kernel_lora_a"], wanted["kernel_lora_b"]) == (
        P("fsdp", None),
        P(None, "tensor"),
    )
    merged = jlora.merge_params(p, cfg)
    np.testing.assert_array_equal(merged["params"]["kernel"], params["params"]["kernel"])
    x = jnp.ones((2, 8))
    np.testing.assert_array_equal(model.apply(merged, x), model.apply(boxed, x))
    back = jlora.combine(*jlora.split(p))
    assert jax.tree.structure(back) == jax.tree.structure(p)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, p)))


class _Sharded(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
        self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)


def test_nnx_state_is_refused_with_the_way_to_pure_dicts():
    auto = (jax.sharding.AxisType.Auto,) * 2
    with jax.set_mesh(jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=auto)):
        _, state = nnx.split(_Sharded(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"Param at 'up/(bias|kernel)'.*nnx.to_pure_dict\(state\)"):
        jlora.init_lora(jax.random.key(0), state, jlora.LoraConfig(rank=2))
