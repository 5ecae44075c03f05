"""One case of ``llama_step.py`` in this process: a model's train step, compiled, fitted, timed.

A case is a model shape (``MODELS``) and a method (``METHODS``): the LoRA step (rank r on all
seven projections, a bf16 base, f32 adapters and Adam state, through ``jlora.value_and_grad``
as the runner's ``Supervised`` objective runs ``jlora.lora``), QLoRA (the same over an NF4
base, ``jlora.quantize``), full fine-tuning (bf16 weights, f32 Adam state: the update is
computed in f32 and rounded onto the bf16 weights), and the limit (forward plus backward to
the embedding output with every weight frozen: no weight gradient at all, the floor a LoRA
step approaches). Steps are ``real_model.steps``; the train steps donate what they update.

The step is first compiled from abstract shapes, reading no weights: when XLA's memory
analysis says it needs more than the device holds, the batch is halved (down to 1) and the
case reports what it would need instead of running out of memory. Only then are random
weights made, on the device, leaf by leaf (stacked layers one layer at a time, an NF4 base
quantised as it is made), so no f32 copy of a model ever exists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _common import carried
from real_model import split_adapted, steps, token_loss

import jlora
from jlora.models.decoder import DECODER_AXIS_RULES, DECODER_TARGETS, Decoder, DecoderConfig

GB = 1e9
#: name -> (label, DecoderConfig shape fields): Llama-3.2-1B and Llama-3.1-8B, and two tiny
#: stand-ins with their layouts (tied and untied head) for tests on a CPU.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "1b": ("Llama-3.2-1B shapes", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    "8b": ("Llama-3.1-8B shapes", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "tiny": ("tiny, tied (1B's layout)", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "tiny-untied": ("tiny, untied (8B's layout)", dict(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}  # fmt: skip
METHODS = ("full", "lora", "qlora", "limit")
#: (substring of ``device.device_kind``, dense bf16 FLOP/s); the first that matches wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)  # fmt: skip
OOM_WORDS = ("resource_exhausted", "out of memory", "oom when allocating")


def peak_flops(kind: str) -> float | None:
    """Dense bf16 FLOP/s of a device kind (``jax.Device.device_kind``), or ``None``."""
    return next((peak for name, peak in PEAK_BF16 if name.lower() in kind.lower()), None)


def decoder_config(model: str, seq: int, remat: str, attention: str | None) -> DecoderConfig:
    """The model's shape in bf16 (weights and compute), layers scanned, with the options.

    Raises:
      SystemExit: ``attention`` given but this tree's ``DecoderConfig`` has no such field.
    """
    options: dict[str, Any] = {"remat": remat}
    if attention:
        if "attention" not in {f.name for f in dataclasses.fields(DecoderConfig)}:
            raise SystemExit(f"--attention {attention}: this DecoderConfig has no attention field")
        options["attention"] = attention
    return DecoderConfig(
        **MODELS[model][1],
        rope_theta=500000.0,
        max_position_embeddings=max(seq, 8),
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        scan_layers=True,
        **options,
    )


def adam_f32(lr: float) -> optax.GradientTransformation:
    """Adam whose state and update are float32 whatever the parameters' dtype."""
    inner = optax.adam(lr)

    def f32(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    return optax.GradientTransformation(
        lambda params: inner.init(f32(params)),
        lambda grads, state, params=None: inner.update(f32(grads), state),
    )


def matmul_params(c: DecoderConfig) -> dict[str, int]:
    """Weights each token multiplies by: per layer, the head; and all parameters."""
    d, f, h, kv, hd = (c.hidden_size, c.intermediate_size, c.num_attention_heads,
                       c.num_key_value_heads, c.head_dim)  # fmt: skip
    layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    head = d * c.vocab_size
    total = c.num_hidden_layers * (layer + 2 * d) + head * (1 if c.tie_word_embeddings else 2) + d
    return {"matmul": c.num_hidden_layers * layer + head, "total": total}


def flops_per_token(c: DecoderConfig, seq: int, method: str, lora_params: int) -> float:
    """Model FLOPs per token of a train step (the formula ``FORMULA`` states)."""
    n = matmul_params(c)["matmul"]
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    if method == "full":
        return 6 * n + attention
    return 4 * n + attention + (6 * lora_params if method != "limit" else 0)


FORMULA = (
    "model FLOPs per token: full FT 6·N + A, LoRA and QLoRA 4·N + 6·N_lora + A, the limit "
    "4·N + A, where N is the weights a token is multiplied by (every layer's projections and "
    "the head, not the embedding lookup), N_lora the adapters' parameters, and A = 6·L·H·hd·S "
    "causal attention (QKᵀ and PV over S/2 keys on average, forward and backward); the frozen "
    "base's weight gradients (2·N) are not computed, rematerialised forwards are not counted"
)


def abstract_params(model: Decoder, cfg: jlora.LoraConfig, quantize: bool) -> Any:
    """The parameters' shapes (an NF4 base's ``Quantized`` nodes included), reading nothing."""
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    if quantize:
        params = jax.eval_shape(lambda p: jlora.quantize(p, cfg, kind="nf4"), params)
    return params


def _make(key: jax.Array, like: Any, ones: bool) -> Any:
    """One array of ``like``'s shape: ones, or N(0, 0.02²); for an NF4 kernel its codes, scales."""
    if ones:
        return jnp.ones(like.shape, like.dtype)
    w = (0.02 * jax.random.normal(key, like.shape, jnp.float32)).astype(like.dtype)
    if not jlora.is_quantized(like):
        return w
    q = jlora.quantize({"w": w}, "w", kind=like.kind, block_size=like.block_size)["w"]
    return q.codes, q.scales


@functools.partial(jax.jit, static_argnums=(0, 2, 3))  # one compile per distinct leaf shape
def _random_leaf(like: Any, key: jax.Array, ones: bool, stacked: bool) -> Any:
    """:func:`_make` of a whole leaf; a stacked one a layer at a time (one layer's temporaries)."""
    if stacked:
        layer = (
            dataclasses.replace(like, shape=like.shape[1:])
            if jlora.is_quantized(like)
            else jax.ShapeDtypeStruct(like.shape[1:], like.dtype)
        )
        got = jax.lax.map(lambda k: _make(k, layer, ones), jax.random.split(key, like.shape[0]))
    else:
        got = _make(key, like, ones)
    if not jlora.is_quantized(like):
        return got
    codes, scales = got  # a kernel is quantised flat in its layout: a layer's blocks adjoin
    return dataclasses.replace(
        like, codes=codes.reshape(-1, codes.shape[-1]), scales=scales.reshape(-1)
    )


def random_params(abstract: Any, key: jax.Array) -> Any:
    """Random weights of ``abstract``'s shapes on the device, one jitted leaf at a time."""
    leaves, treedef = jax.tree.flatten_with_path(abstract, is_leaf=jlora.is_quantized)
    out = []
    for i, (path, shape) in enumerate(leaves):
        name = jlora.path_str(path)
        k = jax.random.fold_in(key, i)
        out.append(_random_leaf(shape, k, name.endswith("scale"), "/layers/" in name))
    return jax.tree.unflatten(treedef, out)


def needed_bytes(exe: Any) -> int:
    """Arguments, outputs and temporaries of a compiled step, a donated buffer counted once."""
    m = exe.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def make_loss(c: DecoderConfig, chunk: str) -> Any:
    """``loss(apply, params, tokens)``: next-token cross-entropy, the head in chunks of tokens.

    ``chunk`` ``"0"``: the decoder's full ``[B, T, V]`` float32 logits, then the loss
    (``real_model.token_loss``); ``"auto"`` (``jlora.auto_chunk_size``) or a count: the final
    hidden states and the head's weight through ``jlora.chunked_cross_entropy``, every row's
    last position masked (it has no next token), so the decoder sees the same ``T`` tokens.

    Raises:
      SystemExit: a chunk size where this tree has no chunked loss, or one that is no count.
    """
    if chunk == "0":
        return token_loss
    try:
        from jlora.models.lm_head import decoder_head

        chunked = jlora.chunked_cross_entropy
        size = jlora.auto_chunk_size(c.vocab_size) if chunk == "auto" else int(chunk)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"--loss-chunk {chunk}: no chunked LM-head loss here ({e})") from e

    def loss(apply: Any, params: Any, toks: jax.Array) -> jax.Array:
        hidden = apply(params, toks, return_hidden=True)
        weight, keywords = decoder_head(params, c)
        mask = jnp.broadcast_to(jnp.arange(toks.shape[1]) < toks.shape[1] - 1, toks.shape)
        targets = jnp.roll(toks, -1, axis=1)
        return chunked(hidden, weight, targets, mask, chunk_size=size, **keywords)

    return loss


