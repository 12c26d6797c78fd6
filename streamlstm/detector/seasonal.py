"""Per-sensor seasonal profiles: what a sensor usually reads at this time of day (or week).

The LSTM sees a short window (T readings) and cannot know that a value rises every day at
08:00, nor that today it did not. A profile per period (e.g. 1 day, 7 days) holds, per
phase bin, an exponentially weighted mean of the readings seen at that phase in earlier
periods. Its residual is a second opinion: a reading the profile explains is not a
surprise even when the LSTM did not see it coming (daily transitions), and a reading the
profile contradicts is one even when the LSTM followed it (a missing daily peak).

A period is enabled for a sensor once the sensor has been seen for one full period
(its storage is allocated then, so short-lived and fast sensors cost nothing) and only
when the period holds at least `MIN_READINGS_PER_PERIOD` readings. A bin is one reading
interval wide, at most `max_bins` per period; its residual counts from the second visit.
Storage is one float32 pool shared by all sensors; each sensor's period owns a slice.
"""
from __future__ import annotations

import numpy as np

MIN_READINGS_PER_PERIOD = 4


class SeasonalProfiles:
    def __init__(self, periods, features: int, alpha: float, max_bins: int):
        self.periods = np.asarray(periods, dtype=np.float64)
        self.features = features
        self.alpha = alpha
        self.max_bins = max_bins
        K = len(self.periods)
        self.start = np.zeros(0)
        self.offset = np.zeros((0, K), np.int64)
        self.bins = np.zeros((0, K), np.int64)
        self.bin_width = np.zeros((0, K))  # seconds; bins * bin_width == period
        self.pool = np.full((0, features), np.nan, np.float32)
        self.used = 0

    @property
    def n_periods(self) -> int:
        return len(self.periods)

    def grow(self, n: int):
        extra = n - len(self.start)
        if extra > 0:
            K = self.n_periods
            self.start = np.concatenate([self.start, np.full(extra, np.nan)])
            self.offset = np.concatenate([self.offset, np.full((extra, K), -1, np.int64)])
            self.bins = np.concatenate([self.bins, np.zeros((extra, K), np.int64)])
            self.bin_width = np.concatenate([self.bin_width, np.zeros((extra, K))])

    def _index(self, slots, ts):
        """(B, K) pool rows of the readings' phase bins, -1 where the period is not enabled."""
        off = self.offset[slots]
        on = off >= 0
        width = np.where(on, self.bin_width[slots], 1.0)
        nb = np.maximum(self.bins[slots], 1)
        phase = np.floor(np.mod(ts[:, None], self.periods[None, :]) / width).astype(np.int64) % nb
        return np.where(on, off + phase, -1)

    def expected(self, slots, ts) -> np.ndarray:
        """(B, K, features) profile value at each reading's phase; NaN where there is none yet."""
        rows = self._index(slots, ts)
        out = np.full(rows.shape + (self.features,), np.nan)
        on = rows >= 0
        out[on] = self.pool[rows[on]]
        return out

    def update(self, slots, ts, values, interval, weight):
        """Learn the readings (weight 0..1 scales the step); enable periods that are due."""
        self._enable(slots, ts, interval)
        rows = self._index(slots, ts)
        for k in range(self.n_periods):
            on = rows[:, k] >= 0
            if not on.any():
                continue
            r = rows[on, k]
            # One step of `alpha` per period: a bin wider than the interval sees several
            # readings per visit, each taking a share of it.
            per_visit = np.maximum(self.bin_width[slots[on], k] / np.maximum(interval[on], 1e-9), 1.0)
            a = (1.0 - (1.0 - self.alpha) ** (1.0 / per_visit)) * weight[on]
            old = self.pool[r].astype(np.float64)
            v = values[on]
            # An empty bin takes the first reading it may learn (weight 0: it stays empty).
            fresh = np.isnan(old)
            new = np.where(fresh, np.where(weight[on, None] > 0, v, np.nan), old + a[:, None] * (v - old))
            # Readings of one slot never repeat within a call (the caller steps in rounds).
            self.pool[r] = new.astype(np.float32)
        first = np.isnan(self.start[slots])
        self.start[slots[first]] = ts[first]

    def _enable(self, slots, ts, interval):
        due = (
            (self.offset[slots] < 0)
            & ((ts - self.start[slots])[:, None] >= self.periods[None, :])
            & (interval[:, None] > 0)
            & (self.periods[None, :] >= MIN_READINGS_PER_PERIOD * interval[:, None])
        )
        for b, k in zip(*np.nonzero(due)):
            nb = int(min(round(self.periods[k] / interval[b]), self.max_bins))
            self._allocate(slots[b], k, nb)

    def _allocate(self, slot, k, nb):
        if self.used + nb > len(self.pool):
            cap = max(self.used + nb, int(len(self.pool) * 1.5), 1024)
            pool = np.full((cap, self.features), np.nan, np.float32)
            pool[: self.used] = self.pool[: self.used]
            self.pool = pool
        self.offset[slot, k] = self.used
        self.bins[slot, k] = nb
        self.bin_width[slot, k] = self.periods[k] / nb
        self.used += nb

    def state_dict(self, n: int, copy: bool = True) -> dict:
        arrays = {"start": self.start[:n], "offset": self.offset[:n], "bins": self.bins[:n],
                  "bin_width": self.bin_width[:n], "pool": self.pool[: self.used], "periods": self.periods}
        return {k: v.copy() for k, v in arrays.items()} if copy else arrays

    def load_state_dict(self, arrays: dict, n: int):
        """Restore; a checkpoint made with other periods or widths starts the profiles afresh."""
        if "pool" not in arrays or not np.array_equal(arrays.get("periods"), self.periods):
            return
        if arrays["pool"].shape[1:] != (self.features,):
            return
        self.grow(n)
        self.start[:n] = arrays["start"]
        self.offset[:n] = arrays["offset"]
        self.bins[:n] = arrays["bins"]
        self.bin_width[:n] = arrays["bin_width"]
        self.pool = arrays["pool"].astype(np.float32).copy()
        self.used = len(self.pool)
