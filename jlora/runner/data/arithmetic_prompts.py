"""GRPO prompts of short arithmetic: ``a + b`` and ``a - b``, answered by a number.

A verifiable task that SmolLM2-135M-Instruct already gets partly right (it often writes
``"7 + 5 = 12"``, and often a wrong sum), so reinforcement learning has correct samples to
reinforce from the first step: the reward is the built-in ``last_number:answer`` (the
completion's last number against the record's answer), and the held-out reward is the task's
accuracy. Records are TRL's conversational prompts with the answer as a column:
``{"prompt": [{"role": "user", "content": "What is 7 + 5? Answer with the number only."}],
"answer": "12"}`` (with a system turn, the base explains instead of answering).

The data shipped in ``jlora/assets/prompts/arithmetic/`` was written by::

    python -m jlora.runner.data.arithmetic_prompts jlora/assets/prompts/arithmetic

and rebuilds byte for byte: every question with ``a`` in 2..20 and ``b`` in 1..9 (and
``a - b`` only where ``a >= b``), shuffled with a fixed seed; the first
:data:`HELD_OUT` are the held-out set, which training never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.runner.data.jsonl import write_data_main

#: Questions kept out of training, for the held-out accuracy.
HELD_OUT = 64
ASK = "Answer with the number only."


def question(a: int, op: str, b: int) -> dict[str, Any]:
    """One prompt record: ``What is a op b?`` with its answer.

    Example:
      >>> question(7, "+", 5)
      {'prompt': [{'role': 'user', 'content': 'What is 7 + 5? Answer with the number only.'}], \
'answer': '12'}
    """
    answer = a + b if op == "+" else a - b
    messages = [{"role": "user", "content": f"What is {a} {op} {b}? {ASK}"}]
    return {"prompt": messages, "answer": str(answer)}


def build() -> dict[str, list[dict[str, Any]]]:
    """``{"train.jsonl": records, "eval.jsonl": records}``: every question, split once."""
    records = [question(a, op, b) for a in range(2, 21) for b in range(1, 10) for op in "+-"]
    records = [r for r in records if int(r["answer"]) >= 0]
    order = np.random.default_rng(0).permutation(len(records))
    shuffled = [records[i] for i in order]
    return {"train.jsonl": shuffled[HELD_OUT:], "eval.jsonl": shuffled[:HELD_OUT]}


def main(argv: Sequence[str] | None = None) -> None:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into the folder given on the command line."""
    write_data_main(build, (__doc__ or "").splitlines()[0], "prompts", argv)


if __name__ == "__main__":
    main()
