"""One message, several sensors: which fields of a JSON object become their own sensors.

Devices like Zigbee2MQTT (``{"temperature": 21.5, "humidity": 40, "battery": 90}``) and Tasmota
(``{"Time": "...", "AM2301": {"Temperature": 21.3}, "ENERGY": {"Power": 120}}``) put several
measurements into one message. An input with ``fields`` turns each selected field into a sensor
of its own (named by ``sensor_name``, e.g. ``{sensor}/{field}``), each with its own model.

* listed fields (``fields: [temperature, humidity]``, dotted paths for nested objects): each must
  be present; a missing one is ``missing_field`` for that field only, the others still count;
* ``fields: ["*"]``: every numeric leaf of the object (nested objects are walked, their paths
  joined with ``.``); text, booleans, nulls and arrays are skipped without a rejection, because
  devices mix them in (Zigbee2MQTT's ``"state": "ON"``, Tasmota's ``"Time"``). ``exclude_fields``
  globs (``fnmatch``) over the paths leave fields out; the timestamp field is never a sensor.

Pure functions over decoded JSON; the parser (payload.py) turns the raw values into numbers and
readings, so number handling stays in one place.
"""
from __future__ import annotations

import fnmatch

__all__ = ["FieldSelector", "MISSING", "MAX_FIELDS"]

MISSING = object()
# A device object with more numeric leaves than this is no device report (or a hostile one):
# the walk stops there instead of making thousands of sensors from one message.
MAX_FIELDS = 256
_MAX_WALK_DEPTH = 8


class FieldSelector:
    """Compiled ``fields`` / ``exclude_fields`` of one input."""

    __slots__ = ("every", "paths", "exclude", "ts_path")

    def __init__(self, fields, exclude=(), timestamp_field=None):
        fields = tuple(fields)
        self.every = fields == ("*",)
        self.paths = () if self.every else tuple((f, tuple(f.split("."))) for f in fields)
        self.exclude = tuple(exclude or ())
        self.ts_path = timestamp_field

    def select(self, obj: dict):
        """[(field path, raw value or MISSING)] in a stable order; raw values are not checked."""
        if not self.every:
            return [(name, _lookup(obj, path)) for name, path in self.paths]
        out = []
        self._walk(obj, "", out, 0)
        return out

    def _walk(self, obj: dict, prefix: str, out: list, depth: int) -> None:
        for key, value in obj.items():
            if len(out) >= MAX_FIELDS:
                return
            if type(key) is not str or not key:
                continue
            path = prefix + key
            if path == self.ts_path or self._excluded(path):
                continue
            t = type(value)
            if t is int or t is float:
                out.append((path, value))
            elif t is dict and depth < _MAX_WALK_DEPTH:
                self._walk(value, path + ".", out, depth + 1)

    def _excluded(self, path: str) -> bool:
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(path, pattern):
                return True
        return False


def _lookup(obj, path):
    for seg in path:
        if type(obj) is not dict:
            return MISSING
        obj = obj.get(seg, MISSING)
        if obj is MISSING:
            return MISSING
    return obj
