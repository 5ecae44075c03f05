"""Preference pairs built from the standard-library module task: the terse right answer wins.

Each record of :mod:`jlora.runner.data.stdlib_modules`'s shipped data (a system turn asking for
the module's dotted name only, a question, the answer) becomes a pair in TRL's conversational
format with an explicit prompt: ``{"prompt": [system, user], "chosen": [the module name],
"rejected": [...]}``. Records alternate between two kinds of rejected answer, so the pairs
teach both the form and the fact: a verbose sentence naming the right module (even records),
and a wrong module (odd records), drawn from the other modules of the same file with a
generator seeded by :data:`SEED` and the record's index.

The data shipped in ``jlora/assets/preferences/stdlib_modules/`` was written by::

    python -m jlora.runner.data.stdlib_preferences jlora/assets/preferences/stdlib_modules

from ``jlora/assets/instructions/stdlib_modules/``; the build is a pure function of those
files, so it rebuilds byte for byte.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.runner.data.jsonl import write_data_main

SEED = 2024
VERBOSE = "The function `{name}` is defined in the `{module}` module of the standard library."


def pairs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The preference pair of each SFT record (see the module's note).

    Example:
      >>> def rec(q, a):
      ...     return {"messages": [{"role": "user", "content": q},
      ...                          {"role": "assistant", "content": a}]}
      >>> out = pairs([rec("defines `loads(s)`?", "json"), rec("defines `dumps(x)`?", "os")])
      >>> out[0]["chosen"][0]["content"], out[0]["rejected"][0]["content"]
      ('json', 'The function `loads` is defined in the `json` module of the standard library.')
      >>> out[1]["rejected"][0]["content"]
      'json'
    """
    modules = sorted({r["messages"][-1]["content"] for r in records})
    out = []
    for i, record in enumerate(records):
        prompt, answer = record["messages"][:-1], record["messages"][-1]["content"]
        if i % 2 == 0:
            signature = prompt[-1]["content"].split("`")[1]
            rejected = VERBOSE.format(name=signature.split("(")[0], module=answer)
        else:
            others = [m for m in modules if m != answer]
            rejected = others[int(np.random.default_rng([SEED, i]).integers(len(others)))]
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out


def build() -> dict[str, list[dict[str, Any]]]:
    """``{"train.jsonl": pairs, "eval.jsonl": pairs}`` from the shipped SFT data."""
    root = importlib.resources.files("jlora") / "assets" / "instructions" / "stdlib_modules"
    out = {}
    for name in ("train.jsonl", "eval.jsonl"):
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        out[name] = pairs([json.loads(line) for line in lines if line.strip()])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into the folder given on the command line."""
    write_data_main(build, (__doc__ or "").splitlines()[0], "pairs", argv)


if __name__ == "__main__":
    main()
