"""QLoRA on a Flax Linen model with nn.scan layers: NF4 base, LoftQ init, train, merge.

Run: python examples/qlora_scan.py [--steps N]

The base is pretrained in float, then quantised to NF4 by ``jlora.init_loftq`` (the adapters
start out carrying the quantisation error), and the adapters are trained on a new task through
``jlora.value_and_grad``: each layer's kernel is dequantised inside the scan, where it is used,
so the step's memory holds the 4.5-bit base rather than the float one.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(x))), None


class Net(nn.Module):
    width: int = 256
    layers: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width)(x)
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x = stack(name="blocks")(x, None)[0]
        return nn.Dense(1)(x)


def task(key, n, shift):
    x = jax.random.normal(key, (n, 16))
    return x, jnp.sin(x @ jnp.linspace(-1, 1, 16))[:, None] + shift * x[:, :1] ** 2


def step_memory_mb(step, *args):
    """Arguments plus temporaries of the compiled step, in MB."""
    m = step.lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20


def main(steps: int = 200) -> dict[str, float]:
    model = Net()
    kx, kt = jax.random.split(jax.random.key(0))
    x, y = task(kx, 512, shift=0.0)
    mse = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)  # noqa: E731
    params = model.init(kx, x)
    tx = optax.adam(3e-3)
    state = tx.init(params)
    pretrain = jax.jit(lambda p, s: _adam_step(jax.value_and_grad(mse), tx, p, s, x, y))
    for _ in range(steps):
        params, state, _ = pretrain(params, state)

    x2, y2 = task(kt, 512, shift=0.5)  # the new task the adapter must learn
    cfg = jlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=r".*/blocks/Dense_\d/kernel",
        axis_rules=[(r".*/blocks/.*", ("stack", "in", "out"))],  # nn.scan's layer axis first
    )
    p = jlora.init_loftq(params, cfg, kind="nf4", block_size=64, iterations=2)
    print(jlora.summary(p))
    grad = jlora.value_and_grad(mse, cfg)  # factorised: x·W_q + s·(x·A)·B, W_q dequantised at use
    lora, base = jlora.split(p)
    tx = optax.adam(2e-3)
    state = tx.init(lora)

    @jax.jit
    def step(lora, state, base):
        return _adam_step(lambda a: grad(jlora.combine(a, base), x2, y2), tx, lora, state)

    float_base = jlora.split(jlora.init_lora(jax.random.key(1), params, cfg))[1]
    memory = {"nf4": step_memory_mb(step, lora, state, base)}
    memory["float"] = step_memory_mb(step, lora, state, float_base)

    before = float(grad(p, x2, y2)[0])
    for _ in range(steps):
        lora, state, _ = step(lora, state, base)
    p = jlora.combine(lora, base)
    after = float(grad(p, x2, y2)[0])
    merged = jlora.merge_quantized(p, cfg, store="float")  # the trained model, dense in float
    gap = float(jnp.abs(model.apply(merged, x2) - jlora.lora(model.apply, cfg)(p, x2)).max())
    print(
        f"new task on the NF4 base: {before:.2e} -> {after:.2e}; train step args+temp "
        f"{memory['nf4']:.2f} MB (float base: {memory['float']:.2f} MB); merged vs unmerged "
        f"max gap {gap:.1e}"
    )
    return {"before": before, "after": after, "gap": gap, **memory}


def _adam_step(value_and_grad, tx, params, state, *args):
    loss, grads = value_and_grad(params, *args)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
