"""Merge-and-export for inference: fold a trained adapter into the base, save, reload, serve.

After merging, the model is exactly the base architecture again (W' = W + s·A·B), so inference
costs what the base costs and needs no jlora at all. This trains a short adapter on the
built-in Llama base, saves the adapter (`jlora.save_adapter`), merges, exports the merged weights
as one safetensors file, reloads them into a plain `Llama`, and checks the logits match the
unmerged (factorised) model.

Run: python examples/merge_export.py [--steps N] [--out DIR]
"""

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.llama import Llama, LlamaConfig, lm_loss
from jlora.models.weights import load_params, save_params
from jlora.runner.lm import weights_path
from jlora.runner.text import LMBatches, encode, load_text


def main(steps: int = 30, out: str | None = None) -> dict[str, float]:
    out = out or tempfile.mkdtemp()
    base, meta = load_params(weights_path("builtin:llama_pydoc"))
    model = Llama(LlamaConfig(**json.loads(meta["config"])))
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=r"layer_\d+/attn/(query|value)/kernel")
    lora, _ = jlora.split(jlora.init_lora(jax.random.key(0), base, cfg))
    data = LMBatches(encode(load_text("sonnets")), seq_len=64, batch_size=8, seed=0)

    def loss(params, batch):
        return lm_loss(model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])

    tx = optax.adam(3e-3)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt, batch):
        value, g = jax.value_and_grad(
            lambda a: jlora.lora(loss, cfg)(jlora.combine(a, base), batch)
        )(lora)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(lora, updates), opt, value

    for i in range(steps):
        lora, opt, _ = step(lora, opt, data.batch(i))
    adapted = jlora.combine(lora, base)
    jlora.save_adapter(os.path.join(out, "adapter"), adapted, cfg)  # adapter-sized files

    # Export: merged weights, the base's structure and metadata; no adapters left.
    merged = jlora.merge_params(adapted, cfg)
    save_params(os.path.join(out, "merged.safetensors"), merged, meta)
    served, _ = load_params(os.path.join(out, "merged.safetensors"))
    tokens = jnp.asarray(encode("Shall I compare thee to a summer's day?"))[None]
    fast = model.apply({"params": served}, tokens)  # plain model: no jlora at inference
    factorised = jlora.lora(lambda p: model.apply({"params": p}, tokens), cfg)(adapted)
    gap = float(jnp.max(jnp.abs(fast - factorised)))
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in ("merged.safetensors",)}
    adapter_bytes = sum(
        os.path.getsize(os.path.join(out, "adapter", f))
        for f in os.listdir(os.path.join(out, "adapter"))
    )
    print(
        f"merged model exported to {out}/merged.safetensors ({sizes['merged.safetensors']:,} B; "
        f"adapter alone {adapter_bytes:,} B); max |merged - factorised| logit gap {gap:.2e}"
    )
    np.testing.assert_allclose(fast, factorised, atol=1e-3)
    return {"gap": gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.steps, args.out)
