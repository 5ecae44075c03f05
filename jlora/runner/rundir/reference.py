"""The reference's log-probabilities of a run's training pairs, kept in its run directory.

``train.precompute_ref_log_probs`` computes them once, before the first step; the file names
what they were computed from (a fingerprint of the tokenized pairs and the base), so a
resumed run reuses them and a run whose data or base changed computes them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from jlora._atomic import atomic_write

REFERENCE_FILE = "reference_logps.safetensors"


def fingerprint(arrays: Iterable[np.ndarray], **settings: Any) -> str:
    """A hash of token arrays (in order, each with its length) and JSON-able settings.

    Example:
      >>> a = fingerprint([np.array([1, 2]), np.array([3])], base="m")
      >>> a == fingerprint([np.array([1]), np.array([2, 3])], base="m"), len(a)
      (False, 64)
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for x in arrays:
        x = np.ascontiguousarray(x, np.int64)
        h.update(np.int64(x.size).tobytes())
        h.update(x.tobytes())
    return h.hexdigest()


def read_reference(run_dir: str, expected: str, pairs: int) -> np.ndarray | None:
    """The ``[2, pairs]`` log-probabilities saved for ``expected``, or None to compute them.

    A missing file, one of another fingerprint or pair count, or an unreadable one (say cut
    short by a crash) is None: the caller computes the values again and overwrites it.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> write_reference(d, np.ones((2, 3), np.float32), "abc")
      >>> read_reference(d, "abc", 3).shape, read_reference(d, "xyz", 3)
      ((2, 3), None)
    """
    path = os.path.join(run_dir, REFERENCE_FILE)
    try:
        with safe_open(path, "np") as f:
            if (f.metadata() or {}).get("fingerprint") != expected:
                return None
            logps = f.get_tensor("logps")
    except (OSError, SafetensorError, ValueError):  # missing, cut short, or no "logps"
        return None
    return logps if logps.shape == (2, pairs) else None


def write_reference(run_dir: str, logps: np.ndarray, key: str) -> None:
    """Saves ``logps`` (``[2, pairs]``: chosen, rejected) under fingerprint ``key``, atomically.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> write_reference(d, np.zeros((2, 1), np.float32), "k")
      >>> os.listdir(d)
      ['reference_logps.safetensors']
    """
    data = save({"logps": np.asarray(logps, np.float32)}, metadata={"fingerprint": key})
    atomic_write(os.path.join(run_dir, REFERENCE_FILE), data)
