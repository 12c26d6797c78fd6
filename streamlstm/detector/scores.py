"""Residual -> anomaly score in [0, 1], vectorised over a batch of sensor slots.

Scores are tail probabilities p on a log scale: with L = -log10 p, `score = L / (L + 5)`,
so p = 1e-5 gives 0.5, p = 1e-10 gives 0.67, and smaller p keep ranking closer to 1
without reaching it (a benchmark that picks one threshold needs resolution at the top).
That makes scores comparable across sensors of any scale and sparse, unlike a raw
|residual|. Every scorer keeps per-slot state in arrays and scores *before* updating it,
so a reading never influences its own score (no look-ahead).
"""
from __future__ import annotations

import math

import numpy as np
from numba import vectorize
from numba.extending import register_jitable

HALF_L = 5.0  # score 0.5 at p = 1e-5
LN10 = math.log(10.0)
SQRT2 = math.sqrt(2.0)
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@register_jitable
def tail_log10(z):
    """-log10 Q(z) of the Gaussian upper tail; asymptotic series where erfc would underflow.
    Scalar, shared by the NumPy detector (vectorised below) and the compiled pass."""
    if z < 8.0:
        return -math.log10(max(0.5 * math.erfc(z / math.sqrt(2.0)), 1e-300))
    inv2 = 1.0 / (z * z)
    return (0.5 * z * z + math.log(z * math.sqrt(2.0 * math.pi)) - math.log(1.0 - inv2 + 3.0 * inv2 * inv2)) / LN10


@vectorize(["float64(float64)"], cache=True, nopython=True)
def neg_log10_upper_tail(z):
    return tail_log10(z)


def log10_tail_to_score(neg_log10_p: np.ndarray) -> np.ndarray:
    L = np.maximum(neg_log10_p, 0.0)
    return L / (L + HALF_L)


def score_to_log10(score: np.ndarray) -> np.ndarray:
    """Inverse of log10_tail_to_score (a score of 1 maps to a large finite value)."""
    s = np.minimum(score, 1.0 - 1e-12)
    return HALF_L * s / (1.0 - s)


@register_jitable
def _log_upper_tail(z):
    """(ln Q(z), d/dz ln Q(z) = -phi(z) / Q(z)); the asymptotic series only where erfc would
    underflow."""
    if z < 37.0:
        q = 0.5 * math.erfc(z / SQRT2)
        return math.log(q), -math.exp(-0.5 * z * z - LOG_SQRT_2PI) / q
    inv2 = 1.0 / (z * z)
    s = 1.0 - inv2 + 3.0 * inv2 * inv2
    return -0.5 * z * z - math.log(z) - LOG_SQRT_2PI + math.log(s), -z / s


@register_jitable
def z_for_tail(p):
    """Invert the Gaussian upper tail (for the reported band): z with Q(z) = p, in [-10, 40].

    A rational first guess (Abramowitz & Stegun 26.2.23, error < 4.5e-4), then Newton steps on
    ln Q, which converge quadratically (two or three reach the last bits). Bisection took 80 erfc
    evaluations, 3.7 us, on every reading whose band a peak widens; this takes 0.2 us and agrees
    with it to 1e-13 relative for p >= 1e-300."""
    p = min(max(p, 1e-300), 1.0 - 1e-16)
    t = math.sqrt(-2.0 * math.log(min(p, 1.0 - p)))
    t2 = t * t
    z = t - (2.515517 + 0.802853 * t + 0.010328 * t2) / (1.0 + 1.432788 * t + 0.189269 * t2 + 0.001308 * t2 * t)
    if p >= 0.5:
        z = -z
    target = math.log(p)
    for _ in range(8):
        f, df = _log_upper_tail(z)
        step = (f - target) / df
        z -= step
        if abs(step) <= 1e-15 * max(abs(z), 1.0):
            break
    return min(max(z, -10.0), 40.0)


@vectorize(["float64(float64)"], cache=True, nopython=True)
def _z_for_tail(p):
    return z_for_tail(p)


class RowStore:
    """Per-slot state of several scorers of one kind, each scorer a row of one 2D array per
    field (rows, slots). The compiled pass takes the 2D arrays as they are (a parallel region
    cannot take a tuple of arrays); each scorer reads and writes its row, a view."""

    def __init__(self, fields, rows: int):
        self.fields = tuple(fields)
        self.arrays = {f: np.zeros((rows, 0)) for f in self.fields}
        self._taken = 0

    def take_row(self) -> int:
        if self._taken >= len(self.arrays[self.fields[0]]):
            raise ValueError("every row of this store is taken")
        self._taken += 1
        return self._taken - 1

    def grow(self, n: int):
        for f, a in self.arrays.items():
            if a.shape[1] < n:
                self.arrays[f] = np.concatenate([a, np.zeros((a.shape[0], n - a.shape[1]))], axis=1)


