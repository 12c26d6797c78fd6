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

State = collections.namedtuple("State", [
    "last_ts", "interval", "seen", "alert_peak", "clock_run", "clock_prev",
    "sc_mean", "sc_var", "sc_count", "sc_prev", "sc_logdiff", "sc_ndiff",
    "lk_smooth", "lk_mean", "lk_var", "lk_fmean", "lk_fvar", "lk_count",  # (2 + K, S) rows: model, range, seasons
    "pk_peak", "pk_base",  # (3, S) rows: model, seasonal, range
    "st_last", "st_run", "st_longest", "st_repeats", "st_total",
    "se_start", "se_offset", "se_bins", "se_width", "se_pool", "se_periods",
    "in_above", "in_open", "in_cooldown", "in_peak", "in_peak_ts", "in_length",
    "theta", "m", "v", "adam_t", "h", "c", "ring_x", "ring_h", "ring_c", "ring_pos", "ring_len", "pred",
    "since_train", "offs", "hp", "ip", "grad_sum", "grad_count",  # shared: the segment's pending sum
])

# Scratch of one thread (allocated in Python: the kernels run without Numba's reference counting,
# which cost more than the detector's own arithmetic, so they must not allocate)
Work = collections.namedtuple("Work", ["xs", "tg", "acts", "das", "hs", "cs", "masks", "rec", "bufs", "grad", "gates",
                                       "buf", "season", "acc", "count", "mean", "wt"])


def make_work(st, accumulators: int = 1) -> Work:
    T, I = st.ring_x.shape[1:]
    L, H = st.ring_h.shape[2:]
    P = st.theta.shape[1]
    O = st.pred.shape[1]
    dt = st.theta.dtype
    return Work(
        np.empty((T, I), dt), np.empty((T, O), dt), np.empty((T, L, 5, H), dt), np.empty((T, L, 4 * H), dt),
        np.empty((T + 1, L, H), dt),
        np.empty((T + 1, L, H), dt), np.ones((T, L, H), dt), np.empty((2, L, H), dt), np.empty((5, max(4 * H, I)), dt),
        np.empty(P, dt), np.empty(4 * H, dt), np.empty(max(H, I), dt), np.empty(max(st.se_periods.shape[0], 1)),
        np.zeros((accumulators, P), dt), np.zeros(accumulators, np.int64),
        np.empty(P, dt), np.empty((L, 2, 4 * H, H), dt),
    )


Rows = collections.namedtuple("Rows", [
    "reason", "prediction", "residual", "score", "alert", "is_anomaly", "band", "loss",
    "fired", "opened", "closed", "accepted", "gap_closed", "gap_end", "gap_peak", "gap_peak_ts", "gap_length",
    "inc_peak", "inc_peak_ts", "inc_length",
    "reset_clock", "reset_gap", "reset_nonfinite", "reset_implausible",
    # carried from the scoring half to the learning half of a reading
    "z", "weight", "learn", "suspicious", "has_pred", "smoothed", "range_smoothed", "season_smoothed",
    "season_ok", "std", "extra", "tstatus",
])


# --- scalar pieces (each mirrors one NumPy method named in its docstring) ------------------


@register_jitable
def _std(st, s, f, fp, ip):
    """RunningScaler.std / FixedScaler.std of one feature."""
    if ip[I_FIXED]:
        return fp[F_HALF]
    floor = max(fp[F_REL_FLOOR] * abs(st.sc_mean[s, f]), fp[F_ABS_FLOOR])
    return max(math.sqrt(st.sc_var[s, f]), floor)


@register_jitable
def _mean(st, s, f, fp, ip):
    if ip[I_FIXED]:
        return fp[F_CENTER]
    return st.sc_mean[s, f]


@register_jitable
def _moments(st, k, s, fp):
    """LikelihoodScorer._moments: (mean, sigma) of scorer k."""
    mean = min(st.lk_mean[k, s], st.lk_fmean[k, s])
    var = min(st.lk_var[k, s], st.lk_fvar[k, s])
    return mean, max(math.sqrt(var), fp[F_MIN_SCALE] + 0.1 * mean)


@register_jitable
def _log10p(st, k, s, raw, smooth_it, fp):
    """LikelihoodScorer.log10p (KSigmaScorer.log10p without smoothing): (-log10 p, smoothed)."""
    m = raw
    if smooth_it and st.lk_count[k, s] > 0:
        m = st.lk_smooth[k, s] + fp[F_A_SHORT] * (raw - st.lk_smooth[k, s])
    mean, sigma = _moments(st, k, s, fp)
    return max(tail_log10((m - mean) / sigma), 0.0), m


