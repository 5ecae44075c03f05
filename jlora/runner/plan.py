"""The memory plan of a run: its own train step, compiled from abstract shapes, per device.

``jlora plan`` builds what ``jlora finetune`` would train (the task's model and loss, the
objective, the base as ``model.base_dtype`` and ``lora.quantize`` make it, the adapters, the
optimizer, ``train.grad_accum``, the mesh layout) with ``jax.ShapeDtypeStruct`` leaves, then
lowers and compiles the real jitted step (:func:`jlora.runner.trainer.step.make_train_step`)
and reads XLA's ``memory_analysis()``. It reads the checkpoint's config.json (and, if present,
its safetensors headers, for the stored dtype), never a weight, a tokenizer or the data, so a
directory holding config.json alone is enough to plan an 8B model on a laptop.

The batch is what the run's batches hold (:func:`abstract_batch`): ``train.batch_size`` rows
of ``data.seq_len`` tokens (twice that for preference pairs, ``num_generations`` completions
per prompt for GRPO), stacked ``train.grad_accum`` times. Weights, adapters, optimizer state
and batch are exact on any backend; the temporaries are what the compiling backend's XLA
schedules, so an estimate made on CPU for a GPU run differs (the output says which backend).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.data.chat_batches import FIELDS
from jlora.runner.defaults import is_builtin_model, resolve
from jlora.runner.dryrun import size
from jlora.runner.mesh import AXES, batch_sharding, layout, mesh_section
from jlora.runner.objectives import make_objective
from jlora.runner.optimizer import make_optimizer
from jlora.runner.tasks import lora_config, task_class
from jlora.runner.trainer.step import make_train_step
from jlora.runner.variants import adapt, prepare_base

if TYPE_CHECKING:
    from jlora.runner.tasks.causal_lm import CausalLMTask

__all__ = ["Plan", "abstract_batch", "format_plan", "plan_loaded", "plan_run"]

# Loop-invariant code motion hoists XLA CPU's float32 copies of bf16 kernels out of the layers.
_NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
_SUGGESTIONS = (  # what lowers each part, in the order a user would try them
    ("model.remat", "full", "activations kept for the backward pass"),
    ("model.dtype", "bfloat16", "activations"),
    ("model.base_dtype", "bfloat16", "the base"),
    ("lora.quantize", "nf4", "the adapted kernels of the base, 4 bits a weight"),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's memory per device, by part, as its compiled train step needs it.

    Attributes:
      config: the run config, ``train.batch_size`` and ``data.seq_len`` resolved.
      model: one line describing the model (architecture and sizes).
      base_dtype: ``(dtype, why)`` of the base (:mod:`jlora.runner.base_dtype`).
      parts: bytes per device: ``base``, ``adapters``, ``optimizer``, ``batch``, ``outputs``
        (the step's updated adapters and optimizer state, beside the old ones) and
        ``temporaries`` (activations kept for the backward pass, gradients, workspace).
      counts: parameters (logical, whatever their storage): ``base`` and ``adapters``.
      total: the step's peak per device: arguments + outputs - aliased + temporaries.
      rows: rows a micro-batch holds (pairs count twice, GRPO's completions each).
      devices: the mesh's device count (1 without a mesh).
      backend: the platform that compiled the step (``cpu``, ``gpu``, ``tpu``) and its kind.
      kv_cache: bytes of a GRPO rollout's KV cache (sampled before the step, not during it),
        or ``None``.
      here: for bf16 on CPU, the peak as this CPU would run the step (XLA's CPU keeps a
        float32 copy of every layer's bf16 kernels, which ``total`` leaves out as an
        accelerator would); ``None`` where the two agree.
    """

    config: RunConfig
    model: str
    base_dtype: tuple[str, str]
    parts: dict[str, int]
    counts: dict[str, int]
    total: int
    rows: int
    devices: int
    backend: tuple[str, str]
    kv_cache: int | None = None
    here: int | None = None


def _planned_config(config: RunConfig, given: Collection[str]) -> RunConfig:
    """``config`` with ``train.batch_size`` and ``data.seq_len`` resolved without the data."""
    if (
        not is_builtin_model(config)
        and config.data.train is not None
        and "data.seq_len" not in given
    ):
        raise ValueError(
            "config data.seq_len is auto, measured from data.train's token lengths; jlora plan "
            "reads no data: give data.seq_len (e.g. data.seq_len=2048)"
        )
    others = ("run_dir", "train.steps", "train.warmup_steps", "train.learning_rate")
    return resolve(config, {*given, *others, "generate.prompts"}).config


