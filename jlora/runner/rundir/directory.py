"""The run directory: its resolved config, guarded against mixing runs, and its metrics file.

Layout: :data:`RUN_FILES` names everything jlora writes into a run directory and what it is
(``config.yaml``, the resolved config; ``metrics.jsonl``; ``adapter/``; ``checkpoints/``;
...). :data:`OWNED` is its list of names: ``overwrite=true`` deletes those and nothing else,
so a run directory can share a folder with the user's own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import yaml

from jlora.runner.config import RunConfig, from_dict, to_dict
from jlora.runner.rundir.lock import LOCK_FILE, hold_lock
from jlora.runner.yamlfile import read_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
# Logs of records keyed by "step": a resumed run cuts them back to the step it resumes from.
_STEP_LOGS = (METRICS_FILE, COMPLETIONS_FILE)
#: Everything jlora writes into a run directory -> what it is (a folder ends in ``/``), in the
#: order a listing shows them. ``jlora finetune`` writes the entries up to ``wandb/`` (a head
#: only for a ``bert`` run, ``tensorboard/`` and ``wandb/`` when ``log`` asks for them); the
#: other commands add the rest.
RUN_FILES: dict[str, str] = {
    CONFIG_FILE: "the resolved config of the run (a resumed run must match it)",
    METRICS_FILE: "one JSON object per logged step and per evaluation",
    "loss_curve.png": "training and held-out loss by step",
    "before.json": "the base model's scores and samples, computed once per run",
    "reference_logps.safetensors": (
        "the reference's log-probabilities of the training pairs "
        "(train.precompute_ref_log_probs), computed once per run"
    ),
    COMPLETIONS_FILE: "GRPO runs: held-out completions sampled at each evaluation",
    "results.json": "scores and samples before and after, parameter counts, data statistics",
    "adapter/": "the trained adapter, as jlora.save_adapter writes it",
    "head.safetensors": "the trained classification head (bert runs)",
    "checkpoints/": "the latest checkpoints (orbax), to resume from",
    "tensorboard/": "TensorBoard event files (log.tensorboard)",
    "wandb/": "Weights & Biases files (log.wandb)",
    "merged.safetensors": "jlora merge: the base with the adapter folded in",
    "merged_hf/": "jlora merge --format hf: a Hugging Face model directory",
    "peft/": "jlora export-peft: a PEFT LoRA adapter directory",
    "base_hf/": "jlora export-peft: a GGUF or package base as a Hugging Face directory",
    LOCK_FILE: "held while a run is going",
}
# Everything jlora writes into a run directory (and the ``.tmp`` files of its atomic writes).
OWNED = tuple(name.rstrip("/") for name in RUN_FILES)


def listing(run_dir: str) -> list[str]:
    """The entries of :data:`RUN_FILES` that ``run_dir`` holds, in its order (no lock file).

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> os.mkdir(os.path.join(d, "adapter"))
      >>> open(os.path.join(d, CONFIG_FILE), "w").close()
      >>> listing(d)
      ['config.yaml', 'adapter/']
    """
    return [
        name
        for name in RUN_FILES
        if name != LOCK_FILE and os.path.exists(os.path.join(run_dir, name.rstrip("/")))
    ]


# The first line of a config.yaml that jlora wrote: overwrite=true deletes only such a file.
_MARK = "# written by jlora finetune: the resolved config of this run (do not edit)\n"
# Keys that do not change what a run computes: where it lives (moved or renamed, or named by
# another path), how it reports progress and metrics, what extra scores evaluation adds, and
# how the process manages host memory.
_FREE = {
    "run_dir",
    "overwrite",
    "train.progress",
    "train.keep_freed_memory",
    "train.eval_exact_match",
    "log.tensorboard",
    "log.wandb",
    "log.wandb_project",
    "log.wandb_mode",
}
# Keys a resumed run may change, so that the advice after a NaN loss ("lower the learning
# rate and re-run") can be followed: the optimiser's step sizes (they enter only its schedule
# functions, not the shapes of its state), how often checkpoints are saved and kept, and
# whether the reference's log-probabilities are precomputed (the same numbers). Not the
# model, adapters, data, seed, batch, step count or anything else that shapes the state or
# the data stream. A change is recorded in config.yaml and metrics.jsonl.
RESUMABLE = {
    "train.learning_rate",
    "train.warmup_steps",
    "train.head_learning_rate",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.precompute_ref_log_probs",
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _saved(path: str) -> dict[str, Any]:
    """The flat config saved at ``path``; keys added to jlora since then read as their defaults.

    So a run saved before a new config key existed resumes, as long as the new key keeps its
    default (which is what that run computed with).
    """
    return {**_flat(to_dict(RunConfig())), **_flat(read_yaml(path) or {})}


def load_run_config(run_dir: str) -> RunConfig:
    """The config saved in ``run_dir``.

    Raises:
      FileNotFoundError: if ``run_dir`` holds no ``config.yaml``.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run_dir!r} is not a jlora run directory (no {CONFIG_FILE}); pass the run_dir of "
            "a `jlora finetune` run"
        )
    return from_dict(RunConfig, read_yaml(path))


def _written_by_jlora(path: str, saved: Any) -> bool:
    with open(path, encoding="utf-8") as f:
        if f.readline() == _MARK:
            return True
    # A config.yaml of a jlora before the mark: a complete resolved config, key for key.
    full = set(_flat(to_dict(RunConfig())))
    return isinstance(saved, dict) and set(_flat(saved)) == full


