"""The training loop of ``jlora finetune``: resume, train the adapters, evaluate, checkpoint.

A checkpoint holds everything the loop's future depends on (adapters and any trainable head,
optimizer state, PRNG key, step and data position), so a run killed at any moment resumes from
its latest checkpoint and continues with exactly the losses it would have had.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from typing import Any, cast

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import jlora
from jlora.runner.config import RunConfig, to_dict
from jlora.runner.data.chat_batches import describe
from jlora.runner.mesh import batch_sharding, make_mesh, mesh_section, shard_state
from jlora.runner.mesh import rules as mesh_rules
from jlora.runner.plots import plot_losses
from jlora.runner.rundir import directory as rundir
from jlora.runner.rundir import resume
from jlora.runner.tasks import Task, lora_config, make_task
from jlora.runner.trainer.interrupt import StopRequest
from jlora.runner.trainer.sinks import MetricSinks, check_sinks
from jlora.runner.variants import adapt, adapter_optimizer, dense_model, prepare_base


def make_schedule(config: RunConfig) -> optax.Schedule:
    """The adapters' learning rate by step: warm-up, then ``train.schedule``.

    Linear warm-up from 0 to ``train.learning_rate`` over ``train.warmup_steps``, then cosine or
    linear decay to ``learning_rate / 10`` at ``train.steps``, or constant.

    Example:
      >>> from jlora.runner.config import apply_overrides
      >>> cfg = apply_overrides(RunConfig(), ["train.schedule=constant", "train.steps=10"])
      >>> round(float(make_schedule(cfg)(9)), 6), cfg.train.learning_rate
      (0.003, 0.003)
    """
    t = config.train
    lr, warm = t.learning_rate, min(t.warmup_steps, t.steps - 1)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, t.steps, lr / 10)
    after = (
        optax.linear_schedule(lr, lr / 10, t.steps - warm)
        if t.schedule == "linear"
        else optax.constant_schedule(lr)
    )
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """Adam(W) on the adapters by :func:`make_schedule`, Adam for a head, clipped together.

    AdamW when ``train.weight_decay`` > 0; the gradient is clipped at global norm
    ``train.clip_norm`` (``None``: unclipped).

    With ``train.loraplus_lr_ratio`` the adapters' Adam runs in LoRA+ groups (B faster).
    """
    t = config.train

    def labels(tree: dict[str, Any]) -> dict[str, Any]:
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()}

    # identity() for no clipping keeps the optimizer state's structure the same either way.
    clip = optax.identity() if t.clip_norm is None else optax.clip_by_global_norm(t.clip_norm)
    return optax.chain(
        clip,
        optax.partition(
            {
                "lora": adapter_optimizer(config, make_schedule(config)),
                "extra": optax.adam(t.head_learning_rate),
            },
            labels,
        ),
    )


def make_loss(task: Task, cfg: jlora.LoraConfig, mode: str) -> Any:
    """``loss(trainable, base, batch, rng)`` with the adapters applied as ``mode`` says.

    ``"factorised"`` runs the model through ``jlora.lora`` (``x·W + s·(x·A)·B``, LoRA dropout
    on the adapters' input drawn from ``rng``); ``"merge"`` forms ``W + s·A·B`` inside the loss.
    Either way only the adapters (and ``extra``) are differentiated.

    Raises:
      ValueError: for ``"merge"`` with ``dropout > 0`` (dropout needs the factorised path).
    """
    if mode == "factorised":

        def factorised(trainable: Any, base: Any, batch: Any, rng: jax.Array) -> jax.Array:
            run = jlora.lora(task.loss, cfg, dropout_rng=rng, deterministic=False)
            return run(jlora.combine(trainable["lora"], base), trainable["extra"], batch)

        return factorised
    if cfg.dropout > 0:
        raise ValueError(
            f"lora.dropout={cfg.dropout} needs train.train_step=factorised (dropout acts on the "
            "adapters' input, which the merge step never sees); set lora.dropout=0 or switch"
        )

    def merged(trainable: Any, base: Any, batch: Any, rng: jax.Array) -> jax.Array:
        del rng
        params = jlora.merge_params(jlora.dequantize(jlora.combine(trainable["lora"], base)), cfg)
        return task.loss(params, trainable["extra"], batch)

    return merged


def accumulated_value_and_grad(loss_fn: Any, weight_fn: Any) -> Any:
    """``(trainable, base, batches, rng) -> (loss, grads)`` over stacked micro-batches.

    ``batches`` stacks ``k`` micro-batches on a leading axis (every leaf of a tuple or dict
    batch); ``lax.scan`` runs one at a time, so memory is one micro-batch's. Micro-batch ``j``
    draws dropout from ``fold_in(rng, j)`` and counts ``w_j = weight_fn(batch_j)`` (the tokens
    or examples its mean loss averages over), and the result is ``Σ w_j·loss_j / Σ w_j`` and
    the same mean of the gradients: the loss and gradient of the ``k`` micro-batches
    concatenated, whatever each one holds.
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def run(trainable: Any, base: Any, batches: Any, rng: jax.Array) -> tuple[jax.Array, Any]:
        k = jax.tree.leaves(batches)[0].shape[0]

        def body(carry: Any, xs: Any) -> tuple[Any, None]:
            j, batch = xs
            loss, grads = grad_fn(trainable, base, batch, jax.random.fold_in(rng, j))
            w = jax.numpy.asarray(weight_fn(batch), jax.numpy.float32)
            total, sums, weights = carry
            return (
                total + w * loss.astype(total.dtype),
                jax.tree.map(lambda s, g: s + w * g, sums, grads),
                weights + w,
            ), None

        zeros = jax.tree.map(jax.numpy.zeros_like, trainable)
        f32 = jax.numpy.zeros((), jax.numpy.float32)
        (total, sums, weights), _ = jax.lax.scan(
            body, (f32, zeros, f32), (jax.numpy.arange(k), batches)
        )
        weights = jax.numpy.where(weights > 0, weights, 1.0)  # nothing to learn: zero update
        return total / weights, jax.tree.map(lambda g: (g / weights).astype(g.dtype), sums)

    return run


def _stack(batches: list[Any]) -> Any:
    """Micro-batches (arrays or tuples of arrays) stacked on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _adapted(trainable: dict[str, Any], base: Any, cfg: jlora.LoraConfig) -> Any:
    return dense_model(jlora.combine(trainable["lora"], base), cfg)


def _initial_state(
    lora: Any, extra: Any, tx: optax.GradientTransformation, key: jax.Array
) -> dict[str, Any]:
    """What a checkpoint holds at step 0: trainable leaves, their optimizer state, the key."""
    trainable = {"lora": lora, "extra": extra}
    return {"trainable": trainable, "opt_state": tx.init(trainable), "rng": key}


def _batch_placer(config: RunConfig, mesh: Any) -> Any:
    """``put(batch)``: a host batch (an array, tuple or dict of arrays) onto the device(s)."""
    if mesh is None:
        return partial(jax.tree.map, jax.numpy.asarray)
    sharding = batch_sharding(mesh, config.train.batch_size)
    if config.train.grad_accum > 1:  # stacked micro-batches: the leading axis is not split
        sharding = NamedSharding(mesh, PartitionSpec(None, *sharding.spec))
    return partial(jax.device_put, device=sharding)


def _make_step(
    task: Task, loss_fn: Any, tx: optax.GradientTransformation, t: Any, jit_options: Any
) -> Any:
    """The jitted train step: (accumulated) gradients, the optimizer update, a finiteness flag."""

    @partial(jax.jit, **jit_options)
    def step_fn(
        state: dict[str, Any], base: Any, batch: Any, step: jax.Array
    ) -> tuple[dict[str, Any], Any]:
        rng = jax.random.fold_in(state["rng"], step)  # a new dropout key every step
        if t.grad_accum > 1:  # batch holds grad_accum stacked micro-batches
            loss, grads = accumulated_value_and_grad(loss_fn, task.batch_weight)(
                state["trainable"], base, batch, rng
            )
        else:
            loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], base, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
        return new, (loss, _all_finite((trainable, opt_state)))

    return step_fn


def finetune(config: RunConfig, log: Any = print) -> dict[str, Any]:
    """Runs (or resumes) the fine-tune that ``config`` describes; returns its results.

    The run directory is locked for the whole run. Ctrl-C stops at the next step boundary,
    saves a checkpoint of the last completed step and raises ``KeyboardInterrupt`` after
    saying where the run resumes from.

    Raises:
      ValueError: bad config values or data, a target regex that matches nothing, a run
        directory holding a different run or in use by another process, or no usable
        checkpoint.
      ModuleNotFoundError: a metrics sink (``log.wandb``) whose package is not installed.
      FloatingPointError: if the training loss or the trained state becomes NaN or infinite
        (finite checkpoints kept).
      OSError: a checkpoint or the adapter cannot be written (named in the message).
      KeyboardInterrupt: on Ctrl-C, once the run is saved.
    """
    run_dir, t = config.run_dir, config.train
    check_sinks(config)
    task = make_task(config)  # every input is checked before the run directory is touched
    if task.data_stats.get("train_examples"):
        log(describe(task.data_stats))
    cfg = lora_config(config)
    mesh_config = mesh_section(config)
    mesh = make_mesh(mesh_config)
    if mesh is not None:
        mesh_rules(mesh_config)
    put_batch = _batch_placer(config, mesh)
    key = jax.random.key(t.seed)
    params = adapt(jax.random.fold_in(key, 0), prepare_base(config, task.base), config)
    lora, base = jlora.split(params)
    start_model = jlora.dequantize(base)  # what the adapters start from (QLoRA: quantised)
    tx = make_optimizer(config)
    loss_fn = make_loss(task, cfg, t.train_step)
    changes = rundir.config_changes(config)
    # Also reads the data of a task that reads it lazily, before the run directory is touched.
    like = jax.eval_shape(lambda: _initial_state(lora, task.extra, tx, key))
    with rundir.open_run_dir(config) as resuming:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        start, window = 0, []
        restored = resume.restore_good(ckpt_dir, like, log) if resuming else None
        if restored is not None:
            state, start = restored.state, int(restored.metadata["step"])
            # The losses since the last log line, so that line averages the same steps.
            window = [float(x) for x in restored.metadata.get("window", [])]
            resume.prune(ckpt_dir, t.keep_checkpoints)
            rundir.rewind_metrics(run_dir, start)
        else:
            rundir.rewind_metrics(run_dir, -1)  # a fresh start keeps no records
            state = _initial_state(lora, task.initial_extra(start_model), tx, key)
        with MetricSinks(config, start if restored is not None else None) as sinks:
            if restored is not None:
                _log_resume(config, start, changes, sinks, log)
            before = _before(config, task, start_model, state, sinks, start, log)
            jit_options: dict[str, Any] = {}
            if mesh is not None:  # lay everything out on the mesh, and keep it so each step
                base, state, state_shardings = shard_state(mesh, mesh_config, base, state, cfg)
                replicated = NamedSharding(mesh, PartitionSpec())
                jit_options["out_shardings"] = (state_shardings, replicated)
            step_fn = _make_step(task, loss_fn, tx, t, jit_options)
            with StopRequest() as stop:
                state = _train(
                    config,
                    task,
                    cfg,
                    step_fn,
                    state,
                    base,
                    put_batch,
                    start,
                    window,
                    stop,
                    sinks,
                    log,
                )
            return _finish(config, task, cfg, state, base, before)


def _log_resume(
    config: RunConfig, start: int, changes: dict[str, Any], sinks: MetricSinks, log: Any
) -> None:
    if changes:
        sinks.append({"step": start, "config_change": changes})
        log(
            f"changed on resume at step {start}: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        )
    log(f"resuming {config.run_dir} from the checkpoint of step {start}")


def _before(
    config: RunConfig,
    task: Task,
    start_model: Any,
    state: dict[str, Any],
    sinks: MetricSinks,
    start: int,
    log: Any,
) -> dict[str, Any]:
    """The base model's scores and samples, computed once per run directory."""
    before_path = os.path.join(config.run_dir, "before.json")
    if not os.path.isfile(before_path):
        log("evaluating the base model ...")
        rundir.write_json(before_path, task.show(start_model, state["trainable"]["extra"]))
    before = cast(dict[str, Any], _read_json(before_path))
    if start == 0:  # the base's scores start the eval curve
        sinks.append({"step": 0, **{k: v for k, v in before.items() if isinstance(v, float)}})
    return before


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.array([jax.numpy.isfinite(x).all() for x in leaves]))


