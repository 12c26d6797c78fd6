"""One model group: its sensors, their LSTM bank and their detector state, stepped in batches.

Per reading, in this order (no look-ahead): check the timestamp, scale, take the
prediction made *before* the reading, score the residual, run the incident filters, then
learn (model, scaler and score statistics) with a weight that learning protection lowers
for anomalous readings.
"""
from __future__ import annotations

import dataclasses
import time
from itertools import repeat

import numpy as np

from ..bank import ModelBank
from ..spec import ModelSpec
from .clock import ClockGuard
from .compiled_driver import CompiledPass
from .incidents import Incident, IncidentFilter
from .scaling import FixedScaler, RunningScaler
from .scores import (HALF_L, DynamicScorer, KSigmaScorer, LikelihoodScorer, PeakReference, RowStore, StuckScorer,
                     log10_tail_to_score, score_to_log10)
from .seasonal import SeasonalProfiles
from .transfer import take_rows
from .settings import CHANNELS, DetectorSettings

OK = ""
CALIBRATED = CHANNELS[:3]  # stuck evidence builds up reading by reading: no peak reference
PROTECT_SCORE = 0.5  # score of tail probability 1e-5
PROTECT_LOG10 = 5.0
PEAK_BASELINE = 200  # readings in the residual baseline before peaks are learnt
SCORE_CLIP = 1000.0  # largest deviation (in units of the sensor's std) that evidence is measured on


@dataclasses.dataclass
class BatchResult:
    """Per-reading results of one batch, in input order (arrays of length B)."""

    reason: list  # "" accepted, else the rejection reason
    prediction: np.ndarray  # (B, O) sensor units, NaN where rejected or not yet predicted
    residual: np.ndarray  # (B, O)
    score: np.ndarray  # (B,) in [0, 1]
    alert: np.ndarray  # (B,) the score where it is a new high (see _alert), else 0
    is_anomaly: np.ndarray  # (B,) bool
    threshold: np.ndarray  # (B,) score threshold in force
    band: np.ndarray  # (B, O) |residual| at which the threshold would be reached (sensor units)
    loss: np.ndarray  # (B,) training loss, NaN where no training ran
    events: list  # (kind, Incident): kind "anomaly" when it opens, "resolved" when it closes
    resets: list  # (sensor, reason)

    @staticmethod
    def empty(B: int, O: int) -> "BatchResult":
        nan = np.full((B, O), np.nan)
        return BatchResult(
            [OK] * B, nan.copy(), nan.copy(), np.zeros(B), np.zeros(B), np.zeros(B, bool), np.zeros(B), nan.copy(),
            np.full(B, np.nan), [], [],
        )


def rounds(slots: np.ndarray) -> list:
    """Split batch positions into rounds in which every slot appears at most once, in order."""
    if len(slots) == 0:
        return []
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
    occurrence = np.empty(len(slots), np.int64)
    occurrence[order] = np.arange(len(slots)) - np.repeat(starts, np.diff(np.r_[starts, len(slots)]))
    n_rounds = occurrence.max() + 1
    if n_rounds == 1:
        return [np.arange(len(slots))]
    return [np.flatnonzero(occurrence == r) for r in range(n_rounds)]