def abstract_batch(config: RunConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one step's batch for ``config``, as its task makes them.

    SFT on text: ``tokens``, ``targets``, ``loss_mask`` ``[B, T]``; instruction data, pairs
    and GRPO rollouts add ``segment_ids`` and ``positions``. Pairs are ``[2B, T]`` (plus
    ``ref_logps`` ``[2B]`` with ``train.precompute_ref_log_probs``); GRPO's rollouts are
    ``[B·G, T]`` with ``advantages`` ``[B·G]`` (and ``old_logps`` ``[B·G, T]`` with
    ``train.num_iterations`` > 1). With ``train.grad_accum`` k > 1 every leaf gets a leading
    axis of k.

    Example:
      >>> abstract_batch(RunConfig())["tokens"].shape
      (16, 128)
    """
    t, seq = config.train, config.data.seq_len
    rows, f32 = t.batch_size, jnp.float32
    keys: tuple[str, ...] = FIELDS if config.data.train is not None else FIELDS[:3]
    extra: dict[str, tuple[tuple[int, ...], Any]] = {}
    if t.objective == "grpo":
        rows, keys = t.batch_size * t.num_generations, FIELDS
        extra["advantages"] = ((rows,), f32)
        if t.num_iterations > 1:
            extra["old_logps"] = ((rows, seq), f32)
    elif t.objective != "sft":
        rows, keys = 2 * t.batch_size, FIELDS
        if t.precompute_ref_log_probs:
            extra["ref_logps"] = ((rows,), f32)
    dtypes = {"loss_mask": jnp.bool_}
    batch = {k: ((rows, seq), dtypes.get(k, jnp.int32)) for k in keys} | extra
    lead = (t.grad_accum,) if t.grad_accum > 1 else ()
    return {k: jax.ShapeDtypeStruct(lead + shape, dtype) for k, (shape, dtype) in batch.items()}


def _mesh(config: RunConfig) -> Mesh | None:
    """The run's mesh over the default backend's devices, or the CPU's if it has too few."""
    m = config.mesh
    shape = (m.data, m.fsdp, m.tensor)
    n = math.prod(shape)
    if n == 1:
        return None
    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= n:
            return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)
    raise ValueError(
        f"config mesh: data*fsdp*tensor = {n} devices; JAX sees {jax.device_count()} (and "
        f"{len(jax.devices('cpu'))} CPU devices) to compile the per-device plan on. jlora plan "
        f"asks for {n} CPU devices itself when it starts; from Python, run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    )


def _bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes per device of ``tree``'s leaves (their shard when ``shardings`` lays them out)."""
    leaves = jax.tree.leaves(tree)
    shards = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for leaf, sharding in zip(leaves, shards, strict=True):
        shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _count(tree: Any) -> int:
    """Parameters of ``tree``, a quantised kernel counted at its logical size."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=jlora.is_quantized))


def _peak(memory: Any) -> int:
    """A compiled step's peak: arguments, outputs not aliased to them, temporaries."""
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _compile(config: RunConfig, task: Any, params: Any, batch: Any, model: str) -> Plan:
    """The run's train step on ``params`` (adapted) and ``batch``, compiled; its memory."""
    from jlora.models.decoder import init_cache
    from jlora.models.formats.stored_dtype import stored_dtype
    from jlora.models.pretrained import resolve_source
    from jlora.runner.base_dtype import resolve_base_dtype

    t, cfg, tx = config.train, lora_config(config), make_optimizer(config)
    key = jax.random.key(t.seed)
    lora, base = jlora.split(params)
    state = jax.eval_shape(
        lambda lo: {
            "trainable": {"lora": lo, "extra": {}},
            "opt_state": tx.init({"lora": lo, "extra": {}}),
            "rng": key,
        },
        lora,
    )
    objective = make_objective(config, task, cfg)
    mesh, jit_options = _mesh(config), {}
    base_sh = state_sh = batch_sh = None
    if mesh is not None:
        base_sh, state_sh = layout(mesh, mesh_section(config), base, state, cfg)
        jit_options["out_shardings"] = (state_sh, NamedSharding(mesh, PartitionSpec()))
        rows_sh = batch_sharding(mesh, t.batch_size)
        if t.grad_accum > 1:
            rows_sh = NamedSharding(mesh, PartitionSpec(None, *rows_sh.spec))
        batch_sh = jax.tree.map(lambda _: rows_sh, batch)

        def put(tree: Any, shardings: Any) -> Any:
            return jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
            )

        base, state, batch = put(base, base_sh), put(state, state_sh), put(batch, batch_sh)
    step_fn = make_train_step(
        objective.loss, objective.batch_weight, tx, t.grad_accum, **jit_options
    )
    step = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = step_fn.lower(state, base, batch, step)
    memory = here = lowered.compile().memory_analysis()
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    bf16 = jnp.bfloat16 in (task.model.config.dtype, task.model.config.param_dtype)
    if device.platform == "cpu" and bf16:
        # XLA's CPU multiplies bf16 in float32: the layers' stacked kernels are converted, and
        # the conversion hoisted out of the layer loop keeps a float32 copy of every layer at
        # once. Accelerators multiply bf16 directly; kept in the loop, one layer's copy is live.
        memory = lowered.compile(compiler_options=_NO_HOISTING).memory_analysis()
    parts = {
        "base": _bytes(base, base_sh),
        "adapters": _bytes(state["trainable"], state_sh and state_sh["trainable"]),
        "optimizer": _bytes(state["opt_state"], state_sh and state_sh["opt_state"]),
        "batch": _bytes(batch, batch_sh),
        "outputs": int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
        "temporaries": int(memory.temp_size_in_bytes),
    }
    total = _peak(memory)
    decoder = task.model.config
    rows = batch["tokens"].shape[-2]
    kv = None
    if t.objective == "grpo":  # the sampler's cache, one slot per token of a row
        kv = _bytes(jax.eval_shape(lambda: init_cache(decoder, rows, config.data.seq_len)))
    source = resolve_source(config.model.decoder)
    return Plan(
        config=config,
        model=model,
        base_dtype=resolve_base_dtype(config.model, stored_dtype(source)),
        parts=parts,
        counts={"base": _count(base), "adapters": _count(lora)},
        total=total,
        rows=rows,
        devices=1 if mesh is None else mesh.size,
        backend=(device.platform, device.device_kind),
        kv_cache=kv,
        here=None if here is memory else _peak(here),
    )


