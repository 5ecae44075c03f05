"""Rotary position embeddings as Hugging Face computes them, with their ``rope_scaling`` variants.

Layout: Hugging Face's ``rotate_half`` pairs channel ``i`` with channel ``i + head_dim/2`` of
each head (not interleaved pairs), so checkpoint q/k weights are
used as they are. Pair ``i`` at position ``p`` turns by ``p · inv_freq[i]``, with
``inv_freq[i] = theta^(-2i/head_dim)`` before scaling; ``cos``/``sin`` are multiplied by an
attention factor (1 except for YaRN-like types, which are not supported here).

The inverse frequencies depend only on the config, so they are numpy constants computed once
in float32 in transformers' order of operations (``_compute_*_parameters`` in
``transformers.modeling_rope_utils``), and only ``positions · inv_freq`` is traced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "apply_rope",
    "check_rope_scaling",
    "rope_cos_sin",
    "rope_inv_freq",
]

#: ``rope_scaling["rope_type"]`` values this module computes exactly as transformers does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    if scaling is None:
        return "default"
    # transformers reads "rope_type", and older config.json files spell it "type"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    """Checks that ``scaling`` (a config.json ``rope_scaling``) is a supported, complete one.

    Args:
      scaling: ``None`` or a dict with ``rope_type`` (or ``type``) and that type's keys.

    Raises:
      ValueError: if the type is not in :data:`SUPPORTED_ROPE_TYPES` or a key it needs is missing.

    Example:
      >>> check_rope_scaling({"rope_type": "linear", "factor": 2.0})
    """
    kind = _rope_type(scaling)
    if kind not in _REQUIRED:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported (supported: {SUPPORTED_ROPE_TYPES}); "
            "dynamic and YaRN-style scalings are not implemented. Use a checkpoint without it "
            "or set rope_scaling to None if the model was not trained with it"
        )
    missing = [k for k in _REQUIRED[kind] if scaling is None or k not in scaling]
    if missing:
        raise ValueError(
            f"rope_scaling {dict(scaling or {})!r} of type {kind!r} lacks keys {missing}; "
            "transformers needs them too, so the config.json is incomplete"
        )


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[head_dim/2]`` (float32) and the attention factor for a config.

    Default: ``1 / theta^(2i/head_dim)``; ``linear`` divides them by ``factor``; ``llama3``
    divides the low frequencies (wavelength above ``original_max / low_freq_factor``) by
    ``factor`` and interpolates smoothly up to ``original_max / high_freq_factor``.

    Args:
      head_dim: width of one head (even).
      theta: ``rope_theta``.
      scaling: ``rope_scaling`` from config.json, or ``None``.

    Returns:
      ``(inv_freq, attention_factor)``.

    Raises:
      ValueError: as :func:`check_rope_scaling`.

    Example:
      >>> inv, factor = rope_inv_freq(4, 10000.0)
      >>> inv.tolist(), factor
      ([1.0, 0.009999999776482582], 1.0)
    """
    check_rope_scaling(scaling)
    kind = _rope_type(scaling)
    # float32 throughout, as torch computes them (theta ** float32 exponent)
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None or kind == "default":
        return inv_freq, 1.0
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32), 1.0
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0, dtype: Any = None
) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` ``[..., head_dim]`` of the angles ``positions · inv_freq``.

    Computed in float32 (as transformers does, autocast off), then cast to ``dtype``.

    Args:
      positions: integer positions, any shape.
      inv_freq: from :func:`rope_inv_freq`.
      attention_factor: multiplies both.
      dtype: output dtype (default float32).

    Returns:
      ``(cos, sin)``, each of shape ``positions.shape + (2 * len(inv_freq),)``.

    Example:
      >>> import jax.numpy as jnp
      >>> cos, sin = rope_cos_sin(jnp.arange(3)[None], rope_inv_freq(4, 10000.0)[0])
      >>> cos.shape
      (1, 3, 4)
    """
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    dtype = jnp.float32 if dtype is None else dtype
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]``: ``x·cos + rotate_half(x)·sin``.

    ``rotate_half`` maps halves ``(x1, x2)`` to ``(-x2, x1)``; ``cos``/``sin`` are
    ``[batch, seq, head_dim]`` (shared by all heads).

    Example:
      >>> import jax.numpy as jnp
      >>> cos, sin = rope_cos_sin(jnp.zeros((1, 2), jnp.int32), rope_inv_freq(4, 10000.0)[0])
      >>> apply_rope(jnp.ones((1, 2, 3, 4)), cos, sin).tolist()[0][0][0]  # position 0: unchanged
      [1.0, 1.0, 1.0, 1.0]
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
