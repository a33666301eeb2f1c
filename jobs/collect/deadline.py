"""A deadline on a whole download that holds however slowly the bytes arrive.

A per-read timeout never fires against a server that sends one byte every two seconds, and a
clock checked between reads is only looked at when a read returns. So one watcher thread holds
the socket of every download in flight and shuts it down when that download's deadline passes:
the blocking ``recv`` in the download thread returns at once, whether it was waiting for the
status line, a header or the body. The download thread then sees ``guard.fired`` and reports a
timeout (an interrupted body can look like a short, complete one, so the flag is what counts).

The connection classes in ``netsafety`` hand their socket over through ``attach_socket`` just
before the response is read; the download thread opens a ``guard`` around the request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

_current = threading.local()  # the guard of the download running in this thread, if any


class Guard:
    """One download's deadline; ``fired`` once the watcher shut its socket down."""

    def __init__(self, watch: DeadlineWatch, deadline: float) -> None:
        self.watch, self.deadline = watch, deadline
        self.sock: socket.socket | None = None
        self.fired = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class DeadlineWatch:
    """The watcher thread (started on first use, stopped by ``close``)."""

    def __init__(self) -> None:
        self._guards: set[Guard] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def guard(self, deadline: float) -> Iterator[Guard]:
        """Arm ``deadline`` for the requests this thread makes inside the block."""
        guard = Guard(self, deadline)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-deadlines", daemon=True)
                self._thread.start()
            self._guards.add(guard)
            self._cond.notify()
        _current.guard = guard
        try:
            yield guard
        finally:
            _current.guard = None
            with self._cond:
                self._guards.discard(guard)

    def attach(self, guard: Guard, sock: socket.socket) -> None:
        with self._cond:
            guard.sock = sock
            if guard.remaining() <= 0:
                self._fire(guard)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for guard in [g for g in self._guards if g.deadline <= now]:
                    self._fire(guard)
                upcoming = [g.deadline for g in self._guards if g.deadline > now]
                self._cond.wait(min(upcoming) - now if upcoming else None)

    def _fire(self, guard: Guard) -> None:
        """Under the lock: the guard leaves the set, so a socket already handed back is never touched."""
        self._guards.discard(guard)
        guard.fired = True
        if guard.sock is not None:
            with contextlib.suppress(OSError):  # already closed by the other side: nothing to interrupt
                guard.sock.shutdown(socket.SHUT_RDWR)


def attach_socket(sock: socket.socket | None) -> None:
    """Put ``sock`` under this thread's download deadline (no-op outside a guard)."""
    guard: Guard | None = getattr(_current, "guard", None)
    if guard is not None and sock is not None:
        guard.watch.attach(guard, sock)