def _check_dir(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(
            f"run_dir {run_dir!r} is a file, not a directory; choose a run_dir that is a "
            "directory or does not exist yet (jlora creates it)"
        )
    path = os.path.join(run_dir, CONFIG_FILE)
    others = set(os.listdir(run_dir)) - {LOCK_FILE} if os.path.isdir(run_dir) else set()
    if others and not os.path.isfile(path):
        raise ValueError(
            f"run_dir {run_dir!r} exists, is not empty and holds no {CONFIG_FILE}, so it is not "
            "a jlora run; choose another run_dir"
        )
    if os.path.isfile(path) and not _written_by_jlora(path, read_yaml(path)):
        raise ValueError(
            f"{path!r} was not written by jlora (it is not the resolved config of a run), so "
            f"{run_dir!r} is not a jlora run and jlora will not overwrite it; choose another "
            "run_dir"
        )


def config_changes(config: RunConfig) -> dict[str, list[Any]]:
    """The :data:`RESUMABLE` keys whose values differ from the run saved in ``config.run_dir``.

    Returns:
      ``{"train.learning_rate": [saved, now], ...}``; empty if there is no saved run.
    """
    path = os.path.join(config.run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    saved, now = _saved(path), _flat(to_dict(config))
    return {k: [saved.get(k), now[k]] for k in sorted(RESUMABLE) if saved.get(k) != now[k]}


def _delete_owned(run_dir: str) -> None:
    for name in os.listdir(run_dir):
        if name == LOCK_FILE or name.removesuffix(".tmp") not in OWNED:
            continue  # the lock stays held; everything else is the user's
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _write_config(config: RunConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_MARK)
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)


def saved_differences(config: RunConfig) -> list[str] | None:
    """How the run saved in ``config.run_dir`` differs from ``config``; nothing is changed.

    Returns:
      ``None`` if no run is saved there; otherwise ``"key: saved (saved) vs now (now)"`` per
      key that would make :func:`prepare_run_dir` refuse (empty: the same run, which resumes).

    Raises:
      ValueError: as :func:`prepare_run_dir` for a directory that is not a jlora run.

    Example:
      >>> import tempfile
      >>> saved_differences(RunConfig(run_dir=tempfile.mkdtemp())) is None
      True
    """
    _check_dir(config.run_dir)
    path = os.path.join(config.run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    saved = _saved(path)
    now = _flat(to_dict(config))
    return [
        f"{k}: {saved.get(k)!r} (saved) vs {now.get(k)!r} (now)"
        for k in sorted(set(saved) | set(now))
        if k not in _FREE | RESUMABLE and saved.get(k) != now.get(k)
    ]


def prepare_run_dir(config: RunConfig) -> bool:
    """Creates or checks ``config.run_dir``; returns whether it already held this run.

    The saved run counts as this run if they differ only in where the run lives, how it
    reports progress, or :data:`RESUMABLE` keys (then ``config.yaml`` is updated).
    ``overwrite=true`` deletes only what jlora wrote there (:data:`OWNED`).

    Raises:
      ValueError: if the directory holds a run with a different config (the differing keys are
        listed) and ``overwrite`` is false; is a non-empty directory that is not a run, or
        holds a ``config.yaml`` that jlora did not write; or ``run_dir`` is a file.
    """
    run_dir = config.run_dir
    path = os.path.join(run_dir, CONFIG_FILE)
    diff = saved_differences(config)
    if diff is not None:
        if not diff:
            if config_changes(config):
                _write_config(config, path)
            return True
        if not config.overwrite:
            raise ValueError(
                f"run_dir {run_dir!r} holds a run with a different config:\n  "
                + "\n  ".join(diff)
                + "\npass overwrite=true to delete it and start over, or choose another run_dir"
            )
        _delete_owned(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    _write_config(config, path)
    return False


@contextlib.contextmanager
def open_run_dir(config: RunConfig) -> Iterator[bool]:
    """:func:`prepare_run_dir` under the run directory's lock, held until the block ends.

    The directory is checked before the lock file is created in it, so a refused directory
    is left exactly as it was.

    Yields:
      whether ``config.run_dir`` already held this run.

    Raises:
      ValueError: as :func:`prepare_run_dir`, or if another jlora process holds the lock.
    """
    _check_dir(config.run_dir)
    os.makedirs(config.run_dir, exist_ok=True)
    with hold_lock(config.run_dir):
        yield prepare_run_dir(config)


def read_metrics(run_dir: str, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (or another log of the run, by file name).

    A torn last line, from a killed run, is skipped.
    """
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def rewind_logs(run_dir: str, step: int) -> None:
    """Keeps only the log records up to ``step``, so a resumed run does not repeat lines.

    Cuts ``metrics.jsonl`` and ``completions.jsonl`` alike; ``step=-1`` empties them.
    """
    for name in _STEP_LOGS:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        kept = [r for r in read_metrics(run_dir, name) if r.get("step", 0) <= step]
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(f"{path}.tmp", path)


def append_metrics(run_dir: str, record: dict[str, Any]) -> None:
    """Appends one record to ``metrics.jsonl``."""
    with open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path: str, data: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(f"{path}.tmp", path)
