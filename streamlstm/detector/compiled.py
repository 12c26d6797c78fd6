"""The compiled pass: one Numba call walks a whole micro-batch of a model group.

`GroupDetector` (group.py) is the readable NumPy version and the oracle; this module does the
same per-reading path (clock, gap reset, scaling, prediction, the four evidence channels, peak
references, incidents, learning weight, model training and forward, scaler/score/profile
learning) for each sensor's readings in time order, with the state arrays of the very same
objects, so a group can switch between the two at any batch and checkpoints do not change.

One walk: each sensor's readings in time order; sensors are split across threads.
* per-sensor weights: sensors are independent.
* shared weights: the batch goes in segments of `train_every` rounds (a round: each sensor's
  r-th reading of the batch). Within a segment the weights stay fixed, so sensors are
  independent again; each thread sums its windows' gradients and the segment ends with one
  update from their mean (`segment_update`), as the NumPy path does.

A seasonal profile's storage is allocated when it becomes due (once per sensor and period):
the kernel stops before such a reading and the driver allocates in Python, then resumes.
"""
from __future__ import annotations

import collections
import math

import numpy as np
from numba import njit
from numba.extending import register_jitable

from ..kernels_cpu import shared_update
from ..lstm_math import HP_LR, IP_OPTIMIZER, STATUS_RESET, STATUS_SKIPPED, all_finite, apply_update
from ..lstm_math import push_and_forward, reset_slot, window_grad
from .scaling import CLIP_K, DIFF_HORIZON, DIFF_MIN, IMPLAUSIBLE_RATIO, ROBUST_AFTER  # scaling.py's robust-scale constants
from .scores import tail_log10, z_for_tail

_JIT = dict(cache=True, nogil=True)
# Helpers of the walk: no C-callable wrapper (Numba's default for a jitted function; only a
# function value passed as an argument would use it), one function less to optimise and emit.
_jitable = register_jitable(no_cfunc_wrapper=True)

# reason codes (GroupDetector.REASONS)
R_OK, R_CLOCK_SKEW, R_DUPLICATE, R_LATE = range(4)  # non-finite readings never reach the kernels

# float parameters
(F_THRESHOLD, F_RELEASE, F_A_SHORT, F_LONG, F_FAST, F_MIN_SCALE, F_PEAK_FLOOR, F_PEAK_WINDOW, F_PEAK_GROWTH,
 F_STUCK_DECAY, F_STUCK_MAX, F_HORIZON, F_REL_FLOOR, F_ABS_FLOOR, F_CENTER, F_HALF, F_SEASON_ALPHA, F_GAP,
 F_SKEW, F_NOW, F_DAMP, F_BAND_Z0, F_BAND_L0, F_INPUT_CLIP, F_PROTECT_SCORE, F_PROTECT_LOG10, F_SCORE_CLIP, F_SIZE) = range(28)
# int parameters
(I_WARMUP, I_SCALING_WARMUP, I_FIXED, I_KSIGMA, I_MIN_DURATION, I_COOLDOWN, I_ACCEPT_AFTER, I_PROTECTION,
 I_CH_MODEL, I_CH_SEASONAL, I_CH_RANGE, I_HAS_PEAKS, I_HAS_STUCK, I_STUCK_MIN, I_JUMP, I_TRAIN_EVERY,
 I_TARGET_LO, I_SHARED, I_PEAK_BASELINE, I_BASELINE, I_SIZE) = range(21)
PROTECTIONS = ("off", "skip", "damp")

LOG_IMPLAUSIBLE = math.log(IMPLAUSIBLE_RATIO)

# The group's state, by owner (each a namedtuple of the owner's arrays, as the NumPy path keeps
# them). The helpers below take only the parts they use: Numba passes a tuple argument as all its
# arrays' fields, so a helper taking the whole state cost ~0.3 s of compile time for nothing.
Clock = collections.namedtuple("Clock", ["last_ts", "interval", "seen", "alert_peak", "run", "prev"])
Scale = collections.namedtuple("Scale", ["mean", "var", "count", "prev", "logdiff", "ndiff"])
# scores: (2 + K, S) rows (model, range, seasons); peaks: (3, S) rows (model, seasonal, range)
Scores = collections.namedtuple("Scores", ["smooth", "mean", "var", "fmean", "fvar", "count"])
Peaks = collections.namedtuple("Peaks", ["peak", "base"])
Stuck = collections.namedtuple("Stuck", ["last", "run", "longest", "repeats", "total"])
Seasons = collections.namedtuple("Seasons", ["start", "offset", "bins", "width", "pool", "periods"])
Incidents = collections.namedtuple("Incidents", ["above", "open", "cooldown", "peak", "peak_ts", "length"])
Model = collections.namedtuple("Model", [
    "theta", "m", "v", "adam_t", "h", "c", "ring_x", "ring_h", "ring_c", "ring_pos", "ring_len", "pred",
    "since_train", "offs", "hp", "ip", "grad_sum", "grad_count",  # shared: the segment's pending sum
])
State = collections.namedtuple("State", ["clock", "sc", "lk", "pk", "stk", "se", "inc", "model"])

