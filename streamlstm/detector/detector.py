"""Detector: routes readings to model groups and steps each group once per batch.

Used the same way by the daemon and by `streamlstm replay`, so both give identical scores
for the same readings. River-style single-reading calls (`score_one`, `learn_one`) go
through the same batched path.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from operator import attrgetter

import numpy as np

from ..config import GroupConfig
from ..reading import Columns, Reading
from ..reasons import CODE, CODES
from ..spec import ModelSpec
from .group import OK, BatchResult, GroupDetector
from .transfer import join, take_rows

__all__ = ["Detector", "DetectorBatch", "GroupConfig", "Outcome"]

ROUTE_CACHE_FACTOR = 2  # the routing cache holds at most this many times max_sensors ids
_NAME = attrgetter("name")


@dataclasses.dataclass
class Outcome:
    """What one reading produced (sensor units)."""

    sensor: str
    group: str | None
    timestamp: float
    value: list
    prediction: list
    residual: list
    score: float
    is_anomaly: bool
    threshold: float
    reason: str = OK  # "" accepted, else why it was rejected


@dataclasses.dataclass
class DetectorBatch:
    """Results of `Detector.process`, aligned with the input readings (row i: reading i)."""

    sensors: list  # the sensor id of each row
    timestamps: np.ndarray
    names: list  # the distinct sensor ids of the batch, in order of first appearance
    sensor_index: np.ndarray  # (B,) row -> position in `names`
    group_names: list  # the groups the batch reached
    group: np.ndarray  # (B,) row -> position in `group_names`, -1 where routing refused it
    code: np.ndarray  # (B,) int8 reason code (reasons.CODES): 0 accepted
    score: np.ndarray
    alert: np.ndarray
    is_anomaly: np.ndarray
    threshold: np.ndarray
    prediction: np.ndarray  # (B, O_max) NaN-padded
    residual: np.ndarray
    band: np.ndarray
    width: np.ndarray  # (B,) columns of prediction/residual/band that are the reading's own
    values: np.ndarray  # (B, W) the readings' values, NaN-padded
    value_width: np.ndarray  # (B,) columns of `values` that are the reading's own
    events: list  # (kind, Incident)
    resets: list  # (group, sensor, reason)
    losses: dict  # group -> mean training loss of this batch (NaN if none)
    step_seconds: dict  # group -> seconds its model backend took for this batch
    backends: dict  # group -> name of the backend that ran it ("cpu", "cuda", ...)

    @property
    def reason(self) -> list:
        """Per row: "" accepted, else why it was rejected."""
        return list(map(CODES.__getitem__, self.code.tolist()))

    @property
    def groups(self) -> list:
        """Per row: the group's name, None where routing refused the reading."""
        names = self.group_names + [None]  # -1 -> None
        return list(map(names.__getitem__, self.group.tolist()))

    def accepted(self) -> tuple[np.ndarray, np.ndarray]:
        """Each sensor with an accepted reading in this batch: its position in `names` and the
        row of its last accepted reading, in the order of its first accepted reading."""
        rows = np.flatnonzero(self.code == 0)
        sensors = self.sensor_index[rows]
        used, first = np.unique(sensors, return_index=True)
        last_from_end = np.unique(sensors[::-1], return_index=True)[1]
        order = np.argsort(first, kind="stable")
        return used[order], rows[len(rows) - 1 - last_from_end][order]

    def last_scores(self) -> dict:
        """sensor -> score of its last accepted reading in this batch."""
        sensors, rows = self.accepted()
        return dict(zip(map(self.names.__getitem__, sensors.tolist()), self.score[rows].tolist()))

    def outcome(self, i: int) -> Outcome:
        width = int(self.width[i])
        return Outcome(
            self.sensors[i], self.group_names[self.group[i]] if self.group[i] >= 0 else None, float(self.timestamps[i]),
            self.values[i, :int(self.value_width[i])].tolist(), self.prediction[i, :width].tolist(),
            self.residual[i, :width].tolist(), float(self.score[i]), bool(self.is_anomaly[i]),
            float(self.threshold[i]), CODES[self.code[i]],
        )

    def __len__(self):
        return len(self.sensors)


