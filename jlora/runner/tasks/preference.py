"""The decoder task on preference pairs: a checkpoint's decoder, pairs as TRL reads them.

The model, tokenizer, sampler and reports are :class:`~jlora.runner.tasks.causal_lm.
CausalLMTask`'s; the data are pairs (:mod:`jlora.runner.data.preferences`) in ``[2B, T]``
batches, and evaluation scores the held-out pairs with the run's preference loss against the
reference, the base model (its log-probabilities computed once and kept), as
:func:`jlora.preference_loss` defines it: ``eval_loss`` and ``eval_rewards/accuracies``,
``eval_rewards/margins``, ... as TRL logs them, and exact match of greedy answers to the
held-out prompts against the chosen answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.lm_head import mean_nll
from jlora.runner.config import RunConfig, to_dict
from jlora.runner.data.chat_batches import Question, exact_match
from jlora.runner.data.preferences import (
    PreferenceBatches,
    PreferenceRecords,
    answer_of,
    eval_pair_batches,
    prompt_ids,
    read_preference_data,
    tokenize_pairs,
)
from jlora.runner.rundir.reference import fingerprint, read_reference, write_reference
from jlora.runner.tasks.causal_lm import CausalLMTask

#: ``train.objective`` -> :func:`jlora.dpo_loss`'s ``loss_type`` (TRL's name).
LOSS_TYPES = {
    "dpo": "sigmoid",
    "robust": "robust",
    "ipo": "ipo",
    "simpo": "simpo",
    "orpo": "orpo",
}

#: The loss types that compare with the reference model (the base).
REFERENCE_BASED = ("sigmoid", "robust", "ipo")


def loss_options(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`jlora.dpo_loss` that ``config.train`` sets.

    Example:
      >>> import dataclasses
      >>> from jlora.runner.config import TrainSection
      >>> loss_options(RunConfig(train=TrainSection(objective="simpo")))["gamma"]
      0.5
    """
    t = config.train
    options: dict[str, Any] = {
        "loss_type": LOSS_TYPES[t.objective],
        "beta": t.beta,
        "label_smoothing": t.label_smoothing,
    }
    if t.objective == "simpo":
        options["gamma"] = t.simpo_gamma
    return options


