"""Resolving an adapted kernel against a config: its roles, rank and scale, shapes checked.

Every consumer of adapters (merge, the factorised path, summary, files) goes through
:func:`resolve_sites`, so a tree paired with the wrong config fails here, naming the path.
"""

from __future__ import annotations

import dataclasses
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
