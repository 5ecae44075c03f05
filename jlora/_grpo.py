"""GRPO's objective (and Dr. GRPO, DAPO, BNPO, GSPO) as pure functions, as TRL has them.

A batch holds ``B = prompts·num_generations`` completions, each prompt's ``num_generations``
consecutive. Each completion's reward becomes an advantage relative to its group
(:func:`group_advantages`), and the policy is pushed towards the completions with positive
advantage through PPO's clipped ratio ``π/π_old`` per token, optionally held near a reference
by ``β`` times the k3 KL estimate (:func:`grpo_loss`). With LoRA the reference costs no
memory: it is the base with the adapters off, ``apply_fn(split(params)[1], ...)`` under
``stop_gradient`` (:func:`grpo_policy_loss`), and the sampler can run through the live
adapters, so no second copy of the weights exists anywhere.

Each formula and metric follows TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions``
for the advantages, ``_compute_loss`` for the loss), and ``tests/test_peft_trl_grpo.py`` checks
them against TRL's own code on the same model, adapter and completions. Two TRL conventions
that are easy to miss and that jlora keeps as the defaults: the KL term is multiplied by the
ratio (``use_bias_correction_kl=True``, which changes the gradient even where the ratio is 1),
and the logits are divided by the sampling ``temperature`` before the log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jlora._config import LoraConfig
from jlora._factorised import lora
from jlora._preference import _token_logps
from jlora._split import split

#: The loss aggregations, as TRL names them.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: How :func:`group_advantages` scales rewards, as TRL's ``scale_rewards``.
SCALE_REWARDS = ("group", "batch", "none")
#: Where the ratio is taken: per token (GRPO) or per sequence (GSPO), TRL's names.
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
#: The batch keys :func:`grpo_policy_loss` reads; ``positions`` and ``segment_ids`` go to
#: ``apply_fn``.
BATCH_KEYS = ("tokens", "targets", "loss_mask", "advantages", "positions", "segment_ids")
_APPLY_KEYS = ("positions", "segment_ids")
_STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)
_ZERO_STD = 1e-8  # torch.isclose(std, 0)'s absolute tolerance, TRL's "zero std" test


class GroupAdvantages(NamedTuple):
    """What :func:`group_advantages` returns (a pytree, so it passes through ``jax.jit``)."""

    #: ``[B]`` float32: each completion's reward minus its group's mean, scaled as asked.
    advantages: jax.Array
    #: ``[B // num_generations]`` bool: the groups whose rewards differ (std > 1e-8); the others
    #: have all-zero advantages and teach nothing. DAPO's dynamic sampling keeps only these.
    nonzero_std: jax.Array


def _nanstd(x: jax.Array, axis: int | None) -> jax.Array:
    """TRL's ``nanstd``: Bessel-corrected std over the non-NaN entries, NaN with fewer than 2."""
    count = jnp.sum(~jnp.isnan(x), axis=axis)
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    squares = jnp.nansum((x - mean) ** 2, axis=axis)
    return jnp.where(count > 1, jnp.sqrt(squares / jnp.maximum(count - 1, 1)), jnp.nan)


