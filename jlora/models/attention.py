r"""Attention: a mask described without its ``[T, S]`` array, and three ways to attend.

A :class:`MaskSpec` says which key slot each query slot may see (causal, a sliding window per
layer kind, packed segments, hidden keys, a KV cache's offset) and builds any ``[bq, bk]``
block of the boolean mask on demand, so nothing of size ``T × S`` need exist. :func:`attend`
computes ``softmax(mask(cap·tanh(scale·q·kᵀ/cap))) · v`` (grouped-query heads sharing kv head
``h // (H / H_kv)``) as transformers' eager path does: masked scores take float32's minimum
(never ``-inf``, so a query that sees no key averages every key uniformly), softmax in float32.
Its implementations (:data:`ATTENTION_IMPLEMENTATIONS`):

- ``"einsum"``: the scores as one ``[B, H, T, S]`` array and a dense mask; every feature.
- ``"fused"``: :func:`jax.nn.dot_product_attention` (grouped heads natively; ``is_causal`` and
  ``local_window_size`` when the mask is only causal and a window, a dense mask otherwise).
  On a GPU with bfloat16/float16 inputs it asks for cuDNN's flash kernel; elsewhere, or where
  cuDNN refuses the shapes, JAX's XLA version (which, in JAX 0.10, ``implementation=None``
  always picks). No logit softcapping.
- ``"blockwise"``: online softmax (FlashAttention-2) in pure JAX over query and key blocks of
  ``block`` slots, with a custom backward pass that recomputes each block: memory
  ``O((T + S)·head_dim + block²)`` forward and backward, and key blocks that the causal
  mask or window hide entirely are skipped. Every feature.
- ``"auto"``: cuDNN's kernel where it applies (``"fused"`` on a GPU in half precision, no
  softcapping); elsewhere ``"blockwise"`` for more than ``block`` queries (on CPU, 0.41x
  einsum's time and 0.03x its memory at 4k tokens: benchmarks/attention.py) and ``"einsum"``
  for fewer (short rows and cached decoding, where a block is the whole row anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "MaskSpec",
    "attend",
    "attend_per_kind",
    "check_attention",
    "resolve_implementation",
]

#: The values of ``DecoderConfig.attention`` (and the runner's ``model.attention``).
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "fused", "blockwise")
_NEG = float(jnp.finfo(jnp.float32).min)  # a masked score, as transformers' eager path


class MaskSpec(NamedTuple):
    """Which key slot each query slot may see, without the ``[T, S]`` array.

    Query ``t`` sits at slot ``cache_index + t`` (``t`` without a cache); key ``s`` at slot
    ``s``. Query slot ``q`` sees key slot ``s`` when ``s <= q``, ``s > q - window`` (with a
    window), the two tokens' ``segment_ids`` are equal (packed rows; no cache), and
    ``kv_mask[b, s]``. A pytree: it passes through ``jit``, ``nn.scan`` and ``lax.switch``.

    Attributes:
      cache_index: int32 scalar, the slot of the first query; ``None`` without a cache.
      segment_ids: int ``[B, T]`` or ``None``.
      kv_mask: bool ``[B, S]`` (``False`` hides a key) or ``None``.

    Example:
      >>> spec = MaskSpec(None, None, None)
      >>> spec.block(None, 0, 3, 0, 3).astype(int).tolist()
      [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
      >>> spec.block(2, 0, 3, 0, 3).astype(int).tolist()
      [[[1, 0, 0], [1, 1, 0], [0, 1, 1]]]
    """

    cache_index: jax.Array | None = None
    segment_ids: jax.Array | None = None
    kv_mask: jax.Array | None = None

    def first_slot(self) -> jax.Array:
        """The slot of query 0 (int32 scalar)."""
        if self.cache_index is None:
            return jnp.zeros((), jnp.int32)
        return jnp.asarray(self.cache_index, jnp.int32)

    def block(self, window: int | None, q_start: Any, bq: int, k_start: Any, bk: int) -> jax.Array:
        """The mask of ``bq`` queries from ``q_start`` and ``bk`` keys from ``k_start``.

        Returns bool ``[B|1, bq, bk]``. Queries and keys past the ends read ``segment_ids``
        and ``kv_mask`` clamped: callers mask keys beyond ``S`` and drop queries beyond ``T``.
        """
        q = self.first_slot() + q_start + jnp.arange(bq, dtype=jnp.int32)
        s = k_start + jnp.arange(bk, dtype=jnp.int32)
        allowed = s[None, :] <= q[:, None]
        if window is not None:
            allowed &= s[None, :] > q[:, None] - window
        allowed = allowed[None]
        if self.segment_ids is not None:
            seg_q = _take(self.segment_ids, q_start, bq)
            seg_k = _take(self.segment_ids, k_start, bk)
            allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :])
        if self.kv_mask is not None:
            allowed = allowed & _take(jnp.asarray(self.kv_mask, bool), k_start, bk)[:, None, :]
        return allowed

    def dense(self, window: int | None, t: int, s: int) -> jax.Array:
        """The whole mask, bool ``[B|1, T, S]`` (the einsum path's)."""
        return self.block(window, 0, t, 0, s)


def _take(x: jax.Array, start: Any, size: int) -> jax.Array:
    """``x[:, start:start+size]`` along axis 1, clamped at the end (static or traced start)."""
    index = jnp.minimum(start + jnp.arange(size), x.shape[1] - 1)
    return jnp.take(x, index, axis=1)


def check_attention(implementation: str, block: int, softcap: float | None, where: str) -> None:
    """Refuses an unknown implementation, a block below 1, or ``"fused"`` with softcapping.

    Raises:
      ValueError: naming ``where`` and the allowed values.

    Example:
      >>> check_attention("blockwise", 512, None, "DecoderConfig")
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: attention {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{where}: attention_block must be a positive int; got {block!r}")
    if implementation == "fused" and softcap is not None:
        raise ValueError(
            f"{where}: attention 'fused' (jax.nn.dot_product_attention) has no logit "
            f"softcapping, which this model uses (attn_logit_softcapping={softcap}); choose "
            "'auto', 'einsum' or 'blockwise'"
        )


def resolve_implementation(
    implementation: str,
    softcap: float | None,
    *,
    queries: int = 1,
    block: int = 512,
    dtype: Any = jnp.float32,
    backend: str | None = None,
) -> str:
    """What ``"auto"`` means for ``queries`` query slots of ``dtype`` on ``backend``.

    ``"fused"`` where cuDNN's flash kernel applies (a GPU, bfloat16/float16, no softcapping);
    otherwise ``"blockwise"`` for more than ``block`` queries, ``"einsum"`` for fewer. Any
    other ``implementation`` is returned as it is.

    Example:
      >>> resolve_implementation("auto", None, queries=4096, backend="cpu")
      'blockwise'
      >>> resolve_implementation("auto", None, queries=4096, dtype=jnp.bfloat16, backend="gpu")
      'fused'
      >>> resolve_implementation("auto", 50.0, queries=64), resolve_implementation("fused", None)
      ('einsum', 'fused')
    """
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half and softcap is None:
        return "fused"
    return "blockwise" if queries > block else "einsum"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    *,
    window: int | None = None,
    implementation: str = "auto",
    scale: float | None = None,
    softcap: float | None = None,
    block: int = 512,
) -> jax.Array:
    """Attention of ``q`` ``[B, T, H, hd]`` over ``k``, ``v`` ``[B, S, H_kv, hd]`` under ``mask``.

    ``softmax(where(mask, cap·tanh(scale·q·kᵀ/cap), min)) · v`` with float32 softmax; the
    result has ``v``'s dtype. See the module docstring for the implementations.

    Args:
      q: queries (rotated), ``H`` a multiple of ``H_kv``.
      k: keys, the cache's ``S`` slots with a cache.
      v: values, like ``k``.
      mask: the :class:`MaskSpec`.
      window: the sliding window (keys ``s > q - window``), or ``None``.
      implementation: one of :data:`ATTENTION_IMPLEMENTATIONS`.
      scale: multiplies the scores; ``None`` for ``hd ** -0.5``.
      softcap: ``cap`` of the scores' softcapping, or ``None``.
      block: query and key slots per block of ``"blockwise"``.

    Returns:
      ``[B, T, H, hd]``.

    Example:
      >>> import jax
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 4, 8))
      >>> a = attend(q, k[:, :, :2], v[:, :, :2], MaskSpec(), implementation="einsum")
      >>> b = attend(q, k[:, :, :2], v[:, :, :2], MaskSpec(), implementation="blockwise", block=2)
      >>> bool(jnp.allclose(a, b, atol=1e-5))
      True
    """
    check_attention(implementation, block, softcap, "attend")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_implementation(
        implementation, softcap, queries=q.shape[1], block=block, dtype=q.dtype
    )
    if impl == "fused":
        return _fused(q, k, v, mask, window, scale)
    if impl == "blockwise":
        return _blockwise(q, k, v, mask, window, float(scale), softcap, block)
    return _einsum(q, k, v, mask, window, scale, softcap)


def attend_per_kind(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    *,
    kind: Any,
    windows: Sequence[int | None],
    **options: Any,
) -> jax.Array:
    """:func:`attend` with the window of layer kind ``kind`` (traced in a scan of layers).

    ``windows[i]`` is kind ``i``'s window; with one distinct window it is passed statically,
    else ``lax.switch`` compiles one branch per distinct window (each with a static window, so
    ``"fused"`` and ``"blockwise"`` keep their window-specific forms).

    Example:
      >>> import jax
      >>> q = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
      >>> a = attend_per_kind(q, q, q, MaskSpec(), kind=jnp.int32(1), windows=(2, None))
      >>> bool(jnp.allclose(a, attend(q, q, q, MaskSpec())))
      True
    """
    distinct = tuple(dict.fromkeys(windows))
    if len(distinct) == 1:
        return attend(q, k, v, mask, window=distinct[0], **options)
    index = jnp.asarray([distinct.index(w) for w in windows], jnp.int32)[kind]
    branches: list[Callable[..., jax.Array]] = [
        functools.partial(_attend_positional, window=w, options=options) for w in distinct
    ]
    return lax.switch(index, branches, q, k, v, mask)


def _attend_positional(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, *, window: Any, options: Any
) -> jax.Array:
    return attend(q, k, v, mask, window=window, **options)


def _einsum(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """Today's eager path: ``[B, H_kv, G, T, S]`` scores and a dense mask."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
    if softcap is not None:
        cap = jnp.asarray(softcap, q.dtype)
        scores = jnp.tanh(scores / cap) * cap
    dense = mask.dense(window, t, k.shape[1])
    scores = jnp.where(dense[:, None, None], scores.astype(jnp.float32), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def _fused(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec, window: int | None, scale: float
) -> jax.Array:
    """:func:`jax.nn.dot_product_attention`, cuDNN on a GPU for half-precision inputs."""
    if all(x is None for x in mask):  # causal (and a window) only: the kernels' own masks
        kwargs: dict[str, Any] = dict(is_causal=True)
        if window is not None:
            kwargs["local_window_size"] = (window - 1, 0)  # keys q - window < s <= q
    else:
        kwargs = dict(mask=mask.dense(window, q.shape[1], k.shape[1])[:, None])
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN checks its shapes, dtypes and version while tracing
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, implementation="cudnn", **kwargs
            )
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # shapes cuDNN does not take: XLA's version, same result
    return jax.nn.dot_product_attention(q, k, v, scale=scale, **kwargs)


