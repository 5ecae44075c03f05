"""Merge-and-export for inference: fold a trained adapter into the base, save, reload, serve.

After merging, the model is exactly the base architecture again (W' = W + s·A·B), so inference
costs what the base costs and needs no jlora at all. This trains a short adapter on the
built-in model (``builtin:llama_pydoc``, a small ``jlora.models.Decoder`` with a byte-level
tokenizer), saves the adapter (``jlora.save_adapter``), merges, exports the merged model as a
Hugging Face directory (``transformers.AutoModelForCausalLM.from_pretrained`` loads it),
reloads it as a plain ``Decoder``, and checks the logits match the unmerged (factorised) model.

Run: python examples/merge_export.py [--steps N] [--out DIR]
"""

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models import export_merged_hf, load_pretrained
from jlora.models.decoder import DECODER_AXIS_RULES, causal_lm_loss
from jlora.runner.data.text import LMBatches, load_text


def main(steps: int = 30, out: str | None = None) -> dict[str, float]:
    out = out or tempfile.mkdtemp()
    pretrained = load_pretrained("builtin:llama_pydoc")  # model, params, tokenizer, config
    model, base, tokenizer = pretrained.model, pretrained.params, pretrained.tokenizer
    # the layers are stacked [L, in, out]: the axis rules give each layer its own A and B
    cfg = jlora.LoraConfig(
        rank=4, alpha=8.0, targets=r".*(q_proj|v_proj)/kernel", axis_rules=DECODER_AXIS_RULES
    )
    lora, _ = jlora.split(jlora.init_lora(jax.random.key(0), base, cfg))
    ids = np.asarray(tokenizer.encode(load_text("sonnets"), add_special_tokens=False), np.int32)
    data = LMBatches(ids, seq_len=64, batch_size=8, seed=0)

    def loss(params, batch):
        return causal_lm_loss(model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])

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

    # Export: W + s·A·B folded in, the base's config and tokenizer; no adapters left.
    export_merged_hf(os.path.join(out, "merged_hf"), pretrained, adapted, cfg)
    served = load_pretrained(os.path.join(out, "merged_hf"))  # a plain Decoder and its params
    tokens = jnp.asarray(tokenizer.encode("Shall I compare thee to a summer's day?"))[None]
    fast = served.model.apply({"params": served.params}, tokens)  # no jlora at inference
    factorised = jlora.lora(lambda p: model.apply({"params": p}, tokens), cfg)(adapted)
    gap = float(jnp.max(jnp.abs(fast - factorised)))
    merged_bytes = os.path.getsize(os.path.join(out, "merged_hf", "model.safetensors"))
    adapter_bytes = sum(
        os.path.getsize(os.path.join(out, "adapter", f))
        for f in os.listdir(os.path.join(out, "adapter"))
    )
    print(
        f"merged model exported to {out}/merged_hf ({merged_bytes:,} B of weights; adapter "
        f"alone {adapter_bytes:,} B); max |merged - factorised| logit gap {gap:.2e}"
    )
    np.testing.assert_allclose(fast, factorised, atol=1e-3)
    return {"gap": gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    main(args.steps, args.out)