class Detector:
    def __init__(self, groups, backend_factory, max_sensors: int = 100_000):
        """groups: a validated configuration's groups (config.GroupConfig: first match wins,
        names unique, one catches '*'). backend_factory(group_name) -> a backend for that
        group's bank."""
        self.groups = list(groups)
        self.backend_factory = backend_factory
        self.max_sensors = max_sensors
        self.active: dict[str, GroupDetector] = {}
        self._backends: dict = {}  # group -> the backend its GroupDetector steps with
        self._route: dict[str, GroupConfig] = {}

    # --- routing ----------------------------------------------------------------------

    def group_for(self, sensor: str) -> GroupConfig:
        g = self._route.get(sensor)
        if g is None:
            g = next(g for g in self.groups if fnmatch.fnmatchcase(sensor, g.match))
            # Bounded: ids refused by the sensor cap (or hostile ones) must not grow it for ever.
            # Over the bound it starts again; the known sensors fill it back in one pass.
            if len(self._route) >= ROUTE_CACHE_FACTOR * self.max_sensors:
                self._route.clear()
            self._route[sensor] = g
        return g

    def _detector(self, group: GroupConfig, width: int) -> GroupDetector | None:
        det = self.active.get(group.name)
        if det is None:
            det = self.active[group.name] = self._new_group(group, width)
        return det if det.spec.input_size == width else None

    def _new_group(self, group: GroupConfig, width: int) -> GroupDetector:
        backend = self._backends[group.name] = self.backend_factory(group.name)
        return GroupDetector(group.name, ModelSpec.from_config(group.model, width), group.detector,
                             group.weights == "shared", backend)

    def sensor_count(self) -> int:
        return sum(len(d.names) for d in self.active.values())

    # --- stepping ---------------------------------------------------------------------

    def process(self, readings) -> DetectorBatch:
        """One micro-batch: `Columns` (the daemon's, reading.py), or readings with `.sensor`,
        `.timestamp`, `.values` (a sequence of floats), converted to columns.

        Python work per batch does not grow with its readings: sensors are routed once each
        (a dict lookup for known ones), groups are split with array operations."""
        cols = readings if isinstance(readings, Columns) else Columns.of(readings)
        sensors, timestamps, values, value_width = cols
        B = len(timestamps)
        names = list(dict.fromkeys(sensors))
        at = dict(zip(names, range(len(names))))
        index = np.fromiter(map(at.__getitem__, sensors), np.int64, B)
        pair_of_row, pair_name, pair_width = _pairs(index, value_width, len(names))
        pair_code, pair_group, group_names = self._route_pairs(names, pair_name, pair_width)
        code = pair_code[pair_of_row]
        group = np.where(code == 0, pair_group[pair_of_row], -1)

        o_max = max([d.spec.output_size for d in self.active.values()] + [1])
        batch = DetectorBatch(
            sensors, timestamps, names, index, group_names, group, code, np.zeros(B), np.zeros(B), np.zeros(B, bool),
            np.zeros(B), np.full((B, o_max), np.nan), np.full((B, o_max), np.nan), np.full((B, o_max), np.nan),
            value_width.copy(), values, value_width, [], [], {}, {}, {},
        )
        routed = np.flatnonzero(group >= 0)
        order, first = np.unique(group[routed], return_index=True)
        for gi in order[np.argsort(first, kind="stable")].tolist():  # groups in order of first reading
            name = group_names[gi]
            det = self.active[name]
            idx = routed[group[routed] == gi]
            I, O = det.spec.input_size, det.spec.output_size
            spent = det.kernel_seconds
            res: BatchResult = det.process_indexed(names, index[idx], timestamps[idx], values[idx, :I])
            batch.step_seconds[name] = det.kernel_seconds - spent
            batch.backends[name] = self._backends[name].name  # after the step: auto may have moved it
            batch.width[idx] = O
            batch.code[idx] = np.fromiter(map(CODE.__getitem__, res.reason), np.int8, len(idx))
            batch.score[idx] = res.score
            batch.alert[idx] = res.alert
            batch.is_anomaly[idx] = res.is_anomaly
            batch.threshold[idx] = res.threshold
            batch.prediction[idx, :O] = res.prediction
            batch.residual[idx, :O] = res.residual
            batch.band[idx, :O] = res.band
            batch.events.extend(res.events)
            batch.resets.extend((name, sensor, why) for sensor, why in res.resets)
            trained = res.loss[~np.isnan(res.loss)]
            batch.losses[name] = float(trained.mean()) if len(trained) else float("nan")
        return batch

    def _route_pairs(self, names: list, pair_name: np.ndarray, pair_width: np.ndarray):
        """Each distinct (sensor, width) of a batch, in order of first appearance -> (reason
        code, group position), and the groups' names. Known sensors cost a dict lookup; new
        ones are routed by pattern and counted against max_sensors in order of appearance (the
        sensor cap refuses the ones past it)."""
        P = len(pair_name)
        sensor_names = list(map(names.__getitem__, pair_name.tolist()))
        routes = list(map(self._route.get, sensor_names))
        if not all(routes):  # a new sensor (all(): no GroupConfig.__eq__ per sensor)
            routes = [g if g is not None else self.group_for(s) for g, s in zip(routes, sensor_names)]
        group_names = list(dict.fromkeys(map(_NAME, routes)))
        at = dict(zip(group_names, range(len(group_names))))
        pair_group = np.fromiter(map(at.__getitem__, map(_NAME, routes)), np.int64, P)
        code = np.zeros(P, np.int8)
        new = np.zeros(P, bool)
        known = self.sensor_count()
        for gi, name in enumerate(group_names):
            mine = np.flatnonzero(pair_group == gi)
            # A group's model takes the width of the first reading it ever gets.
            det = self._detector(routes[mine[0]], int(pair_width[mine[0]]))
            if det is None:
                det = self.active[name]
            ok = mine[pair_width[mine] == det.spec.input_size]
            code[np.setdiff1d(mine, ok)] = CODE["wrong_arity"]
            new[ok] = ~np.fromiter(map(det.sensors.__contains__, map(sensor_names.__getitem__, ok.tolist())),
                                   bool, len(ok))
        room = max(0, self.max_sensors - known)
        code[np.flatnonzero(new)[room:]] = CODE["sensor_cap"]
        return code, pair_group, group_names

    def learn_one(self, sensor: str, timestamp: float, values) -> Outcome:
        """Score one reading, then learn from it (river's score_one + learn_one in one step:
        an online LSTM must see every reading to carry its state)."""
        return self.process([Reading(sensor, timestamp, tuple(np.atleast_1d(values)))]).outcome(0)

    def score_one(self, sensor: str, timestamp: float, values) -> float | None:
        """The score `learn_one` (or `process`) would give this reading now, without changing
        any state. None for a sensor the detector does not know yet, or a reading it would
        reject. The reading goes through every stage (seasonal, peaks, stuck, warm-up) on a copy
        of the sensor's group restored from its state_dict: the same path, on throwaway state."""
        group = self.group_for(sensor)
        det = self.active.get(group.name)
        if det is None or sensor not in det.sensors:
            return None
        values = tuple(np.atleast_1d(np.asarray(values, dtype=np.float64)).tolist())
        if len(values) != det.spec.input_size:
            return None
        copy = GroupDetector(det.name, det.spec, det.settings, det.shared, self.backend_factory(det.name))
        copy.load_state_dict(*det.state_dict())
        res = copy.process([sensor], np.array([float(timestamp)]), [values])
        return None if res.reason[0] else float(res.score[0])

    # --- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict]:
        arrays, meta = {}, {"groups": {}}
        for name, det in self.active.items():
            a, m = det.state_dict()
            arrays.update({f"{name}/{k}": v for k, v in a.items()})
            meta["groups"][name] = m
        return arrays, meta

    # --- sensors moving between detectors (a Kafka partition changing worker) -----------

    def export_sensors(self, names) -> tuple[dict, dict]:
        """The state of those of `names` this detector knows, in `state_dict`'s format (copies;
        a shared group's weights come along whole)."""
        arrays, meta = {}, {"groups": {}}
        for name, det in self.active.items():
            rows = [det.sensors[n] for n in names if n in det.sensors]
            if rows:
                a, m = det.state_dict(rows)
                arrays.update({f"{name}/{k}": v for k, v in a.items()})
                meta["groups"][name] = m
        return arrays, meta

    def drop_sensors(self, names) -> None:
        """Forget these sensors (their state went elsewhere); the others keep theirs."""
        for name, det in list(self.active.items()):
            gone = {det.sensors[n] for n in names if n in det.sensors}
            if gone:
                keep = [slot for slot in range(len(det.names)) if slot not in gone]
                self._replace_group(name, det.state_dict(keep))

    def adopt_sensors(self, states) -> list:
        """Take over sensors other detectors exported: `states`, a list of `export_sensors`
        (or `state_dict`) results, joined into each group in one rebuild. Groups no longer
        configured are skipped (their sensors start fresh); a sensor this detector already
        knows, or that an earlier state of the list brought, keeps that state. ValueError when
        a group's model shape changed. Returns the ids taken over."""
        by_name = {g.name: g for g in self.groups}
        per_group: dict[str, list] = {}
        for arrays, meta in states:
            for name, m in meta["groups"].items():
                if name in by_name:
                    prefix = f"{name}/"
                    incoming = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                    _check_per_sensor_shapes(name, incoming, m)
                    per_group.setdefault(name, []).append((incoming, m))
        taken = []
        for name, incoming in per_group.items():
            det = self.active.get(name)
            if det is not None and (list(incoming[0][1]["shape"]) != list(det.spec.shape_key())
                                    or bool(incoming[0][1]["shared"]) != det.shared):
                raise ValueError(f"group {name!r}: model shape {incoming[0][1]['shape']} does not match the running one")
            parts = [] if det is None else [det.state_dict()]
            known = set() if det is None else set(det.sensors)
            for arrays, m in incoming:
                new = [i for i, s in enumerate(m["sensors"]) if s not in known]
                if new:
                    part = (arrays, m) if len(new) == len(m["sensors"]) else take_rows(arrays, m, new)
                    parts.append(part)
                    known.update(part[1]["sensors"])
                    taken.extend(part[1]["sensors"])
            if det is None and parts:
                self.active[name] = self._new_group(by_name[name], int(parts[0][1]["shape"][0]))
            if len(parts) > (0 if det is None else 1):
                self._replace_group(name, join(parts))
        return taken

    def _replace_group(self, name: str, state: tuple) -> None:
        """A fresh GroupDetector of group `name` holding `state` (slots renumbered from 0)."""
        group = next(g for g in self.groups if g.name == name)
        det = self._new_group(group, int(state[1]["shape"][0]))
        det.load_state_dict(*state)
        self.active[name] = det

    def load_state_dict(self, arrays: dict, meta: dict):
        """Restore groups still in the config; raises ValueError on a model-shape change."""
        by_name = {g.name: g for g in self.groups}
        for name, m in meta["groups"].items():
            group = by_name.get(name)
            if group is None:
                continue  # the group was removed from the config: its sensors start fresh
            det = self._new_group(group, int(m["shape"][0]))
            prefix = f"{name}/"
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            _check_per_sensor_shapes(name, mine, m)
            det.load_state_dict(mine, m)
            self.active[name] = det
        self._route.clear()