# Scratch of one thread (allocated in Python: the kernels run without Numba's reference counting,
# which cost more than the detector's own arithmetic, so they must not allocate)
Work = collections.namedtuple("Work", ["xs", "tg", "acts", "das", "hs", "cs", "masks", "rec", "bufs", "grad", "gates",
                                       "buf", "season", "acc", "count", "mean", "wt"])


def make_work(st, accumulators: int = 1) -> Work:
    T, I = st.model.ring_x.shape[1:]
    L, H = st.model.ring_h.shape[2:]
    P = st.model.theta.shape[1]
    O = st.model.pred.shape[1]
    dt = st.model.theta.dtype
    return Work(
        np.empty((T, I), dt), np.empty((T, O), dt), np.empty((T, L, 5, H), dt), np.empty((T, L, 4 * H), dt),
        np.empty((T + 1, L, H), dt),
        np.empty((T + 1, L, H), dt), np.ones((T, L, H), dt), np.empty((2, L, H), dt), np.empty((5, max(4 * H, I)), dt),
        np.empty(P, dt), np.empty(4 * H, dt), np.empty(max(H, I), dt), np.empty(max(st.se.periods.shape[0], 1)),
        np.zeros((accumulators, P), dt), np.zeros(accumulators, np.int64),
        np.empty(P, dt), np.empty((L, 2, 4 * H, H), dt),
    )


# Per-reading outputs and what the scoring half carries to the learning half. The scalar ones
# are columns of three arrays (ROW_FLAGS, ROW_REALS, ROW_INTS; `row_columns` names them for the
# driver): 14 arrays instead of 36, since every array of a tuple argument is ~8 LLVM arguments
# at each call and in each function's prologue.
Rows = collections.namedtuple("Rows", [
    "prediction", "residual", "score", "alert", "is_anomaly", "band", "loss",  # the BatchResult's own arrays
    "z", "std", "season_smoothed", "season_ok", "flags", "reals", "ints",
])
ROW_FLAGS = ("opened", "closed", "accepted", "gap_closed", "reset_clock", "reset_gap", "reset_nonfinite",
             "reset_implausible", "learn", "suspicious", "has_pred")
ROW_REALS = ("gap_end", "gap_peak", "gap_peak_ts", "inc_peak", "inc_peak_ts", "weight", "smoothed", "range_smoothed",
             "extra")
ROW_INTS = ("reason", "fired", "gap_length", "inc_length", "tstatus")
(RF_OPENED, RF_CLOSED, RF_ACCEPTED, RF_GAP_CLOSED, RF_RESET_CLOCK, RF_RESET_GAP, RF_RESET_NONFINITE,
 RF_RESET_IMPLAUSIBLE, RF_LEARN, RF_SUSPICIOUS, RF_HAS_PRED) = range(len(ROW_FLAGS))
(RR_GAP_END, RR_GAP_PEAK, RR_GAP_PEAK_TS, RR_INC_PEAK, RR_INC_PEAK_TS, RR_WEIGHT, RR_SMOOTHED, RR_RANGE_SMOOTHED,
 RR_EXTRA) = range(len(ROW_REALS))
RI_REASON, RI_FIRED, RI_GAP_LENGTH, RI_INC_LENGTH, RI_TSTATUS = range(len(ROW_INTS))


def make_rows(B, I, O, K, z_dtype, out) -> Rows:
    return Rows(out.prediction, out.residual, out.score, out.alert, out.is_anomaly, out.band, out.loss,
                np.zeros((B, I), z_dtype), np.zeros((B, O)), np.zeros((B, K)), np.zeros((B, K), np.bool_),
                np.zeros((B, len(ROW_FLAGS)), np.bool_), np.zeros((B, len(ROW_REALS))),
                np.zeros((B, len(ROW_INTS)), np.int64))


def row_columns(rw) -> dict:
    """Every per-reading output by name (the packed ones as column views)."""
    cols = rw._asdict()
    for names, packed in ((ROW_FLAGS, rw.flags), (ROW_REALS, rw.reals), (ROW_INTS, rw.ints)):
        cols.update((name, packed[:, i]) for i, name in enumerate(names))
    return cols


