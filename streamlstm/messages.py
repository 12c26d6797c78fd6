"""What the daemon publishes: event and per-sensor state messages (JSON), and the time format
of its log lines."""
from __future__ import annotations

import datetime
import json
import math
import uuid

__all__ = ["event_id", "event_message", "format_time", "state_message"]

# Namespace of event ids (uuid5): a fixed value, so every worker and every replay agrees.
_EVENT_NAMESPACE = uuid.UUID("5f0e4c1a-7b2d-5d8e-9a63-2c1f4b8e6d70")


def format_time(ts) -> str:
    """Epoch seconds as UTC ISO 8601 for log lines (e.g. 2026-11-30T11:00:00.250Z), raw if odd."""
    try:
        dt = datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return repr(ts)
    text = dt.isoformat(timespec="milliseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _values(seq):
    """One-field readings as numbers, vectors as lists; NaN as null."""
    vals = [_num(v) for v in seq]
    return vals[0] if len(vals) == 1 else vals


def event_id(sensor: str, reading_time: float, kind: str) -> str:
    """A deterministic id of an event: the same sensor, reading time and kind give the same id,
    so a consumer drops the duplicates that at-least-once delivery and a replay from a snapshot
    (source: kafka) produce."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{sensor}\x00{float(reading_time)!r}\x00{kind}"))


def event_message(kind: str, incident) -> bytes:
    """JSON of one event. value/prediction/residual/score are those of the reading that opened
    the incident; end is null while it is open.

    The detector reports both events of an incident with the same (mutable) Incident, which
    may already be closed when its "anomaly" event is published (both in one batch): an
    "anomaly" event therefore shows the incident as it was when it opened. `event_id`: from the
    sensor, the time of the reading that opened (anomaly) or closed (resolved) it, and the kind.
    """
    opening = kind == "anomaly"
    at = incident.timestamp if opening or incident.end is None else incident.end
    return json.dumps({
        "event": kind,
        "event_id": event_id(incident.sensor, at, kind),
        "sensor": incident.sensor,
        "group": incident.group,
        "start": _num(incident.start),
        "end": None if opening or incident.end is None else _num(incident.end),
        "timestamp": _num(incident.timestamp),
        "value": _values(incident.value),
        "prediction": _values(incident.prediction),
        "residual": _values(incident.residual),
        "score": _num(incident.score),
        "threshold": _num(incident.threshold),
        "peak_score": _num(incident.score if opening else incident.peak_score),
        "peak_timestamp": _num(incident.timestamp if opening else incident.peak_timestamp),
        "readings": 1 if opening else int(incident.readings),
        "evidence": incident.evidence,  # the channel that opened it: model, seasonal, range or stuck
        "reason": None if opening else (incident.reason or None),  # returned, accepted or gap
    }, allow_nan=False, separators=(",", ":")).encode()


def state_message(batch, i: int, width: int) -> bytes:
    """JSON of a sensor's latest state (retained per-sensor state topic)."""
    return json.dumps({
        "sensor": batch.sensors[i],
        "group": batch.group_names[batch.group[i]],
        "timestamp": _num(batch.timestamps[i]),
        "value": _values(batch.values[i, :batch.value_width[i]]),
        "prediction": _values(batch.prediction[i, :width]),
        "residual": _values(batch.residual[i, :width]),
        "score": _num(batch.score[i]),
        "threshold": _num(batch.threshold[i]),
        "anomaly": bool(batch.is_anomaly[i]),
    }, allow_nan=False, separators=(",", ":")).encode()
