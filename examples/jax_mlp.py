"""LoRA on a plain-JAX MLP (no Flax): params are a nested dict, the model a function.

Run: python examples/jax_mlp.py [--steps N]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import jlora


def init(key, sizes=(16, 64, 64, 1)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"layer{i}": {
            "w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
            "b": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def mlp(params, x):
    for i in range(len(params)):
        layer = params[f"layer{i}"]
        x = x @ layer["w"] + layer["b"]
        x = jnp.tanh(x) if i < len(params) - 1 else x
    return x


def main(steps: int = 300) -> dict[str, float]:
    kp, kx, kl = jax.random.split(jax.random.key(0), 3)
    params = init(kp)
    x = jax.random.normal(kx, (512, 16))
    y = jnp.cos(x[:, :4].sum(axis=1, keepdims=True))
    loss = lambda p: jnp.mean((mlp(p, x) - y) ** 2)  # noqa: E731

    # Any 2-D leaf can be a kernel: name it by regex.
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=r"layer[01]/w")
    p = jlora.init_lora(kl, params, cfg)
    print(jlora.summary(p))
    tx = jlora.lora_optimizer(optax.adam(1e-2), p)  # whole tree in, frozen base out
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(lambda p: loss(jlora.merge_params(p, cfg)))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    before = float(loss(params))
    for _ in range(steps):
        p, state, _ = step(p, state)
    after = float(loss(jlora.merge_params(p, cfg)))
    unchanged = all(
        bool((a == b).all())
        for a, b in zip(jax.tree.leaves(jlora.split(p)[1]), jax.tree.leaves(params), strict=True)
    )
    print(f"plain JAX MLP: mse {before:.4f} -> {after:.4f}; base weights unchanged: {unchanged}")
    return {"before": before, "after": after, "unchanged": unchanged}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
