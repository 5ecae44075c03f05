"""Key paths: the one human-readable form of a leaf's address in a parameter tree.

Leaves are addressed by JAX key paths (tuples of ``DictKey`` / ``SequenceKey`` / ...). The only
string form jlora uses is ``"a/b/c"``, produced by :func:`path_str`; selectors (regexes) are
matched against it, and error messages quote it. Paths are never rebuilt from strings.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
from jax.tree_util import keystr

KeyPath = tuple[Any, ...]


def path_str(path: KeyPath) -> str:
    """Returns the ``"a/b/c"`` form of a JAX key path.

    Args:
      path: a key path as produced by ``jax.tree.flatten_with_path``.

    Returns:
      The path's entries joined by ``/``.

    Example:
      >>> import jax
      >>> [path_str(p) for p, _ in jax.tree.flatten_with_path({"a": {"b": 1}})[0]]
      ['a/b']
    """
    return keystr(tuple(path), simple=True, separator="/")


def path_seed(path: KeyPath) -> int:
    """A stable 31-bit integer derived from a path, for per-path PRNG keys.

    It depends only on the path string, so it is the same in every process and does not change
    when other leaves are added to the tree.
    """
    return zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF


def some_paths(tree: Any, limit: int = 12) -> str:
    """A short, readable listing of a tree's leaf paths with their shapes, for error messages."""
    leaves = jax.tree.flatten_with_path(tree)[0]
    lines = [f"  {path_str(p)} {tuple(getattr(x, 'shape', ()))}" for p, x in leaves[:limit]]
    if len(leaves) > limit:
        lines.append(f"  ... and {len(leaves) - limit} more")
    return "\n".join(lines) if lines else "  (the tree has no leaves)"


def join_paths(paths: Sequence[KeyPath], limit: int = 8) -> str:
    """Paths as a comma-separated string, cut after ``limit`` entries."""
    names = [path_str(p) for p in paths[:limit]]
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(names) + more