# --- scalar pieces (each mirrors one NumPy method named in its docstring) ------------------


@_jitable
def _std(sc, s, f, fp, ip):
    """RunningScaler.std / FixedScaler.std of one feature."""
    if ip[I_FIXED]:
        return fp[F_HALF]
    floor = max(fp[F_REL_FLOOR] * abs(sc.mean[s, f]), fp[F_ABS_FLOOR])
    return max(math.sqrt(sc.var[s, f]), floor)


@_jitable
def _mean(sc, s, f, fp, ip):
    if ip[I_FIXED]:
        return fp[F_CENTER]
    return sc.mean[s, f]


@_jitable
def _moments(lk, k, s, fp):
    """LikelihoodScorer._moments: (mean, sigma) of scorer k."""
    mean = min(lk.mean[k, s], lk.fmean[k, s])
    var = min(lk.var[k, s], lk.fvar[k, s])
    return mean, max(math.sqrt(var), fp[F_MIN_SCALE] + 0.1 * mean)


@_jitable
def _log10p(lk, k, s, raw, smooth_it, fp):
    """LikelihoodScorer.log10p (KSigmaScorer.log10p without smoothing): (-log10 p, smoothed)."""
    m = raw
    if smooth_it and lk.count[k, s] > 0:
        m = lk.smooth[k, s] + fp[F_A_SHORT] * (raw - lk.smooth[k, s])
    mean, sigma = _moments(lk, k, s, fp)
    return max(tail_log10((m - mean) / sigma), 0.0), m


@_jitable
def _scorer_update(lk, k, s, smoothed, w, fp):
    """LikelihoodScorer.update."""
    lk.smooth[k, s] = smoothed
    n = lk.count[k, s] + w
    exact = w / max(n, 1e-12) if n > 0 else 0.0
    a = max(exact, w / fp[F_LONG])
    delta = smoothed - lk.mean[k, s]
    lk.mean[k, s] += a * delta
    lk.var[k, s] = (1 - a) * (lk.var[k, s] + a * delta * delta)
    a = max(exact, w / fp[F_FAST])
    delta = smoothed - lk.fmean[k, s]
    lk.fmean[k, s] += a * delta
    lk.fvar[k, s] = (1 - a) * (lk.fvar[k, s] + a * delta * delta)
    lk.count[k, s] = min(n, fp[F_LONG])


@_jitable
def _scorer_reset(lk, k, s):
    lk.smooth[k, s] = min(lk.mean[k, s], lk.fmean[k, s])


@_jitable
def _peak_adjust(pk, k, s, L, armed, fp):
    """PeakReference.adjust."""
    floor = fp[F_PEAK_FLOOR]
    peak = pk.peak[k, s]
    out = max(L - max(peak - floor, 0.0), 0.0)
    decayed = peak - max(peak, floor) / fp[F_PEAK_WINDOW]
    if L <= floor:
        base = max(decayed, floor)
    else:
        base = max(pk.base[k, s], floor)
    if armed:
        pk.peak[k, s] = max(decayed, min(L, fp[F_PEAK_GROWTH] * base))
        pk.base[k, s] = base
    return out


@_jitable
def _stuck(stk, s, x, fp, ip):
    """StuckScorer.score_and_update, then score_to_log10 of its score."""
    same = True
    for f in range(x.shape[0]):
        if not (x[f] == stk.last[s, f]):
            same = False
    prev_run = stk.run[s]
    run = prev_run + 1.0 if same else 0.0
    reps = stk.repeats[s]
    total = stk.total[s]
    longest = stk.longest[s]
    p_rep = (reps + 1.0) / (total + 2.0)
    excess = max(run - longest, 0.0)
    q = min(excess * -math.log10(p_rep), fp[F_STUCK_MAX])
    score = 0.0
    if total >= ip[I_STUCK_MIN]:
        q = max(q, 0.0)
        score = q / (q + 5.0)
    ended = (not same) and prev_run > 0
    decay = fp[F_STUCK_DECAY]
    if ended:
        stk.longest[s] = max(longest * decay, prev_run)
    stk.repeats[s] = (reps + prev_run if ended else reps) * (1.0 if same else decay)
    if not same:
        stk.total[s] = (total + (prev_run if ended else 0.0)) * decay + 1.0
    stk.run[s] = run
    for f in range(x.shape[0]):
        stk.last[s, f] = x[f]
    sc = min(score, 1.0 - 1e-12)
    return 5.0 * sc / (1.0 - sc)


