"""What a run minimises over a task's batches: the objective protocol, SFT, and its chooser.

The preference losses (DPO and its family) are in :mod:`~jlora.runner.objectives.preference`,
GRPO in :mod:`~jlora.runner.objectives.grpo` (whose ``rollout_step`` samples before it
updates: its batches depend on the adapters).

An objective is a pure, jit-able ``loss(trainable, base, batch, rng) -> (loss, metrics)``
with ``batch_weight(batch)``, the count its mean loss averages over (micro-batches of a
step are weighted by it). ``trainable`` is ``{"lora": adapters, "extra": head}``; ``base`` is
the frozen tree without adapters, so an objective that needs a reference model (DPO's,
GRPO's) has it for free: the base with the adapters off. The train step
(:func:`jlora.runner.trainer.step.make_train_step`) takes any objective.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import jax

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.tasks.base import Task


class Objective(Protocol):
    """A loss over batches, differentiated with respect to ``trainable`` only."""

    def loss(
        self, trainable: Any, base: Any, batch: Any, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and scalar metrics (averaged like the loss when logged)."""
        ...

    def batch_weight(self, batch: Any) -> jax.Array:
        """How many items the loss of ``batch`` averages over."""
        ...


class Supervised:
    """The task's own loss on the adapted model: causal-LM SFT, or classification.

    ``"factorised"`` runs the task's loss through ``jlora.lora`` (``x·W + s·(x·A)·B``, LoRA
    dropout on the adapters' input drawn from ``rng``); ``"merge"`` forms ``W + s·A·B``
    inside the loss. Either way only the adapters (and a head) are differentiated.

    Raises:
      ValueError: for ``"merge"`` with ``dropout > 0`` (dropout needs the factorised path).
    """

    def __init__(self, task: Task, cfg: jlora.LoraConfig, mode: str) -> None:
        """Checks that ``mode`` can apply ``cfg``."""
        if mode != "factorised" and cfg.dropout > 0:
            raise ValueError(
                f"lora.dropout={cfg.dropout} needs train.train_step=factorised (dropout acts on "
                "the adapters' input, which the merge step never sees); set lora.dropout=0 or "
                "switch"
            )
        self.task, self.cfg, self.mode = task, cfg, mode

    def loss(
        self, trainable: Any, base: Any, batch: Any, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The task's loss of ``batch``; no metrics besides it."""
        params = jlora.combine(trainable["lora"], base)
        if self.mode == "factorised":
            run = jlora.lora(self.task.loss, self.cfg, dropout_rng=rng, deterministic=False)
            return run(params, trainable["extra"], batch), {}
        merged = jlora.merge_params(jlora.dequantize(params), self.cfg)
        return self.task.loss(merged, trainable["extra"], batch), {}

    def batch_weight(self, batch: Any) -> jax.Array:
        """The task's count of what the loss averages over."""
        return self.task.batch_weight(batch)


def make_objective(config: RunConfig, task: Task, cfg: jlora.LoraConfig) -> Objective:
    """The objective that ``train.objective`` names.

    :class:`Supervised` for ``sft``; :class:`~jlora.runner.objectives.grpo.GRPO` on an
    :class:`~jlora.runner.tasks.rl.RLTask` for ``grpo``; else the preference loss
    (:class:`~jlora.runner.objectives.preference.Preference`) on a
    :class:`~jlora.runner.tasks.preference.PreferenceTask`.

    Raises:
      ValueError: as :class:`Supervised` or ``Preference``.
    """
    if config.train.objective == "sft":
        return Supervised(task, cfg, config.train.train_step)
    if config.train.objective == "grpo":
        from jlora.runner.objectives.grpo import GRPO
        from jlora.runner.tasks.rl import RLTask

        return GRPO(cast(RLTask, task), cfg, config)
    from jlora.runner.objectives.preference import Preference
    from jlora.runner.tasks.preference import PreferenceTask

    return Preference(cast(PreferenceTask, task), cfg, config)
