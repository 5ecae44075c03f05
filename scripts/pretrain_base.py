"""Pretrains the built-in base model, ``builtin:llama_pydoc``, on CPython's ``pydoc_data.topics``.

The base is a small configuration of :class:`jlora.models.Decoder` (:data:`CONFIG`: 4 layers,
width 128, 0.92M parameters) with a byte-level vocabulary (:func:`jlora.models.formats.tokenizer.
byte_level`), written as a Hugging Face model directory: ``config.json``, ``model.safetensors``
and ``tokenizer.json``, which ``jlora finetune`` adapts by default and ``transformers`` loads.
1,000 steps of 32 x 128 bytes take about 5 minutes on 2 idle CPU cores:

    python scripts/pretrain_base.py [--steps 1000] [--out jlora/assets/models/llama_pydoc]

The shipped weights were trained by this recipe (AdamW, cosine schedule, seed 0; held-out loss
1.224 nats/byte) when the built-in model had its own implementation with interleaved rotary
pairs, and were carried over to the decoder exactly: their query/key output features reordered
as ``rotate_half`` pairs them (logits equal to 2e-5).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.models.decoder import Decoder, DecoderConfig, causal_lm_loss
from jlora.models.formats.tokenizer import byte_level
from jlora.models.pretrained import save_pretrained
from jlora.runner.data.text import LMBatches, eval_windows, load_text, split_tokens

CONFIG = DecoderConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)


def main() -> None:
    """Trains the base and writes its model directory."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="jlora/assets/models/llama_pydoc")
    args = parser.parse_args()

    model, tokenizer = Decoder(CONFIG), byte_level()
    ids = np.asarray(tokenizer.encode(load_text("pydoc")), np.int32)
    train, val = split_tokens(ids, 0.05)
    batches = LMBatches(train, args.seq, args.batch, args.seed)
    val_x = eval_windows(val, args.seq, 64)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(args.seed), tokens)["params"]
    state = tx.init(params)

    def loss_fn(params, x):
        return causal_lm_loss(model.apply({"params": params}, x[:, :-1]), x[:, 1:])

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
    save_pretrained(args.out, (CONFIG, params, tokenizer))
    print(f"wrote {args.out} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")


if __name__ == "__main__":
    main()
