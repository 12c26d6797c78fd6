"""Numenta Anomaly Benchmark (NAB v1.1) scoring, NumPy only.

Follows NAB's ``nab/sweeper.py`` and ``nab/optimizer.py`` (v1.1):

* The first ``min(floor(0.15 * n), 750)`` rows of a file are probation: never scored.
* A row is a detection when ``score >= threshold``.
* Inside a window of ``W`` rows ending at row ``e``, a detection at row ``i`` is worth
  ``A_TP * S(-(e - i + 1) / W) / S(-1)``, with ``S(y) = 2 / (1 + exp(5 y)) - 1``
  (``S(y) = -1`` for ``y > 3``): exactly ``A_TP`` at the window's first row, ~0 at its
  last. Only the earliest detection of a window counts; a window with none costs ``A_FN``.
* Every detection outside the windows costs ``A_FP * S((i - e) / (W - 1))`` where ``e``,
  ``W`` are the end and width of the last window before it, or ``A_FP`` in full when
  no window precedes it.
* The corpus threshold is the one, among "never fire" and each distinct score, that
  maximises the corpus raw score (ties go to the higher threshold, as in NAB).
* normalised = ``100 * (raw - null) / (perfect - null)``; null = the detector that never
  fires, perfect = ``A_TP`` per window (NAB's ``runner.normalize``).

Public API: :data:`PROFILES`, :func:`load_windows`, :func:`load_series`,
:func:`score_file`, :func:`sweep`, :func:`event_metrics`, :func:`scaled_sigmoid`,
:func:`probation_rows` and the result dataclasses.

A *corpus* is ``{name: (timestamps, scores)}``; *windows* is ``{name: [(start, end), ...]}``
as returned by :func:`load_windows`, with the same names (e.g.
``"realKnownCause/nyc_taxi.csv"``).
"""
from __future__ import annotations

import csv
import json
import math
import types
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "PROFILES",
    "PROBATION_PERCENT",
    "FileScore",
    "SweepResult",
    "EventMetrics",
    "load_windows",
    "load_series",
    "probation_rows",
    "scaled_sigmoid",
    "score_file",
    "sweep",
    "event_metrics",
]

PROBATION_PERCENT = 0.15

#: Profile name -> (A_TP, A_FP, A_FN), from NAB v1.1 ``config/profiles.json``.
PROFILES: Mapping[str, Tuple[float, float, float]] = types.MappingProxyType({
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
})

Profile = Union[str, Tuple[float, float, float]]
Window = Tuple[np.datetime64, np.datetime64]


@dataclass(frozen=True)
class FileScore:
    """Score of one file at one threshold.

    ``tp``/``fn`` count windows (detected / missed); ``fp`` counts detection rows
    outside windows (NAB charges each one). ``detections`` holds the row indices of all
    scored detections. ``null``/``perfect`` are this file's share of the normalisation.
    """

    raw: float
    tp: int
    fp: int
    fn: int
    detections: np.ndarray
    null: float
    perfect: float


@dataclass(frozen=True)
class SweepResult:
    """Best corpus threshold and its scores; ``files`` is the breakdown at it."""

    threshold: float
    raw: float
    null: float
    perfect: float
    normalised: float
    files: Mapping[str, FileScore]


@dataclass(frozen=True)
class EventMetrics:
    """Event-level counts: windows detected (tp) / missed (fn), false-alarm runs (fp)."""

    tp: int
    fn: int
    fp: int
    precision: float
    recall: float
    f1: float


class _Rows(NamedTuple):
    scores: np.ndarray  # float64, one per row
    weight: np.ndarray  # NAB "sweep score": what a detection at this row is worth
    window: np.ndarray  # window index of the row, -1 outside every window
    lo: np.ndarray  # first row of each window
    hi: np.ndarray  # last row of each window
    probation: int


# ----------------------------------------------------------------------------- helpers

def scaled_sigmoid(y):
    """NAB's ``2 * sigmoid(-5 y) - 1``, clamped to -1 beyond ``y > 3``."""
    y = np.asarray(y, dtype=np.float64)
    # min() only avoids exp overflow; those points are replaced by -1 anyway
    s = 2.0 * (1.0 / (1.0 + np.exp(5.0 * np.minimum(y, 4.0)))) - 1.0
    out = np.where(y > 3.0, -1.0, s)
    return float(out) if out.ndim == 0 else out


_MAX_TP = scaled_sigmoid(-1.0)


def probation_rows(n_rows: int) -> int:
    """Number of leading rows NAB leaves unscored: ``min(floor(0.15 n), 0.15 * 5000)``."""
    return int(min(math.floor(PROBATION_PERCENT * n_rows), PROBATION_PERCENT * 5000))


def _weights(profile: Profile) -> Tuple[float, float, float]:
    if isinstance(profile, str):
        try:
            return PROFILES[profile]
        except KeyError:
            raise ValueError(
                f"unknown NAB profile {profile!r}; one of {sorted(PROFILES)}") from None
    a_tp, a_fp, a_fn = (float(w) for w in profile)
    if min(a_tp, a_fp, a_fn) < 0:
        raise ValueError(f"profile weights must be >= 0, got {profile!r}")
    return a_tp, a_fp, a_fn


