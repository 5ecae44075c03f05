"""The runner's hooks: throughput, the loss log, progress, evaluation and checkpoints.

Each is a :class:`~jlora.runner.trainer.loop.Hook` with its own cadence (``train.log_every``,
``eval_every``, ``checkpoint_every``), built by :mod:`jlora.runner.finetune` for a run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from jlora.runner.trainer.loop import Hook
from jlora.runner.trainer.sinks import MetricSinks


class Throughput(Hook):
    """Units (tokens or examples) per second since the second step (the first compiles).

    Example:
      >>> t = Throughput(units_per_step=100, unit="tok")
      >>> t.observe(1, {"loss": 1.0}); t.rate
      0.0
    """

    def __init__(self, units_per_step: int, unit: str, start: int = 0) -> None:
        """Counts ``units_per_step`` per step after step ``start + 1``."""
        self.units_per_step, self.unit, self.start = units_per_step, unit, start
        self.tic, self.units, self.rate = time.perf_counter(), 0, 0.0

    def observe(self, step: int, record: dict[str, float]) -> None:
        """Restarts the clock after the first step; else counts this step's units."""
        if step == self.start + 1:
            self.tic, self.units = time.perf_counter(), 0
        else:
            self.units += self.units_per_step
        self.rate = self.units / max(time.perf_counter() - self.tic, 1e-9)


class LossLog(Hook):
    """Every ``every`` steps, the mean loss and metrics since the last line, to the sinks.

    ``window`` holds the records since the last line; a checkpoint stores it so that a
    resumed run's next line averages the same steps as an uninterrupted run's.
    """

    def __init__(
        self,
        every: int,
        sinks: MetricSinks,
        throughput: Throughput,
        window: list[dict[str, float]],
        print_lines: bool,
        steps: int,
    ) -> None:
        """Writes to ``sinks``; ``print_lines`` also prints each line (``step N/steps``)."""
        self.every, self.sinks, self.throughput = every, sinks, throughput
        self.window, self.print_lines, self.steps = window, print_lines, steps

    def observe(self, step: int, record: dict[str, float]) -> None:
        """Keeps the step's record for the next line."""
        self.window.append(record)

    def run(self, step: int, state: Any) -> None:
        """Writes the window's means (``train_loss``, ``train_<metric>``) and the rate."""
        n = len(self.window)
        means = {k: sum(r[k] for r in self.window) / n for k in self.window[0]}
        record = {
            "step": step,
            "train_loss": means.pop("loss"),
            **{f"train_{k}": v for k, v in means.items()},
            f"{self.throughput.unit}_per_s": self.throughput.rate,
        }
        self.sinks.append(record)
        if self.print_lines:
            print(
                f"step {step}/{self.steps}: train_loss {record['train_loss']:.4f}, "
                f"{self.throughput.rate:,.0f} {self.throughput.unit}/s",
                file=sys.stderr,
                flush=True,
            )
        self.window.clear()


class Progress(Hook):
    """A tqdm bar on a terminal (the loss and rate as its postfix); nothing otherwise."""

    def __init__(self, start: int, steps: int, throughput: Throughput, enabled: bool) -> None:
        """A bar from ``start`` to ``steps``; ``enabled`` false draws nothing."""
        self.throughput = throughput
        self.bar = tqdm(
            total=steps, initial=start, disable=not enabled, desc="finetune", unit="step"
        )

    def observe(self, step: int, record: dict[str, float]) -> None:
        """Advances the bar."""
        rate = f"{self.throughput.rate:,.0f}"
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", **{f"{self.throughput.unit}/s": rate})
        self.bar.update(1)

    def write(self, line: str) -> None:
        """Prints a line without breaking the bar."""
        self.bar.write(line)

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()


class Evaluate(Hook):
    """Every ``every`` steps, ``evaluate(state)``'s scores to the sinks and the terminal."""

    def __init__(
        self,
        every: int,
        evaluate: Callable[[Any], dict[str, float]],
        sinks: MetricSinks,
        write: Callable[[str], None],
    ) -> None:
        """Scores with ``evaluate``; prints with ``write``."""
        self.every, self.evaluate, self.sinks, self.write = every, evaluate, sinks, write
        #: ``(step, scores)`` of the latest evaluation: the run's final scores are not redone
        self.last: tuple[int, dict[str, float]] | None = None

    def run(self, step: int, state: Any) -> None:
        """Evaluates the adapted model of ``state``."""
        scores = self.evaluate(state)
        self.last = (step, scores)
        self.sinks.append({"step": step, **scores})
        self.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


class Checkpoint(Hook):
    """Every ``every`` steps, and at a Ctrl-C, ``save(step, state)`` (once per step)."""

    def __init__(
        self,
        every: int,
        save: Callable[[int, Any], None],
        on_interrupt: Callable[[int], None],
    ) -> None:
        """Saves with ``save``; tells ``on_interrupt(step)`` where the run resumes."""
        self.every, self.save, self.on_interrupt = every, save, on_interrupt
        self.saved = -1

    def run(self, step: int, state: Any) -> None:
        """Saves the state of ``step``."""
        self.save(step, state)
        self.saved = step

    def interrupted(self, step: int, state: Any) -> None:
        """Saves the last completed step (unless just saved) and says how to resume."""
        if self.saved != step:
            self.run(step, state)
        self.on_interrupt(step)
