"""Run by test_runner_mesh.py with 8 fake CPU devices: the same tiny run on 1 device and on a
2x2x2 mesh; prints their losses, the adapters' shardings and the batch-size error as JSON."""

import json
import os
import sys
import tempfile

import jax
from runner_helpers import DEFAULT, tiny_overrides, write_tiny_weights

from jlora.runner import mesh as runner_mesh
from jlora.runner.config import load_config
from jlora.runner.loop import finetune
from jlora.runner.rundir import read_metrics

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def main():
    d = tempfile.mkdtemp()
    weights = write_tiny_weights(os.path.join(d, "tiny.safetensors"))
    out = {}
    for name, mesh in (("one", []), ("mesh", MESH)):
        over = [*tiny_overrides(os.path.join(d, name), weights, 4), *mesh, "train.batch_size=8"]
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
        metrics = read_metrics(os.path.join(d, name))
        out[name] = [r["train_loss"] for r in metrics if "train_loss" in r]
    cfg = load_config(DEFAULT, [*MESH, "train.batch_size=6"])
    try:
        runner_mesh.batch_sharding(runner_mesh.make_mesh(cfg.mesh), 6)
    except ValueError as err:
        out["batch_error"] = str(err)
    out["devices"] = jax.device_count()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
