"""A sharded LoRA train step on a (data, fsdp, tensor) mesh, on one or many processes.

The base, a small ``jlora.models.Decoder`` (Llama-style, layers stacked ``[L, in, out]`` for
``nn.scan``), is laid out by regex rules (FSDP over kernel inputs, tensor parallel over
outputs, the layer axis whole); adapters are created inside ``jit`` with shardings derived from
their kernel's; the step runs through ``jlora.value_and_grad`` (factorised, gradients for
adapters only). Nothing here communicates by hand: XLA inserts the collectives that the
shardings imply.

Single process (on CPU, fake 8 devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_train.py --mesh 2,2,2

Multi-process (one line per process; on a TPU pod or GPU cluster drop --coordinator and let
``jax.distributed.initialize()`` find its peers from the environment):
  python examples/sharded_train.py --mesh 2,2,1 --coordinator localhost:1234 --processes 2 --id 0
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.models.decoder import (
    DECODER_AXIS_RULES,
    DECODER_TARGETS,
    Decoder,
    DecoderConfig,
    causal_lm_loss,
)

# Kernels are [L, in, out] (the layer axis unsplit), lm_head [D, V], the embedding [V, D].
RULES = [
    (r".*self_attn/[qkv]_proj/kernel", P(None, "fsdp", "tensor")),
    (r".*self_attn/o_proj/kernel", P(None, "tensor", "fsdp")),
    (r".*mlp/(gate|up)_proj/kernel", P(None, "fsdp", "tensor")),
    (r".*mlp/down_proj/kernel", P(None, "tensor", "fsdp")),
    (r"lm_head/kernel", P("fsdp", "tensor")),
    (r".*embed_tokens/embedding", P(None, "fsdp")),
]
# Every attention and MLP projection; the axis rules give each layer of the stack its own A, B.
LORA = jlora.LoraConfig(rank=4, alpha=8.0, targets=DECODER_TARGETS, axis_rules=DECODER_AXIS_RULES)
BATCH = P(("data", "fsdp"), None)


def model_config(dim: int = 64, layers: int = 2, vocab: int = 256) -> DecoderConfig:
    """A small Llama-style decoder: 4 heads, MLP width ``2 * dim``."""
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
    )


def init_params(model_cfg: DecoderConfig, seed: int = 0):
    """The base's random parameters (the same on every process: a fixed seed)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return Decoder(model_cfg).init(jax.random.key(seed), tokens)["params"]


def make_mesh(shape: tuple[int, int, int], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh: topology-aware over all devices, else the first ones."""
    n = int(np.prod(shape))
    if devices is None and n == jax.device_count():
        auto = (jax.sharding.AxisType.Auto,) * 3
        return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=auto)
    devices = np.asarray(devices if devices is not None else jax.devices())
    return jax.sharding.Mesh(devices[:n].reshape(shape), ("data", "fsdp", "tensor"))


def batches(steps: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """The same token batches on every process and every mesh (fixed seed)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, size=(steps, batch, seq + 1), dtype=np.int32)


def build(mesh, model_cfg: DecoderConfig, mode: str = "lora"):
    """Base params laid out on ``mesh``, adapters created sharded inside jit, the step.

    ``mode="full"`` builds the full fine-tuning step on the same layout, for comparison.
    """
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    params = init_params(model_cfg, seed=0)
    specs = jlora.partition_specs(params, RULES)
    shardings = jax.tree.map(named, specs)
    params = jax.device_put(params, shardings)
    model = Decoder(model_cfg)
    tx = optax.adam(1e-2)

    def loss(q, tokens):
        logits = model.apply({"params": q}, tokens[:, :-1])
        return causal_lm_loss(logits, tokens[:, 1:])

    if mode == "full":

        @jax.jit
        def full_step(params, opt_state, _, tokens):
            value, grads = jax.value_and_grad(loss)(params, tokens)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return params, None, tx.init(params), full_step, named(BATCH)

    p_shardings = jlora.lora_shardings(params, shardings, LORA)
    p = jax.jit(lambda k, t: jlora.init_lora(k, t, LORA), out_shardings=p_shardings)(
        jax.random.key(1), params
    )
    lora, base = jlora.split(p)
    lora_shardings, _ = jlora.split(p_shardings)
    grad_fn = jlora.value_and_grad(loss, LORA)

    @jax.jit
    def step(lora, opt_state, base, tokens):
        value, grads = grad_fn(jlora.combine(lora, base), tokens)
        updates, opt_state = tx.update(grads, opt_state, lora)
        # keep the adapters in their derived layout from step to step
        lora = jax.lax.with_sharding_constraint(optax.apply_updates(lora, updates), lora_shardings)
        return lora, opt_state, value

    return lora, base, tx.init(lora), step, named(BATCH)


def train(mesh, steps: int, model_cfg: DecoderConfig, batch: int = 8, seq: int = 32, mode="lora"):
    """Runs ``steps`` sharded steps; returns the losses, final trainables and the compiled step."""
    lora, base, opt_state, step, batch_sharding = build(mesh, model_cfg, mode)
    data = batches(steps, batch, seq, model_cfg.vocab_size)
    losses = []
    for host_tokens in data:
        tokens = jax.make_array_from_callback(
            host_tokens.shape, batch_sharding, host_tokens.__getitem__
        )
        lora, opt_state, value = step(lora, opt_state, base, tokens)
        losses.append(float(value))
    compiled = step.lower(lora, opt_state, base, tokens).compile()
    return losses, lora, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor sizes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process on CPU)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--save", help="directory for an orbax adapter checkpoint")
    parser.add_argument("--json", help="write losses and checks here")
    args = parser.parse_args()
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.processes, args.id)
    model_cfg = model_config(args.dim, args.layers)
    mesh = make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    losses, lora, compiled = train(mesh, args.steps, model_cfg)
    if args.save:
        jlora.save_checkpoint(os.path.abspath(args.save), args.steps, {"lora": lora})
    report = {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "losses": losses,
        "collective_bytes": sum(c.nbytes for c in jlora.collectives(compiled)),
    }
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
