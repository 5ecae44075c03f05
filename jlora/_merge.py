"""Folding adapters into their kernels (``merge_params``) and taking them back out (``unmerge``).

Both run as one ``jax.jit``-compiled function per tree structure and config. The kernel keeps
its dtype (the sum is formed in the wider of the kernel's and the adapters' dtypes, then cast
back) and, for ``NamedSharding``-placed kernels, its sharding. Inputs are never donated. A
quantised base is merged by :func:`merge_quantized`, which asks how the merged kernels are
stored (``merge_params`` refuses one).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig
from jlora._dora_norm import rescale
from jlora._layout import adapter_keys, delta, magnitude_key
from jlora._paths import KeyPath, path_str
from jlora._qlora import dequantize, quantize_kernel
from jlora._quantized import Quantized, is_quantized
from jlora._resolve import resolve_sites
from jlora._sharding import constrain
from jlora._split import combine
from jlora._tree import find_sites, rebuild, sites_in

# (kernel path, axis roles, scale, sharding to keep or None) per adapted kernel.
_Plan = tuple[tuple[KeyPath, tuple[str, ...], float, Any], ...]


def _plan(params: Any, config: LoraConfig) -> _Plan:
    plan = []
    for adapted in resolve_sites(params, config):
        if isinstance(adapted.site.kernel, Quantized):
            raise ValueError(
                f"merge_params: kernel {adapted.site.name!r} is quantised "
                f"({adapted.site.kernel.kind}); merging into it must dequantise and then either "
                "keep the sum in float or "
                "quantise it again. Use jlora.merge_quantized(params, config, store='float' or "
                "'requantize')"
            )
        sharding = getattr(adapted.site.kernel, "sharding", None)
        keep = sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
        plan.append((adapted.site.path, adapted.roles, adapted.scale, keep))
    return tuple(plan)


@functools.partial(jax.jit, static_argnames=("plan", "sign", "keep_adapters"))
def _fold(params: Any, plan: _Plan, sign: float, keep_adapters: bool) -> Any:
    table = {path: rest for path, *rest in plan}

    def fold(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for site in sites_in(parent, items):
            roles, scale, sharding = table[site.path]
            w = site.kernel
            wide = jnp.promote_types(w.dtype, site.a.dtype)
            new = w.astype(wide) + delta(site.a, site.b, roles, sign * scale).astype(wide)
            if site.m is not None:  # DoRA: fold m / ||W + s·A·B|| in (merge only, see unmerge)
                new = rescale(new, site.m, roles)
            new = new.astype(w.dtype)
            if sharding is not None:
                new = constrain(new, sharding)
            items[site.key] = new
            if not keep_adapters:
                for k in adapter_keys(site.key):
                    del items[k]
                items.pop(magnitude_key(site.key), None)
        return items

    return rebuild(params, fold)


def merge_params(params: Any, config: LoraConfig) -> Any:
    """Folds every adapter into its kernel: ``W <- W + s·A·B``, adapters removed.

    DoRA kernels (with a ``k_lora_m`` magnitude) become ``m · (W + s·A·B) / ||W + s·A·B||``.

    ``config`` must be the one the adapters were trained with. The tree holds only A and B: a
    rank shows in their shapes and is checked, but ``s`` (alpha, ``alpha_pattern``,
    ``use_rslora``) does not, so another alpha merges a differently scaled model and cannot be
    caught here. Take the config from :func:`jlora.load_adapter` / :func:`jlora.import_peft`,
    which record it, or pass yours to them as ``config=`` to have it checked.

    Args:
      params: an adapted tree (from :func:`jlora.init_lora`, possibly trained).
      config: the config the tree was initialised with (it gives scales and axis roles).

    Returns:
      A tree with exactly the structure of the original, un-adapted params; each kernel keeps
      its dtype and sharding. The input is not modified.

    Raises:
      ValueError: if an adapter does not fit ``config`` (the message names its path) or sits
        without its kernel.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> merged = merge_params(jlora.init_lora(jax.random.key(0), params, cfg), cfg)
      >>> bool((merged["dense"]["kernel"] == params["dense"]["kernel"]).all())  # B = 0 at init
      True
    """
    return _fold(params, _plan(params, config), 1.0, False)


def unmerge_params(merged: Any, lora: Any, config: LoraConfig) -> Any:
    """Recovers the adapted tree from a merged one: ``W <- W' - s·A·B``, adapters put back.

    The base is recovered up to floating-point rounding of the merge (exactly in the maths).

    Args:
      merged: the output of :func:`merge_params`.
      lora: the adapter half (from :func:`jlora.split`) that was merged in.
      config: the config of those adapters.

    Returns:
      An adapted tree like the one ``merge_params`` was given.

    Raises:
      ValueError: if ``lora`` does not line up with ``merged`` or does not fit ``config``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> lora, _ = jlora.split(p)
      >>> back = unmerge_params(merge_params(p, cfg), lora, cfg)
      >>> sorted(back["d"])
      ['kernel', 'kernel_lora_a', 'kernel_lora_b']
    """
    params = combine(lora, merged)
    dora = [s.site.name for s in resolve_sites(params, config) if s.site.m is not None]
    if dora:
        raise ValueError(
            f"unmerge_params: {dora} are DoRA kernels; a DoRA merge rescales W by "
            "m / ||W + s·A·B||, whose norm cannot be recovered from the merged kernel. Keep the "
            "base tree and combine(lora, base) instead of unmerging"
        )
    return _fold(params, _plan(params, config), -1.0, True)


STORES = ("float", "requantize")


def merge_quantized(params: Any, config: LoraConfig, *, store: str | None = None) -> Any:
    """Merges adapters into a quantised base: dequantise, add ``s·A·B``, store as asked.

    There is no exact way to keep a merged kernel quantised, so the caller says how it is
    stored: ``"float"`` keeps ``W_q + s·A·B`` dense in the kernel's original dtype (exactly the
    model that was trained; float memory for those kernels), ``"requantize"`` quantises it again
    with the base's kind and block size (the base's memory, but the adapter's change is rounded
    with the base, so outputs move by about the quantisation error). Quantised kernels without
    adapters are kept as they are. DoRA magnitudes are folded in as by ``merge_params``.

    Args:
      params: a tree with :class:`Quantized` kernels and adapters.
      config: the adapters' config.
      store: ``"float"`` or ``"requantize"`` (required).

    Returns:
      The merged tree without adapters.

    Raises:
      ValueError: if ``store`` is missing or unknown (the message explains both choices).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((8, 16))}}, cfg)
      >>> q = jlora.quantize(p, cfg, kind="int8")
      >>> merge_quantized(q, cfg, store="float")["d"]["kernel"].dtype
      dtype('float32')
      >>> type(merge_quantized(q, cfg, store="requantize")["d"]["kernel"]).__name__
      'Quantized'
    """
    if store not in STORES:
        raise ValueError(
            "merge_quantized: say how the merged kernels are stored: store='float' keeps "
            "W + s·A·B dense in the original dtype (exact, float memory), store='requantize' "
            "quantises it again like the base (base memory, the adapter's change rounded with "
            f"it); got store={store!r}"
        )
    nodes = {
        tuple(p): x
        for p, x in jax.tree.flatten_with_path(params, is_leaf=is_quantized)[0]
        if is_quantized(x)
    }
    adapted = {tuple(s.path) for s in find_sites(params) if is_quantized(s.kernel)}
    merged = merge_params(dequantize(params), config)

    def put_back(path: Sequence[Any], leaf: Any) -> Any:
        node = nodes.get(tuple(path))
        if node is None:
            return leaf
        if tuple(path) not in adapted:
            return node
        if store == "requantize":
            return quantize_kernel(path_str(tuple(path)), leaf, node.kind, node.block_size)
        return leaf

    return jax.tree.map_with_path(put_back, merged)
