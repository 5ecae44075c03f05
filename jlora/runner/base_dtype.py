"""Which dtype a run holds its frozen base in: ``model.base_dtype``, with ``auto`` resolved.

The dtypes of a decoder run, by part:

- the frozen base (every weight of the checkpoint): ``model.base_dtype``; ``auto`` is
  bfloat16 when ``model.dtype`` is bfloat16 and the checkpoint stores 16-bit weights, float32
  otherwise. bfloat16 compute casts each kernel to bfloat16 at its use anyway, so holding a
  bf16 checkpoint in bfloat16 computes the same values in half the memory; an f32 checkpoint
  keeps its float32 copy unless ``bfloat16`` is asked for. With ``lora.quantize``, the
  targeted kernels are quantised from this dtype and dequantise back to it;
- activations: ``model.dtype``;
- adapters (``LoraConfig.dtype``, float32 whatever the kernel's), their gradients and the
  optimizer state, the logits and the loss: float32.
"""

from __future__ import annotations

from typing import Any

from jlora.runner.config import ModelSection

__all__ = ["jnp_dtype", "resolve_base_dtype"]


def resolve_base_dtype(section: ModelSection, stored: str) -> tuple[str, str]:
    """``(dtype name, why)``: the base's dtype for ``section`` and a checkpoint ``stored`` so.

    Args:
      section: the run's model section.
      stored: the checkpoint's stored dtype
        (:func:`jlora.models.formats.stored_dtype.stored_dtype`).

    Example:
      >>> resolve_base_dtype(ModelSection(dtype="bfloat16"), "bfloat16")[0]
      'bfloat16'
      >>> resolve_base_dtype(ModelSection(dtype="bfloat16"), "float32")[0]
      'float32'
    """
    from jlora.models.formats.stored_dtype import SIXTEEN_BIT

    if section.base_dtype != "auto":
        return section.base_dtype, "model.base_dtype"
    if section.dtype != "bfloat16":
        return "float32", f"auto: model.dtype is {section.dtype}"
    if stored in SIXTEEN_BIT or not stored.startswith(("F", "float")):
        return "bfloat16", f"auto: model.dtype bfloat16 and the checkpoint stores {stored}"
    return "float32", f"auto: the checkpoint stores {stored} (model.base_dtype=bfloat16 halves it)"


def jnp_dtype(name: str) -> Any:
    """The jax.numpy dtype of a base dtype name.

    Example:
      >>> jnp_dtype("bfloat16").__name__
      'bfloat16'
    """
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
