"""Per-sensor input scaling, so one default model works for sensors of any scale."""
from __future__ import annotations

import numpy as np


# Robustness (issue 12): a single absurd reading (1e20, or 3.4e38, a common sensor error value)
# early in a sensor's life used to blow the std up by orders of magnitude for good, so later
# spikes scaled to ~0 and never scored. Two guards:
ROBUST_AFTER = 5        # from this many readings on, an update's delta is clipped to CLIP_K std
CLIP_K = 100.0          # winsorised: one reading moves the std by at most ~45x at 5 readings, ~14x at
# 50, ~1.7x once the horizon is full; the implausibility reset below catches what gets through.
# (NAB dev standard score: k = 5 -> 63.4, 20 -> 65.4, 50 -> 68.9, 100 -> as before: a spiky
# sensor's routine spikes must still widen its scale.)
# A std that is 10^6 times the sensor's typical reading-to-reading change (geometric mean of the
# non-zero changes over ~DIFF_HORIZON readings, insensitive to a few huge ones) is implausible:
# only a poisoned update makes one (a smooth daily wave at one reading per second is ~10^4).
IMPLAUSIBLE_RATIO = 1e6
DIFF_HORIZON = 50
DIFF_MIN = 20           # non-zero changes seen before the check applies


class RunningScaler:
    """Running mean/std per slot and feature.

    Exact (Welford) over the first readings, then exponentially weighted with horizon
    `horizon` so slow drifts are followed while the model's input stays put. Updates take a
    weight (0 for readings judged anomalous) so an incident does not move the scale.
    The std has a floor relative to the mean so a constant sensor does not divide by zero.
    From ROBUST_AFTER readings on, an update's deviation is clipped to CLIP_K std; `update`
    returns the slots whose statistics became implausible (see IMPLAUSIBLE_RATIO, or not
    finite), which it has reset: they start over with the next reading.
    """

    STATE = ("mean", "var", "count", "prev", "logdiff", "ndiff")

    def __init__(self, width: int, horizon: int, rel_floor: float = 1e-3, abs_floor: float = 1e-9):
        self.width = width
        self.horizon = horizon
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.mean = np.zeros((0, width))
        self.var = np.zeros((0, width))
        self.count = np.zeros(0)
        self.prev = np.zeros((0, width))     # last reading (NaN: none yet)
        self.logdiff = np.zeros((0, width))  # EW mean of log|reading - previous| over non-zero changes
        self.ndiff = np.zeros((0, width))    # non-zero changes seen (up to DIFF_HORIZON)

    def grow(self, n: int):
        extra = n - len(self.count)
        if extra > 0:
            self.mean = np.concatenate([self.mean, np.zeros((extra, self.width))])
            self.var = np.concatenate([self.var, np.zeros((extra, self.width))])
            self.count = np.concatenate([self.count, np.zeros(extra)])
            self.prev = np.concatenate([self.prev, np.full((extra, self.width), np.nan)])
            self.logdiff = np.concatenate([self.logdiff, np.zeros((extra, self.width))])
            self.ndiff = np.concatenate([self.ndiff, np.zeros((extra, self.width))])

    def _floor(self, slots):
        return np.maximum(self.rel_floor * np.abs(self.mean[slots]), self.abs_floor)

    def std(self, slots):
        return np.maximum(np.sqrt(self.var[slots]), self._floor(slots))

    def transform(self, slots, values):
        return (values - self.mean[slots]) / self.std(slots)

    def inverse(self, slots, scaled, features=slice(None)):
        return scaled * self.std(slots)[:, features] + self.mean[slots][:, features]

    def rebase(self, slots, values, count: float):
        """Re-centre on `values` (a new normal was accepted), keeping the spread, and weigh
        the past as `count` readings so the scale settles on the new level quickly."""
        self.mean[slots] = values
        self.count[slots] = np.minimum(self.count[slots], count)

    def update(self, slots, values, weight):
        """Learn `values` (one reading per slot); the mask of slots reset as implausible."""
        with np.errstate(over="ignore", invalid="ignore"):  # a reset handles what overflows
            first = self.count[slots] == 0
            # The very first reading sets the mean (a zero mean would make it a huge outlier).
            self.mean[slots[first]] = values[first]
            n = self.count[slots] + weight
            alpha = np.where(n > 0, weight / np.maximum(n, 1e-12), 0.0)
            alpha = np.maximum(alpha, weight / self.horizon)[:, None]
            alpha = np.where(first[:, None], 0.0, alpha)
            delta = values - self.mean[slots]
            # Only against a measured spread: while the std sits at its floor (a constant sensor
            # so far), the first real change must be free to set the scale.
            spread = np.sqrt(self.var[slots])
            robust = (self.count[slots] >= ROBUST_AFTER)[:, None] & (spread > self._floor(slots))
            limit = CLIP_K * spread
            delta = np.where(robust, np.clip(delta, -limit, limit), delta)
            self.mean[slots] += alpha * delta
            self.var[slots] = (1 - alpha) * (self.var[slots] + alpha * delta * delta)
            self.count[slots] = np.minimum(n, self.horizon)
            return self._check(slots, values)

    def _check(self, slots, values):
        change = np.abs(values - self.prev[slots])
        self.prev[slots] = values
        moved = np.isfinite(change) & (change > 0)
        nd = np.where(moved, np.minimum(self.ndiff[slots] + 1, DIFF_HORIZON), self.ndiff[slots])
        a = np.where(moved, 1.0 / np.maximum(nd, 1), 0.0)
        logc = np.log(np.where(moved, change, 1.0))
        self.logdiff[slots] += a * (logc - self.logdiff[slots])
        self.ndiff[slots] = nd
        std = self.std(slots)
        bad = ~np.isfinite(self.mean[slots]) | ~np.isfinite(std)
        bad |= (nd >= DIFF_MIN) & (self.logdiff[slots] < np.log(std) - np.log(IMPLAUSIBLE_RATIO))
        bad = bad.any(axis=1)
        if bad.any():
            self.reset(slots[bad])
        return bad

    def reset(self, slots):
        """Forget the scale of `slots`: the next reading starts it again."""
        self.mean[slots] = 0.0
        self.var[slots] = 0.0
        self.count[slots] = 0.0


class FixedScaler:
    """Fixed bounds from config: [scale_min, scale_max] maps to [-1, 1]."""

    STATE = ()

    def __init__(self, width: int, lo: float, hi: float):
        self.width = width
        self.center = (lo + hi) / 2.0
        self.half = (hi - lo) / 2.0

    def grow(self, n: int):
        pass

    def std(self, slots):
        return np.full((len(slots), self.width), self.half)

    def transform(self, slots, values):
        return (values - self.center) / self.half

    def inverse(self, slots, scaled, features=slice(None)):
        return scaled * self.half + self.center

    def rebase(self, slots, values, count: float):
        pass

    def update(self, slots, values, weight):
        return np.zeros(len(slots), bool)
