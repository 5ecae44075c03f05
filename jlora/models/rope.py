"""Rotary position embeddings as Hugging Face computes them, with every ``rope_scaling`` type.

Layout: Hugging Face's ``rotate_half`` pairs channel ``i`` with channel ``i + head_dim/2`` of
each head (not interleaved pairs), so checkpoint q/k weights are
used as they are. Pair ``i`` at position ``p`` turns by ``p · inv_freq[i]``, with
``inv_freq[i] = theta^(-2i/head_dim)`` before scaling; ``cos``/``sin`` are multiplied by an
attention factor (1 except for ``yarn`` and ``longrope``).

The inverse frequencies of ``default``, ``linear``, ``llama3`` and ``yarn`` depend only on the
config, so they are numpy constants computed once in float32 in transformers' order of
operations (``_compute_*_parameters`` in ``transformers.modeling_rope_utils``), and only
``positions · inv_freq`` is traced. ``dynamic`` and ``longrope`` also depend on the sequence
length transformers' ``dynamic_rope_update`` sees, ``max(position_ids) + 1`` over the batch:
given as an int it gives numpy constants again, given as a traced scalar (a cached decode
step under ``jax.jit``) the choice is made with ``jnp.where``. transformers keeps the largest
length seen in its module between calls (until one shorter than ``max_position_embeddings``);
this module is stateless, so a call gets the frequencies of its own positions, which is what
transformers gives within one ``generate`` (prefill, then one step per position).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "apply_rope",
    "check_rope_scaling",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_scaling_from_hf",
    "rope_scaling_to_hf",
]

#: ``rope_scaling["rope_type"]`` values this module computes exactly as transformers does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_F32 = np.float32


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    if scaling is None:
        return "default"
    # transformers reads "rope_type", and older config.json files spell it "type"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_rope_scaling(
    scaling: Mapping[str, Any] | None,
    *,
    head_dim: int | None = None,
    max_position_embeddings: int | None = None,
) -> None:
    """Checks that ``scaling`` (a config.json ``rope_scaling``) is a supported, complete one.

    Args:
      scaling: ``None`` or a dict with ``rope_type`` (or ``type``) and that type's keys.
      head_dim: when given, ``longrope``'s factor lists must have ``head_dim / 2`` entries.
      max_position_embeddings: the config's; ``dynamic`` needs it, ``yarn`` and ``longrope``
        fall back to it without ``original_max_position_embeddings``. ``None``: not checked.

    Raises:
      ValueError: if the type is not in :data:`SUPPORTED_ROPE_TYPES`, a key it needs is
        missing, or a ``longrope`` factor list has the wrong length.

    Example:
      >>> check_rope_scaling({"rope_type": "yarn", "factor": 4.0,
      ...                     "original_max_position_embeddings": 32768})
    """
    kind = _rope_type(scaling)
    if kind not in _REQUIRED:
        raise ValueError(
            f"rope_scaling type {kind!r} (key 'rope_type') is not supported (supported: "
            f"{SUPPORTED_ROPE_TYPES}); use a checkpoint without it or set rope_scaling to None "
            "if the model was not trained with it"
        )
    missing = [k for k in _REQUIRED[kind] if scaling is None or k not in scaling]
    if kind == "longrope" and scaling is not None and not missing:
        has_length = "original_max_position_embeddings" in scaling
        if not has_length and "factor" not in scaling and "attention_factor" not in scaling:
            missing = ["factor"]  # transformers computes the attention factor from it
    if missing:
        raise ValueError(
            f"rope_scaling {dict(scaling or {})!r} of type {kind!r} lacks keys {missing}; "
            "transformers needs them too, so the config.json is incomplete"
        )
    if kind == "longrope" and head_dim is not None:
        for key in ("short_factor", "long_factor"):
            value = scaling[key]  # type: ignore[index]
            found = f"{len(value)} entries" if isinstance(value, Sequence) else repr(value)
            if found != f"{head_dim // 2} entries":
                raise ValueError(
                    f"rope_scaling[{key!r}] has {found}; longrope needs a list with one number "
                    f"per rotary pair, head_dim / 2 = {head_dim // 2}. Fix the config.json"
                )
    needs_length = kind == "dynamic" or (
        kind in ("yarn", "longrope") and not (scaling or {}).get("original_max_position_embeddings")
    )
    if needs_length and max_position_embeddings is None:
        raise ValueError(
            f"rope_scaling type {kind!r} needs max_position_embeddings (or "
            "'original_max_position_embeddings' in rope_scaling for yarn and longrope); pass "
            "max_position_embeddings="
        )


def rope_scaling_from_hf(hf: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``rope_scaling`` of a config.json (as a dict) in the form this module reads.

    A copy of ``hf["rope_scaling"]``, except for ``longrope``: transformers takes its
    ``original_max_position_embeddings`` from the top level of config.json (where Phi-3 keeps
    it) and ignores the key inside ``rope_scaling``, so the result holds the top-level value
    under that key, or no such key.

    Example:
      >>> rope_scaling_from_hf({"original_max_position_embeddings": 4096, "rope_scaling":
      ...     {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}})["type"]
      'longrope'
    """
    scaling = hf.get("rope_scaling")
    if scaling is None:
        return None
    scaling = dict(scaling)
    if _rope_type(scaling) == "longrope":
        scaling.pop("original_max_position_embeddings", None)
        if hf.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return scaling


