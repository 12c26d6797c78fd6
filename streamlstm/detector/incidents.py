"""Threshold filters that turn per-reading scores into incidents: one event per incident.

Per slot: an incident opens after `min_duration` consecutive readings at or above the
threshold (outside warm-up and cooldown), tracks its peak, and closes when the score
falls below `threshold * hysteresis`; then `cooldown` readings must pass before the next.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Incident:
    sensor: str
    group: str
    start: float
    timestamp: float  # of the reading that opened it
    value: list
    prediction: list
    residual: list
    score: float
    threshold: float
    peak_score: float = 0.0
    peak_timestamp: float = 0.0
    end: float | None = None
    readings: int = 0
    evidence: str = ""  # the channel that opened it: model, seasonal, range or stuck
    reason: str = ""  # why it closed: returned, accepted (a new normal) or gap (sensor reset)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class IncidentFilter:
    STATE = ("above", "open", "cooldown", "peak", "peak_ts", "length")

    def __init__(self, threshold: float, min_duration: int, hysteresis: float, cooldown: int):
        self.threshold = threshold
        self.min_duration = min_duration
        self.release = threshold * hysteresis
        self.cooldown_len = cooldown
        self.above = np.zeros(0, np.int64)
        self.open = np.zeros(0, bool)
        self.cooldown = np.zeros(0, np.int64)
        self.peak = np.zeros(0)
        self.peak_ts = np.zeros(0)
        self.length = np.zeros(0, np.int64)

    def grow(self, n: int):
        extra = n - len(self.open)
        if extra > 0:
            self.above = np.concatenate([self.above, np.zeros(extra, np.int64)])
            self.open = np.concatenate([self.open, np.zeros(extra, bool)])
            self.cooldown = np.concatenate([self.cooldown, np.zeros(extra, np.int64)])
            self.peak = np.concatenate([self.peak, np.zeros(extra)])
            self.peak_ts = np.concatenate([self.peak_ts, np.zeros(extra)])
            self.length = np.concatenate([self.length, np.zeros(extra, np.int64)])

    def step(self, slots, scores, timestamps, armed):
        """Advance the filters. Returns (is_anomaly, opened, closed) boolean arrays.

        `armed` is False during warm-up: nothing opens then. is_anomaly is True for every
        reading that belongs to an open incident (including the one that opens it).
        """
        hot = (scores >= self.threshold) & armed
        above = np.where(hot, self.above[slots] + 1, 0)
        was_open = self.open[slots]
        cool = np.maximum(self.cooldown[slots] - 1, 0)
        opened = ~was_open & (above >= self.min_duration) & (cool == 0)
        closed = was_open & (scores < self.release)
        now_open = (was_open & ~closed) | opened
        peak = np.where(opened, scores, np.where(now_open & (scores > self.peak[slots]), scores, self.peak[slots]))
        self.peak_ts[slots] = np.where(opened | (now_open & (scores > self.peak[slots])), timestamps, self.peak_ts[slots])
        self.peak[slots] = peak
        self.length[slots] = np.where(opened, 1, np.where(now_open, self.length[slots] + 1, self.length[slots]))
        self.cooldown[slots] = np.where(closed, self.cooldown_len, cool)
        self.above[slots] = above
        self.open[slots] = now_open
        return now_open, opened, closed

    def force_close(self, slots, cooldown: bool = False):
        """Close open incidents (sensor reset; with `cooldown`, as a close by the score does):
        returns the mask of slots that were open."""
        was = self.open[slots].copy()
        self.open[slots] = False
        self.above[slots] = 0
        if cooldown:
            self.cooldown[slots] = self.cooldown_len
        return was
