"""Preference tuning objectives (DPO, rDPO, IPO, SimPO, ORPO) as pure functions, as TRL has them.

A batch holds ``2B`` rows: the first ``B`` are the chosen answers, the last ``B`` the rejected
answers to the same prompts, so one forward pass scores both (TRL's concatenated forward). A
row's score is the log-probability of its completion tokens, summed (DPO, IPO) or averaged
over them (SimPO, ORPO). With LoRA the reference model costs no memory: it is the same base
with the adapters off, ``apply_fn(split(params)[1], ...)`` under ``stop_gradient``.

Each formula and metric follows TRL 1.16 (``DPOTrainer``; ``CPOTrainer`` for SimPO,
``ORPOTrainer``, both in ``trl.experimental``), and ``tests/test_peft_trl_preference.py``
checks them against TRL's own code on the same model, adapter and pairs. Two conventions that
are easy to miss: IPO's squared loss uses per-token averages of the log-ratios while its
``rewards/*`` use the sums, and the ``rewards/*`` of the reference-free losses are
``beta`` times the policy's averaged log-probabilities. Where TRL 1.16 differs from earlier
TRL, jlora keeps the earlier meaning and says so: ``label_smoothing`` on ``"sigmoid"`` is
conservative DPO (TRL 1.16 ignores it there and smooths labels with ``"robust"``, which jlora
has too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jlora._config import LoraConfig
from jlora._factorised import lora
from jlora._split import split

#: The loss types, as TRL names them.
LOSS_TYPES = ("sigmoid", "robust", "ipo", "simpo", "orpo")
#: Loss types that compare the policy with a reference model.
REFERENCE_BASED = ("sigmoid", "robust", "ipo")
#: Loss types whose log-probabilities are per-token averages (the others sum them).
AVERAGED = ("simpo", "orpo")
#: SimPO's target reward margin when ``gamma`` is not given (TRL's ``simpo_gamma``).
SIMPO_GAMMA = 0.5
#: The batch keys :func:`dpo_loss` reads; ``positions`` and ``segment_ids`` go to ``apply_fn``.
BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "nll_mask")
_APPLY_KEYS = ("positions", "segment_ids")
_LN_HALF = -0.6931471805599453


def _token_logps(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """``log_softmax(logits)[targets]`` in float32, ``[B, T]``."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)
    return picked[..., 0]


def _masked_sum(per_token: jax.Array, mask: ArrayLike) -> jax.Array:
    return jnp.sum(jnp.where(jnp.asarray(mask, bool), per_token, 0.0), axis=-1)


def sequence_logps(
    logits: ArrayLike, targets: ArrayLike, mask: ArrayLike, *, average: bool = False
) -> jax.Array:
    """Each row's log-probability of its target tokens where ``mask`` is true, in float32.

    ``sum_t mask[b, t]·log_softmax(logits[b, t])[targets[b, t]]``, or that sum over the row's
    count of true ``mask`` entries with ``average=True`` (SimPO, ORPO); a row with no true
    entry gives 0 either way. ``logits[b, t]`` predicts ``targets[b, t]`` (shift the targets
    yourself).

    Args:
      logits: ``[B, T, V]``.
      targets: int ``[B, T]``.
      mask: bool (or 0/1) ``[B, T]``: the completion tokens.
      average: divide each row's sum by its number of completion tokens.

    Returns:
      ``[B]`` float32.

    Raises:
      ValueError: if ``logits`` is not 3-D or ``targets``/``mask`` are not ``logits.shape[:2]``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens: log(1/4) = -1.3863 each
      >>> mask = jnp.array([[False, True, True]])
      >>> jlora.sequence_logps(logits, jnp.zeros((1, 3), jnp.int32), mask).round(4)
      Array([-2.7726], dtype=float32)
      >>> jlora.sequence_logps(logits, jnp.zeros((1, 3), jnp.int32), mask, average=True).round(4)
      Array([-1.3863], dtype=float32)
    """
    shape = tuple(jnp.shape(logits))
    if len(shape) != 3:
        raise ValueError(f"sequence_logps: logits must be [batch, seq, vocab]; got shape {shape}")
    for name, value in (("targets", targets), ("mask", mask)):
        if tuple(jnp.shape(value)) != shape[:2]:
            raise ValueError(
                f"sequence_logps: {name} must be [batch, seq] = {shape[:2]} like logits; got "
                f"shape {tuple(jnp.shape(value))}"
            )
    total = _masked_sum(_token_logps(logits, targets), mask)
    if not average:
        return total
    return total / jnp.maximum(jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1), 1.0)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, branching at ``-ln 2`` as TRL does (no cancellation).

    Each branch sees only inputs where it is finite, so the unused one adds no nan gradient.
    """
    low = x < _LN_HALF
    return jnp.where(
        low,
        jnp.log1p(-jnp.exp(jnp.where(low, x, _LN_HALF))),
        jnp.log(-jnp.expm1(jnp.where(low, _LN_HALF, x))),
    )


def _smoothed(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """``-(1-ε)·logσ(z) - ε·logσ(-z)``: the loss when a label is flipped with probability ε."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - (
        label_smoothing * jax.nn.log_sigmoid(-logits)
    )


