"""Run by tests/runner/test_mesh.py with 8 fake CPU devices: the same tiny run on 1 device and on a
2x2x2 mesh, for the built-in model and for a checkpoint's decoder on packed instruction data
with gradient accumulation; prints their losses and the batch-size error as JSON."""

import json
import os
import sys
import tempfile

import jax
from jax.sharding import PartitionSpec
from runner_helpers import DEFAULT, tiny_overrides, write_checkpoint, write_tiny_weights

import jlora
from jlora.models.pretrained import load_pretrained
from jlora.runner import mesh as runner_mesh
from jlora.runner.config import load_config
from jlora.runner.finetune import finetune
from jlora.runner.rundir.directory import read_metrics

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def main():
    d = tempfile.mkdtemp()
    weights = write_tiny_weights(os.path.join(d, "tiny"))
    out = {}
    for name, mesh in (("one", []), ("mesh", MESH)):
        over = [*tiny_overrides(os.path.join(d, name), weights, 4), *mesh, "train.batch_size=8"]
        finetune(load_config(DEFAULT, over), log=lambda _: 0)
        metrics = read_metrics(os.path.join(d, name))
        out[name] = [r["train_loss"] for r in metrics if "train_loss" in r]
    out["decoder"] = decoder_runs(d)
    cfg = load_config(DEFAULT, [*MESH, "train.batch_size=6"])
    try:
        runner_mesh.batch_sharding(runner_mesh.make_mesh(cfg.mesh), 6)
    except ValueError as err:
        out["batch_error"] = str(err)
    out["devices"] = jax.device_count()
    print(json.dumps(out))


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)


def decoder_runs(d):
    """A checkpoint's decoder (default mesh rules: the decoder's) on packed chats, accumulated."""
    import pathlib

    ckpt = write_checkpoint(pathlib.Path(d) / "ckpt", chat_template=TEMPLATE)
    words = "thee thou thy summer rose love day night".split()
    chats = [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[: 2 + i % 6])},
                {"role": "assistant", "content": words[i % 8]},
            ]
        }
        for i in range(24)
    ]
    data = pathlib.Path(d) / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    losses = {}
    for name, mesh in (("one", []), ("mesh", MESH)):
        run_dir = os.path.join(d, f"decoder_{name}")
        over = [
            f"run_dir={run_dir}",
            f"model.path={ckpt}",
            f"data.train={data}",
            "data.seq_len=64",
            "train.steps=3",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.eval_every=3",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.progress=false",
            "generate.max_new_tokens=2",
            *mesh,
        ]
        config = load_config(DEFAULT, over)
        finetune(config, log=lambda _: 0)
        metrics = read_metrics(run_dir)
        losses[name] = [r["train_loss"] for r in metrics if "train_loss" in r]
        losses[f"{name}_eval"] = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    # How the mesh run laid out the base: the decoder's rules, as the loop applies them.
    rules = runner_mesh.rules(runner_mesh.mesh_section(config))
    specs = jlora.partition_specs(load_pretrained(ckpt).params, rules)
    losses["specs"] = {
        jlora.path_str(p): [a for a in s]
        for p, s in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )[0]
    }
    return losses


if __name__ == "__main__":
    sys.exit(main())