def _row_view(name):
    return property(lambda self: self._store.arrays[name][self._row], doc=f"per-slot {name} (a view)")


class _Rows:
    """Mixin: the STATE fields live in a row of a RowStore (a private one unless given)."""

    def _attach(self, store):
        self._store = store if store is not None else RowStore(self.STATE, 1)
        self._row = self._store.take_row()

    def grow(self, n: int):
        self._store.grow(n)


class LikelihoodScorer(_Rows):
    """Anomaly likelihood of the smoothed residual under its recent distribution.

    raw = |residual| (largest over outputs, scaled units); m = EWMA of raw over ~short_window;
    its mean and variance are tracked twice, over ~long_window and over ~long_window/10,
    and the smaller of each is used: while the model is still learning, residuals fall
    and the fast pair forgets that phase quickly; when an anomaly raises them, the slow
    pair still remembers what normal was. p = Q((m - mean) / sigma), scored before the
    moments are updated (with `weight`, lowered by learning protection during incidents).
    """

    STATE = ("smooth", "mean", "var", "fmean", "fvar", "count")

    smooth, mean, var, fmean, fvar, count = (_row_view(name) for name in STATE)

    def __init__(self, short_window: int, long_window: int, min_scale: float, store: RowStore | None = None):
        self.a_short = 2.0 / (short_window + 1.0)
        self.long_window = long_window
        self.fast_window = max(long_window / 10.0, 1.0)
        self.min_scale = min_scale
        self._attach(store)

    def _moments(self, slots):
        mean = np.minimum(self.mean[slots], self.fmean[slots])
        var = np.minimum(self.var[slots], self.fvar[slots])
        return mean, np.maximum(np.sqrt(var), self.min_scale + 0.1 * mean)

    def log10p(self, slots, raw):
        """(-log10 p, smoothed residual) of each reading, before learning it."""
        m = np.where(self.count[slots] > 0, self.smooth[slots] + self.a_short * (raw - self.smooth[slots]), raw)
        mean, sigma = self._moments(slots)
        return np.maximum(neg_log10_upper_tail((m - mean) / sigma), 0.0), m

    def score(self, slots, raw):
        L, m = self.log10p(slots, raw)
        return log10_tail_to_score(L), m

    def update(self, slots, smoothed, weight):
        self.smooth[slots] = smoothed
        n = self.count[slots] + weight
        exact = np.where(n > 0, weight / np.maximum(n, 1e-12), 0.0)
        for mean_name, var_name, window in (("mean", "var", self.long_window), ("fmean", "fvar", self.fast_window)):
            alpha = np.maximum(exact, weight / window)
            mean, var = getattr(self, mean_name), getattr(self, var_name)
            delta = smoothed - mean[slots]
            mean[slots] += alpha * delta
            var[slots] = (1 - alpha) * (var[slots] + alpha * delta * delta)
        self.count[slots] = np.minimum(n, self.long_window)

    def band(self, slots, threshold: float, extra_log10=0.0):
        """Smoothed |residual| (scaled units) at which the score reaches `threshold`
        (`extra_log10`: evidence the peak reference takes off first, per slot)."""
        mean, sigma = self._moments(slots)
        L = HALF_L * threshold / (1.0 - threshold) + np.asarray(extra_log10, dtype=np.float64)
        return mean + _z_for_tail(10.0 ** -L) * sigma

    def reset(self, slots):
        self.smooth[slots] = np.minimum(self.mean[slots], self.fmean[slots])


class KSigmaScorer(LikelihoodScorer):
    """Plain k-sigma on the instantaneous residual: the score crosses the threshold at k sigma."""

    def __init__(self, ksigma: float, long_window: int, min_scale: float, store: RowStore | None = None):
        super().__init__(short_window=1, long_window=long_window, min_scale=min_scale, store=store)
        self.ksigma = ksigma

    def log10p(self, slots, raw):
        mean, sigma = self._moments(slots)
        return np.maximum(neg_log10_upper_tail((raw - mean) / sigma), 0.0), raw

    def threshold_score(self) -> float:
        return float(log10_tail_to_score(neg_log10_upper_tail(np.array([self.ksigma])))[0])


