r"""Prompts for reinforcement learning (GRPO), from JSONL as TRL's ``GRPOTrainer`` reads them.

A record is one JSON object per line with a ``"prompt"``: a string, or a list of messages
(rendered with the model's chat template and the assistant's turn opened). Every other key is
a column, passed by name to the reward functions (``f(prompts, completions, **columns)``),
e.g. the ``"answer"`` an exact-match reward compares with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jlora.runner.config import DataSection
from jlora.runner.data.chat_batches import resolve_data
from jlora.runner.data.chats import ROLES
from jlora.runner.data.jsonl import held_out_split, read_jsonl


@dataclasses.dataclass(frozen=True)
class PromptRecords:
    """Prompts read from JSONL, with their other columns and where each came from.

    Attributes:
      prompts: a string, or the prompt's messages, per record.
      columns: the record's other keys and values, per record.
      sources: ``"file:line"`` of each record.
    """

    prompts: list[Any]
    columns: list[dict[str, Any]]
    sources: list[str]

    def subset(self, index: list[int]) -> PromptRecords:
        """The records at ``index``, in that order.

        Example:
          >>> PromptRecords(["a", "b"], [{}, {"x": 1}], ["f:1", "f:2"]).subset([1]).columns
          [{'x': 1}]
        """
        return PromptRecords(
            [self.prompts[i] for i in index],
            [self.columns[i] for i in index],
            [self.sources[i] for i in index],
        )


def _check_prompt(prompt: Any, where: str) -> Any:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f'{where}: "prompt" is empty; give the text the model continues')
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(
            f'{where}: "prompt" must be a string or a non-empty list of messages; got '
            f"{type(prompt).__name__}"
        )
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(
                f'{where}: "prompt" message {i} has role {role!r}; allowed roles are {list(ROLES)}'
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: "prompt" message {i} content must be a string')
    return prompt


def read_prompts(path: str | os.PathLike[str]) -> PromptRecords:
    r"""Reads prompt records from a JSONL file or a directory of ``*.jsonl`` files.

    Raises:
      ValueError: naming the file and line, for malformed JSON, a record that is not an
        object or has no ``"prompt"``, an empty prompt, messages with an unknown role or
        non-string content; an empty file.

    Example:
      >>> import tempfile, pathlib
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
      >>> _ = f.write_text('{"prompt": "2+2=", "answer": "4"}\n')
      >>> r = read_prompts(f)
      >>> r.prompts, r.columns, r.sources[0].endswith("p.jsonl:1")
      (['2+2='], [{'answer': '4'}], True)
    """
    out = PromptRecords([], [], [])
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or "prompt" not in record:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f'{where}: a record is a JSON object with a "prompt" (a string or a list of '
                f'messages) and any other columns, e.g. {{"prompt": "2+2=", "answer": "4"}}; '
                f"got {got}"
            )
        out.prompts.append(_check_prompt(record["prompt"], where))
        out.columns.append({k: v for k, v in record.items() if k != "prompt"})
        out.sources.append(where)
    return out


def read_prompt_data(data: DataSection, seed: int) -> tuple[PromptRecords, PromptRecords]:
    """A GRPO run's training and held-out prompts: ``data.train`` and ``data.eval``.

    Without ``data.eval``, ``data.val_fraction`` of the training prompts (at least one) are
    held out, chosen by ``seed``.

    Raises:
      FileNotFoundError: as :func:`~jlora.runner.data.chat_batches.resolve_data`.
      ValueError: as :func:`read_prompts`; no ``data.train``; too few prompts to split.

    Example:
      >>> train, held = read_prompt_data(
      ...     DataSection(train="builtin:stdlib_modules/train.jsonl"), seed=0)
      >>> len(train.sources) > len(held.sources) > 0
      True
    """
    if data.train is None:
        raise ValueError("data.train is not set: a GRPO run reads its prompts from it")
    train = read_prompts(resolve_data(data.train, "data.train", "prompts"))
    if data.eval is not None:
        return train, read_prompts(resolve_data(data.eval, "data.eval", "prompts"))
    n = len(train.sources)
    try:
        kept, held = held_out_split(n, data.val_fraction, seed, stream=1 << 21, unit="prompt")
    except ValueError as err:
        raise ValueError(f"data.train {data.train!r}: {err}") from None
    return train.subset(kept), train.subset(held)
