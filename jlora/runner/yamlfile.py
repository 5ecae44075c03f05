"""Reading the runner's YAML files strictly: a syntax error or a duplicate key names the file.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a config that sets
``learning_rate`` twice trains with whichever comes second; here that is an error. Its syntax
errors are tracebacks through the parser; here they are one ``ValueError`` naming the file,
line and column.
"""

from __future__ import annotations

import os
from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a mapping with the same key twice."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document in ``path``, with duplicate keys refused (``None`` if it is empty).

    Raises:
      ValueError: if the file is not valid YAML (file, line and column named) or a mapping
        repeats a key, or it is not UTF-8 text.
      FileNotFoundError: if it does not exist.

    Example:
      >>> import pathlib, tempfile
      >>> path = pathlib.Path(tempfile.mkdtemp(), "c.yaml")
      >>> _ = path.write_text("train: {steps: 5}")
      >>> read_yaml(path)
      {'train': {'steps': 5}}
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)  # a SafeLoader subclass: no objects built
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
