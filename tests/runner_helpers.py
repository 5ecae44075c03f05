"""Shared settings for the runner tests: the default config and a tiny Llama base."""

import dataclasses
import json
import os

from jlora.models.llama import LlamaConfig, init_params
from jlora.models.weights import save_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
TINY = LlamaConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_len=64)


def write_tiny_weights(path):
    meta = {"model": "llama", "config": json.dumps(dataclasses.asdict(TINY))}
    save_params(path, init_params(TINY, seed=1), meta)
    return str(path)


def tiny_overrides(run_dir, weights, steps=4, **extra):
    kv = {
        "run_dir": run_dir,
        "model.weights": weights,
        "data.seq_len": 32,
        "train.steps": steps,
        "train.batch_size": 4,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.progress": False,
        "generate.max_new_tokens": 8,
        **extra,
    }
    return [f"{k}={v}" for k, v in kv.items()]