def plan_run(config: RunConfig, given: Collection[str] = ()) -> Plan:
    """Compiles the train step ``config`` describes from abstract shapes; returns its memory.

    Args:
      config: the config as read (:func:`jlora.runner.config.read_config`).
      given: the dotted keys the config file and overrides set.

    Returns:
      A :class:`Plan`.

    Raises:
      ValueError: a ``bert`` run (it reads its encoder to fit its head), an auto
        ``data.seq_len`` that needs the data, a ``data.seq_len`` beyond the model's
        positions, a mesh with more devices than JAX has, or anything the run itself would
        refuse (named as the run names it).
      FileNotFoundError: a checkpoint directory without config.json.

    Example:
      >>> from jlora.runner.config import read_config
      >>> p = plan_run(*read_config("default", ["train.batch_size=2", "data.seq_len=16"]))
      >>> p.parts["base"] > p.parts["adapters"] > 0, p.backend[0]
      (True, 'cpu')
    """
    from jlora.runner.tasks.causal_lm import abstract_base, checkpoint_config

    if config.model.kind != "llama":
        raise ValueError(
            f"jlora plan plans decoder runs (model.kind=llama); model.kind={config.model.kind!r} "
            "reads its encoder to fit a head. Use jlora summary for its sizes"
        )
    config = _planned_config(config, given)
    decoder, _ = checkpoint_config(config.model)
    seq = config.data.seq_len
    if seq > decoder.max_position_embeddings:
        raise ValueError(
            f"config data.seq_len {seq} exceeds model.path {config.model.decoder!r}'s "
            f"max_position_embeddings {decoder.max_position_embeddings}; lower data.seq_len"
        )
    key = jax.random.fold_in(jax.random.key(config.train.seed), 0)
    params = jax.eval_shape(
        lambda b: adapt(key, prepare_base(config, b), config), abstract_base(decoder)
    )
    task = task_class(config).for_shapes(config, decoder)
    model = (
        f"{config.model.decoder}: {decoder.architecture}, {decoder.num_hidden_layers} layers, "
        f"hidden {decoder.hidden_size}, vocab {decoder.vocab_size}"
    )
    return _compile(config, task, params, abstract_batch(config), model)


def plan_loaded(config: RunConfig) -> Plan:
    """The same plan from the run itself: its task loaded (weights, data) and its first batch.

    What :func:`plan_run` is checked against: ``jlora finetune``'s task, base, adapters and
    batch, their shapes handed to the same compile. ``config`` is resolved
    (:func:`jlora.runner.config.load_config`).

    Raises:
      ValueError: for ``train.objective=grpo``, whose batches are sampled during the run.

    Example:
      >>> from jlora.runner.config import load_config
      >>> over = ["train.batch_size=2", "data.seq_len=16"]
      >>> plan_loaded(load_config("default", over)).rows
      2
    """
    from jlora.runner.tasks import make_task

    if config.train.objective == "grpo":
        raise ValueError(
            "plan_loaded: train.objective=grpo samples its batches from the adapters during the "
            "run; check a GRPO plan's batch against RLTask's rollouts instead"
        )
    task = cast("CausalLMTask", make_task(config))
    key = jax.random.fold_in(jax.random.key(config.train.seed), 0)
    params = _shapes(adapt(key, prepare_base(config, task.base), config))
    k = config.train.grad_accum
    batches = [task.train_batch(j) for j in range(k)]
    batch = batches[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *batches)
    decoder = task.model.config
    model = f"{config.model.decoder}: {decoder.architecture} (loaded)"
    return _compile(config, task, params, _shapes(jax.tree.map(jnp.asarray, batch)), model)


