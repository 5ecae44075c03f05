"""Atomic file writes: a reader sees the old file or the new one, never a torn mix.

The bytes go to a temporary file in the destination's directory (so the final rename stays on
one filesystem), are flushed and ``fsync``-ed, and the temporary file is then ``os.replace``-d
over the destination; the directory is ``fsync``-ed too so the rename itself survives a power
loss. If anything fails before the rename, the temporary file is removed and the previous file
is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flushes a directory's entries (renames, creations) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: on any failure the old file is left intact.

    Args:
      path: the destination file; its directory must exist.
      data: the complete new contents.

    Raises:
      OSError: if the directory is missing or not writable (the old file is untouched).

    Example:
      >>> import os, pathlib, tempfile
      >>> d = tempfile.mkdtemp()
      >>> atomic_write(os.path.join(d, "x.txt"), b"hello")
      >>> pathlib.Path(d, "x.txt").read_bytes(), os.listdir(d)
      (b'hello', ['x.txt'])
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
