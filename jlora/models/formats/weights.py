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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jlora._atomic import atomic_path
from jlora._paths import path_str


def save_params(path: str | os.PathLike[str], params: Any, metadata: Mapping[str, str]) -> None:
    """Writes a nested dict of arrays to ``path`` atomically (:func:`jlora._atomic.atomic_path`).

    Example:
      >>> import tempfile, os, jax.numpy as jnp
      >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
      >>> save_params(f, {"a": {"kernel": jnp.ones((2, 2))}}, {"note": "hi"})
      >>> params, meta = load_params(f)
      >>> params["a"]["kernel"].shape, meta["note"]
      ((2, 2), 'hi')
    """
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(params)[0]}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata=dict(metadata))


def load_params(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Reads a file written by :func:`save_params`: ``(nested params, metadata)``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if it is not a safetensors file (another format, truncated, a directory).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        flat = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"weights file {path!r} is not a safetensors file ({err}); give a file written by "
            "jlora (save_params, jlora merge) or another safetensors writer"
        ) from None
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree, metadata
