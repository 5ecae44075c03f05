"""LoRA fine-tune of a Flax Linen MLP on a shifted task: pretrain, adapt, merge.

Run: python examples/linen_finetune.py [--steps N]
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class MLP(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)


def task(key, n, shift):
    x = jax.random.normal(key, (n, 16))
    return x, jnp.sin(x @ jnp.linspace(-1, 1, 16))[:, None] + shift * x[:, :1] ** 2


def fit(loss_fn, params, tx, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, loss = step(params, state)
    return params, float(loss)


def main(steps: int = 300) -> dict[str, float]:
    model = MLP()
    kx, kt, kl = jax.random.split(jax.random.key(0), 3)
    x, y = task(kx, 512, shift=0.0)
    params = model.init(kx, x)
    mse = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)  # noqa: E731
    params, pre = fit(lambda p: mse(p, x, y), params, optax.adam(3e-3), steps)

    x2, y2 = task(kt, 512, shift=0.5)  # the new task the adapter must learn
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=r".*/Dense_[01]/kernel")
    p = jlora.init_lora(kl, params, cfg)
    print(jlora.summary(p))
    before = float(mse(jlora.merge_params(p, cfg), x2, y2))
    p, _ = fit(
        lambda p: mse(jlora.merge_params(p, cfg), x2, y2),
        p,
        jlora.lora_optimizer(optax.adam(1e-2), p),
        steps,
    )
    merged = jlora.merge_params(p, cfg)
    after = float(mse(merged, x2, y2))
    print(f"pretrain loss {pre:.4f}; new task: base {before:.4f} -> LoRA {after:.4f}")
    return {"pretrain": pre, "before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
