"""Sensors moving between detectors: some rows of a group's state, and two groups' states joined.

A group's state is `GroupDetector.state_dict()`'s ``(arrays, meta)``: per-sensor arrays with one
row per sensor in ``meta["sensors"]`` order, except

* ``bank.theta / m / v / adam_t`` (and the pending segment: ``grad_sum / grad_count / phase``) of
  a shared-weights group: one row for the whole group (a
  sensor that moves leaves the weights behind; the receiving group keeps its own);
* ``seasonal.*``: per-sensor ``start / offset / bins / bin_width``, and ``pool``, the profile
  bins of every sensor, each sensor's period owning ``bins`` rows from ``offset`` (-1: none
  yet); ``periods`` is the group's setting;
* ``meta["open"]``: open incidents keyed by the sensor's row (as text).

These rules are the whole format; `take_rows` and `join` are its only readers here.
"""
from __future__ import annotations

import numpy as np

from ..bank import PENDING_ARRAYS, WEIGHT_ARRAYS

__all__ = ["join", "take_rows"]

_SHARED_WEIGHTS = frozenset(f"bank.{name}" for name in WEIGHT_ARRAYS + PENDING_ARRAYS)
_SEASONAL_ROWS = ("seasonal.start", "seasonal.offset", "seasonal.bins", "seasonal.bin_width")


def _per_sensor(key: str, shared: bool) -> bool:
    return not ((shared and key in _SHARED_WEIGHTS) or key.startswith("seasonal."))


def take_rows(arrays: dict, meta: dict, rows) -> tuple[dict, dict]:
    """The state of the sensors in `rows` (row numbers, in the order given), as copies."""
    rows = np.asarray(rows, dtype=np.int64)
    shared = bool(meta["shared"])
    out = {k: (v[rows] if _per_sensor(k, shared) else v.copy()) for k, v in arrays.items()}
    if "seasonal.pool" in arrays:
        for key in _SEASONAL_ROWS:
            out[key] = arrays[key][rows]
        offset, bins, pool = out["seasonal.offset"], out["seasonal.bins"], arrays["seasonal.pool"]
        pieces, used = [], 0
        for i, k in zip(*np.nonzero(offset >= 0)):  # row-major: a fixed layout for a given row order
            n = int(bins[i, k])
            pieces.append(pool[offset[i, k]: offset[i, k] + n])
            offset[i, k] = used
            used += n
        out["seasonal.pool"] = np.concatenate(pieces) if pieces else pool[:0].copy()
    names = meta["sensors"]
    position = {int(r): i for i, r in enumerate(rows)}
    opened = {str(position[int(k)]): v for k, v in meta.get("open", {}).items() if int(k) in position}
    return out, dict(meta, sensors=[names[r] for r in rows], open=opened)


def join(states) -> tuple[dict, dict]:
    """One group's state holding the sensors of each of `states` in turn (their ids must be
    distinct), built in one pass. Shared weights are the first's. ValueError when they do not
    fit together."""
    states = list(states)
    a, ma = states[0]
    for b, mb in states[1:]:
        if list(ma["shape"]) != list(mb["shape"]) or bool(ma["shared"]) != bool(mb["shared"]):
            raise ValueError(f"model shapes differ: {ma['shape']} (shared {ma['shared']}) vs "
                             f"{mb['shape']} (shared {mb['shared']})")
        if set(a) != set(b):
            raise ValueError(f"state arrays differ: {sorted(set(a) ^ set(b))} (written by another version?)")
        if "seasonal.periods" in a and not np.array_equal(a["seasonal.periods"], b["seasonal.periods"]):
            raise ValueError("seasonal periods differ")
    names = [n for _, m in states for n in m["sensors"]]
    if len(set(names)) != len(names):
        raise ValueError("the states share sensors")
    shared = bool(ma["shared"])
    offsets = [state[0]["seasonal.offset"] for state in states] if "seasonal.offset" in a else []
    if offsets:  # each state's profile rows move behind the pools before it
        shift = np.cumsum([0] + [len(state[0]["seasonal.pool"]) for state in states[:-1]])
        offsets = [np.where(off >= 0, off + s, off) for off, s in zip(offsets, shift)]
    out = {}
    for key, va in a.items():
        if key == "seasonal.offset":
            out[key] = np.concatenate(offsets)
        elif _per_sensor(key, shared) or key in _SEASONAL_ROWS or key == "seasonal.pool":
            out[key] = np.concatenate([state[0][key] for state in states])
        else:  # shared weights, seasonal periods: the first's
            out[key] = va.copy()
    opened, first = {}, 0
    for _, m in states:
        opened.update({str(int(k) + first): v for k, v in m.get("open", {}).items()})
        first += len(m["sensors"])
    return out, dict(ma, sensors=names, open=opened)