class PreferenceTask(CausalLMTask):
    """Preference tuning a checkpoint's decoder (``train.objective`` other than ``sft``)."""

    def _read_data(self) -> tuple[PreferenceRecords, PreferenceRecords]:
        """``data.train`` and ``data.eval`` pairs (``val_fraction`` of train held out if none)."""
        return read_preference_data(self.config.data, self.config.train.seed)

    def _use_data(self, raw: Any) -> None:
        train, held = cast(tuple[PreferenceRecords, PreferenceRecords], raw)
        config, tok = self.config, self.tokenizer
        seq, batch = config.data.seq_len, config.train.batch_size
        overflow = cast(Literal["truncate", "error"], config.data.overflow)
        pairs, stats = tokenize_pairs(train, tok, seq, overflow)
        held_pairs, held_stats = tokenize_pairs(held, tok, seq, overflow)
        pad = tok.pad_token_id or 0
        self._batch, self._pad = batch, pad
        self.units_per_batch = 2 * batch * seq
        self._batches = PreferenceBatches(pairs, seq, batch, config.train.seed, pad)
        self._train_batch = self._batches.batch
        self.val = eval_pair_batches(held_pairs, seq, batch, pad)
        self._held = len(held_pairs)
        self.questions = [
            Question(prompt_ids(p, tok, where), answer_of(c), where)
            for p, c, where in zip(held.prompts, held.chosen, held.sources, strict=True)
        ][: config.train.eval_exact_match]
        self.data_stats = {
            **{f"train_{k}": v for k, v in stats.items()},
            **{f"eval_{k}": v for k, v in held_stats.items()},
        }
        skipped = train.skipped + [s for s in held.skipped if s not in train.skipped]
        if skipped:
            self.data_stats |= {"skipped_bad_pairs": len(skipped), "first_bad_pair": skipped[0]}
        self._options = loss_options(config)
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._row_logps = jax.jit(self._row_logps_of)

    def loss(self, params: Any, extra: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """The chosen answers' mean next-token cross-entropy (what SFT on them minimises)."""
        del extra
        b = batch["tokens"].shape[0] // 2
        chosen = {k: v[:b] for k, v in batch.items()}
        return mean_nll(self.scores(params, chosen), chosen["loss_mask"])

    def batch_weight(self, batch: dict[str, jax.Array]) -> jax.Array:
        """How many pairs a batch holds: micro-batches are weighted by it."""
        return jnp.float32(batch["tokens"].shape[0] // 2)

    def _apply(self, params: Any, batch: dict[str, Any]) -> jax.Array:
        logits = self.model.apply(
            {"params": params},
            batch["tokens"],
            batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
        )
        return cast(jax.Array, logits)

    def apply_fn(self, params: Any, tokens: Any, **kw: Any) -> jax.Array:
        """``logits`` of ``tokens`` (with ``positions``/``segment_ids``), as dpo_loss calls it."""
        return self._apply(params, {"tokens": tokens, **kw})

    def _row_logps_of(self, params: Any, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        """Per row: the completion's summed log-probability and its token count."""
        sums = jnp.sum(self.scores(params, batch).logps, axis=-1)
        return sums, jnp.sum(batch["loss_mask"], axis=-1, dtype=jnp.float32)

    def _pair_logps(
        self, params: Any, batches: list[dict[str, np.ndarray]] | None = None, n: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(sums, counts)``, each ``[2, n]``: chosen then rejected, per pair.

        Of the first ``n`` pairs of ``batches``; by default of the held-out pairs.
        """
        if batches is None:
            batches, n = self.val, self._held
        sums, counts = [], []
        for batch in batches:
            s, c = self._row_logps(params, batch)
            b = len(s) // 2
            sums.append(np.stack([s[:b], s[b:]]))
            counts.append(np.stack([c[:b], c[b:]]))
        return np.concatenate(sums, 1)[:, :n], np.concatenate(counts, 1)[:, :n]

    def _reference_model(self) -> Any:
        """The reference the train step uses: the base as the run adapts it (QLoRA: quantised)."""
        from jlora.runner.variants import prepare_base  # variants imports tasks

        return jlora.dequantize(prepare_base(self.config, self.base))

    def prepare_run(self, run_dir: str, start_model: Any, log: Callable[[str], None]) -> None:
        """With ``train.precompute_ref_log_probs``: the training pairs' reference log-probs.

        Read from ``run_dir``, or computed once on ``start_model`` (the base the adapters
        start from, the step's reference) and saved there; the training batches then carry
        them (``ref_logps``) and the step runs no reference forward.
        """
        if not self.config.train.precompute_ref_log_probs:
            return
        pairs, config = self._batches.pairs, self.config
        key = fingerprint(
            (x for p in pairs for x in (p.prompt, p.chosen, p.rejected)),
            model=to_dict(config)["model"],
            lora=to_dict(config)["lora"],  # a base that PiSSA or QLoRA changed
            seed=config.train.seed,
        )
        logps = read_reference(run_dir, key, len(pairs))
        if logps is None:
            log(f"computing the reference's log-probabilities of {len(pairs):,} training pairs")
            batches = eval_pair_batches(pairs, self.config.data.seq_len, self._batch, self._pad)
            logps = self._pair_logps(start_model, batches, len(pairs))[0]
            write_reference(run_dir, logps, key)
        self._batches.reference = logps

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """The preference loss and TRL's metrics on the held-out pairs, and exact match.

        The reference log-probabilities are the base model's as the run adapts it (quantised
        for QLoRA, as in the train step), computed on the first call and kept (and used as the
        policy's when ``params`` is the float base itself).
        """
        del extra
        options = dict(self._options)
        # The base model itself (a float base): its scores are the reference's.
        same = self.config.lora.quantize == "none" and _same_leaves(params, self.base)
        if self._reference is None and (same or options["loss_type"] in REFERENCE_BASED):
            self._reference = self._pair_logps(self._reference_model())
        sums, counts = self._reference if same and self._reference else self._pair_logps(params)
        kw: dict[str, Any] = {}
        if options["loss_type"] in REFERENCE_BASED:
            kw["ref_chosen_logps"], kw["ref_rejected_logps"] = cast(Any, self._reference)[0]
            if options["loss_type"] == "ipo":
                kw["chosen_lengths"], kw["rejected_lengths"] = counts
        else:
            sums = sums / np.maximum(counts, 1.0)
            if options["loss_type"] == "orpo":
                # The mean NLL over all chosen answer tokens (dpo_loss's default nll_mask).
                total = float(np.sum(sums[0] * np.maximum(counts[0], 1.0)))
                kw["chosen_nll"] = -total / max(float(np.sum(counts[0])), 1.0)
        loss, metrics = jlora.preference_loss(sums[0], sums[1], **kw, **options)
        scores = {"eval_loss": float(loss), **{f"eval_{k}": float(v) for k, v in metrics.items()}}
        if self.questions:
            scores["exact_match"] = exact_match(
                self.answers(params), [q.reference for q in self.questions]
            )
        return scores


def _same_leaves(a: Any, b: Any) -> bool:
    """Whether two trees hold the very same arrays (not merely equal ones)."""
    x, y = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(x) == len(y) and all(i is j for i, j in zip(x, y, strict=True))
