"""The run directory: its resolved config, guarded against mixing runs, and its metrics file.

Layout: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per line),
``loss_curve.png``, ``before.json`` / ``results.json`` (what the base and the adapted model
scored), ``adapter/`` (``jlora.save_adapter`` files), ``checkpoints/`` (orbax).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import yaml

from jlora.runner.config import RunConfig, from_dict, to_dict
from jlora.runner.yamlfile import read_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Keys that do not change what a run computes: where it lives (moved or renamed, or named by
# another path), how it reports progress and how the process manages host memory.
_FREE = {"run_dir", "overwrite", "train.progress", "train.keep_freed_memory"}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def prepare_run_dir(config: RunConfig) -> bool:
    """Creates or checks ``config.run_dir``; returns whether it already held this run.

    Raises:
      ValueError: if the directory holds a run with a different config (the differing keys are
        listed) and ``overwrite`` is false, or is a non-empty directory that is not a run.
    """
    run_dir = config.run_dir
    path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not os.path.isfile(path):
        raise ValueError(
            f"run_dir {run_dir!r} exists, is not empty and holds no {CONFIG_FILE}, so it is not "
            "a jlora run; choose another run_dir"
        )
    if os.path.isfile(path):
        saved = _flat(read_yaml(path) or {})
        now = _flat(to_dict(config))
        diff = [
            f"{k}: {saved.get(k)!r} (saved) vs {now.get(k)!r} (now)"
            for k in sorted(set(saved) | set(now))
            if k not in _FREE and saved.get(k) != now.get(k)
        ]
        if not diff:
            return True
        if not config.overwrite:
            raise ValueError(
                f"run_dir {run_dir!r} holds a run with a different config:\n  "
                + "\n  ".join(diff)
                + "\npass overwrite=true to delete it and start over, or choose another run_dir"
            )
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)
    return False


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
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


def rewind_metrics(run_dir: str, step: int) -> None:
    """Keeps only the records up to ``step``, so a resumed run does not repeat lines."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    path = os.path.join(run_dir, METRICS_FILE)
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