def programs(method: str, fns: dict, base: Any, cfg: jlora.LoraConfig, tx: Any) -> tuple:
    """``(jitted step, carried shapes, rest)``: ``rest(base, tokens)`` the other arguments."""
    if method == "full":
        fn = jax.jit(fns["full"].__wrapped__, donate_argnums=(0, 1))
        return fn, (base, jax.eval_shape(tx.init, base)), lambda b, toks: (toks,)
    if method == "limit":
        return fns["limit"], (), lambda b, toks: (b, toks)
    adapters = jax.eval_shape(lambda p: split_adapted(p, cfg)[0], base)
    fn = jax.jit(fns["lora"].__wrapped__, donate_argnums=(0, 1))
    return fn, (adapters, jax.eval_shape(tx.init, adapters)), lambda b, toks: (b, toks)


def fit(
    fn: Any, carry: tuple, rest: Any, base: Any, batch: int, seq: int, limit: float | None
) -> tuple[Any, int, dict[str, Any]]:
    """Compiles at ``batch`` rows, halving them while XLA says the step needs over ``limit``.

    Returns ``(executable or None, rows, info)``; ``None`` when even one row does not fit, or
    the step's state alone (the arguments) does not.
    """
    tries: list[dict[str, Any]] = []
    while True:
        toks = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        start = time.perf_counter()
        exe = fn.lower(*carry, *rest(base, toks)).compile()
        need = needed_bytes(exe)
        m = exe.memory_analysis()
        state = int(m.argument_size_in_bytes) - batch * seq * 4
        tries.append(
            {"batch": batch, "needed_bytes": need, "compile_s": time.perf_counter() - start}
        )
        info = {
            "tries": tries,
            "needed_bytes": need,
            "state_bytes": state,
            "temp_bytes": int(m.temp_size_in_bytes),
        }
        if limit is None or need <= limit:
            return exe, batch, info
        if batch == 1 or state > limit:
            return None, batch, info
        batch //= 2


