"""The LoRA idea in numbers: a 1000x10000 layer adapted at rank 10.

Full fine-tuning this layer trains 10,000,000 weights. LoRA freezes W and trains A (1000x10)
and B (10x10000): 110,000 weights, 1.1%. The update s·A·B has rank <= 10, and when the change
the task needs is itself low-rank, LoRA can learn it exactly. Here the "new task" is the base
layer plus a hidden rank-10 change; LoRA drives the error to near zero while W stays frozen.

Run: python examples/lora_article.py [--steps N]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import jlora


def main(steps: int = 200, d_in: int = 1000, d_out: int = 10000, rank: int = 10) -> dict:
    kw, ku, kv, kx, kl = jax.random.split(jax.random.key(0), 5)
    params = {"layer": {"kernel": jax.random.normal(kw, (d_in, d_out)) / jnp.sqrt(d_in)}}
    # The change the new task needs: rank 10, hidden from the learner.
    change = jax.random.normal(ku, (d_in, rank)) @ jax.random.normal(kv, (rank, d_out)) / d_in
    x = jax.random.normal(kx, (256, d_in))
    target = x @ (params["layer"]["kernel"] + change)

    cfg = jlora.LoraConfig(rank=rank, alpha=float(rank), targets=r"layer/kernel")
    p = jlora.init_lora(kl, params, cfg)
    print(jlora.summary(p))
    lora, base = jlora.split(p)

    def loss(params):
        return jnp.mean((x @ params["layer"]["kernel"] - target) ** 2)

    tx = optax.adam(1e-2)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        value, g = jax.value_and_grad(lambda a: jlora.lora(loss, cfg)(jlora.combine(a, base)))(lora)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(lora, updates), opt, value

    first = float(loss(params))
    for _ in range(steps):
        lora, opt, _ = step(lora, opt)
    last = float(loss(jlora.merge_params(jlora.combine(lora, base), cfg)))
    trainable = sum(x.size for x in jax.tree.leaves(lora))
    print(
        f"{d_in}x{d_out} layer: {d_in * d_out:,} weights, LoRA r={rank} trains {trainable:,} "
        f"({100 * trainable / (d_in * d_out):.1f}%); mse to the new task {first:.4f} -> {last:.6f}"
    )
    return {"trainable": trainable, "first": first, "last": last}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
