"""The daemon's bounded reading queue (between paho's network thread and the worker).

Entries are ``(chunk or None, ack token or None)``: a chunk holds the readings of one message
(reading.Chunk), None marks a message without readings that must be acked in turn. Capacity and
batch sizes count readings (a marker counts one), as when an entry was one reading: a chunk that
does not fit is split, its ack token staying with its last part. See daemon.py for how
backpressure and acks use it.
"""
from __future__ import annotations

import collections
import threading
import time
from bisect import bisect_right
from itertools import accumulate, islice

__all__ = ["ReadingQueue"]


class ReadingQueue:
    """Bounded FIFO of ``(chunk or None, ack token or None)``; capacity counted in readings."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: collections.deque = collections.deque()
        self._sizes: collections.deque = collections.deque()  # readings of each entry, in step with _items
        self._count = 0  # readings queued (a marker counts one)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._want = 1  # readings the waiting consumer needs before it is worth waking it
        self.blocked_s = 0.0  # producer time spent waiting for room (backpressure)

    def __len__(self) -> int:
        """Readings queued (markers count one)."""
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, entries: list, block: bool = True) -> bool:
        """Append all `entries` in order; with `block`, waiting while the queue is full (a chunk
        larger than the room left goes in parts).

        False when the queue was closed first; readings not yet appended then are dropped,
        unacknowledged (the broker redelivers them).
        """
        i, n = 0, len(entries)
        with self._lock:
            if not block:
                if self._closed:
                    return False
                self._items.extend(entries)
                for item, _ in entries:  # inlined _weight: this runs for every message
                    w = 1 if item is None else len(item.timestamps)
                    self._sizes.append(w)
                    self._count += w
                if self._count >= self._want:
                    self._not_empty.notify()
                return True
            while i < n:
                if self._closed:
                    return False
                free = self.capacity - self._count
                if free <= 0:
                    t0 = time.monotonic()
                    self._not_full.wait(0.5)
                    self.blocked_s += time.monotonic() - t0
                    continue
                item, token = entries[i]
                w = _weight(entries[i])
                if w > free:  # the part that fits now; the rest (with the token) waits for room
                    head, tail = item.split(free)
                    self._items.append((head, None))
                    self._sizes.append(free)
                    self._count += free
                    entries = list(entries)
                    entries[i] = (tail, token)
                else:
                    self._items.append(entries[i])
                    self._sizes.append(w)
                    self._count += w
                    i += 1
                if self._count >= self._want:
                    self._not_empty.notify()
        return True

    def wait_for_room(self, timeout: float) -> bool:
        """True once the queue is below capacity (or closed), waiting at most `timeout`."""
        with self._lock:
            if self._count >= self.capacity and not self._closed:
                t0 = time.monotonic()
                self._not_full.wait(timeout)
                self.blocked_s += time.monotonic() - t0
            return self._count < self.capacity or self._closed

    def get_batch(self, max_items: int, max_delay_s: float, idle_s: float) -> list:
        """Entries holding up to `max_items` readings (a chunk at the limit is split: its first
        part comes now, the rest and its token stay first in line): waits `idle_s` for a first
        one, then up to `max_delay_s` for the batch to fill. [] when nothing came."""
        with self._lock:
            if not self._items:
                self._want = 1
                self._not_empty.wait(idle_s)
                if not self._items:
                    return []
            if self._count < max_items and max_delay_s > 0 and not self._closed:
                self._want = max_items
                deadline = time.monotonic() + max_delay_s
                while self._count < max_items and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._not_empty.wait(left)
                self._want = 1
            items, sizes = self._items, self._sizes
            if self._count <= max_items:  # all of it
                out = list(items)
                items.clear()
                sizes.clear()
                self._count = 0
            else:
                # Whole entries that fit, found in C (every entry counts >= 1: at most
                # max_items of them to look at), then the part of the next one that fits.
                ends = list(accumulate(islice(sizes, max_items)))
                k = bisect_right(ends, max_items)
                pop, pop_size = items.popleft, sizes.popleft
                out = [pop() for _ in range(k)]
                for _ in range(k):
                    pop_size()
                room = max_items - (ends[k - 1] if k else 0)
                if room > 0:
                    item, token = items[0]
                    head, tail = item.split(room)
                    items[0] = (tail, token)
                    sizes[0] -= room
                    out.append((head, None))
                self._count -= max_items
            self._not_full.notify_all()
            return out

    def close(self) -> None:
        """No more puts (blocked producers return False); gets drain what is left."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()


def _weight(entry) -> int:
    """Readings an entry counts for: a chunk its readings, a marker one."""
    item = entry[0]
    return 1 if item is None else len(item.timestamps)