def run_case(model_name: str, method: str, args: Any) -> dict[str, Any]:
    """The case's numbers: status, rows, step seconds, tokens/s, FLOPs, memory, loss."""
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    capacity = args.device_memory_gb * GB if args.device_memory_gb else stats.get("bytes_limit")
    limit = None if capacity is None else args.fit_fraction * capacity
    c = decoder_config(model_name, args.seq, args.remat, args.attention)
    model = Decoder(c)
    cfg = jlora.LoraConfig(
        rank=args.rank,
        alpha=2.0 * args.rank,
        targets=DECODER_TARGETS,
        axis_rules=DECODER_AXIS_RULES,
    )
    tx = adam_f32(1e-5)
    fns = steps(model, cfg, tx, make_loss(c, args.loss_chunk))
    base = abstract_params(model, cfg, method == "qlora")
    fn, carry, rest = programs(method, fns, base, cfg, tx)
    lora_params = sum(math.prod(x.shape) for x in jax.tree.leaves(carry[0])) if carry else 0
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device.device_kind)
    out: dict[str, Any] = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "capacity_bytes": capacity,
        "peak_flops": peak,
        "params": matmul_params(c)["total"],
        "matmul_params": matmul_params(c)["matmul"],
        "trained_params": lora_params,
        "seq": args.seq,
        "remat": c.remat,
        "attention": getattr(c, "attention", "einsum"),
    }
    if f"{model_name}:{method}" in args.inject_oom.split(","):  # a test of the OOM report
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory (injected by --inject-oom)")
    exe, batch, info = fit(fn, carry, rest, base, args.batches[model_name], args.seq, limit)
    out |= {"batch": batch, **info}
    if exe is None:
        return out | {"status": "does not fit"}
    key = jax.random.key(0)
    params = random_params(base, key)
    toks = jax.random.randint(jax.random.fold_in(key, 1), (batch, args.seq), 0, c.vocab_size)
    if method == "full":
        state = (params, jax.jit(tx.init)(params))
    elif method == "limit":
        state = ()
    else:
        adapters = jax.jit(lambda p: split_adapted(p, cfg)[0])(params)
        state = (adapters, jax.jit(tx.init)(adapters))
    call = carried(exe, state, rest(params, toks))
    del params, state  # the carried call holds what the step donates
    return out | timed(call, method, batch * args.seq, args, c, lora_params, peak, device)


def timed(
    call: Any,
    method: str,
    tokens: int,
    args: Any,
    c: DecoderConfig,
    lora: int,
    peak: Any,
    device: Any,
) -> dict[str, Any]:
    """Warm-up calls, then ``args.steps`` timed ones: medians, rates and the memory peak."""
    for _ in range(args.warmup):
        got = jax.block_until_ready(call())
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        got = jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    per_token = flops_per_token(c, args.seq, method, lora)
    stats = device.memory_stats() or {}
    return {
        "status": "ok",
        "step_s": seconds,
        "step_s_all": times,
        "tokens_per_s": tokens / seconds,
        "flops_per_token": per_token,
        "model_flops_per_s": per_token * tokens / seconds,
        "mfu": None if not peak else per_token * tokens / seconds / peak,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "loss": None if method == "limit" else float(got[-1]),
    }
