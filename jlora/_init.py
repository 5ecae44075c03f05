"""``init_lora``: adding A and B beside every selected kernel, with per-path randomness."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora._axes import axis_roles
from jlora._config import LoraConfig
from jlora._layout import adapter_keys, adapter_shapes, check_rank, fans
from jlora._paths import KeyPath, path_seed, path_str
from jlora._sharding import constrain, derive_adapter_specs
from jlora._targets import select_kernels
from jlora._tree import rebuild

_CONTAINERS = {
    jax.tree_util.SequenceKey: "list or tuple",
    jax.tree_util.GetAttrKey: "dataclass or object",
    jax.tree_util.FlattenedIndexKey: "custom pytree",
}


def _factors(
    key: jax.Array,
    name: str,
    shape: tuple[int, ...],
    roles: tuple[str, ...],
    rank: int,
    config: LoraConfig,
) -> tuple[jax.Array, jax.Array]:
    a_shape, b_shape = adapter_shapes(shape, roles, rank)
    dtype = jnp.dtype(config.dtype)
    if re.fullmatch(config.embed_pattern, name):
        # loralib's Embedding: A (on the looked-up rows) zero, B standard normal.
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    if config.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:
        # Kaiming-uniform, a=sqrt(5), as the LoRA paper's code: U(±1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fans(shape, roles)[0])
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


def init_lora(key: jax.Array, params: Any, config: LoraConfig, *, shardings: Any = None) -> Any:
    """Adds LoRA factors A and B beside every kernel that ``config`` selects.

    Each selected kernel ``W`` at ``.../k`` gets siblings ``k_lora_a`` (A) and ``k_lora_b`` (B),
    shaped by the kernel's axis roles (see :func:`jlora.axis_roles`), so that the adapted
    kernel is ``W + s·A·B``. B starts at zero (A for embeddings), so the model is exactly
    unchanged at step 0. Each adapter's key is ``fold_in(key, crc32(path))``: adding a target
    never changes the others. Works under ``jax.jit`` and ``jax.eval_shape``.

    Args:
      key: a PRNG key.
      params: a tree of nested dicts / ``FrozenDict`` holding the kernels (any other
        containers may sit above them).
      config: what to adapt and how.
      shardings: optional tree like ``params`` of ``PartitionSpec`` / ``NamedSharding`` /
        ``None``. Each A and B is then created already laid out by the spec derived from its
        kernel's (see :func:`jlora.lora_shardings`); under ``jax.jit`` that means no host round
        trip and no replicated copy. Bare ``PartitionSpec``s need an active mesh
        (``with jax.set_mesh(mesh):``).

    Returns:
      A new tree: ``params`` with the adapter leaves added; no input leaf is changed.

    Raises:
      ValueError: if targets match nothing, a non-kernel or an integer / boolean leaf, a rank is
        too large, a kernel has no axis rule, a kernel is already adapted, or its parent is not
        a dict.
      TypeError: if ``params`` holds Flax boxed parameters; unbox them and pass their specs as
        ``shardings`` (the message shows how).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> p = init_lora(jax.random.key(0), params, LoraConfig(rank=2))
      >>> sorted(p["dense"])
      ['bias', 'kernel', 'kernel_lora_a', 'kernel_lora_b']
      >>> p["dense"]["kernel_lora_a"].shape, p["dense"]["kernel_lora_b"].shape
      ((4, 2), (2, 3))
    """
    specs = {} if shardings is None else derive_adapter_specs(params, shardings, config)
    planned: dict[KeyPath, tuple[jax.Array, jax.Array]] = {}
    for path, leaf in select_kernels(params, config):
        name = path_str(path)
        shape = tuple(leaf.shape)
        roles = axis_roles(name, shape, config)
        rank = config.rank_for(name)
        check_rank(name, shape, roles, rank)
        a, b = _factors(jax.random.fold_in(key, path_seed(path)), name, shape, roles, rank, config)
        spec_a, spec_b = specs.get(tuple(path), (None, None))
        planned[tuple(path)] = constrain(a, spec_a), constrain(b, spec_b)

    done = set()

    def add_siblings(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            path = (*parent, jax.tree_util.DictKey(k))
            if path not in planned:
                continue
            if not isinstance(k, str):
                raise ValueError(
                    f"kernel {path_str(path)!r} is stored under a non-string key {k!r}; "
                    "adapter leaves are named '<key>_lora_a', so the key must be a string"
                )
            a_key, b_key = adapter_keys(k)
            if a_key in items or b_key in items:
                raise ValueError(
                    f"kernel {path_str(path)!r} already has LoRA adapters; merge_params or "
                    "split them off before calling init_lora again"
                )
            items[a_key], items[b_key] = planned[path]
            done.add(path)
        return items

    out = rebuild(params, add_siblings)
    for path in planned:
        if path not in done:
            raise ValueError(
                f"kernel {path_str(path)!r} is held by a "
                f"{_CONTAINERS.get(type(path[-1]), 'non-dict')} container, which cannot hold the "
                "adapter leaves beside it. "
                "Convert that part of the tree to nested dicts first (for Flax NNX: "
                "nnx.to_pure_dict(state)), or exclude the path"
            )
    return out
