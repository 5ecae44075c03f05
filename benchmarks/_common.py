"""What several benchmarks share: a residual GELU MLP as a plain dict, and side-by-side timing."""

import time

import jax
import jax.numpy as jnp
import optax

import jlora


def mlp(d, layers, key):
    """``{"layer{i}": {"up": {"kernel"}, "down": {"kernel"}}}`` with scaled normal weights."""
    ks = jax.random.split(key, 2 * layers)
    return {
        f"layer{i}": {
            "up": {"kernel": jax.random.normal(ks[2 * i], (d, 4 * d)) / d**0.5},
            "down": {"kernel": jax.random.normal(ks[2 * i + 1], (4 * d, d)) / (4 * d) ** 0.5},
        }
        for i in range(layers)
    }


def mlp_apply(p, x):
    for i in range(len(p)):
        layer = p[f"layer{i}"]
        x = x + jax.nn.gelu(x @ layer["up"]["kernel"]) @ layer["down"]["kernel"]
    return x


def interleaved(runs, reps=15):
    """Best time of each ``name: (fn, args)``, timed in turn each round so load hits all alike."""
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, (fn, args) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def stacked_mlp(d, layers, key):
    """:func:`mlp`'s weights stacked by layer, ``{"up": {"kernel": (L, d, 4d)}, "down": ...}``."""
    p = mlp(d, layers, key)
    return jax.tree.map(lambda *ks: jax.numpy.stack(ks), *(p[f"layer{i}"] for i in range(layers)))


def stacked_mlp_apply(p, x):
    """:func:`mlp_apply` as a ``lax.scan`` over the stacked layers (what ``nn.scan`` builds)."""

    def layer(x, w):
        return x + jax.nn.gelu(x @ w["up"]["kernel"]) @ w["down"]["kernel"], None

    return jax.lax.scan(layer, x, p)[0]


def adapter_step(apply, cfg, tx):
    """A jitted train step of the adapters on ``mean(apply(p, x)²)`` through the factorised path."""
    grad = jlora.value_and_grad(lambda p, x: jnp.mean(apply(p, x) ** 2), cfg)

    @jax.jit
    def step(params, state, x):
        value, g = grad(params, x)
        lora, base = jlora.split(params)
        updates, state = tx.update(g, state, lora)
        return jlora.combine(optax.apply_updates(lora, updates), base), state, value

    return step