def group_advantages(
    rewards: ArrayLike, num_generations: int, *, scale_rewards: str = "group"
) -> GroupAdvantages:
    """Each completion's advantage: its reward against the other completions of its prompt.

    With ``r`` a group's ``num_generations`` rewards, ``A = (r - mean(r)) / (std + 1e-4)``, the
    std being the group's (``"group"``, GRPO), the whole batch's (``"batch"``, as Lite PPO
    recommends) or none at all: ``A = r - mean(r)`` (``"none"``, Dr. GRPO). Stds are
    Bessel-corrected, as TRL's ``nanstd``. A NaN reward marks a completion no reward function
    could score: it is left out of its group's mean and std and gets advantage 0, as in TRL.
    With ``num_generations = 1`` every advantage is 0.

    Args:
      rewards: ``[B]`` each completion's (weighted, summed) reward; a prompt's
        ``num_generations`` completions are consecutive rows.
      num_generations: completions per prompt; ``B`` must be a multiple of it.
      scale_rewards: one of :data:`SCALE_REWARDS`.

    Returns:
      :class:`GroupAdvantages`: ``advantages`` ``[B]`` and ``nonzero_std``
      ``[B // num_generations]``, true for the groups whose rewards are not all equal (their
      group std > 1e-8, whatever ``scale_rewards``). DAPO's dynamic sampling keeps those groups
      (``jnp.repeat(nonzero_std, num_generations)`` marks their rows); TRL's logged
      ``frac_reward_zero_std`` is ``1 - mean(nonzero_std)`` with group scaling.

    Raises:
      ValueError: if ``rewards`` is not 1-D, ``num_generations`` is not a positive integer that
        divides ``B``, or ``scale_rewards`` is unknown.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> out = jlora.group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), num_generations=2)
      >>> out.advantages.round(3)  # ±0.5 / (0.7071 + 1e-4); the second group teaches nothing
      Array([ 0.707, -0.707,  0.   ,  0.   ], dtype=float32)
      >>> out.nonzero_std
      Array([ True, False], dtype=bool)
      >>> jlora.group_advantages(jnp.array([1.0, 0.0]), 2, scale_rewards="none").advantages
      Array([ 0.5, -0.5], dtype=float32)
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose one of {SCALE_REWARDS}")
    shape = tuple(jnp.shape(rewards))
    if len(shape) != 1:
        raise ValueError(
            f"group_advantages: rewards must be [B], one (summed) reward per completion; got "
            f"shape {shape} (sum several reward functions' columns with their weights first)"
        )
    if isinstance(num_generations, bool) or not isinstance(num_generations, int):
        raise ValueError(
            f"num_generations must be a positive int (completions per prompt); got "
            f"{num_generations!r}"
        )
    if num_generations < 1 or shape[0] % num_generations:
        raise ValueError(
            f"group_advantages: {shape[0]} rewards do not split into groups of "
            f"num_generations={num_generations}; give each prompt's num_generations completions "
            "as consecutive rows"
        )
    r = jnp.asarray(rewards, jnp.float32)
    grouped = r.reshape(-1, num_generations)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    if num_generations > 1:
        group_std = _nanstd(grouped, axis=1)
    else:  # TRL: a group of one has std 0, not NaN
        group_std = jnp.zeros(grouped.shape[0], jnp.float32)
    advantages = r - mean
    if scale_rewards == "group":
        advantages = advantages / (jnp.repeat(group_std, num_generations) + _STD_EPS)
    elif scale_rewards == "batch":
        std = _nanstd(r, axis=None) if shape[0] > 1 else jnp.zeros((), jnp.float32)
        advantages = advantages / (std + _STD_EPS)
    return GroupAdvantages(jnp.nan_to_num(advantages, nan=0.0), group_std > _ZERO_STD)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_options(
    loss_type: str,
    beta: Any,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str,
    delta: float | None,
    max_completion_length: int | None,
    has_reference: bool,
    has_num_items: bool,
) -> None:
    """Refuses an unknown choice, an out-of-range number, or an argument that would be ignored."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; choose one of "
            f"{IMPORTANCE_SAMPLING_LEVELS} ('sequence' is GSPO)"
        )
    if not (_is_number(epsilon_low) and 0.0 < epsilon_low < 1.0):
        raise ValueError(
            f"epsilon_low clips the ratio from below at 1 - epsilon_low: it must lie in (0, 1); "
            f"got {epsilon_low!r} (TRL's default is 0.2)"
        )
    if not (_is_number(epsilon_high) and epsilon_high > 0.0):
        raise ValueError(
            f"epsilon_high clips the ratio from above at 1 + epsilon_high: it must be > 0; got "
            f"{epsilon_high!r} (None for epsilon_low; DAPO's clip-higher uses 0.28)"
        )
    if delta is not None and not (_is_number(delta) and delta > 1.0 + epsilon_high):
        raise ValueError(
            f"delta caps the unclipped ratio (two-sided GRPO): it must be > 1 + epsilon_high = "
            f"{1.0 + epsilon_high}; got {delta!r} (None for no cap)"
        )
    if _is_number(beta):
        if beta < 0:
            raise ValueError(f"beta weighs the KL penalty: it must be >= 0; got {beta!r}")
        if beta > 0 and not has_reference:
            raise ValueError(
                f"beta={beta!r} adds a KL penalty to the reference: give the reference's "
                "per-token log-probabilities (or beta=0 for none)"
            )
        if beta == 0 and has_reference:
            raise ValueError(
                "beta=0 has no KL term, so the reference log-probabilities would be ignored: "
                "drop them, or set beta > 0"
            )
    elif not has_reference:
        raise ValueError(
            "a traced beta always adds the KL term: give the reference's log-probabilities"
        )
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError(
                "loss_type 'dr_grpo' divides the token sum by B·max_completion_length: give "
                "max_completion_length (TRL's config value; the sampler's max_new_tokens)"
            )
        if isinstance(max_completion_length, bool) or not (
            isinstance(max_completion_length, int) and max_completion_length > 0
        ):
            raise ValueError(
                f"max_completion_length must be a positive int; got {max_completion_length!r}"
            )
    elif max_completion_length is not None:
        raise ValueError(
            f"loss_type {loss_type!r} does not use max_completion_length (dr_grpo's constant); "
            "drop it"
        )
    if has_num_items and loss_type != "dapo":
        raise ValueError(
            f"loss_type {loss_type!r} does not use num_items_in_batch (dapo's normaliser); drop it"
        )