def _check_options(
    loss_type: str,
    beta: Any,
    label_smoothing: float,
    gamma: float | None,
    has_reference: bool,
    has_nll: bool,
    has_lengths: bool,
) -> None:
    """Refuses an unknown loss, or an argument the chosen loss would silently ignore."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if isinstance(beta, int | float) and not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing is the probability that a preference label is flipped: it must "
            f"lie in [0, 0.5); got {label_smoothing!r}"
        )
    unused = []
    if label_smoothing and loss_type in ("ipo", "orpo"):
        unused.append(f"label_smoothing={label_smoothing!r} (sigmoid, robust, simpo use it)")
    if gamma is not None and loss_type != "simpo":
        unused.append(f"gamma={gamma!r} (simpo's target margin)")
    if has_reference and loss_type not in REFERENCE_BASED:
        unused.append(f"reference log-probabilities ({loss_type} is reference-free)")
    if has_nll and loss_type != "orpo":
        unused.append("chosen_nll / nll_mask (orpo's NLL term)")
    if has_lengths and loss_type != "ipo":
        unused.append("chosen_lengths / rejected_lengths (ipo's per-token averages)")
    if unused:
        raise ValueError(f"loss_type {loss_type!r} does not use: {'; '.join(unused)}; drop them")


def preference_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike | None = None,
    ref_rejected_logps: ArrayLike | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float | None = None,
    chosen_nll: ArrayLike | None = None,
    chosen_lengths: ArrayLike | None = None,
    rejected_lengths: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A preference loss and TRL's metrics from each pair's log-probabilities.

    With ``c, r`` the policy's and ``c0, r0`` the reference's log-probabilities of the chosen
    and rejected answers (``[B]`` each), ``σ`` the sigmoid and ``ε = label_smoothing``:

    - ``"sigmoid"`` (DPO; summed log-probs): ``Δ = (c - c0) - (r - r0)``, loss
      ``-(1-ε)·logσ(βΔ) - ε·logσ(-βΔ)`` (conservative DPO for ε > 0; TRL 1.16's sigmoid
      ignores ε, earlier TRL and its CPO sigmoid use this form). ``ln 2`` when policy = reference.
    - ``"robust"`` (rDPO; summed log-probs): ``(-(1-ε)·logσ(βΔ) + ε·logσ(-βΔ)) / (1 - 2ε)``,
      an unbiased loss under labels flipped with probability ε; TRL 1.16's label-smoothed DPO.
    - ``"ipo"`` (summed log-probs and completion lengths): ``(Δ' - 1/(2β))²`` with ``Δ'`` the
      log-ratios averaged per token: ``(c - c0)/len_c - (r - r0)/len_r`` (lengths clamped to
      >= 1), as TRL computes it; ``β`` is the paper's τ.
    - ``"simpo"`` (averaged log-probs, reference-free): ``z = β(c - r) - γ``, loss
      ``-(1-ε)·logσ(z) - ε·logσ(-z)``, ``γ = gamma`` (TRL's ``simpo_gamma``, default 0.5);
      TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``.
    - ``"orpo"`` (averaged log-probs, reference-free): ``chosen_nll - β·logσ(L)`` with the log
      odds ratio ``L = (c - r) - (log(1 - e^c) - log(1 - e^r))``; ``β`` is the paper's λ.

    Each term is averaged over the batch. Metrics, named as TRL logs them and each a batch
    mean (computed without gradient): ``rewards/chosen`` and ``rewards/rejected`` (``β(c - c0)``
    and ``β(r - r0)`` with a reference, summed log-probs even for IPO; ``βc`` and ``βr`` for
    the reference-free losses), ``rewards/accuracies`` (the fraction of pairs whose chosen
    reward is strictly larger: 0 at init), ``rewards/margins``, ``logps/chosen`` and
    ``logps/rejected`` (``c`` and ``r`` as given); for ORPO also ``nll_loss``,
    ``log_odds_ratio`` (mean ``logσ(L)``) and ``log_odds_chosen`` (mean ``L``).

    Args:
      chosen_logps: ``[B]`` policy log-probabilities of the chosen answers (summed over the
        completion for sigmoid/robust/ipo, averaged for simpo/orpo: see
        :func:`sequence_logps`).
      rejected_logps: ``[B]``, likewise for the rejected answers.
      ref_chosen_logps: ``[B]`` the reference's, summed (sigmoid, robust, ipo only).
      ref_rejected_logps: ``[B]`` the reference's, summed (sigmoid, robust, ipo only).
      loss_type: one of :data:`LOSS_TYPES`.
      beta: ``β`` > 0 (a Python number is checked; a traced one is trusted).
      label_smoothing: ``ε`` in ``[0, 0.5)``, the probability a label is flipped (sigmoid,
        robust, simpo).
      gamma: SimPO's target margin (simpo only; ``None`` for :data:`SIMPO_GAMMA`).
      chosen_nll: scalar, the chosen answers' mean next-token NLL (orpo only, required).
      chosen_lengths: ``[B]`` completion token counts of the chosen answers (ipo only, required).
      rejected_lengths: ``[B]`` completion token counts of the rejected answers (ipo only,
        required).

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars.

    Raises:
      ValueError: for an unknown ``loss_type`` (naming the choices), ``beta <= 0``,
        ``label_smoothing`` outside ``[0, 0.5)``, a missing reference (sigmoid, robust, ipo), NLL
        (orpo) or lengths (ipo), an argument the chosen loss does not use, or log-probability
        arrays that are not all the same ``[B]`` shape.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> c, r = jnp.array([-5.0, -7.0]), jnp.array([-6.0, -6.0])
      >>> loss, metrics = jlora.preference_loss(c, r, c, r)  # policy = reference
      >>> round(float(loss), 6), float(metrics["rewards/accuracies"])
      (0.693147, 0.0)
      >>> loss, metrics = jlora.preference_loss(c, r, c - 1.0, r, beta=0.5)
      >>> round(float(metrics["rewards/margins"]), 4)
      0.5
    """
    has_reference = ref_chosen_logps is not None or ref_rejected_logps is not None
    has_lengths = chosen_lengths is not None or rejected_lengths is not None
    _check_options(
        loss_type, beta, label_smoothing, gamma, has_reference, chosen_nll is not None, has_lengths
    )
    if loss_type in REFERENCE_BASED and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"loss_type {loss_type!r} compares with a reference model: give both "
            "ref_chosen_logps and ref_rejected_logps (or choose 'simpo' or 'orpo', which have none)"
        )
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            "loss_type 'ipo' averages the log-ratios per completion token: give chosen_lengths "
            "and rejected_lengths (each pair's completion token counts)"
        )
    if loss_type == "orpo" and chosen_nll is None:
        raise ValueError(
            "loss_type 'orpo' adds the chosen answers' NLL: give chosen_nll (a scalar)"
        )
    arrays: dict[str, ArrayLike | None] = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    if len(shapes["chosen_logps"]) != 1 or len(set(shapes.values())) != 1:
        raise ValueError(f"preference_loss: expected [batch] arrays of one shape; got {shapes}")
    if chosen_nll is not None and jnp.shape(chosen_nll) != ():
        raise ValueError(f"chosen_nll must be a scalar; got shape {jnp.shape(chosen_nll)}")

    c = jnp.asarray(chosen_logps, jnp.float32)
    r = jnp.asarray(rejected_logps, jnp.float32)
    metrics: dict[str, jax.Array] = {}
    if loss_type in REFERENCE_BASED:
        chosen_ratio = c - jnp.asarray(ref_chosen_logps, jnp.float32)
        rejected_ratio = r - jnp.asarray(ref_rejected_logps, jnp.float32)
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        logits = beta * (chosen_ratio - rejected_ratio)
        if loss_type == "sigmoid":
            losses = _smoothed(logits, label_smoothing)
        elif loss_type == "robust":
            flipped = label_smoothing * jax.nn.log_sigmoid(-logits)
            clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
            losses = (clean + flipped) / (1.0 - 2.0 * label_smoothing)
        else:
            chosen_len = jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
            rejected_len = jnp.maximum(jnp.asarray(rejected_lengths, jnp.float32), 1.0)
            delta = chosen_ratio / chosen_len - rejected_ratio / rejected_len
            losses = (delta - 1.0 / (2.0 * beta)) ** 2
        loss = jnp.mean(losses)
    else:
        chosen_reward, rejected_reward = beta * c, beta * r
        if loss_type == "simpo":
            margin = SIMPO_GAMMA if gamma is None else gamma
            loss = jnp.mean(_smoothed(beta * (c - r) - margin, label_smoothing))
        else:
            log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
            ratio = jax.nn.log_sigmoid(log_odds)
            nll = jnp.asarray(chosen_nll, jnp.float32)
            loss = nll - jnp.mean(beta * ratio)
            metrics["nll_loss"] = nll
            metrics["log_odds_ratio"] = jnp.mean(ratio)
            metrics["log_odds_chosen"] = jnp.mean(log_odds)
    metrics["rewards/chosen"] = jnp.mean(chosen_reward)
    metrics["rewards/rejected"] = jnp.mean(rejected_reward)
    metrics["rewards/accuracies"] = jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32))
    metrics["rewards/margins"] = jnp.mean(chosen_reward - rejected_reward)
    metrics["logps/chosen"] = jnp.mean(c)
    metrics["logps/rejected"] = jnp.mean(r)
    return loss, {k: jax.lax.stop_gradient(v) for k, v in sorted(metrics.items())}


