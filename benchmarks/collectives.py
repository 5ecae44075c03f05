"""Bytes moved by collectives per train step: full fine-tuning vs LoRA on the same mesh.

Compiles both steps of examples/sharded_train.py on a (data, fsdp, tensor) mesh of fake CPU
devices for several model widths and sums the result sizes of every collective in the compiled
HLO (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute), per device, times
the number of times each runs (ops in a scan body run once per iteration).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py \\
      [--json F] [--quick]
"""

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import jax
from _common import add_runner_flags, parse, report, write_json

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import sharded_train as st

import jlora


def per_kind(compiled):
    out = defaultdict(int)
    for c in jlora.collectives(compiled):
        out[c.kind] += c.total_bytes  # ops in scanned layers run once per layer
    return out


def gradient_bytes(compiled, trainable):
    """Bytes of all-reduce / reduce-scatter results shaped like a trainable leaf or its shard."""
    shapes = set()
    for x in jax.tree.leaves(trainable):
        if x.ndim:
            shapes |= {x.shape, x.sharding.shard_shape(x.shape)}
    total = 0
    for c in jlora.collectives(compiled):
        if c.kind in ("all-reduce", "reduce-scatter"):
            total += c.count * sum(math.prod(s) * 4 for s in c.shapes if s in shapes)
    return total


def compile_step(mesh, cfg, mode):
    trainable, base, opt_state, step, batch_sharding = st.build(mesh, cfg, mode)
    tokens = jax.ShapeDtypeStruct((8, 33), "int32", sharding=batch_sharding)
    return step.lower(trainable, opt_state, base, tokens).compile(), trainable


QUICK = {"widths": "64,128"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh", default="2,2,2")
    parser.add_argument("--widths", default="64,128,256")
    add_runner_flags(parser, QUICK)
    args = parse(parser, argv)
    mesh = st.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        cfg = st.model_config(dim=width, layers=2)
        full, params = compile_step(mesh, cfg, "full")
        lora, adapters = compile_step(mesh, cfg, "lora")
        f, lo = per_kind(full), per_kind(lora)
        n_all = sum(x.size for x in jax.tree.leaves(params))
        n_lora = sum(x.size for x in jax.tree.leaves(adapters))
        rows.append(
            {
                "width": width,
                "params": n_all,
                "trainable": n_lora,
                "full_bytes": sum(f.values()),
                "lora_bytes": sum(lo.values()),
                "full_grad_reduce_bytes": gradient_bytes(full, params),
                "lora_grad_reduce_bytes": gradient_bytes(lora, adapters),
                "full_all_gather": f["all-gather"],
                "lora_all_gather": lo["all-gather"],
            }
        )
    cells = []
    for r in rows:
        mb = {k: f"{v / 1e6:.3f} MB" for k, v in r.items() if k.endswith("bytes")}
        ratio = r["lora_grad_reduce_bytes"] / r["full_grad_reduce_bytes"]
        cells.append(
            [
                r["width"],
                f"{100 * r['trainable'] / r['params']:.2f}%",
                mb["full_bytes"],
                mb["lora_bytes"],
                mb["full_grad_reduce_bytes"],
                mb["lora_grad_reduce_bytes"],
                f"{ratio:.4f}",
            ]
        )
    header = [
        "width",
        "trainable",
        "all collectives: full",
        "LoRA",
        "gradient reduction: full",
        "LoRA",
        "LoRA/full",
    ]
    tables = []
    title = (
        f"Collectives: mesh (data, fsdp, tensor) = {args.mesh}, 2-layer Llama, bytes per device "
        f"per step from the compiled HLO"
    )
    report(tables, "collectives", title, header, cells)
    write_json(args.json, args, tables, rows=rows)
    return rows


if __name__ == "__main__":
    main()