def rope_scaling_to_hf(
    scaling: Mapping[str, Any] | None,
    freq_factors: Sequence[float] | None = None,
    *,
    head_dim: int | None = None,
    theta: float | None = None,
) -> dict[str, Any]:
    """The config.json keys that make transformers compute what ``scaling`` means here.

    ``{"rope_scaling": ...}``, plus ``original_max_position_embeddings`` at the top level for
    ``longrope`` (see :func:`rope_scaling_from_hf`). ``freq_factors`` (a GGUF's
    ``rope_freqs``, no ``scaling``) become the ``llama3`` scaling llama.cpp's converter made
    them from: ``factor`` is the largest, the smoothed band between gives
    ``low_freq_factor``/``high_freq_factor`` with ``low_freq_factor = 1`` (the three lengths
    are only known up to one common scale, and every choice computes the same frequencies).

    Args:
      scaling: ``rope_scaling``, or ``None``.
      freq_factors: per-pair divisors, or ``None``.
      head_dim: width of one head; needed with ``freq_factors``.
      theta: ``rope_theta``; needed with ``freq_factors``.

    Raises:
      ValueError: for ``freq_factors`` that no ``llama3`` scaling reproduces to 1e-5 (or
        given with a ``scaling`` too): transformers has no key for arbitrary ones.

    Example:
      >>> rope_scaling_to_hf({"rope_type": "linear", "factor": 2.0})
      {'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}}
    """
    if freq_factors is not None:
        found = None
        if scaling is None and head_dim is not None and theta is not None:
            found = _llama3_from_factors(head_dim, theta, np.asarray(freq_factors, np.float64))
        if found is None:
            raise ValueError(
                "rope freq_factors (a GGUF's rope_freqs.weight) that are not a llama3 rope "
                "scaling have no transformers config.json equivalent; to write a Hugging Face "
                "directory, load the original Hugging Face checkpoint instead of the GGUF file"
            )
        return {"rope_scaling": found}
    out: dict[str, Any] = {"rope_scaling": None if scaling is None else dict(scaling)}
    if _rope_type(scaling) == "longrope" and scaling is not None:
        if scaling.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return out


