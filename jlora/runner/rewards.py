"""Reward functions for GRPO, named in a config and called as TRL's ``GRPOTrainer`` calls them.

A reward function has TRL's signature, ``f(prompts, completions, **columns) -> list[float]``:
one prompt and one completion per sampled row (strings; for chat prompts the prompt's messages
and ``[{"role": "assistant", "content": ...}]``), and every other column of the prompt
records by name, one value per row. ``None`` marks a row the function does not score (it is
left out of that row's sum, as in TRL); anything else must be a finite number.

``train.rewards`` names each one as ``path/to/file.py:name``, ``module:name``, or a built-in:
``exact_match:COLUMN``, ``contains:COLUMN``, ``last_number:COLUMN`` or ``regex:PATTERN``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[..., Sequence[float | None]]


def _text(completion: Any) -> str:
    """A completion's text: the string, or its last message's content."""
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def _column(columns: dict[str, Any], column: str) -> list[Any]:
    if column not in columns:
        raise ValueError(
            f"the prompt records have no column {column!r} (they have {sorted(columns)}); add "
            f'it to each record, e.g. {{"prompt": "...", "{column}": "..."}}'
        )
    return list(columns[column])


def exact_match(column: str) -> RewardFn:
    r"""1.0 where the completion, stripped, equals the row's ``column`` (stripped), else 0.0.

    Example:
      >>> exact_match("answer")(["q", "q"], [" json\n", "os"], answer=["json", "json"])
      [1.0, 0.0]
    """

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        del prompts
        want = _column(columns, column)
        return [
            float(_text(c).strip() == str(w).strip())
            for c, w in zip(completions, want, strict=True)
        ]

    reward.__name__ = f"exact_match:{column}"
    return reward


def contains(column: str) -> RewardFn:
    """1.0 where the completion holds the row's ``column`` as a whole word, else 0.0.

    Example:
      >>> contains("answer")(["q", "q"], ["It is `json`.", "jsonl"], answer=["json", "json"])
      [1.0, 0.0]
    """

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        del prompts
        found = []
        for c, w in zip(completions, _column(columns, column), strict=True):
            # A whole word or dotted name: "os" is not in "os.path", "json" is in "json."
            pattern = rf"(?<![\w.]){re.escape(str(w).strip())}(?!\w|\.\w)"
            found.append(float(re.search(pattern, _text(c)) is not None))
        return found

    reward.__name__ = f"contains:{column}"
    return reward


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    """The last number written in ``text`` (``1,000`` and ``-2.5`` read whole), or ``None``."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def last_number(column: str) -> RewardFn:
    """1.0 where the completion's last number equals the row's ``column``, else 0.0.

    The check of math answers (GSM8K's): ``"7 + 5 = 12."`` answers 12, whatever reasoning
    comes first; numbers compare as numbers (``"12.0"`` is 12).

    Example:
      >>> last_number("answer")(["q"] * 3, ["7 + 5 = 12.", "12 + 1", "none"], answer=[12] * 3)
      [1.0, 0.0, 0.0]
    """

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        del prompts
        out = []
        for i, (c, w) in enumerate(zip(completions, _column(columns, column), strict=True)):
            want = _number(str(w))
            if want is None:
                raise ValueError(
                    f"last_number:{column}: row {i}'s {column} {w!r} holds no number; give "
                    "the answer as a number"
                )
            out.append(float(_number(_text(c)) == want))
        return out

    reward.__name__ = f"last_number:{column}"
    return reward


def regex(pattern: str) -> RewardFn:
    """1.0 where ``re.search(pattern, completion)`` finds a match, else 0.0: a format check.

    Raises:
      ValueError: for a pattern that does not compile.

    Example:
      >>> regex(r"^[a-z_.]+$")(["q", "q"], ["os.path", "The os module"])
      [1.0, 0.0]
    """
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"reward regex:{pattern}: not a regular expression ({err})") from None

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        del prompts, columns
        return [float(compiled.search(_text(c)) is not None) for c in completions]

    reward.__name__ = f"regex:{pattern}"
    return reward