@register_jitable
def _scorer_update(st, k, s, smoothed, w, fp):
    """LikelihoodScorer.update."""
    st.lk_smooth[k, s] = smoothed
    n = st.lk_count[k, s] + w
    exact = w / max(n, 1e-12) if n > 0 else 0.0
    a = max(exact, w / fp[F_LONG])
    delta = smoothed - st.lk_mean[k, s]
    st.lk_mean[k, s] += a * delta
    st.lk_var[k, s] = (1 - a) * (st.lk_var[k, s] + a * delta * delta)
    a = max(exact, w / fp[F_FAST])
    delta = smoothed - st.lk_fmean[k, s]
    st.lk_fmean[k, s] += a * delta
    st.lk_fvar[k, s] = (1 - a) * (st.lk_fvar[k, s] + a * delta * delta)
    st.lk_count[k, s] = min(n, fp[F_LONG])


@register_jitable
def _scorer_reset(st, k, s):
    st.lk_smooth[k, s] = min(st.lk_mean[k, s], st.lk_fmean[k, s])


@register_jitable
def _peak_adjust(st, k, s, L, armed, fp):
    """PeakReference.adjust."""
    floor = fp[F_PEAK_FLOOR]
    peak = st.pk_peak[k, s]
    out = max(L - max(peak - floor, 0.0), 0.0)
    decayed = peak - max(peak, floor) / fp[F_PEAK_WINDOW]
    if L <= floor:
        base = max(decayed, floor)
    else:
        base = max(st.pk_base[k, s], floor)
    if armed:
        st.pk_peak[k, s] = max(decayed, min(L, fp[F_PEAK_GROWTH] * base))
        st.pk_base[k, s] = base
    return out


@register_jitable
def _stuck(st, s, x, fp, ip):
    """StuckScorer.score_and_update, then score_to_log10 of its score."""
    same = True
    for f in range(x.shape[0]):
        if not (x[f] == st.st_last[s, f]):
            same = False
    prev_run = st.st_run[s]
    run = prev_run + 1.0 if same else 0.0
    reps = st.st_repeats[s]
    total = st.st_total[s]
    longest = st.st_longest[s]
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
        st.st_longest[s] = max(longest * decay, prev_run)
    st.st_repeats[s] = (reps + prev_run if ended else reps) * (1.0 if same else decay)
    if not same:
        st.st_total[s] = (total + (prev_run if ended else 0.0)) * decay + 1.0
    st.st_run[s] = run
    for f in range(x.shape[0]):
        st.st_last[s, f] = x[f]
    sc = min(score, 1.0 - 1e-12)
    return 5.0 * sc / (1.0 - sc)


@register_jitable
def _season_row(st, s, k, ts):
    """SeasonalProfiles._index: the pool row of this reading's phase bin, -1 if none."""
    off = st.se_offset[s, k]
    if off < 0:
        return -1
    nb = max(st.se_bins[s, k], 1)
    phase = np.int64(math.floor((ts % st.se_periods[k]) / st.se_width[s, k])) % nb
    return off + phase


@register_jitable
def needs_profile(st, s, ts):
    """SeasonalProfiles._enable's condition: a period of slot s is due and has no storage yet."""
    iv = st.interval[s]
    for k in range(st.se_periods.shape[0]):
        p = st.se_periods[k]
        if st.se_offset[s, k] < 0 and ts - st.se_start[s] >= p and iv > 0 and p >= 4.0 * iv:
            return True
    return False


@register_jitable
def _reset_model(st, s):
    """ModelBank.reset_slot (host side) and the model scorer's reset: GroupDetector._reset."""
    reset_slot(s, st.h, st.c, st.ring_len, st.ring_pos, st.pred)
    st.since_train[s] = 0
    _scorer_reset(st, 0, s)


@register_jitable
def _rebase(st, s, x, fp, ip):
    """GroupDetector._rebase_level: re-centre the scale, restart the range smoothing."""
    if not ip[I_FIXED]:
        for f in range(x.shape[0]):
            st.sc_mean[s, f] = x[f]
        st.sc_count[s] = min(st.sc_count[s], float(ip[I_SCALING_WARMUP]))
    _scorer_reset(st, 1, s)


# --- one reading: the scoring half ------------------------------------------------------