def format_plan(plan: Plan, device_memory: int | None = None) -> str:
    """The plan as ``jlora plan`` prints it: the run, the parts, the total, the verdict.

    Example:
      >>> p = Plan(RunConfig(), "m", ("float32", "auto"), dict.fromkeys(("base", "adapters",
      ...     "optimizer", "batch", "outputs", "temporaries"), 2**20), {"base": 1, "adapters": 1},
      ...     6 * 2**20, 16, 1, ("cpu", "cpu"))
      >>> format_plan(p, 2**20).splitlines()[-2]
      'does not fit in 1.00 MiB: 6.00 MiB needed, 5.00 MiB more; to lower it try:'
    """
    from jlora.models.remat import remat_name

    c, t = plan.config, plan.config.train
    accum = f" x {t.grad_accum} micro-batches (train.grad_accum)" if t.grad_accum > 1 else ""
    unit = {"grpo": " completions", "sft": ""}.get(t.objective, " rows (pairs x 2)")
    quantize = "" if c.lora.quantize == "none" else f", lora.quantize {c.lora.quantize}"
    p = plan.parts
    lines = [
        f"== plan: {plan.model} (from config.json: no weight, tokenizer or data read) ==",
        f"run: {t.objective}, {plan.rows}{unit} x {c.data.seq_len} tokens{accum}; "
        f"model.dtype {c.model.dtype}, base {plan.base_dtype[0]} ({plan.base_dtype[1]}), "
        f"remat {remat_name(c.model.remat)}, LoRA rank {c.lora.rank}{quantize}; "
        + (f"mesh {plan.devices} devices" if plan.devices > 1 else "one device"),
        "== memory per device ==",
        f"base weights     {size(p['base']):>12}  {plan.counts['base']:,} parameters, frozen",
        f"adapters         {size(p['adapters']):>12}  {plan.counts['adapters']:,} parameters, "
        "float32",
        f"optimizer state  {size(p['optimizer']):>12}  float32",
        f"batch            {size(p['batch']):>12}",
        f"updated state    {size(p['outputs']):>12}  the step's new adapters and optimizer "
        "state, beside the old",
        f"temporaries      {size(p['temporaries']):>12}  activations kept for the backward "
        "pass, gradients, workspace",
        f"total            {size(plan.total):>12}  the step's peak",
    ]
    if plan.kv_cache is not None:
        lines.append(
            f"(GRPO's rollouts sample before each step with a KV cache of "
            f"{size(plan.kv_cache)}, not held during it)"
        )
    platform, kind = plan.backend
    lines.append(f"estimated by XLA's {platform} compiler ({kind}), jax {jax.__version__}")
    if platform == "cpu":
        lines.append(
            "  a CPU estimate of a GPU/TPU run: weights, adapters, optimizer state and batch are "
            "exact; the temporaries are the CPU compiler's, and a GPU or TPU compile fuses and "
            "reuses buffers differently (run jlora plan on the target machine for its own)"
        )
    if plan.here is not None:
        lines.append(
            f"  run on this CPU the step would need {size(plan.here)}: XLA's CPU multiplies bf16 "
            "in float32 and keeps a float32 copy of every layer's kernels, which the total "
            "above leaves out, as an accelerator multiplies bf16 directly"
        )
    if device_memory is not None:
        lines += _verdict(plan, device_memory)
    return "\n".join(lines)


def _verdict(plan: Plan, device_memory: int) -> list[str]:
    if plan.total <= device_memory:
        line = (
            f"fits in {size(device_memory)}: {plan.total / device_memory:.0%} of it, "
            f"{size(device_memory - plan.total)} free"
        )
        if plan.total > 0.75 * device_memory and plan.backend[0] == "gpu":
            line += (
                "; JAX preallocates 75% of a GPU: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to "
                "use more"
            )
        return [line]
    lines = [
        f"does not fit in {size(device_memory)}: {size(plan.total)} needed, "
        f"{size(plan.total - device_memory)} more; to lower it try:"
    ]
    from jlora.models.remat import remat_name

    m = plan.config.model
    current = {
        "model.remat": remat_name(m.remat),
        "model.dtype": m.dtype,
        "model.base_dtype": plan.base_dtype[0],
        "lora.quantize": plan.config.lora.quantize,
    }
    tries = [
        f"{key}={value} ({what})" for key, value, what in _SUGGESTIONS if current[key] != value
    ]
    tries.append("a smaller train.batch_size with train.grad_accum (same update, less memory)")
    return [*lines, "  " + "; ".join(tries)]
