"""An instruction task built from the Python standard library: which module defines a function?

Each record is a short conversation: a system turn fixing the answer's form, a user turn asking
which standard-library module defines a function (given with its signature), and the answer,
the module's dotted name. The functions are the public, pure-Python functions of the modules in
:data:`MODULES` whose ``__module__`` is that module (re-exports left out), names that two modules
share dropped. A fixed share of each module's functions is held out, so the held-out questions
ask about functions the model never saw answered, from modules it did. Exact match of the answer
is the score.

The data shipped in ``jlora/assets/instructions/stdlib_modules/`` was written by::

    python -m jlora.runner.data.stdlib_modules jlora/assets/instructions/stdlib_modules

on CPython 3.11; other versions give slightly different functions, so the shipped files, not a
fresh build, are what the published numbers come from.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MODULES = (
    "ast", "base64", "bisect", "calendar", "codecs", "colorsys", "compileall", "contextlib",
    "copy", "csv", "dataclasses", "difflib", "dis", "doctest", "email.header", "email.utils",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getpass",
    "gettext", "glob", "gzip", "heapq", "html", "http.cookiejar", "imaplib", "importlib.util",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "mimetypes",
    "operator", "os", "pickletools", "pkgutil", "platform", "pprint", "py_compile", "quopri",
    "random", "re", "runpy", "secrets", "shlex", "shutil", "socket", "ssl", "statistics",
    "string", "subprocess", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "unittest.mock", "urllib.parse",
    "urllib.request", "uu", "uuid", "warnings", "webbrowser", "xml.sax.saxutils", "zipapp",
    "zipfile",
)  # fmt: skip
SYSTEM = "Answer with the dotted name of the module only."
QUESTION = "Which Python standard-library module defines `{signature}`?"
HELD_OUT = 0.15
PER_MODULE = 24  # so that a few large modules (inspect, typing) do not dominate
SEED = 1234
_MAX_SIGNATURE = 72


class _Shown:
    """A default shown by a fixed text in a signature."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _default(value: Any) -> Any:
    """A default as the question shows it: literals as written, anything else as ``...``.

    Other defaults' reprs depend on the process (``executable=sys.executable`` is a venv's
    path; objects print their address), which would make the data differ between machines.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str | bytes) and len(value) <= 24 and os.sep not in str(value):
        return value
    return _Shown("...")


def _signature(name: str, fn: Any) -> str:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parameters = [
        p if p.default is p.empty else p.replace(default=_default(p.default))
        for p in signature.parameters.values()
    ]
    text = f"{name}{signature.replace(parameters=parameters)}"
    return text if len(text) <= _MAX_SIGNATURE else text[: _MAX_SIGNATURE - 4] + "...)"


def functions(modules: Sequence[str] = MODULES) -> dict[str, list[tuple[str, str]]]:
    """Per module, its public pure-Python functions as ``(name, signature)``, sorted by name.

    A module that does not import here is left out; a name defined in two of ``modules`` is
    dropped from both, so every question has one answer.

    Example:
      >>> dict(functions(["shlex"])["shlex"])["quote"]
      'quote(s)'
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for module_name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules (uu) still count
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        entries = []
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            if fn.__module__ != module_name:
                continue
            entries.append((name, _signature(name, fn)))
        found[module_name] = sorted(entries)
    counts: dict[str, int] = {}
    for entries in found.values():
        for name, _ in entries:
            counts[name] = counts.get(name, 0) + 1
    return {m: [e for e in entries if counts[e[0]] == 1] for m, entries in found.items()}


def record(module: str, signature: str) -> dict[str, Any]:
    """The conversation asking for ``signature``'s module, answered.

    Example:
      >>> record("json", "dumps(obj)")["messages"][-1]
      {'role': 'assistant', 'content': 'json'}
    """
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION.format(signature=signature)},
            {"role": "assistant", "content": module},
        ]
    }


def build(
    modules: Sequence[str] = MODULES, held_out: float = HELD_OUT, seed: int = SEED
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)`` records: ``held_out`` of each module's functions set aside.

    A seeded permutation per module picks at most :data:`PER_MODULE` of its functions and holds
    out ``held_out`` of those (at least one where there are two or more), so the split is the
    same on every run of one Python version.

    Example:
      >>> train, held = build(["json", "shlex"])
      >>> len(held) >= 2 and not {str(r) for r in train} & {str(r) for r in held}
      True
    """
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for index, (module, entries) in enumerate(sorted(functions(modules).items())):
        order = np.random.default_rng([seed, index]).permutation(len(entries))[:PER_MODULE]
        entries = [entries[i] for i in sorted(order)]
        order = np.random.default_rng([seed, index, 1]).permutation(len(entries))
        n_held = max(round(held_out * len(entries)), 1) if len(entries) >= 2 else 0
        for rank, i in enumerate(order):
            (held if rank < n_held else train).append(record(module, entries[i][1]))
    return train, held


def main(argv: Sequence[str] | None = None) -> None:
    """Writes ``train.jsonl`` and ``eval.jsonl`` into the folder given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write train.jsonl and eval.jsonl into")
    args = parser.parse_args(argv)
    train, held = build()
    os.makedirs(args.out, exist_ok=True)
    for name, records in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(train)} training and {len(held)} held-out records in {args.out}")


if __name__ == "__main__":
    main()