@_jitable
def _season_row(se, s, k, ts):
    """SeasonalProfiles._index: the pool row of this reading's phase bin, -1 if none."""
    off = se.offset[s, k]
    if off < 0:
        return -1
    nb = max(se.bins[s, k], 1)
    phase = np.int64(math.floor((ts % se.periods[k]) / se.width[s, k])) % nb
    return off + phase


@_jitable
def needs_profile(clock, se, s, ts):
    """SeasonalProfiles._enable's condition: a period of slot s is due and has no storage yet."""
    iv = clock.interval[s]
    for k in range(se.periods.shape[0]):
        p = se.periods[k]
        if se.offset[s, k] < 0 and ts - se.start[s] >= p and iv > 0 and p >= 4.0 * iv:
            return True
    return False


@_jitable
def _reset_model(model, lk, s):
    """ModelBank.reset_slot (host side) and the model scorer's reset: GroupDetector._reset."""
    reset_slot(s, model.h, model.c, model.ring_len, model.ring_pos, model.pred)
    model.since_train[s] = 0
    _scorer_reset(lk, 0, s)


@_jitable
def _rebase(sc, lk, s, x, fp, ip):
    """GroupDetector._rebase_level: re-centre the scale, restart the range smoothing."""
    if not ip[I_FIXED]:
        for f in range(x.shape[0]):
            sc.mean[s, f] = x[f]
        sc.count[s] = min(sc.count[s], float(ip[I_SCALING_WARMUP]))
    _scorer_reset(lk, 1, s)


# --- one reading: the scoring half ------------------------------------------------------


@_jitable
def admit(clock, s, ts, fp, ip):
    """ClockGuard.check and the duplicate/out-of-order test, without changing anything:
    (reason, re-base the clock, the slot's next behind-run and its last timestamp)."""
    ahead = False
    run = 0
    prev = -np.inf
    last = clock.last_ts[s]
    if fp[F_SKEW] > 0:
        limit = fp[F_NOW] + fp[F_SKEW]
        if ts > limit:
            return R_CLOCK_SKEW, False, 0, -np.inf
        ahead = last > limit
        if ts < last - fp[F_SKEW] and not ahead:
            run = clock.run[s] + 1 if ts > clock.prev[s] else 1
            if run >= ip[I_JUMP]:
                ahead = True
                run = 0
            else:
                prev = ts
        if ahead:
            last = ts - clock.interval[s] if clock.interval[s] > 0 else -np.inf
    if ts == last:
        return R_DUPLICATE, ahead, run, prev
    if ts < last:
        return R_LATE, ahead, run, prev
    return R_OK, ahead, run, prev


@_jitable
def profile_due(clock, se, s, ts, fp, ip):
    """An accepted reading whose seasonal storage must be allocated (by the driver) first."""
    return needs_profile(clock, se, s, ts) and admit(clock, s, ts, fp, ip)[0] == R_OK


