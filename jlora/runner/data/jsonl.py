"""JSON Lines files as every data reader takes them: a file or a directory, line by line."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np


def jsonl_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """``path`` itself, or the ``*.jsonl`` files of a directory in sorted name order.

    Raises:
      ValueError: for a path that does not exist, or a directory without ``*.jsonl`` files.

    Example:
      >>> import tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (d / "b.jsonl").write_text("{}"), (d / "a.jsonl").write_text("{}")
      >>> [p.name for p in jsonl_files(d)]
      ['a.jsonl', 'b.jsonl']
    """
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise ValueError(
                f"{path} is a directory without *.jsonl files; put the data in files named "
                "*.jsonl or give the path of one file"
            )
        return files
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a .jsonl file or a directory of them")
    return [path]


def read_jsonl(
    path: str | os.PathLike[str], on_error: Callable[[ValueError], None] | None = None
) -> Iterator[tuple[str, Any]]:
    r"""``("file:line", object)`` for each non-blank line of the JSONL file(s) at ``path``.

    Args:
      path: a ``.jsonl`` file or a directory of them (:func:`jsonl_files`).
      on_error: called with the error of a line that is not JSON, which is then left out;
        ``None`` raises it.

    Raises:
      ValueError: naming the file and line, for a line that is not JSON (without
        ``on_error``); for a file without a non-blank line; as :func:`jsonl_files`.

    Example:
      >>> import tempfile
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
      >>> _ = f.write_text('{"text": "hi"}\n\nnot json\n')
      >>> bad = []
      >>> [(w.rsplit(":", 1)[1], r) for w, r in read_jsonl(f, on_error=bad.append)]
      [('1', {'text': 'hi'})]
      >>> str(bad[0]).endswith("each line must be one JSON object")
      True
    """
    for file in jsonl_files(path):
        lines = 0
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                lines += 1
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    error = ValueError(
                        f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line "
                        "must be one JSON object"
                    )
                    if on_error is None:
                        raise error from None
                    on_error(error)
                    continue
                yield where, record
        if lines == 0:
            raise ValueError(f"{file} holds no records; remove the empty file or fill it")


def held_out_split(
    n: int, fraction: float, seed: int, *, stream: int, unit: str
) -> tuple[list[int], list[int]]:
    """``(train, held)`` indices of ``n`` items: ``fraction`` of them (at least one) held out.

    The held-out items are drawn by ``seed`` from the random stream ``stream`` (each kind of
    data has its own, so a run's split never changes between releases); both lists sorted.

    Raises:
      ValueError: if the training part would be empty (the message counts ``unit``).

    Example:
      >>> held_out_split(5, 0.4, seed=0, stream=1, unit="record")
      ([0, 2, 3], [1, 4])
    """
    held = max(round(n * fraction), 1)
    if n - held < 1:
        raise ValueError(
            f"{n} {unit}(s) cannot be split into training and held-out parts "
            f"(data.val_fraction={fraction}); add {unit}s or give data.eval"
        )
    order = np.random.default_rng([seed, stream]).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def write_data_main(
    build: Callable[[], Mapping[str, list[dict[str, Any]]]],
    description: str,
    unit: str,
    argv: Sequence[str] | None = None,
) -> None:
    """A data builder's command line: ``build()``'s files written into the folder given.

    Each shipped data set's module ends in ``main = functools.partial(write_data_main, ...)``
    style: ``python -m MODULE OUT`` writes ``{name: records}`` as JSONL files in ``OUT``.

    Example:
      >>> import tempfile
      >>> out = tempfile.mkdtemp()
      >>> write_data_main(lambda: {"a.jsonl": [{"x": 1}]}, "demo", "records", [out])
      ... # doctest: +ELLIPSIS
      1 records in .../a.jsonl
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", help="folder to write the data files into")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, records in build().items():
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{len(records)} {unit} in {path}")
