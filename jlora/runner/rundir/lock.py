"""One process per run directory: an exclusive, non-blocking lock on ``<run_dir>/.lock``.

Two ``jlora finetune`` processes in one run directory would interleave their metrics and
checkpoints; the second one fails at once instead. The lock is ``fcntl.flock`` on an open file,
so the kernel releases it when the process ends, however it ends (``kill -9`` included): a
stale ``.lock`` file never blocks a later run. On systems without ``fcntl`` (Windows) the run
is not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold_lock(run_dir: str) -> Iterator[None]:
    """Holds the run directory's lock for the duration of the ``with`` block.

    Args:
      run_dir: an existing run directory.

    Raises:
      ValueError: if another process holds the lock (another ``jlora finetune`` is using
        ``run_dir``).
      OSError: if the lock file cannot be created (e.g. a read-only file system).

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with hold_lock(d):
      ...     pass
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not guarded against each other
        yield
        return
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"run_dir {run_dir!r} is in use by another jlora process (it holds {path!r}); "
                "wait for that run to end, or choose another run_dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
