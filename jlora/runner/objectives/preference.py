"""The preference objective: :func:`jlora.dpo_loss` on a preference task's ``[2B, T]`` batches.

The reference of DPO, rDPO and IPO is the base with the adapters off, inside the same step
under ``stop_gradient``: no second copy of the weights. The metrics are TRL's
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``; ORPO adds ``nll_loss``, ``log_odds_ratio``,
``log_odds_chosen``), logged as ``train_rewards/chosen`` and so on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.tasks.preference import PreferenceTask, loss_options


class Preference:
    """DPO and its family over pairs (``train.objective``), adapters trained factorised.

    Raises:
      ValueError: for ``train.train_step=merge`` (the reference is the base with the
        adapters off, which the factorised forward gives for free).
    """

    def __init__(self, task: PreferenceTask, cfg: jlora.LoraConfig, config: RunConfig) -> None:
        """Reads the loss settings of ``config.train``."""
        if config.train.train_step != "factorised":
            raise ValueError(
                f"train.objective={config.train.objective!r} runs with "
                "train.train_step=factorised (its reference is the base with the adapters "
                f"off); found train.train_step={config.train.train_step!r}"
            )
        self.task, self.cfg, self.options = task, cfg, loss_options(config)

    def loss(
        self, trainable: Any, base: Any, batch: Any, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:func:`jlora.dpo_loss` of the adapted model on ``batch``, and TRL's metrics.

        A batch with ``ref_logps`` (``train.precompute_ref_log_probs``) brings the
        reference's log-probabilities, so no reference forward runs.
        """
        params = jlora.combine(trainable["lora"], base)
        batch = dict(batch)
        ref = batch.pop("ref_logps", None)
        pairs = batch["tokens"].shape[0] // 2
        chunked = self.task.config.train.loss_chunk != 0
        return jlora.dpo_loss(
            None if chunked else self.task.apply_fn,
            params,
            self.cfg,
            batch,
            reference_logps=None if ref is None else (ref[:pairs], ref[pairs:]),
            dropout_rng=rng,
            deterministic=False,
            logps_fn=self.task.logps_fn if chunked else None,
            **self.options,
        )

    def batch_weight(self, batch: Any) -> jax.Array:
        """The number of pairs in ``batch`` (``[2B, T]`` rows)."""
        return jnp.float32(batch["tokens"].shape[0] // 2)
