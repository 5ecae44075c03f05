"""DoRA: a trained magnitude per output unit over the normalised adapted kernel.

``W' = m · (W + s·A·B) / ||W + s·A·B||`` (Liu et al., 2024), the norm over the kernel's ``in``
axes, one per ``stack + out`` entry, and treated as a constant in the backward pass (the paper's
"detach", as PEFT does) so ``m`` and the factors get gradients only through ``m / norm`` times
the output. The magnitude leaf ``k_lora_m`` (shape ``stack + out``, see ``_layout``) starts at
the norm itself, so the model is unchanged at step 0. Merging folds ``m / norm`` into the
kernel; the factorised path scales the output of ``x·W + s·(x·A)·B`` by it, computing the norm
without forming ``W + s·A·B`` (the norms are ``jlora._dora_norm``'s, shared with the merge and
the engine). This module adds and places the magnitude leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey

from jlora._config import LoraConfig
from jlora._dora_norm import factorised_norm
from jlora._init import init_lora
from jlora._layout import magnitude_key, role_sizes
from jlora._paths import KeyPath, path_str
from jlora._quantized import as_array
from jlora._resolve import resolve_sites
from jlora._tree import rebuild


def add_magnitudes(params: Any, config: LoraConfig) -> Any:
    """Adds a DoRA magnitude ``k_lora_m = ||W + s·A·B||`` beside every adapted kernel.

    Starting ``m`` at the current norm leaves the model unchanged, whatever A and B are (plain,
    PiSSA or trained adapters).

    An embedding table ``(vocab, features)`` gets one magnitude per feature, its norm over
    the vocabulary, as PEFT's DoRA embeddings do.

    Raises:
      ValueError: for a kernel that already has a magnitude.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> add_magnitudes(p, cfg)["d"]["kernel_lora_m"]
      Array([2., 2., 2.], dtype=float32)
    """
    planned: dict[KeyPath, jax.Array] = {}
    for adapted in resolve_sites(params, config):
        site, name = adapted.site, adapted.site.name
        if site.m is not None:
            raise ValueError(f"DoRA: {name!r} already has a magnitude {magnitude_key(site.key)!r}")
        dtype = jnp.promote_types(site.kernel.dtype, site.a.dtype)
        norm = factorised_norm(
            as_array(site.kernel).astype(dtype), site.a, site.b, adapted.roles, adapted.scale
        )
        planned[site.path] = norm.astype(config.dtype)

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            m = planned.get((*parent, DictKey(k)))
            if m is not None:
                items[magnitude_key(k)] = m
        return items

    return rebuild(params, add)


def place_magnitudes(params: Any, magnitudes: Mapping[str, Any]) -> Any:
    """``params`` with ``k_lora_m = magnitudes[path]`` beside each kernel named by its path.

    Used when loading saved DoRA adapters; the kernels must already have their A and B.

    Raises:
      ValueError: if a named kernel is not in a dict of ``params``.
    """
    placed = set()

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            name = path_str((*parent, DictKey(k)))
            if name in magnitudes and isinstance(k, str):
                items[magnitude_key(k)] = jnp.asarray(magnitudes[name])
                placed.add(name)
        return items

    out = rebuild(params, add)
    missing = sorted(set(magnitudes) - placed)
    if missing:
        raise ValueError(f"DoRA magnitudes for {missing} have no kernel in a dict of params")
    return out


def place_peft_magnitudes(
    params: Any, config: LoraConfig, given: Mapping[str, Mapping[tuple[int, ...], Any]]
) -> Any:
    """PEFT magnitudes (``given[kernel][stack index] = vector``) placed as ``k_lora_m``.

    A stack layer without a vector (PEFT left it out) gets ``||W + s·A·B||``: no change there.
    """
    full: dict[str, Any] = {}
    for adapted in resolve_sites(params, config):
        site = adapted.site
        if site.name not in given:
            continue
        dtype = jnp.promote_types(site.kernel.dtype, site.a.dtype)
        w = as_array(site.kernel).astype(dtype)
        m = factorised_norm(w, site.a, site.b, adapted.roles, adapted.scale)
        out = role_sizes(site.kernel.shape, adapted.roles)[2]
        for index, vector in given[site.name].items():
            m = m.at[index].set(jnp.asarray(vector, m.dtype).reshape(out))
        full[site.name] = m.astype(config.dtype)
    return place_magnitudes(params, full)


def init_dora(key: jax.Array, params: Any, config: LoraConfig) -> Any:
    """:func:`jlora.init_lora` plus a DoRA magnitude per output unit (the kernel's norm).

    The adapted kernel is ``m · (W + s·A·B) / ||W + s·A·B||``; with ``B = 0`` and ``m = ||W||``
    the model is exactly unchanged at step 0. ``merge_params`` folds ``m`` in; ``jlora.lora``
    computes it factorised; ``lora_optimizer`` trains ``m`` with A and B.

    Args:
      key: a PRNG key (for A, as ``init_lora``).
      params: the base tree.
      config: what to adapt (any kernel ``init_lora`` takes, embedding tables included).

    Returns:
      The adapted tree with ``k_lora_a``, ``k_lora_b`` and ``k_lora_m`` beside each kernel.

    Raises:
      ValueError: as ``init_lora``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = init_dora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> sorted(p["d"]), p["d"]["kernel_lora_m"].shape
      (['kernel', 'kernel_lora_a', 'kernel_lora_b', 'kernel_lora_m'], (3,))
    """
    return add_magnitudes(init_lora(key, params, config), config)