@_jitable
def score_reading(b, s, ts, x, st, rw, fp, ip, season_raw):
    """Everything of GroupDetector._round up to the model step, for batch row b of slot s.
    Returns False when the reading is rejected."""
    clock, sc, lk, pk, stk, se, inc, md = st  # one load of each part (each st.part loads all of st)
    reason, ahead, run, prev = admit(clock, s, ts, fp, ip)
    if fp[F_SKEW] > 0:
        clock.run[s] = run
        clock.prev[s] = prev
        if ahead:
            clock.last_ts[s] = ts - clock.interval[s] if clock.interval[s] > 0 else -np.inf
            rw.flags[b, RF_RESET_CLOCK] = True
    if reason != R_OK:
        rw.ints[b, RI_REASON] = reason
        return False
    last = clock.last_ts[s]

    # GroupDetector._gap_resets
    if fp[F_GAP] > 0:
        dt = ts - last
        iv = clock.interval[s]
        if clock.seen[s] >= 5 and iv > 0 and dt > fp[F_GAP] * iv:
            if dt > fp[F_HORIZON] * iv:
                _rebase(sc, lk, s, x, fp, ip)
            rw.flags[b, RF_RESET_GAP] = True
            _reset_model(md, lk, s)
            if inc.open[s]:
                inc.open[s] = False
                inc.above[s] = 0
                rw.flags[b, RF_GAP_CLOSED] = True
                rw.reals[b, RR_GAP_END] = last
                rw.reals[b, RR_GAP_PEAK] = inc.peak[s]
                rw.reals[b, RR_GAP_PEAK_TS] = inc.peak_ts[s]
                rw.ints[b, RI_GAP_LENGTH] = inc.length[s]

    I = x.shape[0]
    O = md.pred.shape[1]
    tlo = ip[I_TARGET_LO]
    for f in range(I):
        rw.z[b, f] = (x[f] - _mean(sc, s, f, fp, ip)) / _std(sc, s, f, fp, ip)
    has_pred = md.ring_len[s] > 0
    rw.flags[b, RF_HAS_PRED] = has_pred
    clip = fp[F_SCORE_CLIP]
    raw = 0.0
    target_max = 0.0
    for o in range(O):
        # evidence on the reading as it is (float64, unclipped up to SCORE_CLIP); the model
        # gets the float32 copy
        sd = _std(sc, s, tlo + o, fp, ip)
        rw.std[b, o] = sd
        t = (x[tlo + o] - _mean(sc, s, tlo + o, fp, ip)) / sd
        t = min(max(t, -clip), clip)
        raw = max(raw, abs(t - md.pred[s, o]))
        target_max = max(target_max, abs(t))
        rw.prediction[b, o] = md.pred[s, o]  # scaled; made sensor units in the learning half
    if not has_pred:
        raw = 0.0
    seen = clock.seen[s]
    armed = seen >= ip[I_WARMUP]
    live = armed and has_pred

    # seasonal residuals (GroupDetector._seasonal_residuals): the smallest explains
    K = se.periods.shape[0]
    explained = np.inf
    for k in range(K):
        row = _season_row(se, s, k, ts)
        ok = row >= 0
        worst = 0.0
        if ok:
            for o in range(O):
                e = se.pool[row, o]
                if math.isnan(e):
                    ok = False
                else:
                    d = (x[tlo + o] - e) / rw.std[b, o]
                    worst = max(worst, abs(min(max(d, -clip), clip)))
        season_raw[k] = worst if ok else 0.0
        rw.season_ok[b, k] = ok
        if ok:
            explained = min(explained, worst)
    raw = min(raw, explained)
    L, smoothed = _log10p(lk, 0, s, raw, not ip[I_KSIGMA], fp)
    rw.reals[b, RR_SMOOTHED] = smoothed
    season_L = 0.0
    for k in range(K):
        Lk, smk = _log10p(lk, 2 + k, s, season_raw[k], True, fp)
        rw.season_smoothed[b, k] = smk
        if rw.season_ok[b, k] and lk.count[2 + k, s] >= ip[I_BASELINE]:
            season_L = max(season_L, Lk)
    range_L, range_sm = _log10p(lk, 1, s, min(target_max, explained), True, fp)
    rw.reals[b, RR_RANGE_SMOOTHED] = range_sm
    if lk.count[1, s] < ip[I_BASELINE]:
        range_L = 0.0
    ch0 = L if (live and ip[I_CH_MODEL]) else 0.0
    ch1 = season_L if ip[I_CH_SEASONAL] else 0.0
    ch2 = range_L if (armed and ip[I_CH_RANGE]) else 0.0
    evidence = max(ch0, max(ch1, ch2)) if live else 0.0
    extra = 0.0
    if ip[I_HAS_PEAKS]:
        extra = max(pk.peak[0, s] - fp[F_PEAK_FLOOR], 0.0)
        mature = armed and lk.count[0, s] >= ip[I_PEAK_BASELINE]
        ch0 = _peak_adjust(pk, 0, s, ch0, mature, fp)
        ch1 = _peak_adjust(pk, 1, s, ch1, mature, fp)
        ch2 = _peak_adjust(pk, 2, s, ch2, mature, fp)
    rw.reals[b, RR_EXTRA] = extra
    ch3 = _stuck(stk, s, x, fp, ip) if ip[I_HAS_STUCK] else 0.0
    if not live:
        ch0 = ch1 = ch2 = ch3 = 0.0
    top = ch0
    fired = 0
    if ch1 > top:
        top, fired = ch1, 1
    if ch2 > top:
        top, fired = ch2, 2
    if ch3 > top:
        top, fired = ch3, 3
    top = max(top, 0.0)
    score = top / (top + 5.0)
    rw.score[b] = score
    rw.ints[b, RI_FIRED] = fired

    # IncidentFilter.step
    thr = fp[F_THRESHOLD]
    above = inc.above[s] + 1 if (score >= thr and armed) else 0
    was_open = inc.open[s]
    cool = max(inc.cooldown[s] - 1, 0)
    opened = (not was_open) and above >= ip[I_MIN_DURATION] and cool == 0
    closed = was_open and score < fp[F_RELEASE]
    now_open = (was_open and not closed) or opened
    if opened or (now_open and score > inc.peak[s]):
        inc.peak_ts[s] = ts
        inc.peak[s] = score
    if opened:
        inc.length[s] = 1
    elif now_open:
        inc.length[s] += 1
    inc.cooldown[s] = ip[I_COOLDOWN] if closed else cool
    inc.above[s] = above
    inc.open[s] = now_open
    rw.reals[b, RR_INC_PEAK] = inc.peak[s]
    rw.reals[b, RR_INC_PEAK_TS] = inc.peak_ts[s]
    rw.ints[b, RI_INC_LENGTH] = inc.length[s]
    # GroupDetector._accept
    accepted = False
    if ip[I_ACCEPT_AFTER] > 0 and now_open and not opened and inc.length[s] >= ip[I_ACCEPT_AFTER]:
        accepted = True
        inc.open[s] = False
        inc.above[s] = 0
        inc.cooldown[s] = ip[I_COOLDOWN]
    rw.flags[b, RF_OPENED] = opened
    rw.flags[b, RF_CLOSED] = closed or accepted
    rw.flags[b, RF_ACCEPTED] = accepted
    rw.is_anomaly[b] = now_open
    # GroupDetector._alert
    peak = clock.alert_peak[s]
    rw.alert[b] = score if (score > peak and (opened or not now_open)) else 0.0
    decayed = peak if now_open else peak - 1.0 / max(ip[I_COOLDOWN], 1)
    clock.alert_peak[s] = max(score, decayed)

    suspicious = now_open or score >= min(thr, fp[F_PROTECT_SCORE]) or evidence >= fp[F_PROTECT_LOG10]
    weight = 1.0
    if suspicious and ip[I_PROTECTION] == 1:
        weight = 0.0
    elif suspicious and ip[I_PROTECTION] == 2:
        weight = fp[F_DAMP]
    rw.flags[b, RF_SUSPICIOUS] = suspicious
    rw.reals[b, RR_WEIGHT] = weight
    rw.flags[b, RF_LEARN] = seen >= ip[I_SCALING_WARMUP]
    return True