@register_jitable
def admit(st, s, ts, fp, ip):
    """ClockGuard.check and the duplicate/out-of-order test, without changing anything:
    (reason, re-base the clock, the slot's next behind-run and its last timestamp)."""
    ahead = False
    run = 0
    prev = -np.inf
    last = st.last_ts[s]
    if fp[F_SKEW] > 0:
        limit = fp[F_NOW] + fp[F_SKEW]
        if ts > limit:
            return R_CLOCK_SKEW, False, 0, -np.inf
        ahead = last > limit
        if ts < last - fp[F_SKEW] and not ahead:
            run = st.clock_run[s] + 1 if ts > st.clock_prev[s] else 1
            if run >= ip[I_JUMP]:
                ahead = True
                run = 0
            else:
                prev = ts
        if ahead:
            last = ts - st.interval[s] if st.interval[s] > 0 else -np.inf
    if ts == last:
        return R_DUPLICATE, ahead, run, prev
    if ts < last:
        return R_LATE, ahead, run, prev
    return R_OK, ahead, run, prev


@register_jitable
def profile_due(st, s, ts, fp, ip):
    """An accepted reading whose seasonal storage must be allocated (by the driver) first."""
    return needs_profile(st, s, ts) and admit(st, s, ts, fp, ip)[0] == R_OK


