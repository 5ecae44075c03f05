"""The dry run: what ``jlora finetune`` would do with a config, before anything is compiled.

``jlora finetune --dry-run`` and ``jlora summary`` print :func:`dry_run`: the values
resolved for the config and why (:mod:`jlora.runner.defaults`), the run directory's state,
the data statistics at the resolved ``data.seq_len``, what will be trained (the adapted
kernels, from abstract shapes: ``jax.eval_shape``) and the memory the base and the adapters
take. For a decoder only the checkpoint's config and tokenizer are read, never a weight; a
``bert`` run reads its encoder, as its classification head is fitted to it. Nothing is
written: the run directory is not created.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax

import jlora
from jlora.runner.config import RunConfig, get_dotted
from jlora.runner.data.chat_batches import describe
from jlora.runner.defaults import Resolved, resolve, show_value
from jlora.runner.rundir.directory import saved_differences
from jlora.runner.variants import adapt, prepare_base

_ADAM_COPIES = 3  # an adapter's weights and Adam's two moments, float32 each


def given_values(config: RunConfig, given: Collection[str]) -> dict[str, Any]:
    """The values of the keys a config file and its overrides set, by dotted key.

    Example:
      >>> given_values(RunConfig(), ["lora.rank"])
      {'lora.rank': 8}
    """
    return {key: get_dotted(config, key) for key in sorted(given)}


def size(n_bytes: float) -> str:
    """Bytes in binary units.

    Example:
      >>> size(3 * 2**30), size(1536)
      ('3.00 GiB', '1.50 KiB')
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def _config_section(resolved: Resolved, given: Collection[str]) -> list[str]:
    lines = ["== config: auto values resolved (explicit values always win) =="]
    lines += resolved.lines() or ["(none: every auto key was given)"]
    values = given_values(resolved.config, given)
    if values:
        lines.append("given: " + ", ".join(f"{k}={show_value(v)}" for k, v in values.items()))
    return lines


def _run_dir_section(config: RunConfig) -> list[str]:
    run_dir = config.run_dir
    try:
        diff = saved_differences(config)
    except ValueError as err:
        return ["== run directory ==", f"{run_dir}: finetune would refuse it: {err}"]
    if diff is None:
        state = "does not exist yet or holds no run; finetune creates the run there"
    elif not diff:
        state = "holds this run; finetune resumes it from its latest checkpoint"
    elif config.overwrite:
        state = "holds a different run; overwrite=true: finetune deletes it and starts over"
    else:
        state = (
            "holds a different run, so finetune would refuse it (overwrite=true starts over):\n  "
            + "\n  ".join(diff)
        )
    return ["== run directory ==", f"{run_dir}: {state}"]


def _data_section(config: RunConfig, resolved: Resolved) -> list[str]:
    profile = resolved.profile
    if profile is None:
        return []
    seq, batch = config.data.seq_len, config.train.batch_size
    steps, accum = config.train.steps, config.train.grad_accum
    stats = profile.stats(seq)
    lines = [f"== data (at data.seq_len {seq}) =="]
    if profile.instructions:
        lines.append(describe(stats))
        kind = "packed rows" if config.data.pack else "rows (one example each)"
    else:
        lines.append(
            f"train: {stats['train_tokens']:,} tokens, {stats['train_windows']:,} windows; "
            f"eval: {stats['eval_tokens']:,} tokens, {stats['eval_windows']:,} windows"
        )
        kind = "windows"
    rows = profile.epoch_rows(seq, config.train.seed, packed=config.data.pack)
    per_step = batch * accum
    epochs = steps * per_step / max(rows, 1)
    lines.append(
        f"one epoch: {rows:,} {kind} of {seq} tokens; train.steps {steps:,} x {per_step} "
        f"a step = {epochs:.3g} epoch(s)"
    )
    return lines