class DynamicScorer:
    """Telemanom-style nonparametric dynamic threshold (Hundman et al., KDD 2018).

    Errors are EWMA-smoothed and kept in a trailing window per slot; every `refit_every`
    readings the threshold eps = mu + z*sigma is searched over z in 2..10 to maximise
    (dmu/mu + dsigma/sigma) / (#anomalous + #sequences^2); sequences whose peak does not
    exceed the next-highest by `prune` are dropped (raising eps). Score = threshold *
    e/eps below eps and threshold + (1 - threshold)(1 - eps/e) above: monotone, and equal
    to the configured threshold exactly at eps.
    """

    STATE = ("smooth", "errors", "pos", "filled", "eps", "since")

    def __init__(self, long_window: int, short_window: int, threshold: float, min_scale: float,
                 refit_every: int = 50, prune: float = 0.13):
        self.window = long_window
        self.a_short = 2.0 / (short_window + 1.0)
        self.threshold = threshold
        self.min_scale = min_scale
        self.refit_every = refit_every
        self.prune = prune
        self.smooth = np.zeros(0)
        self.errors = np.zeros((0, long_window))
        self.pos = np.zeros(0, np.int64)
        self.filled = np.zeros(0, np.int64)
        self.eps = np.zeros(0)
        self.since = np.zeros(0, np.int64)

    def grow(self, n: int):
        extra = n - len(self.smooth)
        if extra > 0:
            self.smooth = np.concatenate([self.smooth, np.zeros(extra)])
            self.errors = np.concatenate([self.errors, np.zeros((extra, self.window))])
            self.pos = np.concatenate([self.pos, np.zeros(extra, np.int64)])
            self.filled = np.concatenate([self.filled, np.zeros(extra, np.int64)])
            self.eps = np.concatenate([self.eps, np.full(extra, np.inf)])
            self.since = np.concatenate([self.since, np.zeros(extra, np.int64)])

    def score(self, slots, raw):
        e = np.where(self.filled[slots] > 0, self.smooth[slots] + self.a_short * (raw - self.smooth[slots]), raw)
        eps = np.maximum(self.eps[slots], self.min_scale)
        thr = self.threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            below = thr * e / eps
            above = thr + (1 - thr) * (1 - eps / np.maximum(e, 1e-300))
        score = np.where(e < eps, below, above)
        return np.clip(np.nan_to_num(score, nan=0.0), 0.0, 1.0), e

    def update(self, slots, smoothed, weight):
        self.smooth[slots] = smoothed
        keep = weight > 0
        for s, e in zip(slots[keep], smoothed[keep]):
            self.errors[s, self.pos[s]] = e
            self.pos[s] = (self.pos[s] + 1) % self.window
            self.filled[s] = min(self.filled[s] + 1, self.window)
            self.since[s] += 1
            if self.since[s] >= self.refit_every and self.filled[s] >= 10:
                self.since[s] = 0
                self.eps[s] = self.fit(self.errors[s, : self.filled[s]])

    def fit(self, errors: np.ndarray) -> float:
        mu, sd = errors.mean(), errors.std()
        if sd <= 0:
            return float(mu + self.min_scale)
        best, best_eps = -np.inf, float(mu + 10 * sd)
        for z in np.arange(2.0, 10.5, 0.5):
            eps = mu + z * sd
            below = errors[errors < eps]
            above = errors >= eps
            if not above.any() or len(below) == 0:
                continue
            n_seq = int(np.sum(np.diff(np.concatenate([[0], above.astype(np.int8)])) == 1))
            value = ((mu - below.mean()) / mu + (sd - below.std()) / sd) / (above.sum() + n_seq**2)
            if value > best:
                best, best_eps = value, eps
        return float(self._prune(errors, best_eps))

    def _prune(self, errors, eps):
        # Drop weak anomalous sequences: raise eps to the peak of the strongest pruned one.
        above = errors >= eps
        if not above.any():
            return eps
        edges = np.flatnonzero(np.diff(np.concatenate([[0], above.astype(np.int8), [0]])))
        peaks = sorted((errors[a:b].max() for a, b in zip(edges[::2], edges[1::2])), reverse=True)
        peaks.append(errors[~above].max() if (~above).any() else 0.0)
        for i in range(len(peaks) - 1):
            if peaks[i] > 0 and (peaks[i] - peaks[i + 1]) / peaks[i] < self.prune:
                # this and every smaller sequence are noise
                return max(eps, peaks[i] * (1 + 1e-9))
        return eps

    def log10p(self, slots, raw):
        score, e = self.score(slots, raw)
        return score_to_log10(score), e

    def band(self, slots, threshold: float, extra_log10=0.0):
        return np.maximum(self.eps[slots], self.min_scale)

    def reset(self, slots):
        self.smooth[slots] = 0.0


