"""Runs a GroupDetector's micro-batch through the compiled pass (compiled.py).

Python work per batch: sort the readings by sensor, hand the group's state arrays to one
kernel call (a few more when seasonal storage must be allocated), then turn the per-reading
flags into reasons, resets and events. The state arrays are the GroupDetector's own, so the
NumPy path and this one can take turns and checkpoints are the same.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
from numba import get_num_threads

from ..lstm_math import hyper_arrays
from . import compiled as k
from .scores import HALF_L, z_for_tail

REASONS = {k.R_CLOCK_SKEW: "clock_skew", k.R_DUPLICATE: "duplicate_timestamp",
           k.R_LATE: "out_of_order"}


class CompiledPass:
    def __init__(self, group):
        from .group import PEAK_BASELINE, PROTECT_LOG10, PROTECT_SCORE, SCORE_CLIP
        from .scaling import FixedScaler

        self.group = g = group
        s = g.settings
        spec = g.spec
        fp = np.zeros(k.F_SIZE)
        ip = np.zeros(k.I_SIZE, np.int64)
        fp[k.F_THRESHOLD] = g.threshold
        fp[k.F_RELEASE] = g.incidents.release
        fp[k.F_A_SHORT] = g.range_scorer.a_short  # the model scorer of ksigma does not smooth
        fp[k.F_LONG] = g.scorer.long_window
        fp[k.F_FAST] = g.scorer.fast_window
        fp[k.F_MIN_SCALE] = g.scorer.min_scale
        peak = g.peaks.get("model")
        fp[k.F_PEAK_FLOOR] = peak.floor if peak else 0.0
        fp[k.F_PEAK_WINDOW] = peak.window if peak else 1.0
        fp[k.F_PEAK_GROWTH] = peak.GROWTH if peak else 1.0
        fp[k.F_STUCK_DECAY] = g.stuck.decay if g.stuck else 1.0
        fp[k.F_STUCK_MAX] = g.stuck.max_log10 if g.stuck else 0.0
        fixed = isinstance(g.scaler, FixedScaler)
        fp[k.F_HORIZON] = s.scaling_horizon  # the running scale's memory, and the silence that re-centres
        fp[k.F_REL_FLOOR] = 0.0 if fixed else g.scaler.rel_floor
        fp[k.F_ABS_FLOOR] = 0.0 if fixed else g.scaler.abs_floor
        fp[k.F_CENTER] = g.scaler.center if fixed else 0.0
        fp[k.F_HALF] = g.scaler.half if fixed else 1.0
        fp[k.F_SEASON_ALPHA] = s.seasonal_alpha
        fp[k.F_GAP] = s.gap_reset_intervals
        fp[k.F_SKEW] = g.clock.max_skew_s
        fp[k.F_DAMP] = s.damp_factor
        fp[k.F_BAND_L0] = HALF_L * g.threshold / (1.0 - g.threshold)
        fp[k.F_BAND_Z0] = z_for_tail(10.0 ** -fp[k.F_BAND_L0])
        fp[k.F_INPUT_CLIP] = spec.input_clip
        fp[k.F_PROTECT_SCORE] = PROTECT_SCORE
        fp[k.F_PROTECT_LOG10] = PROTECT_LOG10
        fp[k.F_SCORE_CLIP] = SCORE_CLIP
        ip[k.I_WARMUP] = s.warmup
        ip[k.I_SCALING_WARMUP] = s.scaling_warmup
        ip[k.I_FIXED] = fixed
        ip[k.I_KSIGMA] = s.score == "ksigma"
        ip[k.I_MIN_DURATION] = s.min_duration
        ip[k.I_COOLDOWN] = s.cooldown
        ip[k.I_ACCEPT_AFTER] = s.accept_after
        ip[k.I_PROTECTION] = k.PROTECTIONS.index(s.learning_protection)
        ip[k.I_CH_MODEL], ip[k.I_CH_SEASONAL], ip[k.I_CH_RANGE] = g._enabled[:3]
        ip[k.I_HAS_PEAKS] = bool(g.peaks)
        ip[k.I_HAS_STUCK] = g.stuck is not None
        ip[k.I_STUCK_MIN] = g.stuck.min_readings if g.stuck else 0
        ip[k.I_JUMP] = g.clock.jump_readings
        ip[k.I_TRAIN_EVERY] = spec.train_every
        ip[k.I_TARGET_LO] = spec.target_index
        ip[k.I_SHARED] = g.shared
        ip[k.I_PEAK_BASELINE] = min(PEAK_BASELINE, s.long_window)
        ip[k.I_BASELINE] = min(s.warmup, s.long_window)
        self.fp, self.ip = fp, ip
        self.hp, self.model_ip = hyper_arrays(spec)
        # Threads run the (nogil) kernels on disjoint sensors; Numba's worker count is the
        # user's knob (NUMBA_NUM_THREADS) for both. A thread hand-off costs ~20 us: only for
        # walks (a batch, or a shared-weight segment) with enough readings.
        self.threads = get_num_threads()
        self.min_parallel_readings = 256
        self._pool = None
        self._work = []  # per-thread scratch (make_work), reused across batches
        self._blanks = {}  # _blank's arrays by shape, for the current slot capacity
        self._blank_capacity = -1

    @staticmethod
    def supports(group) -> bool:
        """The dynamic (Telemanom) scorer refits a window per reading: NumPy path only."""
        return group.settings.score in ("likelihood", "ksigma")

    # --- state ------------------------------------------------------------------------

    def _blank(self, shape, dtype=np.float64):
        """Stand-in arrays for state a configuration does not have (fixed scaling, no stuck
        channel, no seasonal profiles, no peak references): the kernels keep one signature."""
        key = (shape, np.dtype(dtype))
        blank = self._blanks.get(key)
        if blank is None:
            blank = self._blanks[key] = np.zeros(shape, dtype)
        return blank

    def _state(self) -> k.State:
        g = self.group
        n = len(g.seen)
        if n != self._blank_capacity:  # the group grew: stand-ins of the old capacity go
            self._blanks.clear()
            self._blank_capacity = n
        I, O = g.spec.input_size, g.spec.output_size
        scal = g.scaler if not self.ip[k.I_FIXED] else None
        st = g.stuck
        se = g.seasonal
        b = g.bank
        wide, flat = (lambda: self._blank((n, I))), (lambda: self._blank((n,)))  # noqa: E731
        return k.State(
            k.Clock(g.last_ts, g.interval, g.seen, g.alert_peak, g.clock.run, g.clock.prev),
            k.Scale(*((scal.mean, scal.var, scal.count, scal.prev, scal.logdiff, scal.ndiff) if scal else
                      (wide(), wide(), flat(), wide(), wide(), wide()))),
            k.Scores(*(g.score_store.arrays[name] for name in ("smooth", "mean", "var", "fmean", "fvar", "count"))),
            k.Peaks(g.peak_store.arrays["peak"], g.peak_store.arrays["base"]),
            k.Stuck(*((st.last, st.run, st.longest, st.repeats, st.total) if st else
                      (wide(), flat(), flat(), flat(), flat()))),
            k.Seasons(*((se.start, se.offset, se.bins, se.bin_width, se.pool, se.periods) if se else
                        (flat(), self._blank((n, 0), np.int64), self._blank((n, 0), np.int64), self._blank((n, 0)),
                         self._blank((1, O), np.float32), self._blank((0,))))),
            k.Incidents(g.incidents.above, g.incidents.open, g.incidents.cooldown, g.incidents.peak,
                        g.incidents.peak_ts, g.incidents.length),
            k.Model(b.theta, b.m, b.v, b.adam_t, b.h, b.c, b.ring_x, b.ring_h, b.ring_c, b.ring_pos, b.ring_len, b.pred,
                    b.since_train, b.offs, self.hp, self.model_ip,
                    *((b.grad_sum, b.grad_count) if g.shared else
                      (self._blank((1, 0), b.theta.dtype), self._blank((1,), np.int64)))),
        )

    def _rows(self, B, out) -> k.Rows:
        g = self.group
        K = g.seasonal.n_periods if g.seasonal is not None else 0
        return k.make_rows(B, g.spec.input_size, g.spec.output_size, K, g.spec.np_dtype, out)

    # --- one batch ----------------------------------------------------------------------

    def process(self, slots, good, ts, values, out):
        g = self.group
        B = len(slots)
        rw = self._rows(B, out)
        if len(good) == 0:
            self._finish(slots, ts, values, rw, out, good)
            return
        order = good[np.argsort(slots[good], kind="stable")]
        sorted_slots = slots[order]
        first = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1].astype(np.int64)
        nread = np.diff(np.r_[first, len(order)]).astype(np.int64)
        sensor_slots = sorted_slots[first]
        values = np.ascontiguousarray(values, dtype=np.float64)
        ts = np.ascontiguousarray(ts, dtype=np.float64)
        self.fp[k.F_NOW] = g.clock.now() if g.clock.max_skew_s > 0 else 0.0
        t0 = time.perf_counter()
        if g.shared:
            # most readings first: the sensors still walking in a segment are a prefix
            by_count = np.argsort(-nread, kind="stable")
            first, nread, sensor_slots = first[by_count], nread[by_count], sensor_slots[by_count]
        self._walk(order, first, nread, sensor_slots, ts, values, rw)
        g.kernel_seconds += time.perf_counter() - t0
        self._finish(slots, ts, values, rw, out, good)

    def _works(self, st, n: int):
        """n thread scratches; they share the gradient sums (one row each)."""
        if len(self._work) < n:
            acc = np.zeros((n, st.model.theta.shape[1]), st.model.theta.dtype)
            count = np.zeros(n, np.int64)
            if self._work:  # sums of a walk in progress move along
                old = self._work[0]
                acc[: len(old.count)] = old.acc
                count[: len(old.count)] = old.count
            self._work = [k.make_work(st)._replace(acc=acc, count=count) for _ in range(n)]
        return self._work[:n]

    def _walk(self, order, first, nread, sensor_slots, ts, values, rw):
        """Sensors walk their readings. Shared weights go segment by segment (one update after
        each; segments continue across batches, ModelBank.end_round); a segment with enough
        readings is split across threads (disjoint sensor ranges with about equal numbers of
        readings), the rest run in one kernel call."""
        g = self.group
        n = len(first)
        longest = int(nread.max())
        segment = g.spec.train_every if g.shared else longest
        phase = int(g.bank.phase[0]) if g.shared else 0
        progress = np.zeros(n, np.int64)
        stop = np.zeros(n, np.bool_)
        r = 0
        while r < longest:
            st = self._state()
            r_end = min(r - (r + phase) % segment + segment, longest)
            live = int(np.count_nonzero(nread > r))  # sensors with readings in this segment (a prefix)
            work = np.minimum(nread[:live], r_end) - progress[:live]
            if self.threads > 1 and live > 1 and work.sum() >= self.min_parallel_readings:
                share = np.searchsorted(np.cumsum(work), np.arange(1, self.threads) * work.sum() / self.threads)
                cuts = sorted(set([0, *np.minimum(share + 1, live).tolist(), live]))
                works = self._works(st, len(cuts) - 1)
                args = (segment, phase, r, r_end, False, order, first, nread, sensor_slots, progress, stop, ts,
                        values, st, rw, self.fp, self.ip)
                self._map(k.walk, [(lo, hi) + args + (wk, ch)
                                   for ch, (lo, hi, wk) in enumerate(zip(cuts[:-1], cuts[1:], works))])
                if not stop.any():
                    if g.shared:
                        w0 = works[0]
                        k.segment_update(st.model, w0.acc, w0.count, w0.mean, (r_end + phase) % segment == 0)
                    r = r_end
            else:  # the remaining segments in one call (each narrower than this one)
                wk = self._works(st, 1)[0]
                r = k.walk(0, n, segment, phase, r, longest, g.shared, order, first, nread, sensor_slots, progress,
                           stop, ts, values, st, rw, self.fp, self.ip, wk, 0)
            if stop.any():
                held = np.flatnonzero(stop)
                self._allocate(sensor_slots[held], ts[order[first[held] + progress[held]]])
                stop[:] = False
        if g.shared:  # a segment the batch ended in the middle of: its sums stay pending
            w0 = self._works(st, 1)[0]
            k.segment_update(st.model, w0.acc, w0.count, w0.mean, False)
            g.bank.phase[0] = (phase + longest) % segment

    def _map(self, kernel, calls):
        """Run kernel(*args) for each args; in threads when there are several (nogil kernels)."""
        if len(calls) == 1:
            kernel(*calls[0])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="streamlstm-pass")
        for f in [self._pool.submit(kernel, *args) for args in calls]:
            f.result()

    def compile_entry_points(self):
        """Compile (or load from the cache) every kernel this group's pass can call, with empty
        work, so none compiles in the middle of the daemon's first batch."""
        from .group import BatchResult

        g = self.group
        st = self._state()
        out = BatchResult.empty(1, g.spec.output_size)
        rw = self._rows(1, out)
        wk = self._works(st, 1)[0]
        none = np.zeros(1, np.int64)
        ts, values = np.zeros(1), np.zeros((1, g.spec.input_size))
        stop = np.zeros(1, np.bool_)
        zero = 0
        k.walk(zero, zero, 1, zero, zero, zero, False, none, none, none, none, none, stop, ts, values, st, rw, self.fp,
               self.ip, wk, zero)
        if g.shared:
            k.segment_update(st.model, wk.acc, np.zeros_like(wk.count), wk.mean, False)

    def _allocate(self, slots, ts):
        """Seasonal storage that became due (SeasonalProfiles._enable, as the NumPy path)."""
        g = self.group
        g.seasonal._enable(slots, ts, g.interval[slots])

    def _finish(self, slots, ts, values, rw, out, good):
        g = self.group
        rw = SimpleNamespace(**k.row_columns(rw))
        reason = rw.reason
        for i in np.flatnonzero(reason):
            out.reason[i] = REASONS[int(reason[i])]
        taken = np.zeros(len(slots), bool)
        taken[good] = True
        taken &= reason == k.R_OK
        out.threshold[taken] = g.threshold
        flags = rw.reset_clock | rw.reset_gap | rw.reset_nonfinite | rw.reset_implausible | rw.gap_closed | rw.opened | rw.closed
        names = g.names
        for b in np.flatnonzero(flags):
            slot = int(slots[b])
            name = names[slot]
            if rw.reset_clock[b]:
                out.resets.append((name, "clock_jump"))
            if rw.reset_gap[b]:
                out.resets.append((name, "gap"))
            if rw.gap_closed[b]:
                incident = g._close_incident(slot, float(rw.gap_end[b]), "gap")
                if incident is not None:
                    incident.peak_score = float(rw.gap_peak[b])
                    incident.peak_timestamp = float(rw.gap_peak_ts[b])
                    incident.readings = int(rw.gap_length[b])
                    out.events.append(("resolved", incident))
            if rw.closed[b]:
                incident = g._close_incident(slot, float(ts[b]), "accepted" if rw.accepted[b] else "returned")
                if incident is not None:
                    incident.peak_score = float(rw.inc_peak[b])
                    incident.peak_timestamp = float(rw.inc_peak_ts[b])
                    incident.readings = int(rw.inc_length[b]) - int(rw.accepted[b])
                    out.events.append(("resolved", incident))
            if rw.reset_nonfinite[b]:
                out.resets.append((name, "non_finite_state"))
            if rw.reset_implausible[b]:
                out.resets.append((name, "implausible_scale"))
            if rw.opened[b]:
                O = g.spec.output_size
                incident = g._open_incident(slot, ts[b], values[b], out.prediction[b, :O], out.residual[b, :O],
                                            out.score[b], rw.fired[b])
                out.events.append(("anomaly", incident))
        # incidents still open: what the NumPy path counts reading by reading
        inc = g.incidents
        if g.open:
            for slot in np.unique(slots[taken]).tolist():
                incident = g.open.get(slot)
                if incident is not None and inc.open[slot]:
                    incident.readings = int(inc.length[slot])
                    incident.peak_score = float(inc.peak[slot])
                    incident.peak_timestamp = float(inc.peak_ts[slot])
