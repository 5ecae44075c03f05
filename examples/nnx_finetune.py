"""LoRA fine-tune of a Flax NNX model through its functional API: split, adapt, train, merge back.

NNX modules hold their parameters as state; `nnx.split` + `nnx.to_pure_dict` turn that state
into a plain nested dict, which is what jlora works on. After training, the merged dict goes
back into the module with `nnx.replace_by_pure_dict` + `nnx.merge`.

Run: python examples/nnx_finetune.py [--steps N]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jlora


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 64, rngs=rngs)
        self.out = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def main(steps: int = 200) -> dict[str, float]:
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)  # {"hidden": {"kernel": ..., "bias": ...}, "out": {...}}

    def apply(params, x):
        st = nnx.split(model)[1]  # a fresh state of the same structure
        nnx.replace_by_pure_dict(st, params)
        return nnx.merge(graphdef, st)(x)

    x = jax.random.normal(jax.random.key(1), (256, 8))
    y = jnp.sin(x.sum(axis=1, keepdims=True))  # the new task
    mse = lambda p: jnp.mean((apply(p, x) - y) ** 2)  # noqa: E731

    cfg = jlora.LoraConfig(
        rank=4, alpha=8.0, targets=r"(hidden|out)/kernel", rank_pattern={"out/kernel": 1}
    )
    p = jlora.init_lora(jax.random.key(2), params, cfg)
    print(jlora.summary(p))
    lora, base = jlora.split(p)
    tx = optax.adam(1e-2)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        # Factorised: x·W + s·(x·A)·B; gradients for the adapters only.
        loss, g = jax.value_and_grad(lambda a: jlora.lora(mse, cfg)(jlora.combine(a, base)))(lora)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(lora, updates), opt, loss

    before = float(mse(params))
    for _ in range(steps):
        lora, opt, _ = step(lora, opt)
    merged = jlora.merge_params(jlora.combine(lora, base), cfg)
    # Back into an NNX module: same structure as the original state, adapters folded in.
    state = nnx.split(model)[1]
    nnx.replace_by_pure_dict(state, merged)
    tuned = nnx.merge(graphdef, state)
    after = float(jnp.mean((tuned(x) - y) ** 2))
    print(f"NNX model on the new task: base mse {before:.4f} -> LoRA mse {after:.4f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
