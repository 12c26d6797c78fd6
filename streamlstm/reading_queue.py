"""The daemon's bounded reading queue (between paho's network thread and the worker).

Entries are ``(reading or None, ack token or None)``; see daemon.py for how backpressure and
acks use it.
"""
from __future__ import annotations

import collections
import threading
import time

__all__ = ["ReadingQueue"]


class ReadingQueue:
    """Bounded FIFO of ``(reading or None, ack token or None)``; capacity counted in entries."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._want = 1  # entries the waiting consumer needs before it is worth waking it
        self.blocked_s = 0.0  # producer time spent waiting for room (backpressure)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, entries: list, block: bool = True) -> bool:
        """Append all `entries` in order; with `block`, waiting while the queue is full.

        False when the queue was closed first; entries not yet appended then are dropped,
        unacknowledged (the broker redelivers them).
        """
        i, n = 0, len(entries)
        with self._lock:
            while i < n:
                if self._closed:
                    return False
                free = self.capacity - len(self._items) if block else n - i
                if free <= 0:
                    t0 = time.monotonic()
                    self._not_full.wait(0.5)
                    self.blocked_s += time.monotonic() - t0
                    continue
                j = min(n, i + free)
                self._items.extend(entries if (i == 0 and j == n) else entries[i:j])
                i = j
                if len(self._items) >= self._want:
                    self._not_empty.notify()
        return True

    def wait_for_room(self, timeout: float) -> bool:
        """True once the queue is below capacity (or closed), waiting at most `timeout`."""
        with self._lock:
            if len(self._items) >= self.capacity and not self._closed:
                t0 = time.monotonic()
                self._not_full.wait(timeout)
                self.blocked_s += time.monotonic() - t0
            return len(self._items) < self.capacity or self._closed

    def get_batch(self, max_items: int, max_delay_s: float, idle_s: float) -> list:
        """Up to `max_items` entries: waits `idle_s` for a first one, then up to `max_delay_s`
        for the batch to fill. [] when nothing came."""
        with self._lock:
            if not self._items:
                self._want = 1
                self._not_empty.wait(idle_s)
                if not self._items:
                    return []
            if len(self._items) < max_items and max_delay_s > 0 and not self._closed:
                self._want = max_items
                deadline = time.monotonic() + max_delay_s
                while len(self._items) < max_items and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._not_empty.wait(left)
                self._want = 1
            k = min(max_items, len(self._items))
            pop = self._items.popleft
            out = [pop() for _ in range(k)]
            self._not_full.notify_all()
            return out

    def close(self) -> None:
        """No more puts (blocked producers return False); gets drain what is left."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()