@register_jitable
def score_reading(b, s, ts, x, st, rw, fp, ip, wk):
    """Everything of GroupDetector._round up to the model step, for batch row b of slot s.
    Returns False when the reading is rejected."""
    reason, ahead, run, prev = admit(st, s, ts, fp, ip)
    if fp[F_SKEW] > 0:
        st.clock_run[s] = run
        st.clock_prev[s] = prev
        if ahead:
            st.last_ts[s] = ts - st.interval[s] if st.interval[s] > 0 else -np.inf
            rw.reset_clock[b] = True
    if reason != R_OK:
        rw.reason[b] = reason
        return False
    last = st.last_ts[s]

    # GroupDetector._gap_resets
    if fp[F_GAP] > 0:
        dt = ts - last
        iv = st.interval[s]
        if st.seen[s] >= 5 and iv > 0 and dt > fp[F_GAP] * iv:
            if dt > fp[F_HORIZON] * iv:
                _rebase(st, s, x, fp, ip)
            rw.reset_gap[b] = True
            _reset_model(st, s)
            if st.in_open[s]:
                st.in_open[s] = False
                st.in_above[s] = 0
                rw.gap_closed[b] = True
                rw.gap_end[b] = last
                rw.gap_peak[b] = st.in_peak[s]
                rw.gap_peak_ts[b] = st.in_peak_ts[s]
                rw.gap_length[b] = st.in_length[s]

    I = x.shape[0]
    O = st.pred.shape[1]
    tlo = ip[I_TARGET_LO]
    for f in range(I):
        rw.z[b, f] = (x[f] - _mean(st, s, f, fp, ip)) / _std(st, s, f, fp, ip)
    has_pred = st.ring_len[s] > 0
    rw.has_pred[b] = has_pred
    clip = fp[F_SCORE_CLIP]
    raw = 0.0
    target_max = 0.0
    for o in range(O):
        # evidence on the reading as it is (float64, unclipped up to SCORE_CLIP); the model
        # gets the float32 copy
        sd = _std(st, s, tlo + o, fp, ip)
        rw.std[b, o] = sd
        t = (x[tlo + o] - _mean(st, s, tlo + o, fp, ip)) / sd
        t = min(max(t, -clip), clip)
        raw = max(raw, abs(t - st.pred[s, o]))
        target_max = max(target_max, abs(t))
        rw.prediction[b, o] = st.pred[s, o]  # scaled; made sensor units in the learning half
    if not has_pred:
        raw = 0.0
    seen = st.seen[s]
    armed = seen >= ip[I_WARMUP]
    live = armed and has_pred

    # seasonal residuals (GroupDetector._seasonal_residuals): the smallest explains
    K = st.se_periods.shape[0]
    explained = np.inf
    season_raw = wk.season
    for k in range(K):
        row = _season_row(st, s, k, ts)
        ok = row >= 0
        worst = 0.0
        if ok:
            for o in range(O):
                e = st.se_pool[row, o]
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
    L, smoothed = _log10p(st, 0, s, raw, not ip[I_KSIGMA], fp)
    rw.smoothed[b] = smoothed
    season_L = 0.0
    for k in range(K):
        Lk, smk = _log10p(st, 2 + k, s, season_raw[k], True, fp)
        rw.season_smoothed[b, k] = smk
        if rw.season_ok[b, k] and st.lk_count[2 + k, s] >= ip[I_BASELINE]:
            season_L = max(season_L, Lk)
    range_L, range_sm = _log10p(st, 1, s, min(target_max, explained), True, fp)
    rw.range_smoothed[b] = range_sm
    if st.lk_count[1, s] < ip[I_BASELINE]:
        range_L = 0.0
    ch0 = L if (live and ip[I_CH_MODEL]) else 0.0
    ch1 = season_L if ip[I_CH_SEASONAL] else 0.0
    ch2 = range_L if (armed and ip[I_CH_RANGE]) else 0.0
    evidence = max(ch0, max(ch1, ch2)) if live else 0.0
    extra = 0.0
    if ip[I_HAS_PEAKS]:
        extra = max(st.pk_peak[0, s] - fp[F_PEAK_FLOOR], 0.0)
        mature = armed and st.lk_count[0, s] >= ip[I_PEAK_BASELINE]
        ch0 = _peak_adjust(st, 0, s, ch0, mature, fp)
        ch1 = _peak_adjust(st, 1, s, ch1, mature, fp)
        ch2 = _peak_adjust(st, 2, s, ch2, mature, fp)
    rw.extra[b] = extra
    ch3 = _stuck(st, s, x, fp, ip) if ip[I_HAS_STUCK] else 0.0
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
    rw.fired[b] = fired

    # IncidentFilter.step
    thr = fp[F_THRESHOLD]
    above = st.in_above[s] + 1 if (score >= thr and armed) else 0
    was_open = st.in_open[s]
    cool = max(st.in_cooldown[s] - 1, 0)
    opened = (not was_open) and above >= ip[I_MIN_DURATION] and cool == 0
    closed = was_open and score < fp[F_RELEASE]
    now_open = (was_open and not closed) or opened
    if opened or (now_open and score > st.in_peak[s]):
        st.in_peak_ts[s] = ts
        st.in_peak[s] = score
    if opened:
        st.in_length[s] = 1
    elif now_open:
        st.in_length[s] += 1
    st.in_cooldown[s] = ip[I_COOLDOWN] if closed else cool
    st.in_above[s] = above
    st.in_open[s] = now_open
    rw.inc_peak[b] = st.in_peak[s]
    rw.inc_peak_ts[b] = st.in_peak_ts[s]
    rw.inc_length[b] = st.in_length[s]
    # GroupDetector._accept
    accepted = False
    if ip[I_ACCEPT_AFTER] > 0 and now_open and not opened and st.in_length[s] >= ip[I_ACCEPT_AFTER]:
        accepted = True
        st.in_open[s] = False
        st.in_above[s] = 0
        st.in_cooldown[s] = ip[I_COOLDOWN]
    rw.opened[b] = opened
    rw.closed[b] = closed or accepted
    rw.accepted[b] = accepted
    rw.is_anomaly[b] = now_open
    # GroupDetector._alert
    peak = st.alert_peak[s]
    rw.alert[b] = score if (score > peak and (opened or not now_open)) else 0.0
    decayed = peak if now_open else peak - 1.0 / max(ip[I_COOLDOWN], 1)
    st.alert_peak[s] = max(score, decayed)

    suspicious = now_open or score >= min(thr, fp[F_PROTECT_SCORE]) or evidence >= fp[F_PROTECT_LOG10]
    weight = 1.0
    if suspicious and ip[I_PROTECTION] == 1:
        weight = 0.0
    elif suspicious and ip[I_PROTECTION] == 2:
        weight = fp[F_DAMP]
    rw.suspicious[b] = suspicious
    rw.weight[b] = weight
    rw.learn[b] = seen >= ip[I_SCALING_WARMUP]
    return True


# --- one reading: the model step (ModelBank.step) -------------------------------------------