class GroupDetector:
    def __init__(self, name: str, spec: ModelSpec, settings: DetectorSettings, shared: bool, backend,
                 engine: str = "auto"):
        self.name = name
        self.spec = spec
        self.settings = settings
        self.shared = shared
        self.bank = ModelBank(spec, shared, backend)
        self.clock = ClockGuard(settings.max_clock_skew_s, settings.clock_jump_readings)
        self.sensors: dict[str, int] = {}
        self.names: list[str] = []
        I, O = spec.input_size, spec.output_size
        s = settings
        if s.scaling == "fixed":
            self.scaler = FixedScaler(I, s.scale_min, s.scale_max)
        else:
            self.scaler = RunningScaler(I, s.scaling_horizon)
        periods = s.period_seconds if "seasonal" in s.channels else ()
        # Likelihood state in one store, rows: model, range, one per seasonal period (compiled.py
        # indexes them so); peak references in another, rows: model, seasonal, range.
        self.score_store = RowStore(LikelihoodScorer.STATE, 2 + len(periods))
        self.peak_store = RowStore(PeakReference.STATE, len(CALIBRATED))
        if s.score == "ksigma":
            self.scorer = KSigmaScorer(s.ksigma, s.long_window, s.min_residual_scale, self.score_store)
            self.threshold = self.scorer.threshold_score()
        elif s.score == "dynamic":
            self.scorer = DynamicScorer(s.long_window, s.short_window, s.threshold, s.min_residual_scale)
            self.score_store.take_row()  # the model's row stays unused
            self.threshold = s.threshold
        else:
            self.scorer = LikelihoodScorer(s.short_window, s.long_window, s.min_residual_scale, self.score_store)
            self.threshold = s.threshold
        # Seasonal channels: one profile and one residual likelihood per period, learnt by
        # every scorer type alike (their tail probability is what gets combined).
        self.seasonal = SeasonalProfiles(periods, spec.output_size, s.seasonal_alpha, s.seasonal_max_bins) if periods else None
        # The range channel: how far the reading is from the sensor's running normal (the
        # scaler's mean and std, which stop learning while an incident is open, so it keeps
        # measuring the distance from the normal the sensor had before the incident).
        self.range_scorer = LikelihoodScorer(s.short_window, s.long_window, s.min_residual_scale, self.score_store)
        self.season_scorers = [LikelihoodScorer(s.short_window, s.long_window, s.min_residual_scale, self.score_store)
                               for _ in periods]
        # Peak references calibrate each channel's evidence to the sensor's own peaks.
        self.peaks = {c: PeakReference(s.peak_memory, self.peak_store) for c in CALIBRATED} if s.peak_memory > 0 else {}
        # Stuck evidence saturates a little above the alert threshold: enough to open an
        # incident at any threshold, never outranking strong residual evidence.
        stuck_cap = HALF_L * self.threshold / (1.0 - self.threshold) + 1.0
        self.stuck = StuckScorer(s.long_window, max_log10=stuck_cap) if "stuck" in s.channels else None
        self.incidents = IncidentFilter(self.threshold, s.min_duration, s.hysteresis, s.cooldown)
        self.open: dict[int, Incident] = {}
        self._enabled = np.array([c in s.channels for c in CHANNELS])
        self.last_ts = np.zeros(0)
        self.interval = np.zeros(0)
        self.seen = np.zeros(0, np.int64)
        self.alert_peak = np.zeros(0)
        self._outputs = slice(spec.target_index, spec.target_index + O)
        self.kernel_seconds = 0.0  # time inside the model backend (replay reports its share)
        # The compiled pass (compiled.py) where it covers the configuration and the model runs
        # on the CPU; the NumPy path below is its readable oracle (and serves the rest).
        self._compiled = CompiledPass(self) if engine != "numpy" and CompiledPass.supports(self) else None

    # --- sensors ----------------------------------------------------------------------

    def slot_of(self, sensor: str) -> int:
        slot = self.sensors.get(sensor)
        if slot is None:
            slot = self.bank.add_slot(sensor)  # per-sensor weights: an init keyed by the id
            self.sensors[sensor] = slot
            self.names.append(sensor)
            n = slot + 1
            self._grow(n)
        return slot

    def _grow(self, n: int):
        if n <= len(self.seen):
            return
        cap = max(n, len(self.seen) * 2)
        extra = cap - len(self.seen)
        self.last_ts = np.concatenate([self.last_ts, np.full(extra, -np.inf)])
        self.interval = np.concatenate([self.interval, np.zeros(extra)])
        self.seen = np.concatenate([self.seen, np.zeros(extra, np.int64)])
        self.alert_peak = np.concatenate([self.alert_peak, np.zeros(extra)])
        self.scaler.grow(cap)
        self.scorer.grow(cap)
        self.score_store.grow(cap)
        self.peak_store.grow(cap)
        if self.seasonal is not None:
            self.seasonal.grow(cap)
        self.incidents.grow(cap)
        self.clock.grow(cap)
        if self.stuck is not None:
            self.stuck.grow(cap, self.spec.input_size)

    # --- stepping ---------------------------------------------------------------------

    def process(self, sensors, timestamps, values) -> BatchResult:
        """Score then learn a batch of readings (a sensor may appear several times)."""
        names = list(dict.fromkeys(sensors))
        at = dict(zip(names, range(len(names))))
        return self.process_indexed(names, np.fromiter(map(at.__getitem__, sensors), np.int64, len(sensors)),
                                    timestamps, values)

    def process_indexed(self, names: list, index: np.ndarray, timestamps, values) -> BatchResult:
        """`process` with row i's sensor given as names[index[i]]: sensors are looked up once
        each, not once per reading."""
        B = len(index)
        values = np.asarray(values, dtype=np.float64).reshape(B, self.spec.input_size)
        timestamps = np.asarray(timestamps, dtype=np.float64)
        out = BatchResult.empty(B, self.spec.output_size)
        finite = np.all(np.isfinite(values), axis=1) & np.isfinite(timestamps)
        for i in np.flatnonzero(~finite):
            out.reason[i] = "non_finite"
        slots = np.full(B, -1, np.int64)
        present = index[finite]
        if len(present):
            used, first, inverse = np.unique(present, return_index=True, return_inverse=True)
            used_names = list(map(names.__getitem__, used.tolist()))
            slot = np.fromiter(map(self.sensors.get, used_names, repeat(-1)), np.int64, len(used))
            new = np.flatnonzero(slot < 0)
            # New sensors get their slots in the order of their first reading, as one by one.
            for j in new[np.argsort(first[new], kind="stable")].tolist():
                slot[j] = self.slot_of(used_names[j])
            slots[finite] = slot[inverse.reshape(-1)]
        good = np.flatnonzero(finite)
        if self._use_compiled(slots[good]):
            self._compiled.process(slots, good, timestamps, values, out)
            return out
        # Shared weights learn in segments of train_every rounds: each sensor trains at most
        # once in a segment, against the weights the segment started with, and the segment's
        # windows make one update (the mean gradient) at its end (ModelBank.end_round).
        # Sensors are then independent within a segment, which is what lets the compiled pass
        # walk them in parallel.
        for positions in rounds(slots[good]):
            idx = good[positions]
            self._round(idx, slots[idx], timestamps[idx], values[idx], out)
            self.bank.end_round()
        return out

    def _round(self, idx, slots, ts, values, out: BatchResult):
        s = self.settings
        skew, rebased = self.clock.check(slots, ts, self.last_ts, self.interval)  # clock.py
        out.resets.extend((self.names[slot], "clock_jump") for slot in slots[rebased])
        last = self.last_ts[slots]
        dup = (ts == last) & ~skew
        late = (ts < last) & ~skew
        for i in idx[skew]:
            out.reason[i] = "clock_skew"
        for i in idx[dup]:
            out.reason[i] = "duplicate_timestamp"
        for i in idx[late]:
            out.reason[i] = "out_of_order"
        keep = ~(dup | late | skew)
        idx, slots, ts, values = idx[keep], slots[keep], ts[keep], values[keep]
        if len(idx) == 0:
            return
        self._gap_resets(slots, ts, values, out)

        z = self.scaler.transform(slots, values)
        t0 = time.perf_counter()
        pred = self.bank.predict(slots)  # made before this reading arrived
        self.kernel_seconds += time.perf_counter() - t0
        # The model learns from inputs clipped to +-input_clip, but evidence is measured on the
        # reading as it is (up to SCORE_CLIP): a 200-sigma surprise must outscore a 10-sigma
        # one, while one absurd reading (1e9) cannot flood the smoothed residual for long.
        # Over a vector's features the largest deviation counts (a shift in one of eight
        # sensors must not be averaged away by the seven that did not move).
        target = np.clip(z[:, self._outputs], -SCORE_CLIP, SCORE_CLIP)
        has_pred = self.bank.ring_len[slots] > 0
        raw = np.abs(target - pred).max(axis=1)
        raw = np.where(has_pred, raw, 0.0)
        seen = self.seen[slots]
        armed = seen >= s.warmup
        live = armed & has_pred
        std = self.scaler.std(slots)[:, self._outputs]
        season_raw, season_ok = self._seasonal_residuals(slots, ts, values, std)
        # A reading a seasonal profile explains is no surprise for the model's channel
        # either (e.g. a transition that happens every day at the same time).
        explained = np.where(season_ok, season_raw, np.inf).min(axis=1, initial=np.inf)
        raw = np.minimum(raw, explained)
        L, smoothed = self.scorer.log10p(slots, raw)
        season_L, season_smoothed = self._seasonal_evidence(slots, season_raw, season_ok)
        range_raw = np.minimum(np.abs(target).max(axis=1), explained)
        range_L, range_smoothed = self.range_scorer.log10p(slots, range_raw)
        range_L = np.where(self.range_scorer.count[slots] >= min(s.warmup, s.long_window), range_L, 0.0)
        channels = np.stack([np.where(live, L, 0.0), season_L, np.where(armed, range_L, 0.0), np.zeros(len(slots))])
        channels[~self._enabled] = 0.0
        # Before the peak references calibrate it; nothing counts during warm-up.
        evidence = np.where(live, channels[:3].max(axis=0), 0.0)
        extra = np.zeros(len(slots))
        if self.peaks:
            extra = self.peaks["model"].offset(slots)
            # Peaks are learnt once the residual baseline is mature: the huge evidence of a
            # model still learning (a short warm-up) would otherwise mute the sensor for long.
            mature = armed & (self._baseline_count(slots) >= min(PEAK_BASELINE, s.long_window))
            for k, name in enumerate(CALIBRATED):
                channels[k] = self.peaks[name].adjust(slots, channels[k], mature)
        if self.stuck is not None:
            channels[3] = score_to_log10(self.stuck.score_and_update(slots, values))
        channels = np.where(live, channels, 0.0)
        score = log10_tail_to_score(channels.max(axis=0))
        fired = channels.argmax(axis=0)
        is_anomaly, opened, closed = self.incidents.step(slots, score, ts, armed)
        accepted = self._accept(slots, is_anomaly & ~opened)
        closed |= accepted
        alert = self._alert(slots, score, opened, is_anomaly)

        # Learning protection keys on the evidence (p < 1e-5), not on the alert threshold:
        # a high threshold for rare incidents must not let the model learn anomalies.
        # It uses the evidence before the peak references: a spiky sensor's routine spike
        # is not an alert, but it must not widen the residual baseline either.
        suspicious = is_anomaly | (score >= min(self.threshold, PROTECT_SCORE)) | (evidence >= PROTECT_LOG10)
        if s.learning_protection == "skip":
            weight = np.where(suspicious, 0.0, 1.0)
        elif s.learning_protection == "damp":
            weight = np.where(suspicious, s.damp_factor, 1.0)
        else:
            weight = np.ones(len(slots))
        learn = seen >= s.scaling_warmup  # the scale is still settling before that
        t0 = time.perf_counter()
        result = self.bank.step(slots, z, np.where(learn, weight, 0.0), apply=False)
        self.kernel_seconds += time.perf_counter() - t0
        implausible = self.scaler.update(slots, values, np.where(suspicious, 0.0, 1.0))
        # What normal distance looks like is never learnt from an open incident: the incident
        # stays open while the sensor is away from the normal it had before (the scale stops
        # learning then too), until it returns or accept_after makes the new level normal.
        self.range_scorer.update(slots, range_smoothed, np.where(learn & ~is_anomaly, weight, 0.0))
        # The new level is the new normal: the scale re-centres on it.
        self._rebase_level(slots[accepted], values[accepted])
        # Residuals made while the scale was still settling are meaningless (a std from a
        # handful of readings): they must not set the residual baseline.
        self.scorer.update(slots, smoothed, np.where(has_pred & learn, weight, 0.0))
        if self.seasonal is not None:
            for k, scorer in enumerate(self.season_scorers):
                scorer.update(slots, season_smoothed[:, k], np.where(season_ok[:, k] & learn, weight, 0.0))
            # Nor does the profile learn an open incident: it would explain the anomaly away.
            self.seasonal.update(slots, ts, values[:, self._outputs], self.interval[slots],
                                 np.where(learn & ~is_anomaly, weight, 0.0))

        self.seen[slots] += 1
        dt = ts - self.last_ts[slots]
        first_gap = ~np.isfinite(dt)
        a = np.where(self.seen[slots] <= 5, 0.5, 0.05)
        self.interval[slots] = np.where(
            first_gap, self.interval[slots], np.where(self.interval[slots] == 0, dt, self.interval[slots] + a * (dt - self.interval[slots]))
        )
        self.last_ts[slots] = ts

        prediction = self.scaler.inverse(slots, pred, self._outputs)
        residual = values[:, self._outputs] - prediction
        prediction[~has_pred] = np.nan
        residual[~has_pred] = np.nan
        band = self.scorer.band(slots, self.threshold, extra)[:, None] * std
        out.prediction[idx] = prediction
        out.residual[idx] = residual
        out.score[idx] = score
        out.alert[idx] = alert
        out.is_anomaly[idx] = is_anomaly
        out.threshold[idx] = self.threshold
        out.band[idx] = band
        out.loss[idx] = result.loss
        for k in np.flatnonzero(result.status == 1):
            out.resets.append((self.names[slots[k]], "non_finite_state"))
            self._reset(slots[k])
        for k in np.flatnonzero(implausible):  # the scaler reset itself (scaling.py): warm up again
            out.resets.append((self.names[slots[k]], "implausible_scale"))
            self._reset(slots[k])
            self.seen[slots[k]] = 0
        self._events(slots, ts, values, prediction, residual, score, opened, closed, accepted, fired, is_anomaly, out)

    def _use_compiled(self, slots) -> bool:
        if self._compiled is None:
            return False
        place = getattr(self.bank.backend, "place", None)
        if place is not None:  # auto: a batch this wide may move the bank to the GPU
            place(self.bank, slots)
        return self.bank.backend.name == "cpu"

    def _baseline_count(self, slots):
        """Readings in the model-residual baseline (the count of the scorer's moments)."""
        count = getattr(self.scorer, "count", None)
        if count is None:  # the dynamic scorer keeps a window instead
            return self.scorer.filled[slots]
        return count[slots]

    def _seasonal_residuals(self, slots, ts, values, std):
        """(B, K) largest |residual| over the outputs against each seasonal profile in scaled units,
        and where it exists."""
        if self.seasonal is None:
            return np.zeros((len(slots), 0)), np.zeros((len(slots), 0), bool)
        expected = self.seasonal.expected(slots, ts)
        ok = ~np.isnan(expected).any(axis=2)
        diff = (values[:, None, self._outputs] - expected) / std[:, None, :]
        season_raw = np.abs(np.clip(np.nan_to_num(diff), -SCORE_CLIP, SCORE_CLIP)).max(axis=2)
        return season_raw, ok

    def _seasonal_evidence(self, slots, season_raw, season_ok):
        """-log10 p of the strongest seasonal channel, 0 until a channel has a baseline."""
        B, K = season_raw.shape
        L = np.zeros(B)
        smoothed = np.zeros((B, K))
        for k, scorer in enumerate(self.season_scorers):
            Lk, smoothed[:, k] = scorer.log10p(slots, np.where(season_ok[:, k], season_raw[:, k], 0.0))
            baseline = scorer.count[slots] >= min(self.settings.warmup, self.settings.long_window)
            L = np.maximum(L, np.where(season_ok[:, k] & baseline, Lk, 0.0))
        return L, smoothed

    def _alert(self, slots, score, opened, is_open):
        """Threshold-free alert suppression: a reading keeps its score only if it beats the
        slot's recent peak (which decays to 0 over `cooldown` readings once no incident is
        open), and an open incident alerts once, when it opens. Whatever threshold is applied
        later, one incident then gives one or a few alert rows instead of a run, which is what
        row-counting benchmarks such as NAB reward."""
        peak = self.alert_peak[slots]
        alert = np.where((score > peak) & (opened | ~is_open), score, 0.0)
        decayed = np.where(is_open, peak, peak - 1.0 / max(self.settings.cooldown, 1))
        self.alert_peak[slots] = np.maximum(score, decayed)
        return alert

    def _gap_resets(self, slots, ts, values, out):
        n = self.settings.gap_reset_intervals
        if n <= 0:
            return
        dt = ts - self.last_ts[slots]
        gap = (self.seen[slots] >= 5) & (self.interval[slots] > 0) & (dt > n * self.interval[slots])
        # A silence longer than the scale remembers (scaling_horizon readings) leaves a stale
        # level: it re-centres on the sensor's first reading back, keeping the learnt spread,
        # models and baselines (what a warm start from old history keeps).
        stale = gap & (dt > self.settings.scaling_horizon * self.interval[slots])
        self._rebase_level(slots[stale], values[stale])
        for k in np.flatnonzero(gap):
            slot = slots[k]
            out.resets.append((self.names[slot], "gap"))
            self._reset(slot)
            incident = self._close_incident(int(slot), float(self.last_ts[slot]), "gap")
            if incident is not None and self.incidents.force_close(np.array([slot]))[0]:
                out.events.append(("resolved", incident))

    def _rebase_level(self, slots, values):
        """Re-centre the scale of `slots` on `values` (spread kept, settling as after warm-up)
        and restart the range channel's smoothing from its baseline."""
        if len(slots):
            self.scaler.rebase(slots, values, self.settings.scaling_warmup)
            self.range_scorer.reset(slots)

    def close_all(self):
        """Close every open incident without events (the end of a warm-start fit: a live start
        must not inherit an incident of the history)."""
        n = len(self.names)
        self.incidents.force_close(np.arange(n))
        self.open.clear()

    def _reset(self, slot):
        self.bank.reset_slot(int(slot))
        self.scorer.reset(np.array([slot]))

    def _accept(self, slots, still_open):
        """Incidents open for `accept_after` readings: the sensor has a new normal. Closed here
        (with reason "accepted"); the caller re-centres the scale on the new level."""
        n = self.settings.accept_after
        if n <= 0:
            return np.zeros(len(slots), bool)
        accepted = still_open & (self.incidents.length[slots] >= n)
        self.incidents.force_close(slots[accepted], cooldown=True)
        return accepted

    def _events(self, slots, ts, values, prediction, residual, score, opened, closed, accepted, fired, is_anomaly, out):
        for k in np.flatnonzero(closed):
            incident = self._close_incident(int(slots[k]), float(ts[k]), "accepted" if accepted[k] else "returned")
            if incident is not None:
                incident.peak_score = float(self.incidents.peak[slots[k]])
                incident.peak_timestamp = float(self.incidents.peak_ts[slots[k]])
                out.events.append(("resolved", incident))
        for k in np.flatnonzero(is_anomaly & ~opened):
            incident = self.open.get(int(slots[k]))
            if incident is not None:
                incident.readings += 1
                incident.peak_score = float(self.incidents.peak[slots[k]])
                incident.peak_timestamp = float(self.incidents.peak_ts[slots[k]])
        for k in np.flatnonzero(opened):
            incident = self._open_incident(int(slots[k]), ts[k], values[k], prediction[k], residual[k], score[k], fired[k])
            out.events.append(("anomaly", incident))

    def _open_incident(self, slot, ts, value, prediction, residual, score, channel) -> Incident:
        """A new incident of `slot`, now open, for its `anomaly` event (both paths)."""
        incident = Incident(
            sensor=self.names[slot], group=self.name, start=float(ts), timestamp=float(ts),
            value=np.asarray(value).tolist(), prediction=np.asarray(prediction).tolist(),
            residual=np.asarray(residual).tolist(), score=float(score), threshold=float(self.threshold),
            peak_score=float(score), peak_timestamp=float(ts), readings=1, evidence=CHANNELS[int(channel)],
        )
        self.open[slot] = incident
        return incident

    def _close_incident(self, slot, end: float, reason: str) -> Incident | None:
        """The open incident of `slot`, closed, for its `resolved` event; None if it has none."""
        incident = self.open.pop(slot, None)
        if incident is not None:
            incident.end = end
            incident.reason = reason
        return incident

    # --- checkpoints ------------------------------------------------------------------

    def _stateful(self):
        yield from (("scaler", self.scaler), ("scorer", self.scorer), ("range_scorer", self.range_scorer),
                    ("incidents", self.incidents), ("stuck", self.stuck), ("clock", self.clock))
        # Keyed by period so a config with other periods does not inherit the wrong baselines.
        for period, scorer in zip(self.settings.seasonal_periods, self.season_scorers):
            yield f"season_scorer.{period}", scorer
        for name, peak in self.peaks.items():
            yield f"peak.{name}", peak

    def state_dict(self, rows=None) -> tuple[dict, dict]:
        """(arrays, meta) of every sensor, or of the sensors in slots `rows` (in that order:
        what moves with them to another detector; detector/transfer.py)."""
        n = len(self.names)
        arrays = {f"bank.{k}": v for k, v in self.bank.state_dict(copy=False).items()}
        for prefix, obj in self._stateful():
            for name in getattr(obj, "STATE", ()):
                arrays[f"{prefix}.{name}"] = getattr(obj, name)[:n]
        if self.seasonal is not None:
            arrays.update({f"seasonal.{k}": v for k, v in self.seasonal.state_dict(n, copy=False).items()})
        arrays["last_ts"] = self.last_ts[:n]
        arrays["interval"] = self.interval[:n]
        arrays["seen"] = self.seen[:n]
        arrays["alert_peak"] = self.alert_peak[:n]
        meta = {
            "sensors": list(self.names),
            "shape": list(self.spec.shape_key()),
            "shared": self.shared,
            "open": {str(k): v.as_dict() for k, v in self.open.items()},
        }
        if rows is not None:
            return take_rows(arrays, meta, rows)
        return {k: v.copy() for k, v in arrays.items()}, meta

    def load_state_dict(self, arrays: dict, meta: dict):
        if list(meta["shape"]) != list(self.spec.shape_key()) or meta["shared"] != self.shared:
            raise ValueError(f"group {self.name!r}: checkpoint model shape {meta['shape']} does not match the config")
        names = list(meta["sensors"])
        n = len(names)
        self.bank.load_state_dict({k[5:]: v for k, v in arrays.items() if k.startswith("bank.")}, n)
        self.sensors = {name: i for i, name in enumerate(names)}
        self.names = names
        self._grow(max(n, 1))
        for prefix, obj in self._stateful():
            for name in getattr(obj, "STATE", ()):
                key = f"{prefix}.{name}"
                if key in arrays:  # absent in checkpoints of older versions: start afresh
                    getattr(obj, name)[:n] = arrays[key]
        if self.seasonal is not None:
            self.seasonal.load_state_dict({k[9:]: v for k, v in arrays.items() if k.startswith("seasonal.")}, n)
        self.last_ts[:n] = arrays["last_ts"]
        self.interval[:n] = arrays["interval"]
        self.seen[:n] = arrays["seen"]
        self.alert_peak[:n] = arrays["alert_peak"]
        self.open = {int(k): Incident(**v) for k, v in meta.get("open", {}).items()}
