"""Atomic file writes: a reader sees the old file or the new one, never a torn mix.

The bytes go to a temporary file in the destination's directory (so the final rename stays on
one filesystem), are flushed and ``fsync``-ed, and the temporary file is then ``os.replace``-d
over the destination; the directory is ``fsync``-ed too so the rename itself survives a power
loss. If anything fails before the rename, the temporary file is removed and the previous file
is left exactly as it was.

A writer killed outright (``kill -9``, power loss) cannot remove its temporary file, so each is
named ``.<name>.<host>.<pid>.<random>.tmp`` and the next write to the same destination sweeps
the ones nobody can still be writing: untouched for a minute and owned by a process of this
host that no longer exists, or untouched for an hour (another host's, or from a version of
jlora whose names carried no owner). The temporary file is created with mode ``0o666`` and the
process's umask applies, so the result has the mode ``open(path, "w")`` would give it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator

# A temporary file untouched this long is no longer being written, whoever owns it: a writer
# writes, fsyncs and renames in one go.
_IDLE_S = 60.0
_ABANDONED_S = 3600.0
_OWNED = re.compile(r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8,}")
_LEGACY = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp's names, written by older versions


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def temp_name(path: str | os.PathLike[str]) -> str:
    """A fresh temporary path next to ``path``: ``.<name>.<host>.<pid>.<random>.tmp``.

    Example:
      >>> temp_name("/data/w.safetensors").startswith(f"/data/.w.safetensors.{_host()}.")
      True
    """
    path = os.fspath(path)
    name = f".{os.path.basename(path)}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.path.join(os.path.dirname(path), name)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, another user's
        return True
    return True


def _is_stale(middle: str, idle_s: float) -> bool:
    if idle_s >= _ABANDONED_S:
        return True
    owned = _OWNED.fullmatch(middle)
    if owned is None or idle_s < _IDLE_S or owned["host"] != _host():
        return False
    return not _alive(int(owned["pid"]))


def sweep_stale(path: str | os.PathLike[str]) -> None:
    """Removes the temporary files of writes to ``path`` that were killed before finishing.

    Only names of the form :func:`temp_name` (or ``tempfile.mkstemp``'s, from older versions)
    for this very destination are considered, and only those nobody can still be writing.

    Example:
      >>> import os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> open(os.path.join(d, ".x.json.abcd1234.tmp"), "w").close()
      >>> os.utime(os.path.join(d, ".x.json.abcd1234.tmp"), (0, 0))
      >>> sweep_stale(os.path.join(d, "x.json")); os.listdir(d)
      []
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix, now = f".{os.path.basename(path)}.", time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix) : -len(".tmp")]
        if not (_OWNED.fullmatch(middle) or _LEGACY.fullmatch(middle)):
            continue  # not one of ours: never touch it
        full = os.path.join(directory, name)
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if _is_stale(middle, now - os.stat(full).st_mtime):
                os.unlink(full)


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


@contextlib.contextmanager
def _temp_file(path: str) -> Iterator[tuple[int, str]]:
    """An open ``(fd, temp path)`` next to ``path``; fsynced and renamed over it on success.

    The caller closes ``fd`` (before the block ends), so that a number the OS has since reused
    is never closed here.
    """
    sweep_stale(path)
    while True:
        tmp = temp_name(os.path.abspath(path))
        try:
            # O_EXCL: a fresh file of our own; 0o666 lets the umask decide, as open() does.
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask made of 0o666
        yield fd, tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            # The writer replaced the file with its own (safetensors writes 0o600 temp files).
            os.chmod(tmp, mode)
        sync = os.open(tmp, os.O_RDWR)  # writable: Windows cannot flush a read-only handle
        try:
            os.fsync(sync)
        finally:
            os.close(sync)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary path to write ``path``'s new contents to; moved over ``path`` on success.

    The temporary file exists (empty, mode ``0o666`` less the umask) when the block starts; a
    writer may rewrite or replace it (its mode is then restored). On leaving the block normally
    it is ``fsync``-ed and renamed over ``path``; on an exception it is removed and ``path`` is
    left as it was.

    Raises:
      OSError: if the directory is missing or not writable (the old file is untouched).

    Example:
      >>> import os, pathlib, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with atomic_path(os.path.join(d, "y.txt")) as tmp:
      ...     _ = pathlib.Path(tmp).write_text("hi")
      >>> pathlib.Path(d, "y.txt").read_text(), os.listdir(d)
      ('hi', ['y.txt'])
    """
    with _temp_file(os.fspath(path)) as (fd, tmp):
        os.close(fd)
        yield tmp


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
    with _temp_file(os.fspath(path)) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(data)
