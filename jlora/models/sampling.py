"""KV-cache sampling: prefill a batch of prompts once, then decode one token per step under ``jit``.

The sampler is model-agnostic. It drives a *step* function

    ``step(params, tokens, positions, cache, cache_index, kv_mask) -> (logits, cache)``

that runs the ``T`` tokens ``tokens`` ``[B, T]`` at rotary positions ``positions`` ``[B, T]``,
writes their keys and values into cache slots ``cache_index .. cache_index + T - 1`` and lets
the query in slot ``cache_index + t`` attend to the slots ``s <= cache_index + t`` whose
``kv_mask[b, s]`` is true. Any such function works: a merged model
(``lambda p, *a: decoder_apply(p, *a)``), an adapted tree computed factorised through
``jlora.lora(step, config)``, or one adapter per row through :func:`mixed_step`.

Prompts of different lengths are left-padded to the longest, so every row's next token is
written to the same slot; pads are masked out of attention (``kv_mask``) and each row's positions
start at 0 at its first real token, so a row's tokens do not depend on the other rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._mixed import mixed_batch

Step = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the compiled program depends on besides shapes (static under ``jit``)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_ids: tuple[int, ...]
    pad_id: int


def filter_logits(
    logits: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Logits scaled by ``1/temperature``, then top-k, then top-p filtered, as in transformers.

    Top-k keeps the tokens whose logit is at least the k-th largest (``TopKLogitsWarper``: ties
    with the k-th all stay). Top-p (nucleus, ``TopPLogitsWarper``) sorts ascending and drops the
    tokens whose cumulative probability is ``<= 1 - top_p``, so it keeps the smallest set of
    most likely tokens whose probability adds up to at least ``top_p``, and always the most
    likely one. Dropped tokens get ``-inf``; the last axis is the vocabulary.

    Args:
      logits: ``[..., vocab]`` logits.
      temperature: divides the logits (> 0).
      top_k: how many tokens to keep (>= 1), or ``None`` for all.
      top_p: the nucleus mass in ``(0, 1]``, or ``None`` for all.

    Returns:
      float32 logits of ``logits``' shape, ``-inf`` where filtered out.

    Example:
      >>> import jax.numpy as jnp
      >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.7).tolist()
      [-0.6931471824645996, -1.2039728164672852, -inf]
    """
    x = jnp.asarray(logits).astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        order = jnp.argsort(x, axis=-1)  # ascending and stable, as the warper's sort
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, -1), -1), -1)
        drop = (cumulative <= 1 - top_p).at[..., -1].set(False)
        x = jnp.where(jnp.take_along_axis(drop, jnp.argsort(order, axis=-1), -1), -jnp.inf, x)
    return x