# --- one reading: the model step (ModelBank.step) -------------------------------------------


@_jitable
def train_weight(b, s, model, rw, ip):
    """Count the reading towards `train_every`: the weight to train on the window with now
    (0: not due, not learning, or no window yet)."""
    model.since_train[s] += 1
    due = model.since_train[s] >= ip[I_TRAIN_EVERY]
    if due:
        model.since_train[s] = 0
    rw.loss[b] = np.nan
    rw.ints[b, RI_TSTATUS] = 0
    if not (due and rw.flags[b, RF_LEARN]) or model.ring_len[s] == 0:
        return 0.0
    return rw.reals[b, RR_WEIGHT]  # 1, damp_factor or 0: training when > 0


@_jitable
def train_update(b, s, model, rw, ip, grad, acc, count, ch, scale, step):
    """After the window's gradient (at Adam step `step`): per-sensor weights update now; shared
    weights accumulate the gradient into acc[ch] / count[ch] (the driver applies one update per
    segment)."""
    if ip[I_SHARED]:
        if not all_finite(grad):
            rw.ints[b, RI_TSTATUS] = STATUS_SKIPPED
            return
        for k in range(grad.shape[0]):
            acc[ch, k] += scale * grad[k]
        count[ch] += 1
    elif apply_update(model.theta[s], model.m[s], model.v[s], grad, step, model.hp[HP_LR] * scale, model.hp,
                      model.ip[IP_OPTIMIZER]):
        model.adam_t[s] = step
    else:
        rw.ints[b, RI_TSTATUS] = STATUS_SKIPPED


# --- one reading: the learning half -------------------------------------------------------


