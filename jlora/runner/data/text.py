"""Text data: named text sources and resumable language-model batches of token windows.

A batch is a pure function of ``(seed, position)``: windows of ``seq_len + 1`` tokens are
shuffled per epoch with a generator seeded by ``(seed, epoch)``, so a run resumes exactly by
storing only its data position.
"""

from __future__ import annotations

import importlib.resources
import os

import numpy as np

# Names a config may use instead of a file path.
SOURCES = ("pydoc", "sonnets")


def load_text(source: str) -> str:
    """The text for ``source``: ``"pydoc"``, ``"sonnets"`` or a path to a UTF-8 file.

    ``"pydoc"`` is CPython's ``pydoc_data.topics`` (present on every Python install);
    ``"sonnets"`` is Shakespeare's sonnets (public domain), shipped in ``jlora/assets``.

    Raises:
      FileNotFoundError: if ``source`` is neither a known name nor an existing file.
      ValueError: if the file is empty or not UTF-8 text (a binary file); the path is named.

    Example:
      >>> len(load_text("sonnets")) > 90_000
      True
    """
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if source == "sonnets":
        return (importlib.resources.files("jlora") / "assets" / "sonnets.txt").read_text("utf-8")
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"text source {source!r} is neither one of {SOURCES} nor an existing file; "
            "give a known name or the path to a UTF-8 text file"
        )
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data.source {source!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "give a text file (a binary or differently encoded file cannot be trained on)"
        ) from None
    if not text.strip():
        raise ValueError(f"data.source {source!r} is empty; give a file with text to train on")
    return text


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of ``tokens`` for training, the rest for validation."""
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


class LMBatches:
    """Shuffled windows of ``seq_len + 1`` tokens, addressed by batch position.

    Example:
      >>> import numpy as np
      >>> data = LMBatches(np.arange(1000), seq_len=8, batch_size=4, seed=0)
      >>> data.batch(3).shape
      (4, 9)
      >>> bool((data.batch(3) == LMBatches(np.arange(1000), 8, 4, 0).batch(3)).all())
      True
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        """Cuts ``tokens`` into non-overlapping windows.

        Raises:
          ValueError: if the text is shorter than one batch of windows.
        """
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < batch_size:
            raise ValueError(
                f"text of {len(tokens)} tokens gives {self.windows} windows of {seq_len} tokens, "
                f"fewer than batch_size {batch_size}; use a longer text or smaller seq_len/batch"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = {epoch: rng.permutation(self.windows)}
        return self._perm[epoch]

    def batch(self, position: int) -> np.ndarray:
        """The batch at ``position`` (0, 1, ...), ``[batch_size, seq_len + 1]`` int32."""
        rows = []
        for i in range(position * self.batch_size, (position + 1) * self.batch_size):
            start = int(self._order(i // self.windows)[i % self.windows]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return np.stack(rows).astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, limit: int) -> np.ndarray:
    """Up to ``limit`` consecutive validation windows ``[n, seq_len + 1]``, in order.

    Example:
      >>> import numpy as np
      >>> eval_windows(np.arange(100), 9, 4).shape
      (4, 10)
    """
    n = min(limit, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise ValueError(
            f"validation text of {len(tokens)} tokens is shorter than one window of {seq_len}; "
            "raise data.val_fraction or lower train.seq_len"
        )
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