def _choose(logits: jax.Array, key: jax.Array, s: _Settings) -> jax.Array:
    """The next token per row: argmax at temperature 0, else a draw from the filtered logits."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted by the maximum first, so a tiny temperature drives the others to -inf (greedy in
    # effect) instead of overflowing to inf - inf = nan; the distribution is the same.
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    x = filter_logits(shifted, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("step", "init_cache", "settings", "cache_len"))
def _generate(
    step: Step,
    init_cache: Callable[[int, int], Any],
    settings: _Settings,
    cache_len: int,
    params: Any,
    tokens: jax.Array,
    pads: jax.Array,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Prefill then a ``while_loop`` of one-token steps; ``(new tokens [B, N], steps run)``."""
    batch, width = tokens.shape
    n = settings.max_new_tokens
    eos = jnp.asarray(settings.eos_ids, jnp.int32)
    kv_mask = jnp.arange(cache_len)[None, :] >= pads[:, None]
    positions = jnp.maximum(jnp.arange(width)[None, :] - pads[:, None], 0).astype(jnp.int32)
    logits, cache = step(
        params, tokens, positions, init_cache(batch, cache_len), jnp.int32(0), kv_mask
    )
    first = _choose(logits[:, -1], jax.random.fold_in(key, 0), settings)
    out = jnp.full((batch, n), settings.pad_id, jnp.int32).at[:, 0].set(first)
    lengths = (width - pads).astype(jnp.int32)

    def running(carry: tuple[Any, ...]) -> jax.Array:
        i, _, _, _, done = carry
        return (i < n) & ~jnp.all(done)

    def one_token(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, cache, last, out, done = carry
        # Token i-1 of the continuation goes to slot width + i - 1, at position length + i - 1.
        logits, cache = step(
            params, last[:, None], (lengths + i - 1)[:, None], cache, width + i - 1, kv_mask
        )
        token = _choose(logits[:, -1], jax.random.fold_in(key, i), settings)
        token = jnp.where(done, settings.pad_id, token)
        return i + 1, cache, token, out.at[:, i].set(token), done | jnp.isin(token, eos)

    carry = (jnp.int32(1), cache, first, out, jnp.isin(first, eos))
    steps, _, _, out, _ = jax.lax.while_loop(running, one_token, carry)
    return out, steps


def generate(
    step: Step,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    init_cache: Callable[[int, int], Any],
    max_new_tokens: int,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    cache_len: int | None = None,
    pad_to: int | None = None,
) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens with a KV cache.

    The prompts are left-padded to the longest (``pad_id``, masked out of attention; each row's
    positions start at 0 at its first token) and run in one prefill call; then one token per
    step for all rows in a ``lax.while_loop``, all under one ``jax.jit``, stopping when every
    row has emitted an EOS id or ``max_new_tokens`` are out. ``temperature == 0`` is greedy
    (argmax; ``top_k`` and ``top_p`` change nothing then); otherwise each token is drawn from
    the logits after :func:`filter_logits` (temperature, then top-k, then top-p, as
    transformers). The program is compiled once per ``step`` object, shapes and settings: keep
    ``step`` and ``init_cache`` (a new lambda per call compiles anew).

    Args:
      step: ``step(params, tokens, positions, cache, cache_index, kv_mask) -> (logits,
        cache)``: see the module docstring. Wrap it in ``jlora.lora(step, config)`` to run an
        adapted tree unmerged, or use :func:`mixed_step` for one adapter per row.
      params: the parameters ``step`` takes (any pytree).
      prompts: token ids per row, each non-empty.
      init_cache: ``init_cache(batch, cache_len)``, the empty cache ``step`` takes; e.g.
        ``functools.partial(decoder.init_cache, config)``.
      max_new_tokens: most tokens to add per row (>= 0; 0 returns empty lists).
      eos_ids: token id(s) that end a row; the EOS token is included in the row's output, as
        transformers' ``generate`` does.
      pad_id: the id left-padding the prompts and filling finished rows (never returned).
      temperature: 0 for greedy decoding, else the softmax temperature (> 0).
      top_k: keep the ``top_k`` most likely tokens (>= 1), or ``None``.
      top_p: keep the nucleus of mass ``top_p`` in ``(0, 1]``, or ``None``.
      key: PRNG key for sampling; required when ``temperature > 0``. Step ``i`` draws with
        ``fold_in(key, i)``, so a fixed key gives fixed tokens.
      cache_len: slots per row in the cache; by default exactly what the longest prompt and
        ``max_new_tokens`` need (``longest + max_new_tokens - 1``). Pass the model's maximum
        length to keep the cache shape fixed across calls.
      pad_to: left-pad the prompts to this many tokens instead of the longest one's, so that
        calls with prompts of different lengths run one compiled program (the tokens drawn
        are the same either way).

    Returns:
      The new tokens of each row, in prompt order, ending at its first EOS (included) or after
      ``max_new_tokens``; no padding.

    Raises:
      ValueError: for no prompts, an empty prompt, a negative ``max_new_tokens``, a negative or
        non-finite ``temperature``, ``top_k < 1``, ``top_p`` outside ``(0, 1]``, sampling
        without a ``key``, prompts plus ``max_new_tokens`` that do not fit ``cache_len``, or
        a prompt longer than ``pad_to``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def step(params, tokens, positions, cache, cache_index, kv_mask):
      ...     return jax.nn.one_hot((tokens + 1) % 8, 8), cache  # "predicts" token + 1
      >>> generate(step, None, [[1, 2], [5]], init_cache=lambda b, s: {}, max_new_tokens=3,
      ...          eos_ids=7)
      [[3, 4, 5], [6, 7]]
    """
    settings = _validated(prompts, max_new_tokens, eos_ids, pad_id, temperature, top_k, top_p)
    if settings.temperature > 0 and key is None:
        raise ValueError(
            f"generate: sampling at temperature {temperature} needs a PRNG key; pass "
            "key=jax.random.key(seed), or temperature=0 for greedy decoding"
        )
    width = max(len(p) for p in prompts)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(
                f"generate: a prompt is {width} tokens, longer than pad_to={pad_to}; shorten "
                "it or raise pad_to"
            )
        width = pad_to
    needed = width + max_new_tokens - 1
    if cache_len is not None and needed > cache_len:
        raise ValueError(
            f"generate: the longest prompt ({width} tokens) and max_new_tokens "
            f"{max_new_tokens} need {needed} cache slots, but cache_len is {cache_len}; "
            "shorten the prompts, lower max_new_tokens or enlarge the cache"
        )
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in zip(tokens, prompts, strict=True):
        row[width - len(prompt) :] = prompt
    pads = np.asarray([width - len(p) for p in prompts], np.int32)
    if key is None:
        key = jax.random.key(0)  # greedy: never drawn from
    out, steps = _generate(
        step, init_cache, settings, cache_len or needed, params, tokens, pads, key
    )
    out, steps = np.asarray(out), int(steps)
    rows = []
    for row in out[:, :steps].tolist():
        ends = [i for i, t in enumerate(row) if t in settings.eos_ids]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


def _validated(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: int | Sequence[int] | None,
    pad_id: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> _Settings:
    """The settings, after refusing what cannot be sampled (on entry, not inside the trace)."""
    if not len(prompts):
        raise ValueError("generate: no prompts given; pass a list of token-id lists")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(
                f"generate: prompt {i} is empty; every row needs at least one token (e.g. BOS)"
            )
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, found {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"generate: temperature must be a finite number >= 0 (0 is greedy), found {temperature}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 (or None for all tokens), found {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] (or None), found {top_p}")
    eos = () if eos_ids is None else tuple(int(e) for e in np.atleast_1d(eos_ids))
    return _Settings(max_new_tokens, float(temperature), top_k, top_p, eos, int(pad_id))


def mixed_step(step: Step, rows: Sequence[str | None] | Any, *, cache_batch_axis: int = 1) -> Step:
    """A step in which row ``i`` runs adapter ``rows[i]``, through :func:`jlora.mixed_batch`.

    ``jlora.mixed_batch`` slices every input along axis 0, but a decoder's cache keeps the
    layers there (``[L, B, S, ...]``) and ``cache_index`` is one scalar for all rows: the
    returned step moves the cache's batch axis to the front and gives each row the index,
    calls ``mixed_batch``, and moves the cache back, so :func:`generate` sees the model's own
    layout. Each step's cache passes through these moves and ``mixed_batch``'s row gathers
    (copies of the cache per token): the price of per-row adapters.

    Args:
      step: the model step, as for :func:`generate`.
      rows: per row, an adapter name or ``None`` for the bare base (or concrete indices into
        the bank, ``-1`` for the base), as for ``jlora.mixed_batch``.
      cache_batch_axis: the batch axis of every array in ``step``'s cache.

    Returns:
      ``mixed(params, tokens, positions, cache, cache_index, kv_mask)`` with
      ``params = (base, bank)``: the base tree and the ``{name: jlora.Adapter}`` bank.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=1, targets="w")
      >>> base = {"w": jnp.eye(4)}
      >>> to_3 = {"w_lora_a": jnp.ones((4, 1)), "w_lora_b": jnp.array([[0.0, 1, 2, 3]])}
      >>> bank = {"to_3": jlora.Adapter(to_3, cfg)}
      >>> def step(p, tokens, positions, cache, cache_index, kv_mask):  # logits: one-hot @ w
      ...     return jax.nn.one_hot(tokens, 4) @ p["w"], cache
      >>> generate(mixed_step(step, ["to_3", None]), (base, bank), [[0], [0]],
      ...          init_cache=lambda b, s: {"k": jnp.zeros((2, b, s))}, max_new_tokens=2)
      [[3, 3], [0, 0]]
    """

    def moved(tree: Any, source: int, dest: int) -> Any:
        return jax.tree.map(lambda c: jnp.moveaxis(c, source, dest), tree)

    def rows_first(
        params: Any, tokens: Any, positions: Any, cache: Any, index: Any, kv_mask: Any
    ) -> tuple[jax.Array, Any]:
        cache = moved(cache, 0, cache_batch_axis)
        logits, cache = step(params, tokens, positions, cache, index[0], kv_mask)
        return logits, moved(cache, cache_batch_axis, 0)

    def mixed(
        params: Any, tokens: Any, positions: Any, cache: Any, cache_index: Any, kv_mask: Any
    ) -> tuple[jax.Array, Any]:
        base, bank = params
        index = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), tokens.shape[:1])
        rows_cache = moved(cache, cache_batch_axis, 0)
        logits, rows_cache = mixed_batch(
            rows_first, base, bank, rows, tokens, positions, rows_cache, index, kv_mask
        )
        return logits, moved(rows_cache, 0, cache_batch_axis)

    return mixed