def _check_batch(batch: Mapping[str, Any]) -> int:
    """Validates the pair batch's keys and shapes on entry; returns ``B`` (pairs)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"dpo_loss: batch must be a dict of arrays; got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS[:3] if k not in batch]
    unknown = sorted(k for k in batch if k not in BATCH_KEYS)
    if missing or unknown:
        raise ValueError(
            f"dpo_loss: batch keys {sorted(batch)}: missing {missing}, unknown {unknown}; a "
            f"batch has {list(BATCH_KEYS[:3])} and optionally {list(BATCH_KEYS[3:])}"
        )
    shape = tuple(jnp.shape(batch["tokens"]))
    if len(shape) != 2 or shape[0] == 0 or shape[0] % 2:
        raise ValueError(
            f"dpo_loss: tokens must be [2B, T] with B >= 1 chosen rows followed by their B "
            f"rejected rows; got shape {shape} (an odd or zero row count cannot pair up)"
        )
    for key in BATCH_KEYS[1:]:
        if key in batch and tuple(jnp.shape(batch[key])) != shape:
            raise ValueError(
                f"dpo_loss: batch[{key!r}] must have the tokens' shape {shape}; got "
                f"{tuple(jnp.shape(batch[key]))}"
            )
    return shape[0] // 2


def dpo_loss(
    apply_fn: Callable[..., Any] | None,
    params: Any,
    config: LoraConfig,
    batch: Mapping[str, Any],
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float | None = None,
    reference_logps: tuple[ArrayLike, ArrayLike] | None = None,
    on_unsupported: str = "raise",
    dropout_rng: Any = None,
    deterministic: bool = True,
    logps_fn: Callable[..., Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A preference loss of a LoRA-adapted model on a batch of pairs, and TRL's metrics.

    The policy is ``jlora.lora(apply_fn, config)(params, tokens, **kw)``; the reference (for
    ``"sigmoid"``, ``"robust"`` and ``"ipo"``) is the same base with the adapters off,
    ``apply_fn(split(params)[1], tokens, **kw)`` under ``stop_gradient``, so no second copy of
    the weights exists and at init (B = 0) the DPO loss is exactly ``ln 2``. Pass
    ``reference_logps`` precomputed to skip the reference forward. Each row's completion
    log-probability is summed (sigmoid, robust, ipo) or averaged (simpo, orpo) over the tokens
    ``loss_mask`` marks (:func:`sequence_logps`); the loss and metrics are
    :func:`preference_loss`'s. ORPO's NLL term is the mean next-token NLL over the chosen rows'
    tokens that ``nll_mask`` marks (default ``loss_mask``, the answers; TRL's ``ORPOTrainer``
    counts every non-padding token, prompt included: mark those to match it).

    Differentiate with respect to the adapters alone through :func:`jlora.split` /
    :func:`jlora.combine` (not inside :func:`jlora.value_and_grad`, whose stripped tree would
    make the policy the reference): see the example. Called eagerly, each call wraps
    ``apply_fn`` anew and so compiles it again: call it inside the ``jax.jit`` train step.

    Args:
      apply_fn: ``apply_fn(params, tokens, **kw) -> logits [2B, T, V]``, e.g.
        ``lambda p, t, **kw: model.apply({"params": p}, t, **kw)``. ``kw`` holds the batch's
        ``positions`` and ``segment_ids`` (as keywords of those names), when present.
        ``None`` with ``logps_fn``.
      params: the adapted tree (A and B beside the kernels, from :func:`jlora.init_lora`).
      config: the config the tree was initialised with.
      batch: ``tokens``, ``targets`` (``targets[:, t]`` is the token after ``tokens[:, t]``),
        ``loss_mask`` (true on targets that are completion tokens), each ``[2B, T]``; optional
        ``positions`` and ``segment_ids`` ``[2B, T]`` (passed to ``apply_fn``) and ``nll_mask``
        ``[2B, T]`` (orpo). Rows ``0..B-1`` are the chosen answers, rows ``B..2B-1`` the
        rejected answers to the same prompts, in the same order.
      loss_type: one of :data:`LOSS_TYPES`.
      beta: as in :func:`preference_loss`.
      label_smoothing: as in :func:`preference_loss`.
      gamma: as in :func:`preference_loss`.
      reference_logps: ``(chosen, rejected)``, each ``[B]``: the reference's summed
        completion log-probabilities, precomputed (sigmoid, robust, ipo).
      on_unsupported: as in :func:`jlora.lora`.
      dropout_rng: as in :func:`jlora.lora` (the reference runs without dropout).
      deterministic: as in :func:`jlora.lora`.
      logps_fn: instead of ``apply_fn``'s logits, ``logps_fn(params, tokens, targets,
        loss_mask, **kw) -> [2B, T]``: each target token's log-probability (any value where
        ``loss_mask`` is false), run through :func:`jlora.lora` as ``apply_fn`` would be.
        A decoder's hidden states through :func:`jlora.chunked_token_logps` give them without
        ``[2B, T, V]`` logits (:func:`jlora.models.lm_head.decoder_scores`).

    Returns:
      ``(loss, metrics)`` as :func:`preference_loss` returns them.

    Raises:
      TypeError: if ``batch`` is not a mapping, or as :func:`jlora.lora`.
      ValueError: for a batch with a missing or unknown key, ``tokens`` not ``[2B, T]`` with
        ``B >= 1``, another key of a different shape, ``reference_logps`` not two ``[B]``
        arrays, ``params`` without adapters, ``nll_mask`` for a loss other than orpo, neither
        or both of ``apply_fn`` and ``logps_fn``, ``logps_fn`` giving another shape than
        ``[2B, T]``, and as :func:`preference_loss` and :func:`jlora.lora`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> emb = jax.random.normal(jax.random.key(0), (6, 4))
      >>> def apply_fn(p, tokens):
      ...     return emb[tokens] @ p["w"]
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> params = jlora.init_lora(jax.random.key(1), {"w": jnp.ones((4, 6))}, cfg)
      >>> tokens = jnp.array([[1, 2, 3], [1, 2, 4]])  # one pair: chosen row, then rejected row
      >>> batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
      ...          "loss_mask": jnp.array([[False, True, False]] * 2)}
      >>> loss, metrics = jlora.dpo_loss(apply_fn, params, cfg, batch)
      >>> round(float(loss), 6)  # B = 0 at init: the policy is the reference
      0.693147
      >>> lora, base = jlora.split(params)
      >>> def of_adapters(lora):
      ...     return jlora.dpo_loss(apply_fn, jlora.combine(lora, base), cfg, batch)
      >>> (loss, metrics), grads = jax.value_and_grad(of_adapters, has_aux=True)(lora)
      >>> sorted(grads)
      ['w_lora_a', 'w_lora_b']
    """
    _check_options(
        loss_type,
        beta,
        label_smoothing,
        gamma,
        reference_logps is not None,
        "nll_mask" in batch,
        False,
    )
    pairs = _check_batch(batch)
    if (apply_fn is None) == (logps_fn is None):
        raise ValueError(
            "dpo_loss: give apply_fn (the model's logits) or logps_fn (its per-token "
            "log-probabilities), exactly one of them; pass None for the other"
        )
    if reference_logps is not None and (
        len(reference_logps) != 2 or any(tuple(jnp.shape(x)) != (pairs,) for x in reference_logps)
    ):
        raise ValueError(
            f"dpo_loss: reference_logps must be (chosen, rejected), each of shape ({pairs},); "
            f"got {[tuple(jnp.shape(x)) for x in reference_logps]}"
        )
    adapters, base = split(params)
    if not jax.tree.leaves(adapters):
        raise ValueError(
            "dpo_loss: params holds no LoRA adapters, so there is nothing to train and the "
            "policy would be the reference; call jlora.init_lora(key, params, config) first"
        )
    kwargs = {k: batch[k] for k in _APPLY_KEYS if k in batch}
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]

    def per_token_logps(tree: Any, **options: Any) -> jax.Array:
        if logps_fn is None:
            logits = lora(cast(Callable[..., Any], apply_fn), config, **options)(
                tree, tokens, **kwargs
            )
            return _token_logps(logits, targets)
        out = jnp.asarray(lora(logps_fn, config, **options)(tree, tokens, targets, mask, **kwargs))
        if out.shape != jnp.shape(tokens):
            raise ValueError(
                f"dpo_loss: logps_fn must give [2B, T] = {jnp.shape(tokens)} per-token "
                f"log-probabilities; got shape {out.shape}"
            )
        return out.astype(jnp.float32)

    per_token = per_token_logps(
        params,
        on_unsupported=on_unsupported,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
    )
    lengths = jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1)
    summed = _masked_sum(per_token, mask)
    logps = summed / jnp.maximum(lengths, 1.0) if loss_type in AVERAGED else summed
    options: dict[str, Any] = {"loss_type": loss_type, "beta": beta}
    options |= {"label_smoothing": label_smoothing, "gamma": gamma}
    refs: tuple[Any, Any] = (None, None)
    if loss_type in REFERENCE_BASED:
        if reference_logps is None:
            # The base alone: jlora.lora runs apply_fn unchanged on a tree without adapters
            # (dequantising a QLoRA base first), with no dropout.
            ref = _masked_sum(per_token_logps(jax.lax.stop_gradient(base)), mask)
            reference_logps = (ref[:pairs], ref[pairs:])
        refs = (
            jax.lax.stop_gradient(jnp.asarray(reference_logps[0], jnp.float32)),
            jax.lax.stop_gradient(jnp.asarray(reference_logps[1], jnp.float32)),
        )
    if loss_type == "ipo":
        options |= {"chosen_lengths": lengths[:pairs], "rejected_lengths": lengths[pairs:]}
    if loss_type == "orpo":
        nll_mask = jnp.asarray(batch.get("nll_mask", mask), bool)[:pairs]
        count = jnp.maximum(jnp.sum(nll_mask.astype(jnp.float32)), 1.0)
        options["chosen_nll"] = -jnp.sum(_masked_sum(per_token[:pairs], nll_mask)) / count
    return preference_loss(logps[:pairs], logps[pairs:], *refs, **options)
