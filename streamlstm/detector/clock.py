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
    def __init__(self, max_skew_s: float, jump_readings: int, now: Callable[[], float] = time.time):
        self.max_skew_s = float(max_skew_s)
        self.jump_readings = int(jump_readings)
        self._now = now
        self._behind: dict = {}  # slot -> (readings in the current run behind, timestamp of the last)

    def check(self, slots, ts, last_ts, interval):
        """(refused, rebased) masks over the round; re-based slots get a new `last_ts` (in place)."""
        refused = np.zeros(len(slots), bool)
        rebased = np.zeros(len(slots), bool)
        if self.max_skew_s <= 0:
            return refused, rebased
        limit = self._now() + self.max_skew_s
        refused = ts > limit
        last = last_ts[slots]
        ahead = (last > limit) & ~refused
        behind = (ts < last - self.max_skew_s) & ~refused
        if self._behind:
            for k in np.flatnonzero(~behind):
                self._behind.pop(int(slots[k]), None)
        for k in np.flatnonzero(behind & ~ahead):
            slot = int(slots[k])
            run, prev = self._behind.get(slot, (0, -np.inf))
            run = run + 1 if ts[k] > prev else 1
            if run >= self.jump_readings:
                ahead[k] = True
                self._behind.pop(slot, None)
            else:
                self._behind[slot] = (run, float(ts[k]))
        for k in np.flatnonzero(ahead):
            slot = slots[k]
            # Just before this reading: the interval estimate (and the gap reset) stay as they were.
            last_ts[slot] = ts[k] - interval[slot] if interval[slot] > 0 else -np.inf
            self._behind.pop(int(slot), None)
        return refused, ahead