def _llama3_from_factors(head_dim: int, theta: float, f: np.ndarray) -> dict[str, Any] | None:
    inv_freq = _default(head_dim, theta)
    factor = float(f.max())
    # smoothed band: 1/f = (1 - s)/factor + s, with s = (old/wavelen - low)/(high - low)
    medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor <= 1 or medium.sum() < 2 or not np.all((f == 1) | (f == factor) | medium):
        return None
    smooth = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[medium].astype(np.float64) / (2 * math.pi), smooth, 1)
    if intercept >= 0:
        return None
    high = 1 - 1 / intercept  # with low_freq_factor 1: intercept = -1 / (high - 1)
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": round(float(-slope / intercept)),
    }
    ours = inv_freq / f.astype(_F32)
    if not np.allclose(_llama3(inv_freq, scaling), ours, rtol=1e-5, atol=0):
        return None
    return scaling


def _default(head_dim: int, theta: float) -> np.ndarray:
    # float32 throughout, as torch computes them (theta ** float32 exponent)
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(_F32) / _F32(head_dim)
    return (_F32(1.0) / np.power(_F32(theta), exponent)).astype(_F32)


def _llama3(inv_freq: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    factor = _F32(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = _F32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(_F32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(_F32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(_F32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(_F32)


def _yarn(head_dim: int, theta: float, s: Mapping[str, Any], max_len: int | None) -> Any:
    factor = float(s["factor"])
    original = float(s.get("original_max_position_embeddings") or cast(int, max_len))
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention = get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original length
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = np.power(_F32(theta), np.arange(0, head_dim, 2).astype(_F32) / _F32(head_dim))
    extrapolation = _F32(1.0) / pos_freqs
    interpolation = _F32(1.0) / (_F32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1)
    keep = (1 - ramp).astype(_F32)  # 1: extrapolate (high frequencies), 0: interpolate
    return (interpolation * (1 - keep) + extrapolation * keep).astype(_F32), float(attention)


def _dynamic(head_dim: int, theta: float, factor: float, max_len: int, seq_len: Any) -> Any:
    """NTK base ``theta·(factor·L/max - (factor-1))^(d/(d-2))`` for length ``L > max``."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(_F32) / _F32(head_dim)
    # at init transformers evaluates the formula at L = max with Python floats
    base0 = theta * ((factor * max_len / max_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    short = (_F32(1.0) / np.power(_F32(base0), exponent)).astype(_F32)
    if seq_len is None:
        return short
    xp: Any = np if isinstance(seq_len, (int, np.integer)) else jnp
    if xp is np and seq_len <= max_len:
        return short
    # the update path runs in float32 tensors: seq_len is max(position_ids) + 1
    length = xp.maximum(xp.asarray(seq_len), max_len).astype(_F32)
    grown = (_F32(factor) * length / _F32(max_len) - _F32(factor - 1)) ** _F32(
        head_dim / (head_dim - 2)
    )
    base = _F32(theta) * grown
    long = (_F32(1.0) / xp.power(base, xp.asarray(exponent))).astype(_F32)
    return long if xp is np else jnp.where(seq_len > max_len, long, short)


def _longrope(
    head_dim: int, theta: float, s: Mapping[str, Any], max_len: int | None, seq_len: Any
) -> Any:
    original = s.get("original_max_position_embeddings")
    factor = s.get("factor")
    if original:  # Phi-3: the factor is the ratio of the two lengths
        factor = (max_len or original) / original
    else:
        original = max_len
    attention = s.get("attention_factor")
    if attention is None:  # check_rope_scaling made sure factor and a length are known
        factor, length = float(cast(float, factor)), float(cast(int, original))
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(length))
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(_F32) / _F32(head_dim)
    powers = np.power(_F32(theta), exponent)

    def inv(key: str) -> np.ndarray:
        return (_F32(1.0) / (np.asarray(s[key], _F32) * powers)).astype(_F32)

    short, long = inv("short_factor"), inv("long_factor")
    if seq_len is None or original is None:
        return short, float(attention)
    if isinstance(seq_len, (int, np.integer)):
        return (long if seq_len > original else short), float(attention)
    return jnp.where(seq_len > original, long, short), float(attention)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None = None,
    *,
    max_position_embeddings: int | None = None,
    seq_len: int | ArrayLike | None = None,
    freq_factors: Sequence[float] | None = None,
) -> tuple[Any, float]:
    """Inverse frequencies ``[head_dim/2]`` (float32) and the attention factor for a config.

    Default: ``1 / theta^(2i/head_dim)``. ``linear`` divides them by ``factor``; ``llama3``
    divides the low frequencies (wavelength above ``original_max / low_freq_factor``) by
    ``factor`` and interpolates smoothly up to ``original_max / high_freq_factor``; ``yarn``
    blends interpolated (``/ factor``) and original frequencies over a ramp set by
    ``beta_fast``/``beta_slow`` and scales cos/sin by ``0.1·ln(factor) + 1`` (or its
    ``mscale`` variant, or ``attention_factor``); ``dynamic`` raises the base to
    ``theta·(factor·L/max - (factor-1))^(d/(d-2))`` once the length ``L`` passes
    ``max_position_embeddings``; ``longrope`` divides by ``long_factor`` past
    ``original_max_position_embeddings`` (else ``short_factor``) and scales cos/sin by
    ``sqrt(1 + ln(factor)/ln(original))``. ``freq_factors`` (llama.cpp's ``rope_freqs``)
    finally divide the result pair by pair.

    Args:
      head_dim: width of one head (even).
      theta: ``rope_theta``.
      scaling: ``rope_scaling`` from config.json, or ``None``.
      max_position_embeddings: the config's (``dynamic``; fallback for ``yarn``/``longrope``).
      seq_len: ``max(positions) + 1`` of the call, for ``dynamic`` and ``longrope``: an int,
        a traced scalar (then the result is a traced array), or ``None`` for the frequencies
        transformers starts with. Other types ignore it.
      freq_factors: per-pair divisors (``head_dim/2`` of them), or ``None``.

    Returns:
      ``(inv_freq, attention_factor)``; ``inv_freq`` is a numpy array unless ``seq_len`` is
      traced and the type depends on it.

    Raises:
      ValueError: as :func:`check_rope_scaling`, or ``freq_factors`` of the wrong length or
        not positive.

    Example:
      >>> inv, factor = rope_inv_freq(4, 10000.0)
      >>> inv.tolist(), factor
      ([1.0, 0.009999999776482582], 1.0)
      >>> inv, factor = rope_inv_freq(4, 10000.0, {"rope_type": "yarn", "factor": 4.0},
      ...                             max_position_embeddings=64)
      >>> round(factor, 4)
      1.1386
    """
    check_rope_scaling(scaling, head_dim=head_dim, max_position_embeddings=max_position_embeddings)
    kind = _rope_type(scaling)
    s: Mapping[str, Any] = scaling or {}
    attention = 1.0
    if kind == "yarn":
        inv_freq, attention = _yarn(head_dim, theta, s, max_position_embeddings)
    elif kind == "dynamic":
        max_len = cast(int, max_position_embeddings)  # checked above
        inv_freq = _dynamic(head_dim, theta, float(s["factor"]), max_len, seq_len)
    elif kind == "longrope":
        inv_freq, attention = _longrope(head_dim, theta, s, max_position_embeddings, seq_len)
    else:
        inv_freq = _default(head_dim, theta)
        if kind == "linear":
            inv_freq = (inv_freq / _F32(s["factor"])).astype(_F32)
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
    if freq_factors is not None:
        divisors = np.asarray(freq_factors, _F32)
        if divisors.shape != (head_dim // 2,) or not np.all(divisors > 0):
            raise ValueError(
                f"rope freq_factors must be {head_dim // 2} positive numbers, one per rotary "
                f"pair (head_dim / 2); got shape {divisors.shape}, minimum "
                f"{divisors.min() if divisors.size else None}. Check the GGUF's rope_freqs"
            )
        inv_freq = (inv_freq / divisors).astype(_F32)
    return inv_freq, attention


def rope_cos_sin(
    positions: ArrayLike, inv_freq: ArrayLike, attention_factor: float = 1.0, dtype: Any = None
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