@_jitable
def learn_reading(b, s, ts, x, st, rw, fp, ip, fstatus):
    """The rest of GroupDetector._round after the model's step (training, then the forward
    with status fstatus): the scale, score baselines and profiles learn; outputs in sensor
    units; resets."""
    clock, sc, lk, pk, stk, se, inc, md = st  # one load of each part (each st.part loads all of st)
    if fstatus == STATUS_RESET:
        md.since_train[s] = 0
    I = x.shape[0]
    O = md.pred.shape[1]
    tlo = ip[I_TARGET_LO]
    weight = rw.reals[b, RR_WEIGHT]
    learn = rw.flags[b, RF_LEARN]
    is_anomaly = rw.is_anomaly[b]

    # RunningScaler.update (with its implausibility check)
    implausible = False
    if not ip[I_FIXED]:
        w = 0.0 if rw.flags[b, RF_SUSPICIOUS] else 1.0
        count = sc.count[s]
        first = count == 0
        if first:
            for f in range(I):
                sc.mean[s, f] = x[f]
        n = count + w
        alpha = w / max(n, 1e-12) if n > 0 else 0.0
        alpha = max(alpha, w / fp[F_HORIZON])
        if first:
            alpha = 0.0
        for f in range(I):
            mean = sc.mean[s, f]
            delta = x[f] - mean
            spread = math.sqrt(sc.var[s, f])
            floor = max(fp[F_REL_FLOOR] * abs(mean), fp[F_ABS_FLOOR])
            if count >= ROBUST_AFTER and spread > floor:
                limit = CLIP_K * spread
                delta = min(max(delta, -limit), limit)
            sc.mean[s, f] = mean + alpha * delta
            sc.var[s, f] = (1 - alpha) * (sc.var[s, f] + alpha * delta * delta)
        sc.count[s] = min(n, fp[F_HORIZON])
        for f in range(I):  # RunningScaler._check
            change = abs(x[f] - sc.prev[s, f])
            sc.prev[s, f] = x[f]
            nd = sc.ndiff[s, f]
            if math.isfinite(change) and change > 0:
                nd = min(nd + 1, DIFF_HORIZON)
                sc.logdiff[s, f] += (math.log(change) - sc.logdiff[s, f]) / max(nd, 1)
            sc.ndiff[s, f] = nd
            mean = sc.mean[s, f]
            std = max(math.sqrt(sc.var[s, f]), max(fp[F_REL_FLOOR] * abs(mean), fp[F_ABS_FLOOR]))
            if not math.isfinite(mean) or not math.isfinite(std):
                implausible = True
            elif nd >= DIFF_MIN and sc.logdiff[s, f] < math.log(std) - LOG_IMPLAUSIBLE:
                implausible = True
        if implausible:
            for f in range(I):
                sc.mean[s, f] = 0.0
                sc.var[s, f] = 0.0
            sc.count[s] = 0.0

    _scorer_update(lk, 1, s, rw.reals[b, RR_RANGE_SMOOTHED], weight if (learn and not is_anomaly) else 0.0, fp)
    if rw.flags[b, RF_ACCEPTED]:
        _rebase(sc, lk, s, x, fp, ip)
    _scorer_update(lk, 0, s, rw.reals[b, RR_SMOOTHED], weight if (rw.flags[b, RF_HAS_PRED] and learn) else 0.0, fp)

    # SeasonalProfiles.update (storage was allocated by the driver before this reading)
    K = se.periods.shape[0]
    if K > 0:
        for k in range(K):
            _scorer_update(lk, 2 + k, s, rw.season_smoothed[b, k],
                           weight if (rw.season_ok[b, k] and learn) else 0.0, fp)
        w = weight if (learn and not is_anomaly) else 0.0
        iv = clock.interval[s]
        for k in range(K):
            row = _season_row(se, s, k, ts)
            if row < 0:
                continue
            per_visit = max(se.width[s, k] / max(iv, 1e-9), 1.0)
            a = (1.0 - (1.0 - fp[F_SEASON_ALPHA]) ** (1.0 / per_visit)) * w
            for o in range(O):
                old = np.float64(se.pool[row, o])
                v = x[tlo + o]
                if math.isnan(old):
                    new = v if w > 0 else np.nan
                else:
                    new = old + a * (v - old)
                se.pool[row, o] = new
        if math.isnan(se.start[s]):
            se.start[s] = ts

    # interval and clock of the sensor
    clock.seen[s] += 1
    dt = ts - clock.last_ts[s]
    if math.isfinite(dt):
        if clock.interval[s] == 0:
            clock.interval[s] = dt
        else:
            a = 0.5 if clock.seen[s] <= 5 else 0.05
            clock.interval[s] += a * (dt - clock.interval[s])
    clock.last_ts[s] = ts

    # outputs in sensor units (with the scale as it is now, as the NumPy path)
    L0 = fp[F_BAND_L0] + rw.reals[b, RR_EXTRA]
    mean, sigma = _moments(lk, 0, s, fp)
    z = fp[F_BAND_Z0] if rw.reals[b, RR_EXTRA] == 0.0 else z_for_tail(10.0 ** -L0)
    band = mean + z * sigma
    for o in range(O):
        p = rw.prediction[b, o] * _std(sc, s, tlo + o, fp, ip) + _mean(sc, s, tlo + o, fp, ip)
        if rw.flags[b, RF_HAS_PRED]:
            rw.prediction[b, o] = p
            rw.residual[b, o] = x[tlo + o] - p
        else:
            rw.prediction[b, o] = np.nan
            rw.residual[b, o] = np.nan
        rw.band[b, o] = band * rw.std[b, o]
    if max(rw.ints[b, RI_TSTATUS], fstatus) == STATUS_RESET:
        rw.flags[b, RF_RESET_NONFINITE] = True
        _reset_model(md, lk, s)
    if implausible:
        rw.flags[b, RF_RESET_IMPLAUSIBLE] = True
        _reset_model(md, lk, s)
        clock.seen[s] = 0


