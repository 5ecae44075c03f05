"""Adapter shardings derived from the kernel's, from every place users keep specs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora


@pytest.mark.parametrize(
    ("spec", "roles", "want_a", "want_b"),
    [
        (P("fsdp", "tensor"), ("in", "out"), P("fsdp", None), P(None, "tensor")),
        (P("fsdp"), ("in", "out"), P("fsdp", None), P(None, None)),  # short specs pad
        (P(), ("in", "out"), P(None, None), P(None, None)),
        # DenseGeneral q/k/v (embed, heads, head_dim) and out (heads, head_dim, embed)
        (P("fsdp", "tensor", None), ("in", "out", "out"), P("fsdp", None), P(None, "tensor", None)),
        (P("tensor", None, "fsdp"), ("in", "in", "out"), P("tensor", None, None), P(None, "fsdp")),
        # Conv (h, w, in, out)
        (P(None, None, "fsdp", "tensor"), ("in", "in", "in", "out"), P(None, None, "fsdp", None),
         P(None, "tensor")),
        # Embed (vocab, features)
        (P("tensor", "fsdp"), ("in", "out"), P("tensor", None), P(None, "fsdp")),
        # nn.scan stack: the layer axis follows the kernel on both factors
        (P("stage", "fsdp", "tensor"), ("stack", "in", "out"), P("stage", "fsdp", None),
         P("stage", None, "tensor")),
        # a stack axis in the middle moves to the front of A and B
        (P(None, ("x", "y"), "z"), ("in", "stack", "out"), P(("x", "y"), None, None),
         P(("x", "y"), None, "z")),
    ],
)  # fmt: skip
def test_derivation_rules(spec, roles, want_a, want_b):
    assert jlora.adapter_specs(spec, roles) == (want_a, want_b)


def test_none_spec_means_replicated():
    assert jlora.adapter_specs(None, ("in", "out")) == (None, None)


def test_named_shardings_keep_their_mesh():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    a, b = jlora.adapter_specs(NamedSharding(mesh, P("fsdp", "tensor")), ("in", "out"))
    assert a == NamedSharding(mesh, P("fsdp", None))
    assert b == NamedSharding(mesh, P(None, "tensor"))


def test_spec_longer_than_the_kernel_is_an_error():
    with pytest.raises(ValueError, match=r"'q' has 3 entries, but the kernel has 2 axes"):
        jlora.adapter_specs(P("a", "b", "c"), ("in", "out"), "q")


def test_lora_shardings_tree_matches_init_lora():
    params = {
        "mlp": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
        "emb": {"embedding": jnp.ones((10, 8))},
    }
    specs = {
        "mlp": {"kernel": P("fsdp", "tensor"), "bias": None},
        "emb": {"embedding": P("tensor", "fsdp")},
    }
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(kernel|embedding)")
    out = jlora.lora_shardings(params, specs, cfg)
    p = jlora.init_lora(jax.random.key(0), params, cfg)
    is_leaf = lambda x: x is None or isinstance(x, P)  # noqa: E731
    assert jax.tree.structure(out, is_leaf=is_leaf) == jax.tree.structure(
        jax.tree.map(lambda _: 0, p), is_leaf=is_leaf
    )
    assert out["emb"]["embedding_lora_a"] == P("tensor", None)
    assert out["mlp"]["kernel_lora_b"] == P(None, "tensor")
    assert out["mlp"]["bias"] is None


def test_missing_and_wrong_entries():
    params = {"mlp": {"kernel": jnp.ones((8, 4))}}
    cfg = jlora.LoraConfig(rank=2)
    with pytest.raises(ValueError, match="no entry for the adapted kernel 'mlp/kernel'"):
        jlora.lora_shardings(params, {"mlp": {}}, cfg)
    with pytest.raises(TypeError, match="sharding of 'mlp/kernel' is str; expected"):
        jlora.lora_shardings(params, {"mlp": {"kernel": "fsdp"}}, cfg)


class _Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(16, kernel_init=init)(x)
        logical = nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "heads", None)
        )
        attn = nn.MultiHeadDotProductAttention(num_heads=2, kernel_init=logical)
        return attn(x[:, None, :])


def test_from_flax_linen_boxed_params_with_logical_rules():
    boxed = _Boxed().init(jax.random.key(0), jnp.ones((2, 8)))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    params = nn.unbox(boxed)
    cfg = jlora.LoraConfig(rank=2, targets=r".*/(Dense_0|query)/kernel")
    out = jlora.lora_shardings(params, specs, cfg)["params"]
    assert out["Dense_0"]["kernel_lora_a"] == P("fsdp", None)
    assert out["Dense_0"]["kernel_lora_b"] == P(None, "tensor")
    q = out["MultiHeadDotProductAttention_0"]["query"]
    assert q["kernel_lora_a"] == P("fsdp", None)
    assert q["kernel_lora_b"] == P(None, "tensor", None)


def test_from_flax_linen_mesh_axis_partitioning():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "tensor"))
    boxed = nn.Dense(4, kernel_init=init).init(jax.random.key(0), jnp.ones((2, 8)))
    specs = nn.get_partition_spec(boxed)
    out = jlora.lora_shardings(nn.unbox(boxed), specs, jlora.LoraConfig(rank=2))["params"]
    assert out["kernel_lora_a"] == P(None, None)
    assert out["kernel_lora_b"] == P(None, "tensor")


class _Sharded(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
        self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)


def test_from_nnx_sharding_metadata():
    auto = (jax.sharding.AxisType.Auto,) * 2
    with jax.set_mesh(jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=auto)):
        _, state = nnx.split(_Sharded(nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    params = nnx.to_pure_dict(state)
    out = jlora.lora_shardings(params, specs, jlora.LoraConfig(rank=2, targets="up/kernel"))
    assert out["up"]["kernel_lora_a"] == P("fsdp", None)
    assert out["up"]["kernel_lora_b"] == P(None, "tensor")


def test_init_lora_creates_adapters_already_sharded():
    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    shard = NamedSharding(mesh, P("fsdp", "tensor"))
    params = {"mlp": {"kernel": jax.device_put(jnp.ones((8, 4)), shard)}}
    cfg = jlora.LoraConfig(rank=2)
    p = jax.jit(lambda k, t: jlora.init_lora(k, t, cfg, shardings={"mlp": {"kernel": shard}}))(
        jax.random.key(0), params
    )
    assert p["mlp"]["kernel_lora_a"].sharding.spec == P("fsdp", None)
    assert p["mlp"]["kernel_lora_b"].sharding.spec == P(None, "tensor")
