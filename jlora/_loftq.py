"""LoftQ: adapters that start where quantisation went wrong, so ``Q + s·A·B ≈ W``.

A QLoRA base ``Q = quantize(W)`` with ``B = 0`` starts training from the quantised model, not
the one that was pretrained. LoftQ (Li et al., 2023) alternates: quantise what the adapters do
not carry, ``Q = quantize(W - s·A·B)``, then set ``s·A·B`` to the best rank-r approximation of
the error ``W - Q`` (its SVD, the PiSSA factorisation of the residual). The quantised kernel and
the float adapters go in the tree; training then runs on the quantised base as any QLoRA run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jlora._attach import place_factored
from jlora._config import LoraConfig
from jlora._layout import delta
from jlora._paths import KeyPath, path_str
from jlora._pissa import factor_kernel
from jlora._qlora import check_options, quantize_kernel
from jlora._targets import float_kernels


def init_loftq(
    params: Any,
    config: LoraConfig,
    *,
    kind: str = "nf4",
    block_size: int = 64,
    iterations: int = 1,
) -> Any:
    """Quantises each selected kernel and adds adapters that carry its quantisation error.

    Each selected kernel ``W`` becomes a :class:`jlora.Quantized` ``Q`` and gets
    ``k_lora_a`` / ``k_lora_b`` with ``s·A·B`` the rank-r SVD of ``W - Q`` (after
    ``iterations`` rounds of LoftQ's alternation), so the model at step 0 is closer to the
    float one than the quantised base alone. Train it as any QLoRA tree (``jlora.lora``,
    ``jlora.value_and_grad``); ``merge_quantized`` merges it.

    Args:
      params: the float base tree (nested dicts holding the kernels).
      config: what to adapt, at which rank and scale (as ``init_lora``).
      kind: ``"nf4"`` or ``"int8"``, as :func:`jlora.quantize`.
      block_size: values per scale, as :func:`jlora.quantize`.
      iterations: LoftQ rounds (>= 1); each quantises ``W - s·A·B`` again and refits A, B.

    Returns:
      The tree with quantised kernels and their adapters.

    Raises:
      ValueError: for ``iterations < 1``, an already quantised kernel, and as ``quantize``
        and ``init_pissa`` (kind, block size, rank, targets, containers).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> w = jax.random.normal(jax.random.key(0), (32, 16))
      >>> cfg = jlora.LoraConfig(rank=4)
      >>> p = init_loftq({"d": {"kernel": w}}, cfg, kind="nf4", block_size=16)
      >>> q = jlora.merge_quantized(p, cfg, store="float")["d"]["kernel"]
      >>> plain = jlora.dequantize(jlora.quantize({"d": {"kernel": w}}, cfg, block_size=16))
      >>> bool(jnp.linalg.norm(q - w) < jnp.linalg.norm(plain["d"]["kernel"] - w))
      True
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"init_loftq: iterations must be an int >= 1; got {iterations!r}")
    check_options(kind, block_size, "init_loftq")
    planned: dict[KeyPath, tuple[Any, jax.Array, jax.Array]] = {}
    dtype = jnp.dtype(config.dtype)
    why = "LoftQ quantises the float kernel itself. Pass the float base"
    for path, w, roles, rank, scale in float_kernels(params, config, "init_loftq", why):
        wide = jnp.promote_types(w.dtype, dtype)
        carried = jnp.zeros((), wide)  # s·A·B, nothing before the first round
        for _ in range(iterations):
            q = quantize_kernel(
                path_str(path), (w.astype(wide) - carried).astype(w.dtype), kind, block_size
            )
            error = w.astype(wide) - q.dequantize().astype(wide)
            a, b = factor_kernel(error, roles, rank, scale, "pissa", dtype)
            carried = delta(a, b, roles, scale).astype(wide)
        planned[path] = (q, a, b)
    return place_factored(params, planned, "init_loftq")
