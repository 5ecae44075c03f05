"""Ctrl-C during training: a request to stop at the next step boundary, not an exception.

A ``KeyboardInterrupt`` raised at an arbitrary bytecode lands inside JAX dispatch, a compile
or orbax's save machinery, where it shows a traceback, can be swallowed by a worker thread, or
crash the interpreter on the way out. So while training, SIGINT only sets a flag; the loop
checks it between steps, saves what it has and raises ``KeyboardInterrupt`` itself. A second
Ctrl-C means "now": it raises at once, except inside a :meth:`StopRequest.critical` section
(writing a checkpoint or an adapter), where it is raised as the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class StopRequest:
    """SIGINT handler for the training loop, installed for the duration of a ``with`` block.

    Example:
      >>> with StopRequest() as stop:
      ...     stop.requested
      False
    """

    def __init__(self) -> None:
        """A request not yet made; nothing is installed until ``__enter__``."""
        self.requested = False
        self._critical = 0
        self._pending = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if not self.requested:
            self.requested = True
            return
        if self._critical:
            self._pending = True
            return
        raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        """Installs the handler (only the main thread may install signal handlers)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        """Restores the previous handler."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section a second Ctrl-C must not cut short; it is raised when the section ends.

        Raises:
          KeyboardInterrupt: on leaving the section, if a second Ctrl-C arrived inside it.
        """
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical:
            self._pending = False
            raise KeyboardInterrupt
