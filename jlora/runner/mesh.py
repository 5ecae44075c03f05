"""The runner's ``mesh`` section: laying a run's state out on a (data, fsdp, tensor) mesh.

The base is placed by regex rules (``jlora.partition_specs``), adapters and their optimizer
state follow their kernels (``jlora.lora_shardings``), a trainable head is replicated, and each
batch is split over ``data × fsdp``. Nothing else changes: the jitted step sees sharded inputs
and XLA inserts the collectives they imply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora.runner.config import DECODER_RULES, MeshSection, RunConfig

AXES = ("data", "fsdp", "tensor")


def mesh_section(config: RunConfig) -> MeshSection:
    """The run's mesh section; a decoder's rules left empty become :data:`DECODER_RULES`.

    Example:
      >>> from jlora.runner.config import ModelSection
      >>> mesh_section(RunConfig()).rules == DECODER_RULES
      True
      >>> mesh_section(RunConfig(model=ModelSection(kind="bert"))).rules
      ()
    """
    section = config.mesh
    if config.model.kind == "llama" and not section.rules:
        return dataclasses.replace(section, rules=DECODER_RULES)
    return section


def make_mesh(section: MeshSection) -> Mesh | None:
    """The run's mesh, or ``None`` for the default single-device run.

    Raises:
      ValueError: if the mesh needs more or fewer devices than JAX sees.

    Example:
      >>> make_mesh(MeshSection()) is None
      True
    """
    shape = (section.data, section.fsdp, section.tensor)
    if shape == (1, 1, 1):
        return None
    n = int(np.prod(shape))
    if n != jax.device_count():
        raise ValueError(
            f"config mesh: data*fsdp*tensor = {'*'.join(map(str, shape))} = {n} devices, but JAX "
            f"sees {jax.device_count()}; make the product equal the device count (on CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} fakes {n} devices)"
        )
    return Mesh(np.asarray(jax.devices()).reshape(shape), AXES)


def rules(section: MeshSection) -> list[tuple[str, PartitionSpec]]:
    """The section's ``[regex, axis, ...]`` rules as ``(regex, PartitionSpec)``.

    An axis ``none`` is replicated.

    Raises:
      ValueError: for an axis name other than data, fsdp, tensor or none.
    """
    out = []
    for rule in section.rules:
        pattern, *axes = rule
        bad = [a for a in axes if a not in (*AXES, "none")]
        if bad or not axes:
            raise ValueError(
                f"config mesh.rules: rule {list(rule)} must be [regex, axis, ...] with axes from "
                f"{[*AXES, 'none']}; found {bad or 'no axes'}"
            )
        out.append((pattern, PartitionSpec(*(None if a == "none" else a for a in axes))))
    return out


def shard_state(
    mesh: Mesh, section: MeshSection, base: Any, state: dict[str, Any], config: jlora.LoraConfig
) -> tuple[Any, dict[str, Any], Any]:
    """Places ``base`` and the train ``state`` on ``mesh`` (laid out by :func:`layout`).

    Returns:
      ``(base, state, state_shardings)``; ``state_shardings`` is a tree like ``state``, for
      the step's ``out_shardings`` so the layout stays the same from step to step.
    """
    base_sh, state_sh = layout(mesh, section, base, state, config)
    return jax.device_put(base, base_sh), jax.device_put(state, state_sh), state_sh


def layout(
    mesh: Mesh, section: MeshSection, base: Any, state: dict[str, Any], config: jlora.LoraConfig
) -> tuple[Any, Any]:
    """``(base_shardings, state_shardings)``: trees of ``NamedSharding`` like the two trees.

    Shapes are all it reads, so ``base`` and ``state`` may be ``jax.ShapeDtypeStruct`` trees
    (what ``jlora plan`` lays out).
    """
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    base_sh = jax.tree.map(named, jlora.partition_specs(base, rules(section)))
    lora_sh, _ = jlora.split(jlora.lora_shardings(base, base_sh, config))
    by_path = {jlora.path_str(p): s for p, s in jax.tree.flatten_with_path(lora_sh)[0]}
    replicated = named(PartitionSpec())

    def place(path: Any, _: Any) -> NamedSharding:
        # An adapter, and each optimizer moment of it, ends in the adapter's own path.
        for start in range(len(path)):
            sharding = by_path.get(jlora.path_str(path[start:]))
            if sharding is not None:
                return sharding
        return replicated

    return base_sh, jax.tree.map_with_path(place, state)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Batches split over ``data × fsdp``.

    Raises:
      ValueError: if ``batch_size`` does not divide evenly.
    """
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ValueError(
            f"config train.batch_size {batch_size} must be divisible by mesh data*fsdp = {ways}"
        )
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
