"""Bounds the connections of the /metrics HTTP server (issue 12, slowloris).

One thread per connection with no cap let ~1,000 clients that trickle their request a byte at
a time use up the process' file descriptors: checkpoints, MQTT reconnects and scrapes failed.
`ConnectionGuard` keeps at most `max_connections` open: a new connection beyond that closes
the oldest one (a scrape takes milliseconds, so the oldest is the one that trickles), and
`reap()` closes every connection older than `deadline_s`, however slowly it sends.

Connections are closed with shutdown() on a duplicate of their descriptor, taken under the
lock that `unregister` also takes: the owning thread unregisters before it closes its socket,
so the descriptor can never have been reused by another file (e.g. the MQTT socket).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Optional

__all__ = ["ConnectionGuard"]

class ConnectionGuard:
    def __init__(self, max_connections: int, deadline_s: float, *, on_drop: Optional[Callable[[str], None]] = None,
                 on_count: Optional[Callable[[int], None]] = None, monotonic: Callable[[], float] = time.monotonic):
        self.max_connections = max_connections
        self.deadline_s = deadline_s
        self._on_drop = on_drop or (lambda reason: None)
        self._on_count = on_count or (lambda n: None)
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._open: dict = {}  # fd -> monotonic time it was accepted (insertion order = age)
        self.dropped = {"over_cap": 0, "timeout": 0}

    def __len__(self) -> int:
        return len(self._open)

    def register(self, sock) -> None:
        """A new connection (accept loop); closes the oldest when over the cap."""
        with self._lock:
            while len(self._open) >= self.max_connections:
                fd = next(iter(self._open))
                self._close(fd, "over_cap")
            self._open[sock.fileno()] = self._monotonic()
            n = len(self._open)
        self._on_count(n)

    def unregister(self, sock_or_fd) -> None:
        """The connection's thread is done with it (call before closing the socket)."""
        fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
        with self._lock:
            self._open.pop(fd, None)
            n = len(self._open)
        self._on_count(n)

    def reap(self) -> None:
        """Close connections open longer than the deadline (called from the accept loop)."""
        limit = self._monotonic() - self.deadline_s
        with self._lock:
            for fd in [fd for fd, t in self._open.items() if t < limit]:
                self._close(fd, "timeout")
            n = len(self._open)
        self._on_count(n)

    def _close(self, fd: int, reason: str) -> None:
        # Under the lock. The owner thread sees EOF / an error and unregisters (a no-op then).
        del self._open[fd]
        self.dropped[reason] += 1
        try:
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            dup.close()
        self._on_drop(reason)
