"""Per-sensor input scaling, so one default model works for sensors of any scale."""
from __future__ import annotations

import numpy as np


class RunningScaler:
    """Running mean/std per slot and feature.

    Exact (Welford) over the first readings, then exponentially weighted with horizon
    `horizon` so slow drifts are followed while the model's input stays put. Updates take a
    weight (0 for readings judged anomalous) so an incident does not move the scale.
    The std has a floor relative to the mean so a constant sensor does not divide by zero.
    """

    STATE = ("mean", "var", "count")

    def __init__(self, width: int, horizon: int, rel_floor: float = 1e-3, abs_floor: float = 1e-9):
        self.width = width
        self.horizon = horizon
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor
        self.mean = np.zeros((0, width))
        self.var = np.zeros((0, width))
        self.count = np.zeros(0)

    def grow(self, n: int):
        extra = n - len(self.count)
        if extra > 0:
            self.mean = np.concatenate([self.mean, np.zeros((extra, self.width))])
            self.var = np.concatenate([self.var, np.zeros((extra, self.width))])
            self.count = np.concatenate([self.count, np.zeros(extra)])

    def std(self, slots):
        floor = np.maximum(self.rel_floor * np.abs(self.mean[slots]), self.abs_floor)
        return np.maximum(np.sqrt(self.var[slots]), floor)

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
        first = self.count[slots] == 0
        # The very first reading sets the mean (a zero mean would make it a huge outlier).
        self.mean[slots[first]] = values[first]
        n = self.count[slots] + weight
        alpha = np.where(n > 0, weight / np.maximum(n, 1e-12), 0.0)
        alpha = np.maximum(alpha, weight / self.horizon)[:, None]
        alpha = np.where(first[:, None], 0.0, alpha)
        delta = values - self.mean[slots]
        self.mean[slots] += alpha * delta
        self.var[slots] = (1 - alpha) * (self.var[slots] + alpha * delta * delta)
        self.count[slots] = np.minimum(n, self.horizon)


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
        pass
