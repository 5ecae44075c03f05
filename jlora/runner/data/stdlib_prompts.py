"""GRPO prompts built from the standard-library module task: the answer is a column.

Each record of :mod:`jlora.runner.data.stdlib_modules`'s shipped data (a system turn asking for
the module's dotted name only, a question, the answer) becomes ``{"prompt": [system, user],
"answer": module}``, TRL's conversational prompt format with the answer as a column that the
reward functions read (``exact_match:answer``, ``contains:answer``), and
:func:`stdlib_module`, a reward for answering with a real standard-library module (named in a
config as ``jlora.runner.data.stdlib_prompts:stdlib_module``).

The data shipped in ``jlora/assets/prompts/stdlib_modules/`` was written by::

    python -m jlora.runner.data.stdlib_prompts jlora/assets/prompts/stdlib_modules

from ``jlora/assets/instructions/stdlib_modules/``; it rebuilds byte for byte.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
from collections.abc import Sequence
from typing import Any

from jlora.runner.data.jsonl import write_data_main


def prompts(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt record of each SFT record: its turns before the answer, and the answer.

    Example:
      >>> rec = {"messages": [{"role": "user", "content": "defines `loads(s)`?"},
      ...                     {"role": "assistant", "content": "json"}]}
      >>> prompts([rec])
      [{'prompt': [{'role': 'user', 'content': 'defines `loads(s)`?'}], 'answer': 'json'}]
    """
    return [{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]} for r in records]


def stdlib_module(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    r"""1.0 where the completion is a standard-library module's dotted name, else 0.0.

    A reward with TRL's signature: the form of the answer, and a real module (not any word).

    Example:
      >>> stdlib_module(["q"] * 3, ["os.path", " json\n", "False"])
      [1.0, 1.0, 0.0]
    """
    del prompts, columns
    out = []
    for c in completions:
        text = (c if isinstance(c, str) else c[-1]["content"]).strip()
        parts = text.split(".")
        real = parts[0] in sys.stdlib_module_names and all(p.isidentifier() for p in parts)
        out.append(float(real))
    return out


def build() -> dict[str, list[dict[str, Any]]]:
    """``{"train.jsonl": records, "eval.jsonl": records}`` from the shipped SFT data."""
    root = importlib.resources.files("jlora") / "assets" / "instructions" / "stdlib_modules"
    out = {}
    for name in ("train.jsonl", "eval.jsonl"):
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        out[name] = prompts([json.loads(line) for line in lines if line.strip()])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into the folder given on the command line."""
    write_data_main(build, (__doc__ or "").splitlines()[0], "prompts", argv)


if __name__ == "__main__":
    main()
