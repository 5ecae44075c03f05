"""What a run trains: a task (a model and its data) for each ``model.kind``, and its LoRA config.

- :mod:`~jlora.runner.tasks.base`: the :class:`~jlora.runner.tasks.base.Task` protocol.
- :mod:`~jlora.runner.tasks.causal_lm`: a decoder on text or instruction data.
- :mod:`~jlora.runner.tasks.preference`: a decoder on preference pairs (``train.objective``
  ``dpo``, ``robust``, ``ipo``, ``simpo``, ``orpo``).
- :mod:`~jlora.runner.tasks.rl`: a decoder on prompts and rewards (``train.objective: grpo``).
- :mod:`~jlora.runner.tasks.classification`: a BERT encoder with a classification head.
"""

from __future__ import annotations

from typing import Any, cast

import jlora
from jlora.runner.config import RunConfig
from jlora.runner.tasks.base import Task

__all__ = ["Task", "lora_config", "make_task", "task_class"]


def task_class(config: RunConfig) -> type[Any]:
    """The task class for ``config``: by ``train.objective``, else by ``model.kind``.

    A preference ``train.objective`` trains the decoder on pairs, ``grpo`` on prompts.

    Example:
      >>> task_class(RunConfig()).__name__
      'CausalLMTask'
    """
    if config.train.objective == "grpo":
        from jlora.runner.tasks.rl import RLTask

        return RLTask
    if config.train.objective != "sft":
        from jlora.runner.tasks.preference import PreferenceTask

        return PreferenceTask
    if config.model.kind == "bert":
        from jlora.runner.tasks.classification import ClassificationTask

        return ClassificationTask
    from jlora.runner.tasks.causal_lm import CausalLMTask

    return CausalLMTask


def make_task(config: RunConfig) -> Task:
    """The task for ``config`` (:func:`task_class`), with its model and data loaded."""
    return cast(Task, task_class(config)(config))


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