def _model_section(config: RunConfig) -> tuple[list[str], Any, Any, str]:
    """The model line, the abstract adapted tree, the abstract base, and why its dtype."""
    why = "a bert run's encoder"
    if config.model.kind == "llama":
        from jlora.models.formats.stored_dtype import stored_dtype
        from jlora.runner.base_dtype import resolve_base_dtype
        from jlora.runner.tasks.causal_lm import abstract_base, checkpoint_config

        decoder, source = checkpoint_config(config.model)
        why = resolve_base_dtype(config.model, stored_dtype(source))[1]
        name = config.model.decoder
        where = name if source == name else f"{name} ({source})"
        line = (
            f"model: {where}: {decoder.architecture}, {decoder.num_hidden_layers} layers, "
            f"hidden {decoder.hidden_size}, vocab {decoder.vocab_size}, "
            f"{decoder.max_position_embeddings:,} positions (weights not read)"
        )
        base = abstract_base(decoder)
    else:
        from jlora.runner.tasks import make_task

        line = f"model: {config.model.kind} {config.model.weights}"
        base = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_task(config).base
        )
    abstract = jax.eval_shape(
        lambda b: adapt(jax.random.key(0), prepare_base(config, b), config), base
    )
    return ["== what will be trained ==", line], abstract, base, why


def _memory_section(config: RunConfig, abstract: Any, base: Any, why: str) -> list[str]:
    lora, rest = jlora.split(abstract)
    adapters = sum(x.size for x in jax.tree.leaves(lora))
    count = sum(x.size for x in jax.tree.leaves(base))
    held = sorted({x.dtype.name for x in jax.tree.leaves(base)})
    stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    lines = [
        "== memory ==",
        f"base: {count:,} parameters held in {'/'.join(held)} = {size(stored)} ({why}; "
        f"model.dtype={config.model.dtype} sets the compute dtype)",
    ]
    if config.lora.quantize != "none":
        quantised = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rest))
        lines.append(
            f"quantised for training (lora.quantize={config.lora.quantize}): "
            f"{size(quantised)}, after reading the base"
        )
    lines += [
        f"adapters: {adapters:,} parameters x {_ADAM_COPIES} (weights and Adam's two moments) "
        f"x 4 bytes = {size(4 * _ADAM_COPIES * adapters)}",
        f"activations come on top and grow with train.batch_size x data.seq_len "
        f"({config.train.batch_size} x {config.data.seq_len}); model.remat=full or "
        "model.dtype=bfloat16 shrinks them; jlora plan compiles the step and prints them",
    ]
    return lines


def dry_run(config: RunConfig, given: Collection[str] = ()) -> str:
    """What ``jlora finetune`` would do with ``config``, as text, without compiling or writing.

    Args:
      config: the config as read, auto keys not yet resolved
        (:func:`jlora.runner.config.read_config`).
      given: the dotted keys the config file and overrides set (kept as they are).

    Returns:
      The sections: resolved config, run directory, data, what will be trained, memory.

    Raises:
      FileNotFoundError, ValueError: a checkpoint, tokenizer or data that the run would
        refuse, named as the run would name it.

    Example:
      >>> from jlora.runner.config import read_config
      >>> text = dry_run(*read_config("default", ["train.steps=3"]))
      >>> [line for line in text.splitlines() if line.startswith("==")][:3]
      ... # doctest: +NORMALIZE_WHITESPACE
      ['== config: auto values resolved (explicit values always win) ==',
       '== run directory ==', '== data (at data.seq_len 128) ==']
    """
    resolved = resolve(config, given, measure_data=True)
    config = resolved.config
    lines = _config_section(resolved, given)
    lines += _run_dir_section(config)
    lines += _data_section(config, resolved)
    model_lines, abstract, base, why = _model_section(config)
    lines += model_lines
    lines.append(jlora.summary(abstract))
    lines += _memory_section(config, abstract, base, why)
    return "\n".join(lines)