# --- walks -----------------------------------------------------------------------------------
# Entry points compile without reference counting (_nrt=False): nothing below allocates.
# error_model="numpy": no divide-by-zero exception checks, which keep the activations' loops
# scalar (replay of one series measured 77k -> 97k readings/s); every division here is guarded
# (scales have floors, counts are >= 1), and a zero would give inf/NaN, which the pass checks.
_PASS = dict(cache=True, nogil=True, _nrt=False, error_model="numpy", no_cfunc_wrapper=True)


@njit(**_PASS)
def walk(lo, hi, segment, phase, r_from, r_to, update, order, first, nread, slots, progress, stop, ts, values, st,
         rw, fp, ip, wk, ch):
    """Sensors lo..hi (sorted by reading count, most first) walk their readings of rounds
    r_from..r_to, segment by segment (a segment ends after round r when r + 1 + phase is a
    multiple of `segment`), each from progress[j]. Per-sensor weights: sensors are independent
    (one segment spans the batch). Shared weights: the weights stay fixed within a segment and
    the windows' gradients add up in wk.acc[ch]; with `update` a segment's update follows it
    here (one thread), otherwise the driver makes it once all threads are through
    (`segment_update`); sums of a segment that goes on in the next batch stay pending.

    Stops at a reading whose seasonal storage must be allocated first (stop[j] marks it) and
    returns the start of that segment (to resume it from there), or r_to when done."""
    r_end = min(r_from - (r_from + phase) % segment + segment, r_to)
    while r_from < r_to:
        for j in range(lo, hi):
            if nread[j] <= r_from:
                break  # sorted by count: no later sensor has readings in this segment
            s = slots[j]
            n = min(nread[j], r_end)
            r = progress[j]
            while r < n:
                b = order[first[j] + r]
                if profile_due(st.clock, st.se, s, ts[b], fp, ip):
                    stop[j] = True
                    break
                if score_reading(b, s, ts[b], values[b], st, rw, fp, ip, wk.season):
                    # The model step (ModelBank.step): train when due, then the forward. The two
                    # big kernels are called from here, not from helpers: each jitted level
                    # compiles (optimises and emits) everything below it again.
                    md = st.model
                    row = 0 if ip[I_SHARED] else s
                    scale = train_weight(b, s, md, rw, ip)
                    if scale > 0.0:
                        step = md.adam_t[row] + 1
                        rw.loss[b] = window_grad(
                            md.theta[row], md.offs, md.hp, md.ip, step, s, md.ring_x, md.ring_h, md.ring_c,
                            md.ring_pos[s], md.ring_len[s], rw.z[b], wk.grad, wk.xs, wk.tg, wk.acts, wk.das, wk.hs,
                            wk.cs, wk.masks, wk.rec, wk.bufs, wk.wt,
                        )
                        train_update(b, s, md, rw, ip, wk.grad, wk.acc, wk.count, ch, scale, step)
                    fstatus = push_and_forward(s, rw.z[b], md.theta[row], md.offs, fp[F_INPUT_CLIP], md.h, md.c,
                                               md.ring_x, md.ring_h, md.ring_c, md.ring_pos, md.ring_len, md.pred,
                                               wk.gates, wk.buf)
                    learn_reading(b, s, ts[b], values[b], st, rw, fp, ip, fstatus)
                r += 1
            progress[j] = r
        for j in range(lo, hi):
            if stop[j]:
                return r_from
        if update and (r_end + phase) % segment == 0:
            _segment_update(st.model, wk.acc, wk.count, wk.mean, True)
        r_from = r_end
        r_end = min(r_end + segment, r_to)
    return r_to


@_jitable
def _segment_update(model, acc, count, mean, apply):
    """The threads' gradient sums join the pending sum (model.grad_sum, which a segment left
    unfinished by the previous batch started); with `apply` the segment is over: one update
    from the mean, and nothing is pending."""
    P = model.grad_sum.shape[1]
    for ch in range(count.shape[0]):
        if count[ch]:
            for k in range(P):
                model.grad_sum[0, k] += acc[ch, k]
                acc[ch, k] = 0.0
            model.grad_count[0] += count[ch]
            count[ch] = 0
    if apply:
        shared_update(model.theta, model.m, model.v, model.adam_t, model.hp, model.ip, model.grad_sum, model.grad_count,
                      mean)


@njit(**_PASS)
def segment_update(model, acc, count, mean, apply):
    _segment_update(model, acc, count, mean, apply)
