"""A zoo of real parameter trees that every public function is run over.

Each entry is a ``Model``: its params, a LoRA config that fits it, a pure ``apply(params, x)``
and an input. The trees come from real Flax Linen / NNX modules where possible, so the paths,
containers and kernel layouts are the ones users have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jlora


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    params: Any
    config: jlora.LoraConfig
    apply: Callable[[Any, jax.Array], jax.Array]
    x: jax.Array


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(8)(x)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x, x)


class _Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Conv(8, (3, 3), strides=2)(x)


class _Embed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(6)(nn.Embed(50, 16)(tokens))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(x, x)
        return x + nn.Dense(x.shape[-1])(nn.gelu(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="layers")(x, None)[0]


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(12, 24, rngs=rngs)
        self.down = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _linen(name, module, x, config) -> Model:
    params = module.init(jax.random.key(1), x)
    return Model(name, params, config, module.apply, x)


def _nnx() -> Model:
    graphdef, state = nnx.split(_NnxMLP(nnx.Rngs(1)))
    params = nnx.to_pure_dict(state)

    def apply(pure: Any, x: jax.Array) -> jax.Array:
        abstract = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(abstract, pure)
        return nnx.merge(graphdef, abstract)(x)

    x = jax.random.normal(jax.random.key(2), (4, 12))
    return Model("nnx_mlp", params, jlora.LoraConfig(rank=3, alpha=6.0), apply, x)


def _plain() -> Model:
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    params = {
        "mlp": {
            "w_in": jax.random.normal(k1, (10, 20)) / 3,
            "w_out": jax.random.normal(k2, (20, 10)) / 4,
            "scale": jnp.ones(10),
        }
    }

    def apply(p: Any, x: jax.Array) -> jax.Array:
        m = p["mlp"]
        return jnp.tanh(x @ m["w_in"]) @ m["w_out"] * m["scale"]

    cfg = jlora.LoraConfig(rank=4, alpha=4.0, targets=r"mlp/w_(in|out)")
    return Model("plain_dict", params, cfg, apply, jax.random.normal(k3, (6, 10)))


def zoo() -> list[Model]:
    """Every model of the zoo, freshly built."""
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (3, 7), 0, 50)
    return [
        _linen("linen_mlp", _MLP(), jnp.ones((4, 16)), jlora.LoraConfig(rank=4, alpha=8.0)),
        _linen(
            "linen_attention",
            _Attention(),
            jax.random.normal(key, (2, 5, 24)),
            jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*/(query|key|value|out)/kernel"),
        ),
        _linen(
            "linen_conv",
            _Conv(),
            jax.random.normal(key, (2, 9, 9, 3)),
            jlora.LoraConfig(rank=2, alpha=4.0, targets=r".*/Conv_\d/kernel"),
        ),
        _linen(
            "linen_embed",
            _Embed(),
            tokens,
            jlora.LoraConfig(rank=4, alpha=4.0, targets=r".*/(embedding|kernel)"),
        ),
        _linen(
            "linen_scan",
            _Scanned(),
            jax.random.normal(key, (2, 5, 16)),
            jlora.LoraConfig(
                rank=2,
                alpha=4.0,
                targets=r".*/kernel",
                axis_rules=[(r".*/layers/Dense_0/kernel", ("stack", "in", "out"))],
            ),
        ),
        _nnx(),
        _plain(),
    ]


ZOO_NAMES = [m.name for m in zoo()]


def model(name: str) -> Model:
    """The zoo model called ``name``."""
    return next(m for m in zoo() if m.name == name)
