"""``jlora finetune``: a run wired together: task, objective, state, hooks, the trainer.

A checkpoint holds everything the run's future depends on (adapters and any trainable head,
optimizer state, PRNG key, step and data position), so a run killed at any moment resumes from
its latest checkpoint and continues with exactly the losses it would have had.
"""

from __future__ import annotations

import json
import math
import os
import sys
from functools import partial
from typing import Any, cast

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import jlora
from jlora.runner.config import RunConfig, to_dict
from jlora.runner.data.chat_batches import describe
from jlora.runner.mesh import batch_sharding, make_mesh, mesh_section, shard_state
from jlora.runner.mesh import rules as mesh_rules
from jlora.runner.objectives import make_objective
from jlora.runner.optimizer import make_optimizer
from jlora.runner.plots import plot_losses
from jlora.runner.rundir import directory as rundir
from jlora.runner.rundir import resume
from jlora.runner.tasks import Task, lora_config, make_task
from jlora.runner.trainer.hooks import Checkpoint, Evaluate, LossLog, Progress, Throughput
from jlora.runner.trainer.interrupt import StopRequest
from jlora.runner.trainer.loop import Diverged, Hook, train
from jlora.runner.trainer.sinks import MetricSinks, check_sinks
from jlora.runner.trainer.step import make_train_step
from jlora.runner.variants import adapt, dense_model, prepare_base


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
    objective = make_objective(config, task, cfg)
    changes = rundir.config_changes(config)
    # Also reads the data of a task that reads it lazily, before the run directory is touched.
    like = jax.eval_shape(lambda: _initial_state(lora, task.extra, tx, key))
    with rundir.open_run_dir(config) as resuming:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        start, window = 0, []
        restored = resume.restore_good(ckpt_dir, like, log) if resuming else None
        if restored is not None:
            state, start = restored.state, int(restored.metadata["step"])
            # The records since the last log line, so that line averages the same steps.
            window = [
                r if isinstance(r, dict) else {"loss": float(r)}
                for r in restored.metadata.get("window", [])
            ]
            resume.prune(ckpt_dir, t.keep_checkpoints)
            rundir.rewind_logs(run_dir, start)
        else:
            rundir.rewind_logs(run_dir, -1)  # a fresh start keeps no records
            state = _initial_state(lora, task.initial_extra(start_model), tx, key)
        with MetricSinks(config, start if restored is not None else None) as sinks:
            if restored is not None:
                _log_resume(config, start, changes, sinks, log)
            task.prepare_run(run_dir, start_model, log)
            before = _before(config, task, start_model, state, sinks, start, log)
            jit_options: dict[str, Any] = {}
            if mesh is not None:  # lay everything out on the mesh, and keep it so each step
                base, state, state_shardings = shard_state(mesh, mesh_config, base, state, cfg)
                replicated = NamedSharding(mesh, PartitionSpec())
                jit_options["out_shardings"] = (state_shardings, replicated)
            step_fn = make_train_step(
                objective.loss, objective.batch_weight, tx, t.grad_accum, **jit_options
            )
            with StopRequest() as stop:
                hooks = _hooks(config, task, cfg, base, sinks, stop, start, window, log)
                run_step, batch_for = (
                    partial(_with_base, step_fn, base),
                    _batches(task, t.grad_accum, put_batch),
                )
                if hasattr(objective, "rollout_step"):  # batches sampled from the adapters
                    run_step = objective.rollout_step(step_fn, base, put_batch)
                    batch_for = lambda step: task.train_batch(step - 1)  # noqa: E731
                try:
                    state = train(
                        run_step,
                        state,
                        batch_for,
                        start=start,
                        steps=t.steps,
                        hooks=hooks,
                        stop=stop,
                    )
                except Diverged as err:
                    raise _diverged(ckpt_dir, err.step, err.loss) from None
            final = next((h.last for h in hooks if isinstance(h, Evaluate)), None)
            scores = final[1] if final is not None and final[0] == t.steps else None
            return _finish(config, task, cfg, state, base, before, scores)


def _with_base(step_fn: Any, base: Any, state: Any, batch: Any, step: int) -> Any:
    return step_fn(state, base, batch, step)


def _batches(task: Task, k: int, put_batch: Any) -> Any:
    """``batch_for(step)``: the step's batch, or its ``k`` micro-batches stacked, on device."""

    def batch_for(step: int) -> Any:
        if k == 1:
            return put_batch(task.train_batch(step - 1))
        return put_batch(_stack([task.train_batch((step - 1) * k + j) for j in range(k)]))

    return batch_for


def _hooks(
    config: RunConfig,
    task: Task,
    cfg: jlora.LoraConfig,
    base: Any,
    sinks: MetricSinks,
    stop: StopRequest,
    start: int,
    window: list[dict[str, float]],
    log: Any,
) -> list[Hook]:
    """The run's hooks, in the order they run after a step: log, evaluate, checkpoint."""
    t, ckpt_dir = config.train, os.path.join(config.run_dir, "checkpoints")
    throughput = Throughput(task.units_per_batch * t.grad_accum, task.unit, start)
    # A bar redrawn into a log file or a pipe is one line per refresh: lines per log step there.
    show_bar = t.progress and sys.stderr.isatty()
    progress = Progress(start, t.steps, throughput, show_bar)
    loss_log = LossLog(t.log_every, sinks, throughput, window, t.progress and not show_bar, t.steps)

    def save(step: int, state: Any) -> None:
        # Data positions count micro-batches of batch_size; grad_accum is fixed for a run.
        meta = {
            "step": step,
            "data_position": step * t.grad_accum,
            "config": to_dict(config),
            "window": loss_log.window,
        }
        with stop.critical():
            resume.save(ckpt_dir, step, state, meta, t.keep_checkpoints)

    def interrupted(step: int) -> None:
        progress.close()
        log(
            f"interrupted after step {step}: its checkpoint is in {ckpt_dir!r}; resume with "
            f"the same command: resumes from step {step}"
        )

    def evaluate(state: Any) -> dict[str, float]:
        extra = state["trainable"]["extra"]
        return task.evaluate(_adapted(state["trainable"], base, cfg), extra)

    return [
        throughput,
        progress,
        loss_log,
        Evaluate(t.eval_every, evaluate, sinks, progress.write),
        Checkpoint(t.checkpoint_every, save, interrupted),
    ]


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
    scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Saves the adapter and head, reports before -> after; ``scores``: the last step's."""
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
    after = task.show(_adapted(trainable, base, cfg), trainable["extra"], scores)
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
