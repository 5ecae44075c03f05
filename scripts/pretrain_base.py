"""Pretrains the built-in Llama-style base model on CPython's ``pydoc_data.topics``.

This reproduces ``jlora/assets/llama_pydoc.safetensors``, the base that ``jlora finetune``
adapts by default (byte-level vocabulary, 0.92M parameters; 1,000 steps of ~0.3 s on 2 idle CPU
cores, about 5 minutes; it took 20 minutes on a machine shared with other jobs):

    python scripts/pretrain_base.py [--steps 1000] [--out jlora/assets/llama_pydoc.safetensors]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
import optax

from jlora.models.llama import Llama, LlamaConfig, init_params, lm_loss
from jlora.models.weights import save_params
from jlora.runner.text import LMBatches, encode, eval_windows, load_text, split_tokens


def main() -> None:
    """Trains the base and writes its safetensors file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="jlora/assets/llama_pydoc.safetensors")
    args = parser.parse_args()

    config = LlamaConfig()
    model = Llama(config)
    train, val = split_tokens(encode(load_text("pydoc")), 0.05)
    batches = LMBatches(train, args.seq, args.batch, args.seed)
    val_x = eval_windows(val, args.seq, 64)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    params = init_params(config, args.seed)
    state = tx.init(params)

    def loss_fn(params, x):
        return lm_loss(model.apply({"params": params}, x[:, :-1]), x[:, 1:])

    @jax.jit
    def step(params, state, x):
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_fn)
    start, losses = time.time(), []
    for i in range(args.steps):
        params, state, loss = step(params, state, batches.batch(i))
        losses.append(float(loss))
        if (i + 1) % 100 == 0 or i + 1 == args.steps:
            val_loss = float(evaluate(params, val_x))
            print(
                f"step {i + 1}/{args.steps}  train {np.mean(losses[-100:]):.3f}  "
                f"val {val_loss:.3f} nats/byte  {time.time() - start:.0f}s",
                flush=True,
            )
    meta = {
        "model": "llama",
        "config": json.dumps(dataclasses.asdict(config)),
        "trained_on": "pydoc_data.topics (byte-level), scripts/pretrain_base.py",
        "train_args": json.dumps(vars(args)),
        "val_loss": f"{val_loss:.4f}",
    }
    save_params(args.out, params, meta)
    print(f"wrote {args.out} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")


if __name__ == "__main__":
    main()