@register_jitable
def train_reading(b, s, st, rw, ip, wk, ch):
    """Count the reading towards `train_every`; train on the window when due. Shared weights
    accumulate the gradient into acc[ch] (the driver applies one update per segment)."""
    st.since_train[s] += 1
    due = st.since_train[s] >= ip[I_TRAIN_EVERY]
    if due:
        st.since_train[s] = 0
    rw.loss[b] = np.nan
    rw.tstatus[b] = 0
    scale = rw.weight[b] if (due and rw.learn[b]) else 0.0
    n = st.ring_len[s]
    if scale <= 0.0 or n == 0:
        return
    grad = wk.grad
    shared = ip[I_SHARED] != 0
    row = 0 if shared else s
    step = st.adam_t[row] + 1
    rw.loss[b] = window_grad(
        st.theta[row], st.offs, st.hp, st.ip, step, s, st.ring_x, st.ring_h, st.ring_c, st.ring_pos[s], n, rw.z[b],
        grad, wk.xs, wk.tg, wk.acts, wk.das, wk.hs, wk.cs, wk.masks, wk.rec, wk.bufs, wk.wt,
    )
    if shared:
        if not all_finite(grad):
            rw.tstatus[b] = STATUS_SKIPPED
            return
        for k in range(grad.shape[0]):
            wk.acc[ch, k] += scale * grad[k]
        wk.count[ch] += 1
    elif apply_update(st.theta[s], st.m[s], st.v[s], grad, step, st.hp[HP_LR] * scale, st.hp, st.ip[IP_OPTIMIZER]):
        st.adam_t[s] = step
    else:
        rw.tstatus[b] = STATUS_SKIPPED


# --- one reading: the learning half -------------------------------------------------------


@register_jitable
def learn_reading(b, s, ts, x, st, rw, fp, ip, wk):
    """The rest of GroupDetector._round after the model's training step: forward, then the
    scale, score baselines and profiles learn; outputs in sensor units; resets."""
    wrow = 0 if ip[I_SHARED] else s
    fstatus = push_and_forward(s, rw.z[b], st.theta[wrow], st.offs, fp[F_INPUT_CLIP], st.h, st.c, st.ring_x,
                               st.ring_h, st.ring_c, st.ring_pos, st.ring_len, st.pred, wk.gates, wk.buf)
    if fstatus == STATUS_RESET:
        st.since_train[s] = 0
    I = x.shape[0]
    O = st.pred.shape[1]
    tlo = ip[I_TARGET_LO]
    weight = rw.weight[b]
    learn = rw.learn[b]
    is_anomaly = rw.is_anomaly[b]

    # RunningScaler.update (with its implausibility check)
    implausible = False
    if not ip[I_FIXED]:
        w = 0.0 if rw.suspicious[b] else 1.0
        count = st.sc_count[s]
        first = count == 0
        if first:
            for f in range(I):
                st.sc_mean[s, f] = x[f]
        n = count + w
        alpha = w / max(n, 1e-12) if n > 0 else 0.0
        alpha = max(alpha, w / fp[F_HORIZON])
        if first:
            alpha = 0.0
        for f in range(I):
            mean = st.sc_mean[s, f]
            delta = x[f] - mean
            spread = math.sqrt(st.sc_var[s, f])
            floor = max(fp[F_REL_FLOOR] * abs(mean), fp[F_ABS_FLOOR])
            if count >= ROBUST_AFTER and spread > floor:
                limit = CLIP_K * spread
                delta = min(max(delta, -limit), limit)
            st.sc_mean[s, f] = mean + alpha * delta
            st.sc_var[s, f] = (1 - alpha) * (st.sc_var[s, f] + alpha * delta * delta)
        st.sc_count[s] = min(n, fp[F_HORIZON])
        for f in range(I):  # RunningScaler._check
            change = abs(x[f] - st.sc_prev[s, f])
            st.sc_prev[s, f] = x[f]
            nd = st.sc_ndiff[s, f]
            if math.isfinite(change) and change > 0:
                nd = min(nd + 1, DIFF_HORIZON)
                st.sc_logdiff[s, f] += (math.log(change) - st.sc_logdiff[s, f]) / max(nd, 1)
            st.sc_ndiff[s, f] = nd
            mean = st.sc_mean[s, f]
            std = max(math.sqrt(st.sc_var[s, f]), max(fp[F_REL_FLOOR] * abs(mean), fp[F_ABS_FLOOR]))
            if not math.isfinite(mean) or not math.isfinite(std):
                implausible = True
            elif nd >= DIFF_MIN and st.sc_logdiff[s, f] < math.log(std) - LOG_IMPLAUSIBLE:
                implausible = True
        if implausible:
            for f in range(I):
                st.sc_mean[s, f] = 0.0
                st.sc_var[s, f] = 0.0
            st.sc_count[s] = 0.0

    _scorer_update(st, 1, s, rw.range_smoothed[b], weight if (learn and not is_anomaly) else 0.0, fp)
    if rw.accepted[b]:
        _rebase(st, s, x, fp, ip)
    _scorer_update(st, 0, s, rw.smoothed[b], weight if (rw.has_pred[b] and learn) else 0.0, fp)

    # SeasonalProfiles.update (storage was allocated by the driver before this reading)
    K = st.se_periods.shape[0]
    if K > 0:
        for k in range(K):
            _scorer_update(st, 2 + k, s, rw.season_smoothed[b, k],
                           weight if (rw.season_ok[b, k] and learn) else 0.0, fp)
        w = weight if (learn and not is_anomaly) else 0.0
        iv = st.interval[s]
        for k in range(K):
            row = _season_row(st, s, k, ts)
            if row < 0:
                continue
            per_visit = max(st.se_width[s, k] / max(iv, 1e-9), 1.0)
            a = (1.0 - (1.0 - fp[F_SEASON_ALPHA]) ** (1.0 / per_visit)) * w
            for o in range(O):
                old = np.float64(st.se_pool[row, o])
                v = x[tlo + o]
                if math.isnan(old):
                    new = v if w > 0 else np.nan
                else:
                    new = old + a * (v - old)
                st.se_pool[row, o] = new
        if math.isnan(st.se_start[s]):
            st.se_start[s] = ts

    # interval and clock of the sensor
    st.seen[s] += 1
    dt = ts - st.last_ts[s]
    if math.isfinite(dt):
        if st.interval[s] == 0:
            st.interval[s] = dt
        else:
            a = 0.5 if st.seen[s] <= 5 else 0.05
            st.interval[s] += a * (dt - st.interval[s])
    st.last_ts[s] = ts

    # outputs in sensor units (with the scale as it is now, as the NumPy path)
    L0 = fp[F_BAND_L0] + rw.extra[b]
    mean, sigma = _moments(st, 0, s, fp)
    z = fp[F_BAND_Z0] if rw.extra[b] == 0.0 else z_for_tail(10.0 ** -L0)
    band = mean + z * sigma
    for o in range(O):
        p = rw.prediction[b, o] * _std(st, s, tlo + o, fp, ip) + _mean(st, s, tlo + o, fp, ip)
        if rw.has_pred[b]:
            rw.prediction[b, o] = p
            rw.residual[b, o] = x[tlo + o] - p
        else:
            rw.prediction[b, o] = np.nan
            rw.residual[b, o] = np.nan
        rw.band[b, o] = band * rw.std[b, o]
    if max(rw.tstatus[b], fstatus) == STATUS_RESET:
        rw.reset_nonfinite[b] = True
        _reset_model(st, s)
    if implausible:
        rw.reset_implausible[b] = True
        _reset_model(st, s)
        st.seen[s] = 0