def _as_time(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind in "OUS":
        arr = arr.astype("datetime64[us]")
    return arr


def _window_rows(ts: np.ndarray, windows: Sequence[Window]):
    """Map [start, end] windows to inclusive row ranges (lo, hi), sorted by start.

    NAB locates window edges with ``timestamps.index(...)``: the first row equal to the
    edge (NAB files repeat some timestamps). An edge that is not a row timestamp falls
    back to the rows inside [start, end]; a window covering no row is dropped.
    """
    n = len(ts)
    los, his = [], []
    for start, end in sorted(windows, key=lambda w: _as_time(w[0])):
        start, end = _as_time(start), _as_time(end)
        if end < start:
            raise ValueError(f"window ends before it starts: {start} > {end}")
        hit = np.flatnonzero(ts == start)
        if hit.size:
            lo = int(hit[0])
        else:
            after = np.flatnonzero(ts >= start)
            lo = int(after[0]) if after.size else n
        hit = np.flatnonzero(ts == end)
        if hit.size:
            hi = int(hit[0])
        else:
            past = np.flatnonzero(ts[lo:] > end)
            hi = lo + int(past[0]) - 1 if past.size else n - 1
        if hi < lo:
            continue
        if his and lo <= his[-1]:
            raise ValueError(f"overlapping NAB windows around {start}")
        los.append(lo)
        his.append(hi)
    return np.asarray(los, dtype=np.int64), np.asarray(his, dtype=np.int64)


def _rows(timestamps, scores, windows: Sequence[Window], profile: Profile) -> _Rows:
    a_tp, a_fp, _ = _weights(profile)
    ts = _as_time(timestamps)
    sc = np.asarray(scores, dtype=np.float64)
    if ts.ndim != 1 or ts.shape != sc.shape:
        raise ValueError(f"timestamps {ts.shape} and scores {sc.shape} must be 1-D, same length")
    if np.isnan(sc).any():
        raise ValueError("anomaly scores contain NaN")
    n = len(sc)
    lo, hi = _window_rows(ts, windows)
    idx = np.arange(n)
    weight = np.empty(n)
    window = np.full(n, -1, dtype=np.int64)
    for k, (a, b) in enumerate(zip(lo, hi)):
        window[a:b + 1] = k
        pos = -(b - idx[a:b + 1] + 1) / float(b - a + 1)
        weight[a:b + 1] = scaled_sigmoid(pos) * a_tp / _MAX_TP
    out = idx[window < 0]
    prev = np.searchsorted(hi, out, side="left") - 1  # last window ending before the row
    unweighted = np.full(out.shape, -1.0)
    seen = prev >= 0
    if seen.any():
        p = prev[seen]
        # NAB divides by (width - 1): a one-row window would divide by zero there
        span = np.maximum(hi[p] - lo[p], 1).astype(np.float64)
        unweighted[seen] = scaled_sigmoid((out[seen] - hi[p]) / span)
    weight[out] = unweighted * a_fp
    return _Rows(sc, weight, window, lo, hi, probation_rows(n))


def _score_rows(r: _Rows, threshold: float, profile: Profile) -> FileScore:
    a_tp, _, a_fn = _weights(profile)
    det = np.flatnonzero(r.scores[r.probation:] >= threshold) + r.probation
    win = r.window[det]
    fp_rows = det[win < 0]
    raw = float(r.weight[fp_rows].sum())
    tp = fn = 0
    for k in range(len(r.lo)):
        if r.hi[k] < r.probation:
            continue  # wholly in probation: NAB scores neither TP nor FN
        hits = det[win == k]
        if hits.size:
            tp += 1
            raw += max(-a_fn, float(r.weight[hits[0]]))  # earliest = largest weight
        else:
            fn += 1
            raw -= a_fn
    return FileScore(
        raw=raw, tp=tp, fp=int(fp_rows.size), fn=fn, detections=det,
        null=-a_fn * float(np.count_nonzero(r.hi >= r.probation)),
        perfect=a_tp * float(len(r.lo)),
    )


def _normalise(raw: float, null: float, perfect: float) -> float:
    if perfect == null:
        return float("nan")  # no windows: NAB's normalisation is undefined
    return 100.0 * (raw - null) / (perfect - null)


# -------------------------------------------------------------------------------- API

def load_windows(path) -> dict:
    """Read NAB ``combined_windows.json``: ``{name: [(start, end), ...]}`` as datetime64[us]."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {
        name: [(np.datetime64(a, "us"), np.datetime64(b, "us")) for a, b in wins]
        for name, wins in raw.items()
    }


def load_series(path) -> Tuple[np.ndarray, np.ndarray]:
    """Read a NAB data CSV (``timestamp,value``) -> (datetime64[us] array, float64 array)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            raise ValueError(f"{path}: expected a 'timestamp,value' header, got {header}")
        rows = [row for row in reader if row]
    ts = np.array([row[0] for row in rows], dtype="datetime64[us]")
    values = np.array([float(row[1]) for row in rows], dtype=np.float64)
    return ts, values


def score_file(timestamps, scores, windows: Sequence[Window], threshold: float,
               profile: Profile = "standard") -> FileScore:
    """NAB raw score of one file when rows with ``score >= threshold`` are detections.

    ``profile`` is a key of :data:`PROFILES` or an ``(A_TP, A_FP, A_FN)`` tuple.
    """
    return _score_rows(_rows(timestamps, scores, windows, profile), threshold, profile)


def sweep(corpus: Mapping[str, tuple], windows: Mapping[str, Sequence[Window]],
          profile: Profile = "standard") -> SweepResult:
    """Find the single corpus threshold that maximises the NAB raw score.

    Sorts every scored row once and updates the total incrementally as the threshold
    drops past each row (NAB's ``Sweeper.calcScoreByThreshold``): O(N log N) in rows.
    The "never fire" candidate has threshold 1.1 (NAB's), or just above the top score
    if scores exceed 1.
    """
    a_tp, _, a_fn = _weights(profile)
    prepared, parts = {}, []
    null = perfect = 0.0
    n_windows = n_rows = 0
    for name, (ts, sc) in corpus.items():
        if name not in windows:
            raise KeyError(f"no NAB windows for {name!r}")
        r = _rows(ts, sc, windows[name], profile)
        prepared[name] = r
        s = r.probation
        gwin = np.where(r.window[s:] >= 0, r.window[s:] + n_windows, -1)
        parts.append((r.scores[s:], r.weight[s:], gwin, np.arange(s, len(r.scores)) + n_rows))
        null -= a_fn * float(np.count_nonzero(r.hi >= s))
        perfect += a_tp * float(len(r.lo))
        n_windows += len(r.lo)
        n_rows += len(r.scores)

    if parts:
        score, weight, win, row = (np.concatenate(p) for p in zip(*parts))
    else:
        score = weight = np.empty(0)
        win = row = np.empty(0, dtype=np.int64)
    top = float(score.max()) if score.size else 0.0
    never = 1.1 if top < 1.1 else float(np.nextafter(top, np.inf))

    order = np.argsort(-score, kind="stable")
    score, weight, win, row = score[order], weight[order], win[order], row[order]
    delta = np.where(win < 0, weight, 0.0)
    inside = np.flatnonzero(win >= 0)
    if inside.size:
        # Per window, only a detection earlier than all previous ones changes the score.
        # Group window rows by window (keeping sweep order) and find those "records" with a
        # running max of a key that is exact in int64 and grows across groups.
        g = inside[np.lexsort((inside, win[inside]))]
        key = win[g] * (n_rows + 1) + (n_rows - row[g])
        rec = g[key == np.maximum.accumulate(key)]
        value = np.maximum(-a_fn, weight[rec])
        before = np.concatenate(([-a_fn], value[:-1]))
        new_window = np.concatenate(([True], win[rec][1:] != win[rec][:-1]))
        before[new_window] = -a_fn
        delta[rec] = value - before
    total = null + np.cumsum(delta)
    last_of_tie = np.flatnonzero(np.append(score[1:] != score[:-1], True))
    cand_score = np.concatenate(([null], total[last_of_tie]))
    cand_thr = np.concatenate(([never], score[last_of_tie]))
    best = int(np.argmax(cand_score))  # first max = highest threshold, as NAB's stable sort
    threshold = float(cand_thr[best])

    files = {name: _score_rows(r, threshold, profile) for name, r in prepared.items()}
    raw = float(sum(f.raw for f in files.values()))
    return SweepResult(threshold=threshold, raw=raw, null=null, perfect=perfect,
                       normalised=_normalise(raw, null, perfect),
                       files=types.MappingProxyType(files))


def event_metrics(corpus: Mapping[str, tuple], windows: Mapping[str, Sequence[Window]],
                  threshold: float) -> EventMetrics:
    """Event-level precision / recall / F1 at ``threshold`` over the scored rows.

    A window is detected if any detection falls inside it; each run of consecutive
    detection rows outside the windows is one false-positive event. Probation rows and
    windows wholly inside probation are ignored, as in NAB. Undefined ratios are 0.
    """
    tp = fn = fp = 0
    for name, (ts, sc) in corpus.items():
        sc = np.asarray(sc, dtype=np.float64)
        lo, hi = _window_rows(_as_time(ts), windows[name])
        s = probation_rows(len(sc))
        det = sc >= threshold
        det[:s] = False
        outside = det.copy()
        for a, b in zip(lo, hi):
            if b >= s:
                if det[a:b + 1].any():
                    tp += 1
                else:
                    fn += 1
            outside[a:b + 1] = False
        fp += int(np.count_nonzero(outside[1:] & ~outside[:-1])) + int(outside[:1].sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return EventMetrics(tp=tp, fn=fn, fp=fp, precision=precision, recall=recall, f1=f1)