def _check_per_sensor_shapes(group: str, arrays: dict, meta: dict) -> None:
    """ValueError unless every per-sensor array has one row per listed sensor: a crafted file
    with a valid checksum would otherwise broadcast one row (e.g. a last timestamp) to all."""
    names = meta.get("sensors")
    if not isinstance(names, list) or not all(type(x) is str for x in names) or len(set(names)) != len(names):
        raise ValueError(f"group {group!r}: the sensor list is not a list of distinct ids")
    n = len(names)
    for key, arr in arrays.items():
        if key.startswith(("bank.", "seasonal.")):
            continue  # model weights / profiles: shapes checked by their own loaders
        if getattr(arr, "ndim", 0) < 1 or arr.shape[0] != n:
            raise ValueError(f"group {group!r}: array {key!r} has shape {getattr(arr, 'shape', None)}, "
                             f"expected {n} rows (one per sensor)")


def _pairs(index: np.ndarray, width: np.ndarray, n_names: int):
    """The distinct (sensor, width) pairs of a batch in order of first appearance: (row -> pair,
    pair -> sensor position, pair -> width). One width for the whole batch (the usual case):
    the pairs are the sensors."""
    if len(width) == 0 or width.min() == width.max():
        w = int(width[0]) if len(width) else 1
        return index, np.arange(n_names), np.full(n_names, w, np.int64)
    span = int(width.max()) + 1
    key = index * span + width
    keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    keys = keys[order]
    return rank[inverse.reshape(-1)], keys // span, keys % span
