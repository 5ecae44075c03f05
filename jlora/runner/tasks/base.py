"""The task protocol: a model and its data, what the trainer needs of them, and two mixins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax


class Task(Protocol):
    """A model plus data: the runner trains adapters on ``base`` and any ``extra`` (a head)."""

    base: Any  # frozen parameters, the tree LoRA adapts
    unit: str  # what throughput counts: "tok" or "ex"
    units_per_batch: int
    data_stats: dict[str, Any]  # what the data holds and left out, for the log and results

    @property
    def extra(self) -> Any:
        """Trainable parameters that are not adapters, e.g. a head (``{}`` for none)."""
        ...

    def loss(self, params: Any, extra: Any, batch: Any) -> jax.Array:
        """Scalar training loss of ``batch`` under (merged) ``params`` and ``extra``."""
        ...

    def batch_weight(self, batch: Any) -> jax.Array:
        """How many items :meth:`loss` averages over in ``batch`` (weights micro-batches)."""
        ...

    def train_batch(self, position: int) -> Any:
        """The training batch at data position ``position``."""
        ...

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        """Validation scores (``eval_loss`` and any others)."""
        ...

    def show(
        self, params: Any, extra: Any, scores: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """What is reported before and after fine-tuning (scores, samples).

        ``scores``: :meth:`evaluate`'s result for these ``params`` when the caller has it
        (the last step's evaluation), so it is not computed twice.
        """
        ...

    def prepare_run(self, run_dir: str, start_model: Any, log: Callable[[str], None]) -> None:
        """Once the run directory is open, before the first step: what the task keeps there.

        E.g. a preference run's precomputed reference log-probabilities.
        """
        ...

    def initial_extra(self, params: Any) -> Any:
        """The starting value of ``extra`` for a new run (e.g. a head fitted on ``params``)."""
        ...

    def save_extra(self, run_dir: str, extra: Any) -> None:
        """Saves trainable non-adapter parameters (a head) into ``run_dir``."""
        ...

    def load_extra(self, run_dir: str) -> Any:
        """Loads what :meth:`save_extra` wrote."""
        ...


class FixedBatches:
    """:meth:`Task.batch_weight` of a task whose batches all hold the same number of items."""

    def batch_weight(self, batch: Any) -> jax.Array:
        """Every batch counts alike."""
        del batch
        return jax.numpy.ones((), jax.numpy.float32)


class NoHead:
    """The :class:`Task` methods of a task that trains adapters only (no head)."""

    def initial_extra(self, params: Any) -> dict[str, Any]:
        """No head: an empty tree."""
        del params
        return {}

    def save_extra(self, run_dir: str, extra: Any) -> None:
        """Nothing to save: only the adapters train."""
        del run_dir, extra

    def load_extra(self, run_dir: str) -> Any:
        """No head: an empty tree."""
        del run_dir
        return {}
