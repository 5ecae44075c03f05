"""Parameter trees as safetensors files: nested dicts flattened to ``"a/b/c"`` keys.

This is a file-format boundary: a flat name is the only way safetensors stores a tensor, so
nested dict keys (which never contain ``/`` in the built-in models) are joined on save and
split on load. String metadata (e.g. the model config as JSON) rides along in the header.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jlora._paths import path_str


def save_params(path: str | os.PathLike[str], params: Any, metadata: Mapping[str, str]) -> None:
    """Writes a nested dict of arrays to ``path`` (atomically: temp file, then rename).

    Example:
      >>> import tempfile, os, jax.numpy as jnp
      >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> save_params(f, {"a": {"kernel": jnp.ones((2, 2))}}, {"note": "hi"})
      >>> params, meta = load_params(f)
      >>> params["a"]["kernel"].shape, meta["note"]
      ((2, 2), 'hi')
    """
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(params)[0]}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(flat, tmp, metadata=dict(metadata))
    os.replace(tmp, path)


def load_params(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Reads a file written by :func:`save_params`: ``(nested params, metadata)``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {os.fspath(path)!r} does not exist")
    with safe_open(os.fspath(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
    tree: dict[str, Any] = {}
    for name, value in load_file(os.fspath(path)).items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree, metadata
