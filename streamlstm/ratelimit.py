"""At most one log line per key per interval; the next line tells how many were held back.

Used for per-reason rejection logs (``logging.rejected_log_interval_s``): a flood of bad
payloads must not turn into a flood of log lines. Thread-safe: paho's network thread and the
worker both log.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Callable

__all__ = ["RateLimitedLogger", "key_text"]


class _KeyState:
    __slots__ = ("next_at", "suppressed")

    def __init__(self, next_at: float):
        self.next_at = next_at
        self.suppressed = 0


class RateLimitedLogger:
    """Wraps a `logging.Logger`-like object (``log`` and ``isEnabledFor``)."""

    def __init__(self, logger, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 *, max_keys: int = 10_000):
        if not interval_s >= 0:  # also refuses NaN
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        self.logger = logger
        self.interval_s = float(interval_s)
        self._clock = clock
        self._max_keys = max_keys
        self._state: dict = {}
        self._lock = threading.Lock()

    def log(self, key, level: int, msg, *args) -> bool:
        """Log ``msg % args`` unless `key` logged within the interval. True if a line went out."""
        if not self.logger.isEnabledFor(level):
            return False
        with self._lock:
            now = self._clock()
            state = self._state.get(key)
            if state is not None and now < state.next_at:
                state.suppressed += 1
                return False
            suppressed = 0
            if state is None:
                if len(self._state) >= self._max_keys:
                    self._prune(now)
                self._state[key] = _KeyState(now + self.interval_s)
            else:
                suppressed = state.suppressed
                state.suppressed = 0
                state.next_at = now + self.interval_s
        # Emit outside the lock: handlers do I/O and take their own locks.
        if suppressed:
            msg, args = _with_suffix(msg, args, suppressed)
        self.logger.log(level, msg, *args)
        return True

    def flush(self, level: int | None = None) -> int:
        """Log the counts still held back (e.g. at shutdown); returns how many lines went out."""
        with self._lock:
            pending = [(k, s.suppressed) for k, s in self._state.items() if s.suppressed]
            for k, _ in pending:
                self._state[k].suppressed = 0
        lvl = logging.WARNING if level is None else level
        for key, n in pending:
            self.logger.log(lvl, "%s: %d similar messages suppressed", key_text(key), n)
        return len(pending)

    def _prune(self, now: float) -> None:
        # Keys whose window is over and that hold no count carry no information.
        stale = [k for k, s in self._state.items() if now >= s.next_at and not s.suppressed]
        for k in stale:
            del self._state[k]


def key_text(key) -> str:
    """A key in words: ("rejected", "bad_json") -> "rejected (bad_json)", as the log lines say it."""
    if isinstance(key, tuple) and key:
        head, rest = str(key[0]), [str(k) for k in key[1:]]
        return f"{head} ({', '.join(rest)})" if rest else head
    return str(key)


def _with_suffix(msg, args, suppressed: int):
    # Format the original line ourselves: appending an arg would break mapping-style args.
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        args = args[0]  # as logging.LogRecord does
    try:
        text = str(msg) % args if args else str(msg)
    except (TypeError, ValueError, KeyError):
        text = f"{msg} {args!r}"
    return "%s (%d similar messages suppressed)", (text, suppressed)