def _train(
    config: RunConfig,
    task: Task,
    cfg: jlora.LoraConfig,
    step_fn: Any,
    state: dict[str, Any],
    base: Any,
    put_batch: Any,
    start: int,
    window: list[float],
    stop: StopRequest,
    sinks: MetricSinks,
    log: Any,
) -> dict[str, Any]:
    """Steps ``start + 1`` to ``train.steps``: log, evaluate, checkpoint; stop on Ctrl-C."""
    run_dir, t = config.run_dir, config.train
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    # A bar redrawn into a log file or a pipe is one line per refresh: lines per log step there.
    show_bar = t.progress and sys.stderr.isatty()
    bar = tqdm(total=t.steps, initial=start, disable=not show_bar, desc="finetune", unit="step")

    def save(step: int) -> None:
        # Data positions count micro-batches of batch_size; grad_accum is fixed for a run.
        meta = {
            "step": step,
            "data_position": step * k,
            "config": to_dict(config),
            "window": window,
        }
        with stop.critical():
            resume.save(ckpt_dir, step, state, meta, t.keep_checkpoints)

    k = t.grad_accum

    def batch_for(step: int) -> Any:
        if k == 1:
            return task.train_batch(step - 1)
        return _stack([task.train_batch((step - 1) * k + j) for j in range(k)])

    tic, units = time.perf_counter(), 0
    for step in range(start + 1, t.steps + 1):
        state, (loss, finite) = step_fn(state, base, put_batch(batch_for(step)), step)
        loss = float(loss)
        if not (math.isfinite(loss) and bool(finite)):
            bar.close()
            raise _diverged(ckpt_dir, step, loss)
        window.append(loss)
        if step == start + 1:  # throughput excludes the first step's compilation
            tic, units = time.perf_counter(), 0
        else:
            units += task.units_per_batch * k
        rate = units / max(time.perf_counter() - tic, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", **{f"{task.unit}/s": f"{rate:,.0f}"})
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps:
            record = {
                "step": step,
                "train_loss": sum(window) / len(window),
                f"{task.unit}_per_s": rate,
            }
            sinks.append(record)
            if t.progress and not show_bar:
                print(
                    f"step {step}/{t.steps}: train_loss {record['train_loss']:.4f}, "
                    f"{rate:,.0f} {task.unit}/s",
                    file=sys.stderr,
                    flush=True,
                )
            window = []
        if step % t.eval_every == 0 or step == t.steps:
            scores = task.evaluate(
                _adapted(state["trainable"], base, cfg), state["trainable"]["extra"]
            )
            sinks.append({"step": step, **scores})
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if step % t.checkpoint_every == 0 or step == t.steps:
            save(step)
        if stop.requested:
            bar.close()
            if step not in jlora.checkpoint_steps(ckpt_dir):
                save(step)
            log(
                f"interrupted after step {step}: its checkpoint is in {ckpt_dir!r}; resume with "
                f"the same command: resumes from step {step}"
            )
            raise KeyboardInterrupt
    bar.close()
    return state


def _diverged(ckpt_dir: str, step: int, loss: float) -> FloatingPointError:
    """The error for a non-finite loss or update at ``step``; sets aside a checkpoint it spoils.

    A NaN loss at ``step`` is the loss of the state saved as step ``step - 1``: resuming from
    that checkpoint meets the same NaN whatever the learning rate, so it is moved aside.
    """
    moved = ""
    if not math.isfinite(loss) and (step - 1) in jlora.checkpoint_steps(ckpt_dir):
        where = resume.set_aside(ckpt_dir, step - 1, "diverged")
        moved = (
            f"; the checkpoint of step {step - 1}, whose state gave this loss, moved to {where!r}"
        )
    done = jlora.checkpoint_steps(ckpt_dir)
    if done:
        kept = f"the last good checkpoint is step {done[-1]} in {ckpt_dir!r}{moved}"
        then = f"it resumes from step {done[-1]} with the new value"
    else:
        kept = f"no good checkpoint in {ckpt_dir!r}{moved}"
        then = "it starts over with the new value"
    what = (
        f"training loss is {loss} at step {step}"
        if not math.isfinite(loss)
        else f"the update of step {step} made the adapters or optimizer state non-finite"
    )
    return FloatingPointError(
        f"{what}; stopped without saving ({kept}). Lower train.learning_rate (or raise "
        f"train.warmup_steps) and re-run the same command: {then}"
    )


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _finish(
    config: RunConfig,
    task: Task,
    cfg: jlora.LoraConfig,
    state: dict[str, Any],
    base: Any,
    before: dict[str, Any],
) -> dict[str, Any]:
    run_dir = config.run_dir
    trainable = state["trainable"]
    params = jlora.combine(trainable["lora"], base)
    adapter_dir = os.path.join(run_dir, "adapter")
    bad = resume.non_finite(trainable)
    if bad is not None:  # never replace a saved adapter with a broken one
        raise FloatingPointError(
            f"the trained {bad!r} holds NaN or infinite values; not saved to {adapter_dir!r} "
            "(any adapter there is left as it was)"
        )
    try:
        jlora.save_adapter(adapter_dir, params, cfg)
    except OSError as err:
        raise OSError(
            err.errno,
            f"{err.strerror or err}: could not save the adapter (the previous one, if any, is "
            "left as it was; the checkpoints are kept, so re-running the same command retries)",
            adapter_dir,
        ) from err
    task.save_extra(run_dir, trainable["extra"])
    after = task.show(_adapted(trainable, base, cfg), trainable["extra"])
    counts = _counts(params, trainable["extra"])
    results = {"before": before, "after": after, **counts}
    if task.data_stats:
        results["data"] = task.data_stats
    rundir.write_json(os.path.join(run_dir, "results.json"), results)
    plot_losses(
        rundir.read_metrics(run_dir),
        os.path.join(run_dir, "loss_curve.png"),
        f"LoRA r={cfg.rank} on {config.data.source}",
    )
    return results


def _counts(params: Any, extra: Any) -> dict[str, int]:
    lora, _ = jlora.split(params)

    def size(tree: Any) -> int:  # a quantised kernel counts its logical size
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=jlora.is_quantized))

    return {
        "trainable_params": size(lora) + size(extra),
        "adapter_params": size(lora),
        "total_params": size(params) + size(extra),
    }