BUILTIN: dict[str, Callable[[str], RewardFn]] = {
    "exact_match": exact_match,
    "contains": contains,
    "last_number": last_number,
    "regex": regex,
}


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward function as a run uses it: its name (as configured), weight and function."""

    name: str
    weight: float
    fn: RewardFn


def load_reward(spec: str) -> RewardFn:
    """The function ``spec`` names: a built-in, ``path/to/file.py:name`` or ``module:name``.

    Raises:
      ValueError: a spec without ``:``, a file or module that does not load, a missing name,
        or something that is not callable (each naming the spec).

    Example:
      >>> load_reward("exact_match:answer").__name__
      'exact_match:answer'
      >>> load_reward("os.path:basename")("a/b")
      'b'
    """
    where, sep, name = spec.rpartition(":")
    if spec.split(":", 1)[0] in BUILTIN:
        kind, _, arg = spec.partition(":")
        if not arg:
            raise ValueError(f"reward {spec!r}: {kind} needs an argument, e.g. {kind}:answer")
        return BUILTIN[kind](arg)
    if not sep or not where or not name:
        raise ValueError(
            f"reward {spec!r}: name a function as path/to/file.py:name or module:name, or a "
            f"built-in: {', '.join(f'{k}:...' for k in BUILTIN)}"
        )
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"reward {spec!r}: {where} does not exist (cwd {os.getcwd()!r})")
        module_spec = importlib.util.spec_from_file_location(
            f"jlora_reward_{abs(hash(where))}", where
        )
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"reward {spec!r}: {where} failed to load: {err!r}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"reward {spec!r}: module {where!r} does not import: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(
            f"reward {spec!r}: {where} has no function {name!r}"
            + ("" if fn is None else f" ({name} is a {type(fn).__name__})")
        )
    return fn


def load_rewards(specs: Sequence[str], weights: Sequence[float] = ()) -> list[Reward]:
    r"""The run's reward functions with their weights (all 1.0 when ``weights`` is empty).

    Raises:
      ValueError: as :func:`load_reward`; a weight count other than the function count.

    Example:
      >>> [(r.name, r.weight) for r in load_rewards(["exact_match:answer", "regex:^\\\\w+$"])]
      [('exact_match:answer', 1.0), ('regex:^\\\\w+$', 1.0)]
    """
    if weights and len(weights) != len(specs):
        raise ValueError(f"{len(weights)} reward weight(s) for {len(specs)} reward function(s)")
    out: list[Reward] = []
    for spec, w in zip(specs, weights or [1.0] * len(specs), strict=True):
        # Logged by the function's name, as TRL does; a built-in by its spec.
        name = spec if spec.split(":", 1)[0] in BUILTIN else spec.rpartition(":")[2]
        if any(r.name == name for r in out):
            name = f"{name}_{len(out)}"
        out.append(Reward(name, float(w), load_reward(spec)))
    return out


def score(
    rewards: Sequence[Reward],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
) -> tuple[np.ndarray, np.ndarray]:
    """Every function's rewards ``[F, N]`` (NaN where it returned None) and their weighted sum.

    The sum is TRL's: the weighted rewards of a row summed over the functions that scored it
    (NaN where none did).

    Raises:
      ValueError: naming the function, if it raised, returned something that is not a
        list of ``N`` numbers (or None), or a non-finite number.

    Example:
      >>> r = load_rewards(["exact_match:answer", "regex:^[a-z]+$"], [2.0, 1.0])
      >>> per, total = score(r, ["q", "q"], ["json", "Json"], {"answer": ["json", "json"]})
      >>> per.tolist(), total.tolist()
      ([[1.0, 0.0], [1.0, 0.0]], [3.0, 0.0])
    """
    n = len(completions)
    out = np.full((len(rewards), n), np.nan, np.float32)
    for k, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts, completions, **columns)
        except Exception as err:
            raise ValueError(f"reward {reward.name!r} raised {type(err).__name__}: {err}") from err
        try:
            listed: list[Any] | None = list(values)
        except TypeError:
            listed = None
        if listed is None or len(listed) != n:
            got = f"a {type(values).__name__}" if listed is None else f"{len(listed)} value(s)"
            raise ValueError(
                f"reward {reward.name!r} returned {got} for {n} completion(s); it must return "
                "one float (or None) per completion"
            )
        for i, v in enumerate(listed):
            if v is None:
                continue
            if not isinstance(v, int | float | np.number):
                raise ValueError(
                    f"reward {reward.name!r} returned {v!r} for completion {i}; rewards are "
                    "numbers (or None for a completion it does not score)"
                )
            if not math.isfinite(float(v)):
                raise ValueError(
                    f"reward {reward.name!r} returned {float(v)} for completion {i} "
                    f"({_text(completions[i])[:60]!r}); rewards must be finite"
                )
            out[k, i] = float(v)
    weights = np.asarray([r.weight for r in rewards], np.float32)[:, None]
    scored = ~np.isnan(out)
    total = np.where(scored, out * weights, 0.0).sum(axis=0)
    return out, np.where(scored.any(axis=0), total, np.nan).astype(np.float32)


def mean_scored(values: np.ndarray, axis: int | None = None) -> Any:
    """The mean of the scored (non-NaN) rewards; NaN where none was scored, and no warning.

    Example:
      >>> mean_scored(np.array([1.0, np.nan, 0.0])), mean_scored(np.array([np.nan]))
      (0.5, nan)
    """
    scored = ~np.isnan(values)
    total = np.where(scored, values, 0.0).sum(axis=axis)
    count = scored.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(out) if np.ndim(out) == 0 else out
