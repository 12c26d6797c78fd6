"""Readings: one at a time (`Reading`, for callers that have one) and columnar (`Chunk`: what the
payload parser produces, one per message; `Columns`: a micro-batch, what the detector takes).

The daemon's hot path never builds a Python object per reading: a message's readings travel as
arrays, and the worker joins the chunks of a micro-batch with a few C-level calls (`concat`).
"""
from __future__ import annotations

from itertools import chain
from operator import attrgetter, itemgetter
from typing import NamedTuple

import numpy as np

__all__ = ["Chunk", "Columns", "Reading", "concat"]


class Reading(NamedTuple):
    sensor: str
    timestamp: float  # seconds since the epoch
    values: tuple  # tuple[float, ...], finite


class Chunk:
    """The readings of one message, in payload order: ``sensors`` (a list, one id per row: a
    batch payload may name a sensor per item), ``timestamps`` (n,) float64, ``values`` (n, w)
    float64. One width per chunk (an input has one). ``len(chunk)`` is its number of readings.

    A one-reading message (`Chunk.one`) keeps plain lists, ``[timestamp]`` and ``[values]``:
    two small NumPy arrays per message cost the network thread more than the whole chunk is
    worth, and `concat` turns a batch of such lists into arrays in one call."""

    __slots__ = ("sensors", "timestamps", "values")

    def __init__(self, sensors: list, timestamps: np.ndarray, values: np.ndarray):
        self.sensors = sensors
        self.timestamps = timestamps
        self.values = values

    @classmethod
    def one(cls, sensor: str, timestamp: float, values: tuple) -> "Chunk":
        return cls([sensor], [float(timestamp)], [values])

    @classmethod
    def of(cls, readings) -> "Chunk":
        """From `Reading`s of one width (the parser's paths that go item by item)."""
        return cls([r.sensor for r in readings], np.array([r.timestamp for r in readings], dtype=np.float64),
                   np.array([r.values for r in readings], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def width(self) -> int:
        return block_of(self.values).shape[1]

    def split(self, k: int) -> tuple["Chunk", "Chunk"]:
        """The first k readings and the rest (views, no copies)."""
        return (Chunk(self.sensors[:k], self.timestamps[:k], self.values[:k]),
                Chunk(self.sensors[k:], self.timestamps[k:], self.values[k:]))

    def readings(self) -> list:
        """As `Reading`s (tests, tools): Python floats, as the parser gave them before chunks."""
        return [Reading(s, t, tuple(v)) for s, t, v in
                zip(self.sensors, np.asarray(self.timestamps, dtype=np.float64).tolist(), block_of(self.values).tolist())]

    def __eq__(self, other):
        if not isinstance(other, Chunk):
            return NotImplemented
        mine, theirs = block_of(self.values), block_of(other.values)
        return (self.sensors == other.sensors and np.array_equal(self.timestamps, other.timestamps)
                and mine.shape == theirs.shape and np.array_equal(mine, theirs))

    __hash__ = None

    def __repr__(self):
        return f"Chunk({self.sensors!r}, {self.timestamps!r}, {self.values!r})"


class Columns(NamedTuple):
    """A micro-batch of readings, columnar and in arrival order: ``sensors`` one id per row,
    ``timestamps`` (B,), ``values`` (B, W) with W the widest reading (narrower rows NaN-padded),
    ``width`` (B,) each row's own number of values."""

    sensors: list
    timestamps: np.ndarray
    values: np.ndarray
    width: np.ndarray

    @classmethod
    def of(cls, readings) -> "Columns":
        """From objects with `.sensor`, `.timestamp`, `.values` (tests, learn_one, tools)."""
        rows = [tuple(r.values) for r in readings]
        width = np.array([len(v) for v in rows], dtype=np.int64)
        B = len(rows)
        if len(set(width.tolist())) <= 1:
            values = np.array(rows, dtype=np.float64).reshape(B, int(width[0]) if B else 1)
        else:
            values = np.full((B, int(width.max())), np.nan)
            for i, v in enumerate(rows):
                values[i, :len(v)] = v
        return cls([r.sensor for r in readings], np.array([r.timestamp for r in readings], dtype=np.float64),
                   values, width)

    def __len__(self) -> int:  # noqa: D105 - readings, not fields
        return len(self.timestamps)


_SENSORS = attrgetter("sensors")
_TIMESTAMPS = attrgetter("timestamps")
_VALUES = attrgetter("values")
_SHAPE = attrgetter("shape")
_NCOLS = itemgetter(1)


def concat(chunks: list) -> Columns:
    """One `Columns` from the chunks of a micro-batch, with a constant number of calls (the
    per-chunk work is C-level: map/chain over attribute getters, np.array, np.concatenate)."""
    sensors = list(chain.from_iterable(map(_SENSORS, chunks)))
    if not chunks:
        return _joined(sensors, np.zeros(0), [])
    stamps = list(map(_TIMESTAMPS, chunks))
    if set(map(type, stamps)) == {list}:  # one-reading messages: their lists, joined at once
        rows = list(chain.from_iterable(map(_VALUES, chunks)))
        widths = set(map(len, rows))
        if len(widths) == 1:
            n, w = len(rows), widths.pop()
            timestamps = np.fromiter(chain.from_iterable(stamps), np.float64, n)
            values = np.fromiter(chain.from_iterable(rows), np.float64, n * w).reshape(n, w)
            return Columns(sensors, timestamps, values, np.full(n, w, dtype=np.int64))
    timestamps = np.concatenate(stamps).astype(np.float64, copy=False)
    return _joined(sensors, timestamps, list(map(block_of, map(_VALUES, chunks))))


def block_of(values) -> np.ndarray:
    """A chunk's values as an (n, w) array (a one-reading chunk holds a list of one tuple)."""
    return values if type(values) is np.ndarray else np.array(values, dtype=np.float64).reshape(len(values), -1)


def _joined(sensors: list, timestamps: np.ndarray, blocks: list) -> Columns:
    widths = set(map(_NCOLS, map(_SHAPE, blocks)))
    if len(widths) <= 1:  # the usual case: one width for the whole batch
        w = widths.pop() if widths else 1
        values = np.concatenate(blocks) if blocks else np.zeros((0, w))
        return Columns(sensors, timestamps, values, np.full(len(timestamps), w, dtype=np.int64))
    # Inputs of several widths in one batch: pad to the widest (rare; one step per block).
    wmax = max(widths)
    values = np.full((len(timestamps), wmax), np.nan)
    width = np.empty(len(timestamps), np.int64)
    at = 0
    for block in blocks:
        n, w = block.shape
        values[at:at + n, :w] = block
        width[at:at + n] = w
        at += n
    return Columns(sensors, timestamps, values, width)
