"""Reading timestamps against the wall clock: a skew limit, and recovery from a clock jump.

A reading dated far in the future used to freeze its sensor: every later reading was older
than it and rejected `out_of_order`, across restarts (the last timestamp is checkpointed).
`ClockGuard.check` runs before the duplicate/out-of-order check of `GroupDetector._round`:

* Skew limit: a reading more than `max_skew_s` ahead of the wall clock is refused
  (`clock_skew`). 0 turns the check off (replaying recorded data stamped in the future).
* Re-basing: a sensor's last timestamp is moved back to just before the current reading
  (which is then accepted) when either
  - the last timestamp itself is more than `max_skew_s` ahead of the wall clock (accepted
    before the limit existed, or the host clock was fixed backwards), or
  - `jump_readings` consecutive readings arrive in order, each more than `max_skew_s` behind
    the last timestamp: the device's clock jumped back (e.g. an RTC reset). The readings of
    the run before the last are rejected `out_of_order`. A redelivery after a reconnect is
    behind by seconds to minutes, far less than the limit, so it is never taken for a jump.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


class ClockGuard:
    """Per-slot state: `run` (in-order readings in the current run behind the last timestamp,
    0: none) and `prev` (the timestamp of the last of them); arrays, so the compiled pass
    (compiled.py) keeps the very same state."""

    STATE = ("run", "prev")  # checkpointed: a run behind the last timestamp survives a restart or a move

    def __init__(self, max_skew_s: float, jump_readings: int, now: Callable[[], float] = time.time):
        self.max_skew_s = float(max_skew_s)
        self.jump_readings = int(jump_readings)
        self._now = now
        self.run = np.zeros(0, np.int64)
        self.prev = np.zeros(0)

    def now(self) -> float:
        return self._now()

    def grow(self, n: int):
        extra = n - len(self.run)
        if extra > 0:
            self.run = np.concatenate([self.run, np.zeros(extra, np.int64)])
            self.prev = np.concatenate([self.prev, np.full(extra, -np.inf)])

    def check(self, slots, ts, last_ts, interval):
        """(refused, rebased) masks over the round; re-based slots get a new `last_ts` (in place)."""
        refused = np.zeros(len(slots), bool)
        rebased = np.zeros(len(slots), bool)
        if self.max_skew_s <= 0:
            return refused, rebased
        if len(slots):
            self.grow(int(np.max(slots)) + 1)
        limit = self._now() + self.max_skew_s
        refused = ts > limit
        last = last_ts[slots]
        ahead = (last > limit) & ~refused
        behind = (ts < last - self.max_skew_s) & ~refused
        counting = behind & ~ahead
        run = np.where(ts > self.prev[slots], self.run[slots] + 1, 1)
        jumped = counting & (run >= self.jump_readings)
        ahead |= jumped
        keep = counting & ~jumped
        self.run[slots] = np.where(keep, run, 0)
        self.prev[slots] = np.where(keep, ts, -np.inf)
        # Just before this reading: the interval estimate (and the gap reset) stay as they were.
        step_back = np.where(interval[slots] > 0, ts - interval[slots], -np.inf)
        last_ts[slots[ahead]] = step_back[ahead]
        return refused, ahead
