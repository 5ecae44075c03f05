"""Run by test_distributed.py in a subprocess with 8 fake CPU devices; prints a JSON report."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import sharded_train as st

import jlora


def weight_shapes(params, mesh_shape):
    """Every base kernel's full shape and per-device shard shape under the example's rules.

    A stacked layer kernel ``[L, in, out]`` also gives one layer's slice of both: inside the
    scan a gradient is reduced layer by layer.
    """
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=True))
    specs = jlora.partition_specs(params, st.RULES)
    shapes = set()
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs), strict=True):
        if leaf.ndim < 2:
            continue
        shapes.add(tuple(leaf.shape))
        shard = list(leaf.shape)
        for i, axis in enumerate(spec):
            for name in (axis,) if isinstance(axis, str) else (axis or ()):
                shard[i] //= sizes[name]
        shapes.add(tuple(shard))
        if leaf.ndim == 3:
            shapes |= {tuple(leaf.shape[1:]), tuple(shard[1:])}
    return shapes


def reduced_weight_shapes(compiled, shapes):
    return sorted(
        {
            s
            for c in jlora.collectives(compiled)
            if c.kind in ("all-reduce", "reduce-scatter")
            for s in c.shapes
            if s in shapes
        }
    )


CFG = st.model_config(dim=64, layers=2)  # the example's defaults, as the two processes run
# 3 layers for the mesh checks: a stacked kernel's leading axis (layers) then differs from the
# per-device batch (8 rows over data x fsdp = 4), so no activation is taken for a weight shard
MESH_CFG = st.model_config(dim=64, layers=3)


def restore(directory, steps):
    """Trains ``steps`` on one device and compares with the adapters restored from ``directory``."""
    losses, lora, _ = st.train(st.make_mesh((1, 1, 1)), steps, CFG)
    like = {"lora": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)}
    restored = jlora.restore_checkpoint(directory, like)
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), restored.state["lora"], lora)
    print(
        json.dumps(
            {"losses": losses, "step": restored.step, "max_diff": max(jax.tree.leaves(diffs))}
        )
    )


def main():
    cfg = MESH_CFG
    steps = 5
    mesh = st.make_mesh((2, 2, 2))
    losses, lora, compiled = st.train(mesh, steps, cfg)
    single, _, _ = st.train(st.make_mesh((1, 1, 1)), steps, cfg)
    full_losses, _, full = st.train(mesh, 1, cfg, mode="full")
    shapes = weight_shapes(st.init_params(cfg), (2, 2, 2))
    base = jax.device_put(st.init_params(cfg))
    want = jlora.lora_shardings(base, jlora.partition_specs(base, st.RULES), st.LORA)
    mismatched = [
        f"{jlora.path_str(p)}: {x.sharding.spec} != {_at(want, p)}"
        for p, x in jax.tree.flatten_with_path(lora)[0]
        if _padded(x.sharding.spec, x.ndim) != _padded(_at(want, p), x.ndim)
    ]
    print(
        json.dumps(
            {
                "losses": losses,
                "single": single,
                "full_first_loss": full_losses[0],
                "spec_mismatches": mismatched,
                "n_adapters": len(jax.tree.leaves(lora)),
                "lora_reduced_weight_shapes": reduced_weight_shapes(compiled, shapes),
                "full_reduced_weight_shapes": reduced_weight_shapes(full, shapes),
                "lora_bytes": sum(c.nbytes for c in jlora.collectives(compiled)),
                "full_bytes": sum(c.nbytes for c in jlora.collectives(full)),
                "finite": bool(np.isfinite(losses).all()),
            }
        )
    )


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


if __name__ == "__main__":
    if len(sys.argv) > 1:
        restore(sys.argv[1], int(sys.argv[2]))
    else:
        main()
