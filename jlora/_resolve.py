"""Resolving an adapted kernel against a config: its roles, rank and scale, shapes checked.

Every consumer of adapters (merge, the factorised path, summary, files) goes through
:func:`resolve_sites`, so a tree paired with the wrong config fails here, naming the path.
Files record each kernel's roles, rank and scale; :func:`check_config` holds a config against
them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jlora._axes import axis_roles
from jlora._config import LoraConfig
from jlora._layout import adapter_shapes, magnitude_shape
from jlora._tree import Site, find_sites


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A site with everything needed to apply it: ``W + scale * (A contracted with B)``."""

    site: Site
    roles: tuple[str, ...]
    rank: int
    scale: float


def resolve(site: Site, config: LoraConfig) -> Adapted:
    """Checks a site's adapter shapes against ``config`` and returns its roles, rank and scale.

    Raises:
      ValueError: if A or B (or a DoRA magnitude) does not have the shape ``config`` implies
        for this kernel.
    """
    name = site.name
    shape = tuple(site.kernel.shape)
    roles = axis_roles(name, shape, config)
    rank = config.rank_for(name)
    want_a, want_b = adapter_shapes(shape, roles, rank)
    got_a, got_b = tuple(site.a.shape), tuple(site.b.shape)
    if (got_a, got_b) != (want_a, want_b):
        raise ValueError(
            f"adapters of {name!r} do not fit this config: found A {got_a} and B {got_b}, but a "
            f"kernel of shape {shape} with roles {roles} at rank {rank} needs A {want_a} and B "
            f"{want_b}. Pass the LoraConfig the tree was initialised with"
        )
    if site.m is not None and tuple(site.m.shape) != magnitude_shape(shape, roles):
        raise ValueError(
            f"DoRA magnitude of {name!r} has shape {tuple(site.m.shape)}, but a kernel of shape "
            f"{shape} with roles {roles} needs {magnitude_shape(shape, roles)} (its stack and "
            "out axes); recreate it with jlora.add_magnitudes"
        )
    return Adapted(site, roles, rank, config.scale_for(name, rank))


def resolve_sites(params: Any, config: LoraConfig) -> list[Adapted]:
    """:func:`resolve` for every adapted kernel in ``params``, in tree order."""
    return [resolve(site, config) for site in find_sites(params)]


def _describe(config: LoraConfig, kernel: str, rank: int) -> str:
    how = f"alpha {config.alpha_for(kernel):g} / {'sqrt(' if config.use_rslora else ''}r"
    return f"{how}{')' if config.use_rslora else ''}, r = {rank}"


def check_config(
    where: str,
    recorded: LoraConfig,
    kernels: list[tuple[str, tuple[int, ...], tuple[str, ...], int, float]],
    given: LoraConfig,
    given_name: str = "the config given",
) -> None:
    """Refuses ``given`` unless it gives every adapted kernel the recorded roles, rank and scale.

    The tree holds only A and B: a rank shows in their shapes, but alpha, ``alpha_pattern`` and
    ``use_rslora`` do not, so a config of another alpha would silently scale the update. Files
    record them; this is where a file and a config meet.

    Args:
      where: the file, for the message.
      recorded: the config the file records (for describing it).
      kernels: ``(path, shape, roles, rank, scale)`` per adapted kernel, as recorded.
      given: the config the caller means to use with these adapters.
      given_name: how the message names ``given``.

    Raises:
      ValueError: naming the first kernel where roles, rank or scale differ, with both values.

    Example:
      >>> cfg = LoraConfig(rank=2, alpha=4.0)
      >>> check_config("x", cfg, [("d/kernel", (3, 3), ("in", "out"), 2, 2.0)], cfg)
    """
    fix = (
        "Use the config the file records (the one load_adapter / import_peft returns when no "
        "config is passed), or a config with the same alpha, alpha_pattern, rank and use_rslora"
    )
    for kernel, shape, roles, rank, scale in kernels:
        got_roles = axis_roles(kernel, shape, given)
        if got_roles != tuple(roles):
            raise ValueError(
                f"{where}: kernel {kernel!r} was adapted with axis roles {tuple(roles)}, but "
                f"{given_name} lays it out as {got_roles} (axis_rules differ). {fix}"
            )
        got_rank = given.rank_for(kernel)
        got_scale = given.scale_for(kernel, got_rank)
        if got_rank != rank or not math.isclose(got_scale, scale, rel_tol=1e-9):
            raise ValueError(
                f"{where}: kernel {kernel!r} was trained with scale {scale:g} "
                f"({_describe(recorded, kernel, rank)}), but {given_name} has scale "
                f"{got_scale:g} there ({_describe(given, kernel, got_rank)}); merging or "
                f"applying with it would scale the update by {got_scale / scale:.4g}. {fix}"
            )