class PeakReference(_Rows):
    """Calibrates a channel's evidence to the sensor's own recent peaks of evidence.

    A tail probability assumes the residual's recent distribution describes its tail; for
    spiky or heavy-tailed sensors it does not, and their routine spikes reach -log10 p of 10
    or more. For a calibrated channel the largest evidence among n readings is about
    log10(n), the `floor`. Each slot remembers its peak evidence (a maximum that decays over
    ~`window` readings) and new evidence keeps only what exceeds the peak's excess over the
    floor: L' = max(L - max(peak - floor, 0), 0). A calibrated sensor is scored as before; a
    spiky one must beat its own routine peaks, and a surprise far above them keeps the margin.
    One excursion (a run of readings above the floor) can at most double the reference it
    started from (`GROWTH`): a single huge event, a spike or a long shift, cannot teach the
    sensor that huge events are routine, so the next one is not discounted away; a sensor
    that really is that spiky gets there over a few excursions. Peaks are learnt only while
    `armed`.
    """

    STATE = ("peak", "base")
    GROWTH = 2.0

    peak, base = _row_view("peak"), _row_view("base")  # base: the reference when the current excursion began

    def __init__(self, window: int, store: RowStore | None = None):
        self.window = window
        self.floor = math.log10(max(window, 10))
        self._attach(store)

    def offset(self, slots):
        """Evidence taken off each slot's readings now (0 for a calibrated sensor)."""
        return np.maximum(self.peak[slots] - self.floor, 0.0)

    def adjust(self, slots, log10p, armed):
        out = np.maximum(log10p - self.offset(slots), 0.0)
        peak = self.peak[slots]
        decayed = peak - np.maximum(peak, self.floor) / self.window
        quiet = log10p <= self.floor
        base = np.where(quiet, np.maximum(decayed, self.floor), np.maximum(self.base[slots], self.floor))
        learnt = np.maximum(decayed, np.minimum(log10p, self.GROWTH * base))
        self.peak[slots] = np.where(armed, learnt, peak)
        self.base[slots] = np.where(armed, base, self.base[slots])
        return out


class StuckScorer:
    """A sensor that stops changing: evidence grows with each repeat past the longest run seen.

    p_repeat is the (decayed) share of readings equal to their predecessor; a run of k
    identical readings scores -log10 p = (k - longest_run) * -log10(p_repeat), capped at
    `max_log10`. A noisy sensor that freezes is flagged within a few readings; a flat line
    from the start, a quantised sensor, or a mostly-constant one with bursts is not.
    """

    STATE = ("last", "run", "longest", "repeats", "total")

    def __init__(self, horizon: int, min_readings: int = 50, max_log10: float = 30.0):
        self.decay = 1.0 - 1.0 / horizon
        self.min_readings = min_readings
        self.max_log10 = max_log10
        self.last = np.zeros((0, 1))
        self.run = np.zeros(0)
        self.longest = np.zeros(0)
        self.repeats = np.zeros(0)
        self.total = np.zeros(0)

    def grow(self, n: int, width: int):
        extra = n - len(self.run)
        if extra > 0:
            self.last = np.concatenate([self.last.reshape(-1, width), np.full((extra, width), np.nan)])
            for name in ("run", "longest", "repeats", "total"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra)]))

    def score_and_update(self, slots, values):
        same = np.all(values == self.last[slots], axis=1)
        run = np.where(same, self.run[slots] + 1, 0.0)
        reps, total, longest = self.repeats[slots], self.total[slots], self.longest[slots]
        p_rep = (reps + 1.0) / (total + 2.0)
        excess = np.maximum(run - longest, 0.0)
        log10_q = np.minimum(excess * -np.log10(p_rep), self.max_log10)
        score = np.where(total >= self.min_readings, log10_tail_to_score(log10_q), 0.0)
        # The history learns from finished runs only, so a stuck stretch does not teach
        # itself to be normal while it lasts.
        ended = ~same & (self.run[slots] > 0)
        self.longest[slots] = np.where(ended, np.maximum(longest * self.decay, self.run[slots]), longest)
        self.repeats[slots] = np.where(ended, reps + self.run[slots], reps) * np.where(same, 1.0, self.decay)
        self.total[slots] = np.where(same, total, (total + np.where(ended, self.run[slots], 0.0)) * self.decay + 1.0)
        self.run[slots] = run
        self.last[slots] = values
        return score