# ---- blockwise: online softmax forward, recomputing backward ---------------------------------


class _Plan(NamedTuple):
    """Static block geometry: ``bq``/``bk`` slots per block, ``nq``/``nk`` blocks."""

    t: int
    s: int
    bq: int
    bk: int
    nq: int
    nk: int
    window: int | None
    scale: float
    softcap: float | None


def _blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    window: int | None,
    scale: float,
    softcap: float | None,
    block: int,
) -> jax.Array:
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    bq, bk = min(block, t), min(block, s)
    plan = _Plan(t, s, bq, bk, -(-t // bq), -(-s // bk), window, scale, softcap)
    qg = q.reshape(b, t, kv, h // kv, hd)
    return _flash(plan, qg, k, v, mask).reshape(b, t, h, hd)


def _pad(x: jax.Array, size: int) -> jax.Array:
    """``x`` padded with zeros along axis 1 to ``size``."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, size - x.shape[1])
    return jnp.pad(x, pad)


def _key_range(plan: _Plan, mask: MaskSpec, i: Any) -> tuple[Any, Any]:
    """Key blocks ``[lo, hi)`` that query block ``i`` can see under the causal mask and window."""
    first = mask.first_slot() + i * plan.bq
    last = jnp.minimum(first + plan.bq, mask.first_slot() + plan.t) - 1
    hi = jnp.clip(last // plan.bk + 1, 0, plan.nk)
    if plan.window is None:
        return jnp.zeros((), jnp.int32), hi
    return jnp.clip((first - plan.window + 1) // plan.bk, 0, hi), hi


def _scores(
    plan: _Plan, mask: MaskSpec, qi: jax.Array, kp: jax.Array, i: Any, j: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Block ``(i, j)``: masked float32 scores, pre-cap scores, the mask and key block."""
    kj = lax.dynamic_slice_in_dim(kp, j * plan.bk, plan.bk, axis=1)
    raw = jnp.einsum("btkgd,bskd->bkgts", qi, kj) * jnp.asarray(plan.scale, qi.dtype)
    capped = raw
    if plan.softcap is not None:
        cap = jnp.asarray(plan.softcap, qi.dtype)
        capped = jnp.tanh(raw / cap) * cap
    allowed = mask.block(plan.window, i * plan.bq, plan.bq, j * plan.bk, plan.bk)
    allowed = allowed & (j * plan.bk + jnp.arange(plan.bk) < plan.s)  # padded keys
    allowed = allowed[:, None, None]
    return jnp.where(allowed, capped.astype(jnp.float32), _NEG), raw, allowed, kj


def _query_blocks(plan: _Plan, x: jax.Array) -> jax.Array:
    """``[B, T, ...]`` -> ``[nq, B, bq, ...]`` (padded)."""
    x = _pad(x, plan.nq * plan.bq)
    x = x.reshape(x.shape[0], plan.nq, plan.bq, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_query_blocks(plan: _Plan, x: jax.Array) -> jax.Array:
    """``[nq, B, K, G, bq, ...]`` -> ``[B, T, K, G, ...]``."""
    x = jnp.moveaxis(x, 4, 2)  # [nq, B, bq, K, G, ...]
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape(x.shape[0], plan.nq * plan.bq, *x.shape[3:])
    return x[:, : plan.t]


def _forward(
    plan: _Plan, qg: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec
) -> tuple[jax.Array, jax.Array]:
    """Output ``[B, T, K, G, hd]`` (``v``'s dtype) and log-sum-exp ``[nq, B, K, G, bq]``."""
    kp, vp = _pad(k, plan.nk * plan.bk), _pad(v, plan.nk * plan.bk)
    b, _, kv, g, hd = qg.shape
    # a query that sees no key averages all keys uniformly, as the einsum path's softmax does
    vmean = jnp.mean(v.astype(jnp.float32), axis=1)[:, :, None, None]  # [B, K, 1, 1, hd]

    def one_query_block(args: tuple[Any, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, qi = args
        lo, hi = _key_range(plan, mask, i)

        def step(j: Any, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            m, total, acc = carry
            sc, _, _, _ = _scores(plan, mask, qi, kp, i, j)
            vj = lax.dynamic_slice_in_dim(vp, j * plan.bk, plan.bk, axis=1)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkgts,bskd->bkgtd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32
            )
            return m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv

        init = (
            jnp.full((b, kv, g, plan.bq), _NEG, jnp.float32),
            jnp.zeros((b, kv, g, plan.bq), jnp.float32),
            jnp.zeros((b, kv, g, plan.bq, hd), jnp.float32),
        )
        m, total, acc = lax.fori_loop(lo, hi, step, init)
        dead = m == _NEG
        out = jnp.where(dead[..., None], vmean, acc / jnp.where(dead, 1.0, total)[..., None])
        # dead rows get lse = inf: their probabilities are 0 in the backward pass's recompute
        lse = jnp.where(dead, jnp.inf, m + jnp.log(jnp.where(dead, 1.0, total)))
        return out.astype(v.dtype), lse

    qb = _query_blocks(plan, qg)
    out, lse = lax.map(one_query_block, (jnp.arange(plan.nq), qb))
    return _from_query_blocks(plan, out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, qg: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec) -> jax.Array:
    return _forward(plan, qg, k, v, mask)[0]


def _flash_fwd(
    plan: _Plan, qg: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _forward(plan, qg, k, v, mask)
    return out, (qg, k, v, mask, out, lse)


def _flash_bwd(plan: _Plan, res: tuple[Any, ...], d_out: jax.Array) -> tuple[Any, ...]:
    """FlashAttention-2's backward: per query block, recompute each visible key block."""
    qg, k, v, mask, out, lse = res
    b, _, kv, g, hd = qg.shape
    kp, vp = _pad(k, plan.nk * plan.bk), _pad(v, plan.nk * plan.bk)
    d_out32 = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1)  # [B, T, K, G]
    qb, dob = _query_blocks(plan, qg), _query_blocks(plan, d_out32)
    deltab = jnp.moveaxis(_query_blocks(plan, delta), 2, -1)  # [nq, B, K, G, bq]

    def one_query_block(
        carry: tuple[jax.Array, jax.Array], args: tuple[Any, ...]
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        i, qi, doi, lse_i, delta_i = args
        lo, hi = _key_range(plan, mask, i)

        def step(j: Any, inner: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            dq, dk, dv = inner
            sc, raw, allowed, kj = _scores(plan, mask, qi, kp, i, j)
            vj = lax.dynamic_slice_in_dim(vp, j * plan.bk, plan.bk, axis=1)
            p = jnp.exp(sc - lse_i[..., None])  # [B, K, G, bq, bk]
            dv_j = jnp.einsum("bkgts,btkgd->bskd", p, doi)
            dp = jnp.einsum("btkgd,bskd->bkgts", doi, vj.astype(jnp.float32))
            ds = jnp.where(allowed, p * (dp - delta_i[..., None]), 0.0)
            if plan.softcap is not None:
                ds = ds * (1.0 - jnp.square(jnp.tanh(raw.astype(jnp.float32) / plan.softcap)))
            ds = ds * plan.scale
            dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kj.astype(jnp.float32))
            dk_j = jnp.einsum("bkgts,btkgd->bskd", ds, qi.astype(jnp.float32))
            start = j * plan.bk
            dk = lax.dynamic_update_slice_in_dim(
                dk, lax.dynamic_slice_in_dim(dk, start, plan.bk, axis=1) + dk_j, start, axis=1
            )
            dv = lax.dynamic_update_slice_in_dim(
                dv, lax.dynamic_slice_in_dim(dv, start, plan.bk, axis=1) + dv_j, start, axis=1
            )
            return dq, dk, dv

        dq0 = jnp.zeros((b, plan.bq, kv, g, hd), jnp.float32)
        dq, dk, dv = lax.fori_loop(lo, hi, step, (dq0, *carry))
        return (dk, dv), dq

    zeros = jnp.zeros((b, plan.nk * plan.bk, kv, hd), jnp.float32)
    (dk, dv), dqb = lax.scan(
        one_query_block, (zeros, zeros), (jnp.arange(plan.nq), qb, dob, lse, deltab)
    )
    dq = jnp.moveaxis(dqb, 0, 1).reshape(b, plan.nq * plan.bq, kv, g, hd)[:, : plan.t]
    # dead rows (lse = inf) averaged every key: each key's value gets 1/S of their gradient
    dead = _from_query_blocks(plan, jnp.isinf(lse)[..., None])  # [B, T, K, G, 1]
    dv_dead = jnp.sum(jnp.where(dead, d_out32, 0.0), axis=(1, 3)) / plan.s  # [B, K, hd]
    dv = dv[:, : plan.s] + dv_dead[:, None]
    mask_ct = jax.tree.map(lambda _: None, mask)
    return dq.astype(qg.dtype), dk[:, : plan.s].astype(k.dtype), dv.astype(v.dtype), mask_ct


_flash.defvjp(_flash_fwd, _flash_bwd)
