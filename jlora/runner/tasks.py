"""What a run trains: the task protocol, the task for a config, and its ``LoraConfig``."""

from __future__ import annotations

from typing import Any, Protocol

import jax

import jlora
from jlora.runner.config import RunConfig


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

    def show(self, params: Any, extra: Any) -> dict[str, Any]:
        """What is reported before and after fine-tuning (scores, samples)."""
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


def make_task(config: RunConfig) -> Task:
    """The task for ``config.model``: a checkpoint's ``path``, else by ``kind``."""
    if config.model.kind == "bert":
        from jlora.runner.classify import ClassificationTask

        return ClassificationTask(config)
    from jlora.runner.pretrained_lm import PretrainedLMTask

    return PretrainedLMTask(config)


def lora_config(config: RunConfig) -> jlora.LoraConfig:
    """The :class:`jlora.LoraConfig` of a run's ``lora`` section.

    A decoder stacks its layers' kernels ``[L, in, out]``, so its config carries
    :data:`jlora.models.decoder.DECODER_AXIS_RULES` (one adapter per layer); with
    ``lora.targets`` left empty, its targets are :data:`jlora.models.decoder.DECODER_TARGETS`,
    every attention and MLP projection.

    Raises:
      ValueError: for a ``bert`` run without ``lora.targets``.

    Example:
      >>> lora_config(RunConfig()).rank
      8
    """
    s = config.lora
    axis_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    targets = tuple(s.targets)
    if config.model.kind == "llama":
        from jlora.models.decoder import DECODER_AXIS_RULES, DECODER_TARGETS

        axis_rules = DECODER_AXIS_RULES
        targets = targets or (DECODER_TARGETS,)
    elif not targets:
        raise ValueError(
            "config lora.targets: a model.kind=bert run names the kernels it adapts, e.g. "
            "lora.targets=['layer_\\d+/attention/(query|value)/kernel']"
        )
    return jlora.LoraConfig(
        rank=s.rank,
        alpha=s.alpha,
        targets=targets,
        exclude=tuple(s.exclude),
        use_rslora=s.use_rslora,
        init=s.init,
        dropout=s.dropout,
        axis_rules=axis_rules,
    )