# --- walks -----------------------------------------------------------------------------------
# Entry points compile without reference counting (_nrt=False): nothing below allocates.
# error_model="numpy": no divide-by-zero exception checks, which keep the activations' loops
# scalar (replay of one series measured 77k -> 97k readings/s); every division here is guarded
# (scales have floors, counts are >= 1), and a zero would give inf/NaN, which the pass checks.
_PASS = dict(cache=True, nogil=True, _nrt=False, error_model="numpy")


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
                if profile_due(st, s, ts[b], fp, ip):
                    stop[j] = True
                    break
                if score_reading(b, s, ts[b], values[b], st, rw, fp, ip, wk):
                    train_reading(b, s, st, rw, ip, wk, ch)
                    learn_reading(b, s, ts[b], values[b], st, rw, fp, ip, wk)
                r += 1
            progress[j] = r
        for j in range(lo, hi):
            if stop[j]:
                return r_from
        if update and (r_end + phase) % segment == 0:
            _segment_update(st, wk.acc, wk.count, wk.mean, True)
        r_from = r_end
        r_end = min(r_end + segment, r_to)
    return r_to


@register_jitable
def _segment_update(st, acc, count, mean, apply):
    """The threads' gradient sums join the pending sum (st.grad_sum, which a segment left
    unfinished by the previous batch started); with `apply` the segment is over: one update
    from the mean, and nothing is pending."""
    P = st.grad_sum.shape[1]
    for ch in range(count.shape[0]):
        if count[ch]:
            for k in range(P):
                st.grad_sum[0, k] += acc[ch, k]
                acc[ch, k] = 0.0
            st.grad_count[0] += count[ch]
            count[ch] = 0
    if apply:
        shared_update(st.theta, st.m, st.v, st.adam_t, st.hp, st.ip, st.grad_sum, st.grad_count, mean)


@njit(**_PASS)
def segment_update(st, acc, count, mean, apply):
    _segment_update(st, acc, count, mean, apply)
