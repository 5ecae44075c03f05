"""The training loop: step a jitted update over batches, stop on NaN or Ctrl-C, call hooks.

The loop knows nothing of what is trained. It takes a step function ``step_fn(state, batch,
step) -> (state, (loss, finite, metrics))`` (built by :func:`~jlora.runner.trainer.step.
make_train_step` from any objective), a ``batch_for(step)`` function and a list of
:class:`Hook`; logging, evaluation, checkpointing and progress are hooks. A new objective
(DPO, GRPO) brings its own step function or loss and leaves this file alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from jlora.runner.trainer.interrupt import StopRequest

StepFn = Callable[[Any, Any, int], tuple[Any, tuple[Any, Any, dict[str, Any]]]]


class Hook:
    """Something that runs around the training steps; subclasses override what they need.

    Attributes:
      every: :meth:`run` is called after every ``every``-th step and after the last one.

    Example:
      >>> class Count(Hook):
      ...     seen = 0
      ...     def observe(self, step, record):
      ...         self.seen += 1
      >>> Count().every
      1
    """

    every: int = 1

    def observe(self, step: int, record: dict[str, float]) -> None:
        """After every step: its ``loss`` and metrics as Python floats."""

    def run(self, step: int, state: Any) -> None:
        """After steps that are multiples of :attr:`every`, and after the last step."""

    def interrupted(self, step: int, state: Any) -> None:
        """After the step at which Ctrl-C was asked for, before the loop raises."""

    def close(self) -> None:
        """When the loop ends, however it ends."""


class Diverged(FloatingPointError):
    """The loss or the updated state stopped being finite at ``step``.

    Attributes:
      step: the step whose loss or update was not finite.
      loss: that step's loss (may be finite when only the update was not).
    """

    def __init__(self, step: int, loss: float) -> None:
        """Records where training diverged; the runner turns it into advice."""
        super().__init__(f"training diverged at step {step} (loss {loss})")
        self.step, self.loss = step, loss


def train(
    step_fn: StepFn,
    state: Any,
    batch_for: Callable[[int], Any],
    *,
    start: int,
    steps: int,
    hooks: Sequence[Hook] = (),
    stop: StopRequest | None = None,
) -> Any:
    """Runs steps ``start + 1 .. steps`` and returns the final state.

    Each step calls ``step_fn(state, batch_for(step), step)``; hooks observe every step's
    loss and metrics in order and run at their cadence. A Ctrl-C (``stop.requested``) ends the
    loop after the step in flight: hooks are told (a checkpoint hook saves), then
    ``KeyboardInterrupt`` is raised.

    Args:
      step_fn: the update; returns the new state and ``(loss, finite, metrics)``, where
        ``finite`` says that the new state holds only finite values.
      state: the state at step ``start``.
      batch_for: the batch of a step (1-based).
      start: the last step already done (0 for a fresh run).
      steps: the last step to run.
      hooks: run in order after each step.
      stop: the Ctrl-C request to honour between steps, or ``None``.

    Returns:
      The state after step ``steps``.

    Raises:
      Diverged: when a loss or an update is not finite; the state of that step is dropped.
      KeyboardInterrupt: after a Ctrl-C, once the hooks have run.

    Example:
      >>> def step_fn(state, batch, step):
      ...     return state + batch, (float(batch), True, {})
      >>> train(step_fn, 0, lambda step: step, start=0, steps=3)
      6
    """
    try:
        for step in range(start + 1, steps + 1):
            new_state, (loss, finite, metrics) = step_fn(state, batch_for(step), step)
            loss = float(loss)
            if not (math.isfinite(loss) and bool(finite)):
                raise Diverged(step, loss)
            state = new_state
            record = {"loss": loss, **{k: float(v) for k, v in metrics.items()}}
            for hook in hooks:
                hook.observe(step, record)
            for hook in hooks:
                if step % hook.every == 0 or step == steps:
                    hook.run(step, state)
            if stop is not None and stop.requested:
                for hook in hooks:
                    hook.interrupted(step, state)
                raise KeyboardInterrupt
        return state
    finally:
        for hook in hooks:
            hook.close()