def grpo_loss(
    per_token_logps: ArrayLike,
    old_per_token_logps: ArrayLike | None,
    ref_per_token_logps: ArrayLike | None,
    advantages: ArrayLike,
    loss_mask: ArrayLike,
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's clipped policy loss (and its variants) and TRL's metrics from per-token log-probs.

    Per token, with ``ρ = exp(logp - old)`` (``"sequence"``: the row's mean log-ratio over its
    completion, GSPO) and ``A`` the advantage:
    ``ℓ = -min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) + β·ρ·(exp(ref - logp) - (ref - logp) - 1)``
    (the last factor is the k3 KL estimate; ``ρ`` multiplies it only with
    ``use_bias_correction_kl``, TRL's default; ``delta`` caps the unclipped ``ρ``). The tokens
    ``loss_mask`` marks are then aggregated as ``loss_type`` says:

    - ``"grpo"``: each row's mean over its tokens, averaged over rows (length-biased).
    - ``"bnpo"``: the sum over all tokens over their count.
    - ``"dr_grpo"``: the sum over all tokens over ``B·max_completion_length`` (Dr. GRPO).
    - ``"dapo"`` (TRL's default): the sum over ``num_items_in_batch`` (default: this batch's
      token count, which is ``"bnpo"``); pass the whole generation batch's count, scaled as TRL
      does, to normalise micro-batches by one number.

    Entries outside ``loss_mask`` are ignored (their values may be anything finite or not).
    Metrics, named as TRL logs them (without gradient): ``kl`` (the KL term's mean per token,
    with ``β > 0``), ``clip_ratio/low_mean`` (tokens with ``ρ < 1 - ε_low`` and ``A < 0``),
    ``clip_ratio/high_mean`` (``ρ > 1 + ε_high`` and ``A > 0``), ``clip_ratio/region_mean``
    (either), as fractions of all completion tokens (of rows at sequence level), and
    ``clip_ratio/low_min`` / ``clip_ratio/high_max``, the extreme per-row fractions (NaN if no
    row has a token).

    Args:
      per_token_logps: ``[B, T]`` the policy's log-probability of each target token.
      old_per_token_logps: ``[B, T]`` the sampling policy's (``num_iterations > 1``), or
        ``None`` for the policy's own under ``stop_gradient`` (one update per rollout: ``ρ = 1``
        with ``ρ``'s gradient).
      ref_per_token_logps: ``[B, T]`` the reference's, with ``beta > 0``; ``None`` with
        ``beta = 0``.
      advantages: ``[B]`` (from :func:`group_advantages`) or ``[B, T]``.
      loss_mask: bool (or 0/1) ``[B, T]``: the completion tokens (TRL's ``completion_mask``).
      loss_type: one of :data:`LOSS_TYPES`.
      beta: ``β >= 0``, the KL weight (TRL's default 0). A traced ``beta`` needs the reference.
      epsilon_low: ``ε_low`` in ``(0, 1)`` (TRL's ``epsilon``).
      epsilon_high: ``ε_high > 0``; ``None`` for ``ε_low`` (DAPO's clip-higher: 0.28).
      importance_sampling_level: one of :data:`IMPORTANCE_SAMPLING_LEVELS`.
      delta: cap on the unclipped ratio (two-sided GRPO), ``> 1 + ε_high``; ``None`` for none.
      use_bias_correction_kl: multiply the KL term by ``ρ`` (TRL's default).
      max_completion_length: ``"dr_grpo"``'s constant (required there, refused elsewhere).
      num_items_in_batch: ``"dapo"``'s normaliser, a scalar (refused for other losses).

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars.

    Raises:
      ValueError: for an unknown ``loss_type`` or ``importance_sampling_level``, ``epsilon_low``
        outside ``(0, 1)``, ``epsilon_high <= 0``, ``delta <= 1 + ε_high``, ``beta < 0``, a
        missing reference with ``beta > 0`` (or one given with ``beta = 0``), a missing
        ``max_completion_length`` for dr_grpo, an argument the loss does not use, or arrays of
        the wrong shapes.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> logps = jnp.log(jnp.array([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]]))
      >>> mask = jnp.array([[True, True, True], [True, False, False]])
      >>> adv = jnp.array([1.0, -1.0])
      >>> loss, metrics = jlora.grpo_loss(logps, None, None, adv, mask)  # on-policy: ρ = 1
      >>> float(loss)  # dapo: -(3·1 + 1·(-1)) / 4 tokens
      -0.5
      >>> float(jlora.grpo_loss(logps, None, None, adv, mask, loss_type="grpo")[0])
      0.0
      >>> loss, metrics = jlora.grpo_loss(logps, logps - 1.0, None, adv, mask)  # ρ = e
      >>> round(float(loss), 4)  # (-3·1.2 + e) / 4: A > 0 is clipped, A < 0 is not
      -0.2204
      >>> float(metrics["clip_ratio/high_mean"]), float(metrics["clip_ratio/region_mean"])
      (0.75, 0.75)
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_options(
        loss_type,
        beta,
        epsilon_low,
        epsilon_high,
        importance_sampling_level,
        delta,
        max_completion_length,
        ref_per_token_logps is not None,
        num_items_in_batch is not None,
    )
    shape = tuple(jnp.shape(per_token_logps))
    if len(shape) != 2:
        raise ValueError(
            f"grpo_loss: per_token_logps must be [batch, completion tokens]; got shape {shape}"
        )
    given = {
        "old_per_token_logps": old_per_token_logps,
        "ref_per_token_logps": ref_per_token_logps,
        "loss_mask": loss_mask,
    }
    for name, value in given.items():
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise ValueError(
                f"grpo_loss: {name} must have per_token_logps's shape {shape}; got "
                f"{tuple(jnp.shape(value))}"
            )
    if tuple(jnp.shape(advantages)) not in (shape[:1], shape):
        raise ValueError(
            f"grpo_loss: advantages must be [B] = {shape[:1]} (one per completion) or [B, T] = "
            f"{shape}; got {tuple(jnp.shape(advantages))}"
        )
    if num_items_in_batch is not None and jnp.shape(num_items_in_batch) != ():
        raise ValueError(
            f"num_items_in_batch must be a scalar; got shape {jnp.shape(num_items_in_batch)}"
        )

    mask = jnp.asarray(loss_mask, bool)
    weights = mask.astype(jnp.float32)

    def masked(x: ArrayLike) -> jax.Array:
        # zero outside the mask before any exp, so padding can neither overflow nor give nan grads
        return jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)

    logps = masked(per_token_logps)
    old = jax.lax.stop_gradient(
        logps if old_per_token_logps is None else masked(old_per_token_logps)
    )
    adv = jnp.asarray(advantages, jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        lengths = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
        log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True) / lengths
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(capped * adv, clipped * adv)
    per_token = jnp.broadcast_to(per_token, shape)
    metrics: dict[str, jax.Array] = {}
    count = jnp.sum(weights)
    if ref_per_token_logps is not None:
        ref_gap = jax.lax.stop_gradient(masked(ref_per_token_logps)) - logps
        kl = jnp.exp(ref_gap) - ref_gap - 1.0
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(count, 1.0)

    token_sums = jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1)
    if loss_type == "grpo":
        loss = jnp.mean(token_sums / jnp.maximum(jnp.sum(weights, axis=-1), 1.0))
    elif loss_type == "bnpo":
        loss = jnp.sum(token_sums) / jnp.maximum(count, 1.0)
    elif loss_type == "dr_grpo":  # max_completion_length: a positive int, checked on entry
        loss = jnp.sum(token_sums) / (shape[0] * int(max_completion_length or 1))
    else:
        items = (
            count if num_items_in_batch is None else jnp.asarray(num_items_in_batch, jnp.float32)
        )
        loss = jnp.sum(token_sums) / jnp.maximum(items, 1.0)

    # TRL's clip metrics: the ratio (capped by delta, which is > 1 + ε_high so it changes none)
    low = ((capped < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((capped > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    row_counts = jnp.sum(weights, axis=-1)
    for name, flags in (("low", low), ("high", high), ("region", region)):
        if flags.shape[1] == 1:  # one value per sequence: a mean over the rows
            metrics[f"clip_ratio/{name}_mean"] = jnp.mean(flags)
            per_row = flags[:, 0]
        else:
            metrics[f"clip_ratio/{name}_mean"] = jnp.sum(flags * weights) / jnp.maximum(count, 1.0)
            per_row = jnp.where(
                row_counts > 0, jnp.sum(flags * weights, axis=-1) / row_counts, jnp.nan
            )
        if name == "low":
            metrics["clip_ratio/low_min"] = jnp.nanmin(per_row)
        elif name == "high":
            metrics["clip_ratio/high_max"] = jnp.nanmax(per_row)
    return loss, {k: jax.lax.stop_gradient(v) for k, v in sorted(metrics.items())}


def token_logps(logits: ArrayLike, targets: ArrayLike, *, temperature: float = 1.0) -> jax.Array:
    """Each target token's log-probability under ``logits / temperature``, float32 ``[B, T]``.

    ``log_softmax(logits[b, t] / τ)[targets[b, t]]``: the per-token log-probabilities
    :func:`grpo_loss` takes (the policy's, the sampling policy's for ``num_iterations > 1``, the
    reference's), scaled by the sampling temperature as TRL's ``GRPOTrainer`` scales them.

    Args:
      logits: ``[B, T, V]``; ``logits[b, t]`` predicts ``targets[b, t]``.
      targets: int ``[B, T]``.
      temperature: ``τ > 0``, the temperature the completions were sampled at.

    Returns:
      ``[B, T]`` float32.

    Raises:
      ValueError: if ``logits`` is not 3-D, ``targets`` is not ``logits.shape[:2]``, or
        ``temperature <= 0``.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> jlora.token_logps(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]])).round(4)
      Array([[-1.3863, -1.3863]], dtype=float32)
    """
    shape = tuple(jnp.shape(logits))
    if len(shape) != 3:
        raise ValueError(f"token_logps: logits must be [batch, seq, vocab]; got shape {shape}")
    if tuple(jnp.shape(targets)) != shape[:2]:
        raise ValueError(
            f"token_logps: targets must be [batch, seq] = {shape[:2]} like logits; got shape "
            f"{tuple(jnp.shape(targets))}"
        )
    _check_temperature(temperature)
    return _token_logps(jnp.asarray(logits, jnp.float32) / temperature, targets)


def _check_temperature(temperature: Any) -> None:
    if not (_is_number(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a number > 0 (the one the completions were sampled at); got "
            f"{temperature!r}"
        )


def _check_batch(batch: Mapping[str, Any]) -> tuple[int, int]:
    """Validates the rollout batch's keys and shapes on entry; returns ``(B, T)``."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"grpo_policy_loss: batch must be a dict of arrays; got {type(batch).__name__}"
        )
    missing = [k for k in BATCH_KEYS[:4] if k not in batch]
    unknown = sorted(k for k in batch if k not in BATCH_KEYS)
    if missing or unknown:
        raise ValueError(
            f"grpo_policy_loss: batch keys {sorted(batch)}: missing {missing}, unknown {unknown}; "
            f"a batch has {list(BATCH_KEYS[:4])} and optionally {list(BATCH_KEYS[4:])}"
        )
    shape = tuple(jnp.shape(batch["tokens"]))
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(
            f"grpo_policy_loss: tokens must be [B, T] with B >= 1 prompt+completion rows; got "
            f"shape {shape}"
        )
    for key in ("targets", "loss_mask", *_APPLY_KEYS):
        if key in batch and tuple(jnp.shape(batch[key])) != shape:
            raise ValueError(
                f"grpo_policy_loss: batch[{key!r}] must have the tokens' shape {shape}; got "
                f"{tuple(jnp.shape(batch[key]))}"
            )
    advantages = tuple(jnp.shape(batch["advantages"]))
    if advantages not in (shape[:1], shape):
        raise ValueError(
            f"grpo_policy_loss: batch['advantages'] must be [B] = {shape[:1]} (one per "
            f"completion) or [B, T] = {shape}; got {advantages}"
        )
    return shape[0], shape[1]


def grpo_policy_loss(
    apply_fn: Callable[..., Any] | None,
    params: Any,
    config: LoraConfig,
    batch: Mapping[str, Any],
    *,
    old_logps: ArrayLike | None = None,
    ref_logps: ArrayLike | None = None,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: ArrayLike | None = None,
    temperature: float = 1.0,
    on_unsupported: str = "raise",
    dropout_rng: Any = None,
    deterministic: bool = True,
    logps_fn: Callable[..., Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's loss of a LoRA-adapted model on a batch of scored completions, and TRL's metrics.

    The policy is ``jlora.lora(apply_fn, config)(params, tokens, **kw)``; with ``beta > 0`` the
    reference is the same base with the adapters off, ``apply_fn(split(params)[1], tokens,
    **kw)`` under ``stop_gradient``, computed in the same call unless ``ref_logps`` is given:
    no second copy of the weights exists. Token log-probabilities are :func:`token_logps` of
    the logits at ``temperature``; the loss and metrics are :func:`grpo_loss`'s, plus
    ``entropy``: the policy's mean entropy per completion token, as TRL logs it.

    Differentiate with respect to the adapters alone through :func:`jlora.split` /
    :func:`jlora.combine` (not inside :func:`jlora.value_and_grad`, whose stripped tree would
    make the policy the reference): see the example. Call it inside the ``jax.jit`` train step.

    Args:
      apply_fn: ``apply_fn(params, tokens, **kw) -> logits [B, T, V]``. ``kw`` holds the
        batch's ``positions`` and ``segment_ids``, when present. ``None`` with ``logps_fn``.
      params: the adapted tree (A and B beside the kernels, from :func:`jlora.init_lora`).
      config: the config the tree was initialised with.
      batch: ``tokens`` (prompt then completion), ``targets`` (``targets[:, t]`` is the token
        after ``tokens[:, t]``), ``loss_mask`` (true on targets that are completion tokens),
        each ``[B, T]``, and ``advantages`` ``[B]`` (:func:`group_advantages`); optional
        ``positions`` and ``segment_ids`` ``[B, T]`` (passed to ``apply_fn``).
      old_logps: ``[B, T]`` the sampling policy's :func:`token_logps`, for
        ``num_iterations > 1``; ``None`` for the policy's own under ``stop_gradient``.
      ref_logps: ``[B, T]`` the reference's, precomputed (``beta > 0``).
      loss_type: as in :func:`grpo_loss`.
      beta: as in :func:`grpo_loss`.
      epsilon_low: as in :func:`grpo_loss`.
      epsilon_high: as in :func:`grpo_loss`.
      importance_sampling_level: as in :func:`grpo_loss`.
      delta: as in :func:`grpo_loss`.
      use_bias_correction_kl: as in :func:`grpo_loss`.
      max_completion_length: as in :func:`grpo_loss`.
      num_items_in_batch: as in :func:`grpo_loss`.
      temperature: the sampling temperature ``> 0``; logits are divided by it (as TRL does).
      on_unsupported: as in :func:`jlora.lora`.
      dropout_rng: as in :func:`jlora.lora` (the reference runs without dropout).
      deterministic: as in :func:`jlora.lora`.
      logps_fn: instead of ``apply_fn``'s logits, ``logps_fn(params, tokens, targets,
        loss_mask, *, temperature, **kw) -> (logps, entropy)``, each ``[B, T]``: each target
        token's log-probability under ``logits / temperature`` and each position's entropy
        (any values where ``loss_mask`` is false), run through :func:`jlora.lora` as
        ``apply_fn`` would be; :func:`jlora.chunked_logps_and_entropy` gives both from a
        decoder's hidden states without ``[B, T, V]`` logits.

    Returns:
      ``(loss, metrics)`` as :func:`grpo_loss` returns them, with ``entropy`` added.

    Raises:
      TypeError: if ``batch`` is not a mapping, or as :func:`jlora.lora`.
      ValueError: for a batch with a missing or unknown key, ``tokens`` not ``[B, T]`` with
        ``B >= 1``, another key or ``old_logps`` / ``ref_logps`` of a different shape,
        ``params`` without adapters, ``temperature <= 0``, neither or both of ``apply_fn``
        and ``logps_fn``, ``logps_fn`` giving other shapes than ``[B, T]``, and as
        :func:`grpo_loss` and :func:`jlora.lora`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> emb = jax.random.normal(jax.random.key(0), (6, 4))
      >>> def apply_fn(p, tokens):
      ...     return emb[tokens] @ p["w"]
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> params = jlora.init_lora(jax.random.key(1), {"w": jnp.ones((4, 6))}, cfg)
      >>> tokens = jnp.array([[1, 2, 3], [1, 2, 4]])  # one prompt [1, 2], two completions
      >>> batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
      ...          "loss_mask": jnp.array([[False, True, False]] * 2),
      ...          "advantages": jlora.group_advantages(jnp.array([1.0, 0.0]), 2).advantages}
      >>> loss, metrics = jlora.grpo_policy_loss(apply_fn, params, cfg, batch, beta=0.04)
      >>> float(loss), float(metrics["kl"])  # at init the policy is the reference: KL 0
      (0.0, 0.0)
      >>> lora, base = jlora.split(params)
      >>> def of_adapters(lora):
      ...     return jlora.grpo_policy_loss(apply_fn, jlora.combine(lora, base), cfg, batch)
      >>> (loss, metrics), grads = jax.value_and_grad(of_adapters, has_aux=True)(lora)
      >>> sorted(grads)
      ['w_lora_a', 'w_lora_b']
    """
    _check_temperature(temperature)
    rows, length = _check_batch(batch)
    if (apply_fn is None) == (logps_fn is None):
        raise ValueError(
            "grpo_policy_loss: give apply_fn (the model's logits) or logps_fn (its per-token "
            "log-probabilities and entropies), exactly one of them; pass None for the other"
        )
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if value is not None and tuple(jnp.shape(value)) != (rows, length):
            raise ValueError(
                f"grpo_policy_loss: {name} must be [B, T] = {(rows, length)} like the tokens; got "
                f"{tuple(jnp.shape(value))}"
            )
    adapters, base = split(params)
    if not jax.tree.leaves(adapters):
        raise ValueError(
            "grpo_policy_loss: params holds no LoRA adapters, so there is nothing to train and "
            "the policy would be the reference; call jlora.init_lora(key, params, config) first"
        )
    needs_reference = not (_is_number(beta) and beta == 0)
    options: dict[str, Any] = {
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": epsilon_low,
        "epsilon_high": epsilon_high,
        "importance_sampling_level": importance_sampling_level,
        "delta": delta,
        "use_bias_correction_kl": use_bias_correction_kl,
        "max_completion_length": max_completion_length,
        "num_items_in_batch": num_items_in_batch,
    }
    _check_options(  # on entry, before any forward pass; the reference is made here if needed
        loss_type,
        beta,
        epsilon_low,
        epsilon_low if epsilon_high is None else epsilon_high,
        importance_sampling_level,
        delta,
        max_completion_length,
        ref_logps is not None or needs_reference,
        num_items_in_batch is not None,
    )
    kwargs = {k: batch[k] for k in _APPLY_KEYS if k in batch}
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]

    def scores(tree: Any, **lora_options: Any) -> tuple[jax.Array, jax.Array]:
        """Per-token log-probabilities and entropies (without gradient) of the model on ``tree``."""
        if logps_fn is None:
            policy = lora(cast(Callable[..., Any], apply_fn), config, **lora_options)
            logits = jnp.asarray(policy(tree, tokens, **kwargs), jnp.float32) / temperature
            logp = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
            return _token_logps(logits, targets), -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        fn = lora(logps_fn, config, **lora_options)
        out = fn(tree, tokens, targets, mask, temperature=temperature, **kwargs)
        shapes = [tuple(jnp.shape(x)) for x in (out if isinstance(out, tuple) else [out])]
        if shapes != [(rows, length)] * 2:
            raise ValueError(
                f"grpo_policy_loss: logps_fn must give (logps, entropy), each [B, T] = "
                f"{(rows, length)}; got {shapes}"
            )
        return jnp.asarray(out[0], jnp.float32), jax.lax.stop_gradient(out[1])

    per_token, entropy = scores(
        params,
        on_unsupported=on_unsupported,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
    )
    if needs_reference and ref_logps is None:
        # The base alone: jlora.lora runs the model unchanged on a tree without adapters
        # (dequantising a QLoRA base first), with no dropout.
        ref_logps = scores(jax.lax.stop_gradient(base))[0]
    loss, metrics = grpo_loss(per_token, old_logps, ref_logps, batch["advantages"], mask, **options)
    weights = jnp.asarray(mask, bool)
    count = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)
    metrics["entropy"] = jnp.sum(jnp.where(weights, entropy, 0.0)) / count
    return loss, dict(sorted(metrics.items()))
