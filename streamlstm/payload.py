"""MQTT payload -> readings (as arrays), topic template -> sensor id.

Called from paho's network thread for every message: `PayloadParser.parse` is fast and never
raises; the message's readings come as one `Chunk` (reading.py: sensor ids, timestamps and
values as arrays), whatever is wrong with it ends up in `ParseResult.rejected` as
``(reason, detail)`` with a reason from docs/design.md. A batch is read column by column
(`_batch_columns`, `_map_columns`: C-level passes over the decoded items, no Python step per
reading); when an item needs a closer look (anything that would be rejected, nested fields, ISO
timestamps) the message goes item by item instead, which gives the same readings and every
item's own reason. Templates and input specs are validated at
construction (config time) and raise ValueError there.

Payload shapes (``format``):

* ``number``: plain ASCII text holding one float (``21.5``, `` -3e2\\n``). ``nan``/``inf`` and
  overflowing numbers are ``non_finite``; anything else (``1_000``, non-ASCII digits, words) is
  ``not_a_number``.
* ``json``: one reading: an object with the value fields (dotted paths; several = one vector
  reading) and an optional timestamp field, a bare JSON number, or an array of numbers (vector).
* ``batch``: an array of objects (each may name its sensor in ``sensor``, else the topic's
  sensor), or an object mapping sensor id -> number, number list (vector) or reading object.
* ``influx``: InfluxDB line protocol (Telegraf's MQTT output), see influx.py; every numeric
  field of every line is a sensor named by ``sensor_name`` (``{measurement}``, ``{tag.NAME}``).
* ``auto``: text that is not a JSON object/array is read as ``number``; an array holding an
  object is a batch, an array of numbers a vector; an object is one reading. Sensor maps need
  ``format: batch``: in auto, ``{"temperature": 21.5}`` from a device whose value field is
  misconfigured would otherwise silently become sensor "temperature" for every device.

With ``fields`` (formats auto/json) each selected field of a JSON object is a sensor of its own
(fields.py); ``sensor_name`` (sensor_names.py) names the sensors of any input. Home Assistant's
``unavailable`` / ``unknown`` states are rejected as ``unavailable``, not ``not_a_number``.

JSON numbers only: strings, bools and nulls at a value field are ``not_a_number``. orjson is used
when importable; the stdlib path is tuned to give the same results (see `_json_loader`).
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import time
import zoneinfo
from itertools import chain, repeat
from typing import Callable, NamedTuple

import numpy as np

from .config import InputConfig, MqttConfig, section_problems
from .fields import MISSING as _FIELD_MISSING, FieldSelector
from .influx import SYNTAX as _INFLUX_SYNTAX, LineError, parse_lines
from .reading import Chunk, Reading
from .reasons import PARSER_REASONS
from .sensor_names import SensorName
from .topic_template import TopicTemplate, valid_sensor_id, valid_sensor_ids

__all__ = [
    "REASONS",
    "InputSpec",
    "Chunk",
    "ParseResult",
    "PayloadParser",
    "Reading",
    "TopicTemplate",
]

REASONS = PARSER_REASONS  # what `ParseResult.rejected` may say (reasons.py)
_UNIT_DIVISOR = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
BATCH_SENSOR_FIELD = "sensor"
MAX_BATCH_READINGS = 100_000
# Real sensor payloads are a few levels deep. The bound keeps the stdlib decoder clear of
# RecursionError and orjson clear of its stack (3.8 segfaults near 10^5 levels), so both agree.
MAX_JSON_DEPTH = 128
MAX_TIMESTAMP = 32503680000.0  # 3000-01-01T00:00:00Z
_DETAIL_CHARS = 80
_MAX_PAYLOAD_FIELD = MqttConfig.__dataclass_fields__["max_payload_bytes"]  # same key, same rules


class ParseResult(NamedTuple):
    chunks: list  # [Chunk]: the message's readings as arrays (reading.py); [] when it has none
    rejected: list  # [(reason, detail)]

    @property
    def readings(self) -> list:
        """The readings one by one (tests, tools; the daemon takes the chunks)."""
        return [r for chunk in self.chunks for r in chunk.readings()]


def _result(readings: list, rejected: list) -> ParseResult:
    """ParseResult of the paths that go item by item (one width per input: one chunk)."""
    return ParseResult([Chunk.of(readings)] if readings else [], rejected)


def _one(reading: Reading) -> ParseResult:
    sensor, timestamp, values = reading  # a float timestamp already: Chunk.one's layout, directly
    return ParseResult([Chunk([sensor], [timestamp], [values])], [])


def _short(value, limit: int = _DETAIL_CHARS) -> str:
    """Bounded repr for details: payloads are untrusted and may be huge."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if not text.isprintable():  # details go to logs: printable and on one line
        text = repr(text)[1:-1]
        if len(text) > limit + 3:
            text = text[:limit] + "..."
    return text


# ---------------------------------------------------------------------------------------------
# Input specs

def _split_path(path, what: str):
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what}: field path must be a non-empty string, got {path!r}")
    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"{what}: field path {path!r} has an empty segment")
    return tuple(parts)


@dataclasses.dataclass(frozen=True)
class InputSpec(InputConfig):
    """One entry of the config's ``inputs:`` list (config.InputConfig: keys, defaults, rules),
    with the payload size limit and the compiled topic template.

    Built in code (tests, tools) it is held to the config's rules, raised as ValueError.
    """

    max_payload_bytes: int = dataclasses.field(
        default=_MAX_PAYLOAD_FIELD.default, metadata=_MAX_PAYLOAD_FIELD.metadata)
    template: TopicTemplate = dataclasses.field(init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, inp: InputConfig, max_payload_bytes: int) -> "InputSpec":
        return cls(**{f.name: getattr(inp, f.name) for f in dataclasses.fields(InputConfig)},
                   max_payload_bytes=max_payload_bytes)

    def __post_init__(self):
        what = f"input {self.topic!r}"
        # Lists from code become tuples (frozen, hashable); the paths are compiled here, so a
        # malformed one is refused with the reason the parser would trip over.
        fields = (self.value_fields,) if isinstance(self.value_fields, str) else self.value_fields
        try:
            fields = tuple(fields)
        except TypeError:
            raise ValueError(f"{what}: value_fields must be a list of field paths") from None
        object.__setattr__(self, "value_fields", fields)
        object.__setattr__(self, "fields", tuple(self.fields or ()))
        object.__setattr__(self, "exclude_fields", tuple(self.exclude_fields or ()))
        for f in fields:
            _split_path(f, f"{what}: value_fields")
        for f in self.fields:
            if f != "*":
                _split_path(f, f"{what}: fields")
        if self.timestamp_field is not None:
            _split_path(self.timestamp_field, f"{what}: timestamp_field")
        object.__setattr__(self, "template", TopicTemplate(self.topic))
        # The topic's grammar is TopicTemplate's (it allows literal wildcard levels).
        problems = section_problems(self, skip=("topic",))
        if problems:
            key, reason = problems[0]
            raise ValueError(f"{what}: {key}: {reason}")

    @property
    def arity(self) -> int:
        return self.width


# ---------------------------------------------------------------------------------------------
# JSON decoding

class _Reject(Exception):
    """Internal: carries one rejection out of nested helpers."""

    def __init__(self, reason, detail):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


_I64_MIN = -(2 ** 63)
_U64_MAX = 2 ** 64 - 1


def _stdlib_int(text):
    # Same as orjson: integers beyond the 64-bit range come back as floats, and as an error
    # when they overflow to infinity. Also avoids int()'s 4300-digit ValueError.
    if len(text) <= 20:
        value = int(text)
        if _I64_MIN <= value <= _U64_MAX:
            return value
    value = float(text)
    if value - value != 0.0:
        raise ValueError("number out of range")
    return value


def _stdlib_float(text):
    value = float(text)
    if value - value != 0.0:  # orjson refuses numbers that overflow to infinity
        raise ValueError("number out of range")
    return value


def _stdlib_constant(name):
    raise ValueError(f"{name} is not JSON")  # orjson refuses NaN/Infinity too


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)


def _has_lone_surrogate(data: bytes) -> bool:
    """Whether a \\uD800-\\uDFFF escape is not part of a high+low pair (orjson refuses those).

    Works on the text: a parsed object may have lost the string to a duplicate key. Escapes are
    walked in order so that an escaped backslash before 'u' is not taken for an escape.
    """
    high_end = -1  # end of an unpaired high surrogate escape, or -1
    for m in _ESCAPE.finditer(data):
        if high_end >= 0 and m.start() != high_end:
            return True
        esc = m.group(1)
        cp = int(esc[1:], 16) if len(esc) == 5 else -1
        if high_end >= 0:
            if not 0xDC00 <= cp <= 0xDFFF:
                return True
            high_end = -1
        elif 0xD800 <= cp <= 0xDBFF:
            high_end = m.end()
        elif 0xDC00 <= cp <= 0xDFFF:
            return True
    return high_end >= 0


def _json_loader(backend: str):
    """(name, loads) where loads(bytes) -> object or raises. Imports stay local: no module state."""
    if backend in ("auto", "orjson"):
        try:
            import orjson
        except ImportError:
            if backend == "orjson":
                raise ValueError("json_backend 'orjson' asked for, but orjson is not installed"
                                 ) from None
        else:
            return "orjson", orjson.loads
    elif backend != "json":
        raise ValueError(f"json_backend must be auto, orjson or json, got {backend!r}")

    import json
    decoder = json.JSONDecoder(parse_float=_stdlib_float, parse_int=_stdlib_int,
                               parse_constant=_stdlib_constant)
    decode = decoder.decode

    def loads(data: bytes):
        # orjson takes UTF-8 only (no UTF-16/32 sniffing as json.loads(bytes) does).
        obj = decode(data.decode("utf-8"))
        # orjson refuses lone surrogate escapes; json.loads keeps them. Rarely needed check.
        if _SURROGATE_ESCAPE.search(data) is not None and _has_lone_surrogate(data):
            raise ValueError("lone surrogate in string")
        return obj

    return "json", loads


# An unterminated string runs to the end (so every byte is scanned once: linear time).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
# One pass drops everything but brackets and folds '[{' -> '(' and ']}' -> ')'.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_PAREN_CHUNK = 64


def _too_deep(data: bytes, limit: int) -> bool:
    """Whether the JSON text nests deeper than `limit`, without recursion, in linear time."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Brackets inside strings do not nest. In any valid prefix this finds the same strings as a
    # JSON decoder, so the bound holds for whatever part a decoder would read.
    if b'"' in data:
        if b"\\" in data:
            data = _JSON_STRING.sub(b"", data)
        else:  # no escapes (the usual case): strings end at the next quote
            data = b"".join(data.split(b'"')[0::2])
    parens = data.translate(_TO_PARENS, _NOT_BRACKETS)
    # Chunks that cannot reach the limit even if all-opening are skipped at C speed; the
    # per-byte walk runs only near the limit, so nesting bombs stop within a few chunks.
    depth = 0
    for start in range(0, len(parens), _PAREN_CHUNK):
        chunk = parens[start:start + _PAREN_CHUNK]
        opens = chunk.count(40)  # '('
        if depth + opens <= limit:
            # Below 0 the text is invalid JSON anyway; clamping only overestimates (safe side).
            depth = max(0, depth + 2 * opens - len(chunk))
            continue
        for ch in chunk:
            depth = depth + 1 if ch == 40 else max(0, depth - 1)
            if depth > limit:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Plain numbers

# ASCII float grammar only: no '_' separators, no non-ASCII digits (float() takes both).
_PLAIN_NUMBER = re.compile(rb"[+-]?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]++)?")
_PLAIN_NON_FINITE = re.compile(rb"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def _plain_number(data: bytes, sensor: str):
    """float, or raise _Reject."""
    text = data.strip()
    if _PLAIN_NUMBER.fullmatch(text) is not None:
        value = float(text)
        if value - value == 0.0:
            return value
        raise _Reject("non_finite",
                      f"{sensor}: {_short(text[:100].decode('ascii'))} overflows a float")
    if _PLAIN_NON_FINITE.fullmatch(text) is not None:
        raise _Reject("non_finite", f"{sensor}: {text.decode('ascii')}")
    _check_unavailable(text, sensor)
    raise _Reject("not_a_number", f"{sensor}: payload {_short(text[:100])}")


# Home Assistant's placeholder states (statestream publishes them like any state): an entity
# that is offline is no malformed payload, so it gets a reason of its own (logged at DEBUG).
_UNAVAILABLE_STATES = (b"unavailable", b"unknown")


def _check_unavailable(text: bytes, sensor: str) -> None:
    if text.lower() in _UNAVAILABLE_STATES:
        raise _Reject("unavailable", f"{sensor}: state {text.decode('ascii')}")


# ---------------------------------------------------------------------------------------------
# Readings from decoded JSON

_MISSING = object()


def _number(value, sensor, what):
    """float from a decoded JSON value, or raise _Reject."""
    t = type(value)
    if t is float:
        if value - value == 0.0:
            return value
        raise _Reject("non_finite", f"{sensor}: {what}: {value!r}")
    if t is int:
        try:
            return float(value)
        except OverflowError:
            raise _Reject("non_finite", f"{sensor}: {what}: integer overflows a float") from None
    raise _Reject("not_a_number",
                  f"{sensor}: {what}: expected a number, got {_show(value)}")


def _show(value) -> str:
    """Type and a short view of a decoded JSON value, never a repr of a whole container."""
    kind = _json_type(value)
    if type(value) in (dict, list):
        return f"{kind} of {len(value)}"
    return f"{kind} {_short(value, 40)}"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool",
            type(None): "null"}.get(type(value), type(value).__name__)


def _lookup(obj, path):
    for seg in path:
        t = type(obj)
        if t is dict:
            obj = obj.get(seg, _MISSING)
            if obj is _MISSING:
                return _MISSING
        elif t is list and seg.isdigit() and seg.isascii():
            idx = int(seg)
            if idx >= len(obj):
                return _MISSING
            obj = obj[idx]
        else:
            return _MISSING
    return obj


class _Compiled:
    """Per-input lookup tables, prepared once."""

    __slots__ = ("spec", "template", "format", "paths", "single_key", "ts_path", "ts_unit",
                 "arity", "max_bytes", "namer", "selector", "tz", "columns")

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.template = spec.template
        self.format = spec.format
        self.paths = tuple(_split_path(f, "value_fields") for f in spec.value_fields)
        # One top-level field: plain dict.get on the hot path.
        self.single_key = self.paths[0][0] if len(self.paths) == 1 and len(self.paths[0]) == 1 \
            else None
        self.ts_path = (None if spec.timestamp_field is None
                        else _split_path(spec.timestamp_field, "timestamp_field"))
        self.ts_unit = spec.timestamp_unit
        self.arity = len(self.paths)
        self.max_bytes = spec.max_payload_bytes
        self.namer = SensorName(spec.sensor_template)
        self.tz = zoneinfo.ZoneInfo(spec.timestamp_tz) if spec.timestamp_tz else None
        if spec.format == "influx":
            # Line protocol: every numeric field unless listed; the timestamp is no field there.
            self.selector = FieldSelector(spec.fields or ("*",), spec.exclude_fields)
            self.arity = 1
        elif spec.fields:
            self.selector = FieldSelector(spec.fields, spec.exclude_fields, spec.timestamp_field)
            self.arity = 1
        else:
            self.selector = None
        # Batch items read column by column (_batch_columns) when every field is a top-level
        # key and the timestamp a number: (value keys, timestamp key or None). Else None.
        flat = all(len(p) == 1 for p in self.paths) and (self.ts_path is None or len(self.ts_path) == 1)
        self.columns = ((tuple(p[0] for p in self.paths), self.ts_path[0] if self.ts_path else None)
                        if flat and self.ts_unit != "iso" else None)


_UTC = datetime.timezone.utc


def _local_timestamp(dt: datetime.datetime, tz, now) -> float:
    """A naive wall-clock time in zone `tz` -> epoch seconds.

    At a DST fall-back the same wall time happens twice (fold 0 and 1). A device stamps the
    present, so the occurrence nearer to the arrival time `now` is the one it meant; taking
    always the first would move every reading of the repeated hour an hour back (out_of_order).
    """
    first = dt.replace(tzinfo=tz, fold=0).timestamp()
    second = dt.replace(tzinfo=tz, fold=1).timestamp()
    if first == second or now is None:
        return first
    return first if abs(first - now) <= abs(second - now) else second


def _timestamp(raw, unit, sensor, tz=None, now=None):
    """Seconds since the epoch from a decoded timestamp field, or raise _Reject.

    Naive ISO times are in `tz` (the input's timestamp_tz), or UTC when it is None.
    """
    t = type(raw)
    if unit == "iso":
        if t is not str:
            raise _Reject("bad_timestamp",
                          f"{sensor}: expected an ISO 8601 string, got {_json_type(raw)}")
        try:
            dt = datetime.datetime.fromisoformat(raw)
            if dt.tzinfo is None:
                ts = dt.replace(tzinfo=_UTC).timestamp() if tz is None else _local_timestamp(dt, tz, now)
            else:
                ts = dt.timestamp()
        except (ValueError, OverflowError, OSError):
            raise _Reject("bad_timestamp", f"{sensor}: {_short(raw, 40)}") from None
    else:
        if t is int or t is float:
            try:
                ts = float(raw)
            except OverflowError:
                raise _Reject("bad_timestamp", f"{sensor}: out of range") from None
            if unit != "s":
                ts /= _UNIT_DIVISOR[unit]
        else:
            raise _Reject("bad_timestamp",
                          f"{sensor}: expected a number ({unit}), got {_show(raw)}")
    if not 0.0 <= ts <= MAX_TIMESTAMP:  # also catches NaN
        raise _Reject("bad_timestamp", f"{sensor}: {_show(raw)} is before 1970 or after 3000"
                                       f"{_unit_hint(ts, unit)}")
    return ts


def _unit_hint(ts: float, unit: str) -> str:
    """What timestamp_unit a far-future number probably is in (Telegraf sends nanoseconds)."""
    if unit == "iso" or not ts > MAX_TIMESTAMP:
        return ""
    seconds = ts * _UNIT_DIVISOR[unit]
    for cand in ("ms", "us", "ns"):
        if _UNIT_DIVISOR[cand] > _UNIT_DIVISOR[unit] and 0 <= seconds / _UNIT_DIVISOR[cand] <= MAX_TIMESTAMP:
            return f" in {unit}; it looks like {cand}: set the input's timestamp_unit: {cand}"
    return ""


def _reading_from_object(obj: dict, sensor: str, c: _Compiled, now: float) -> Reading:
    if c.single_key is not None:
        raw = obj.get(c.single_key, _MISSING)
        if raw is _MISSING:
            raise _Reject("missing_field", f"{sensor}: no field {c.single_key!r}")
        values = (_number(raw, sensor, c.single_key),)
    else:
        vals = []
        for path in c.paths:
            raw = _lookup(obj, path)
            if raw is _MISSING:
                raise _Reject("missing_field", f"{sensor}: no field {'.'.join(path)!r}")
            vals.append(_number(raw, sensor, ".".join(path)))
        values = tuple(vals)
    ts = now
    if c.ts_path is not None:
        raw = obj.get(c.ts_path[0], _MISSING) if len(c.ts_path) == 1 else _lookup(obj, c.ts_path)
        if raw is not _MISSING and raw is not None:
            ts = _timestamp(raw, c.ts_unit, sensor, c.tz, now)
    return Reading(sensor, ts, values)


def _vector(raw: list, sensor: str, c: _Compiled) -> tuple:
    if len(raw) != c.arity:
        raise _Reject("wrong_arity",
                      f"{sensor}: {len(raw)} values, expected {c.arity}")
    return tuple(_number(v, sensor, f"value[{i}]") for i, v in enumerate(raw))


def _scalar(raw, sensor: str, c: _Compiled) -> tuple:
    if c.arity != 1 and (type(raw) is int or type(raw) is float):
        raise _Reject("wrong_arity", f"{sensor}: 1 value, expected {c.arity}")
    return (_number(raw, sensor, "value"),)


def _renamed(result: ParseResult, c: _Compiled) -> ParseResult:
    """Readings renamed by the input's sensor_name (e.g. ``vec/{sensor}``): once per sensor."""
    rejected = result.rejected
    chunks = []
    for chunk in result.chunks:
        renamed = {s: c.namer.render(s) for s in dict.fromkeys(chunk.sensors)}
        sensors = list(map(renamed.__getitem__, chunk.sensors))
        if valid_sensor_ids(renamed.values()):
            chunks.append(Chunk(sensors, chunk.timestamps, chunk.values))
            continue
        keep = []
        for i, (old, sid) in enumerate(zip(chunk.sensors, sensors)):
            if valid_sensor_id(sid):
                keep.append(i)
            else:
                rejected.append(("missing_field", f"{old}: sensor_name gives an invalid sensor id "
                                                  f"{_short(sid, 40)}"))
        if keep:
            chunks.append(Chunk([sensors[i] for i in keep], chunk.timestamps[keep], chunk.values[keep]))
    return ParseResult(chunks, rejected)


_NUMBERS = frozenset((int, float))
_NUMBERS_OR_NONE = frozenset((int, float, type(None)))
_ID_OR_NONE = frozenset((str, type(None)))


def _number_column(raw: list):
    """float64 array of JSON numbers, or None when one is anything else (or overflows)."""
    if not _NUMBERS.issuperset(map(type, raw)):
        return None
    arr = np.array(raw, dtype=np.float64)
    return arr if np.isfinite(arr).all() else None


def _batch_columns(items: list, sensor: str, c: _Compiled, now: float):
    """A batch array read column by column (C-level passes over the items, no Python step per
    reading), or None when some item needs a closer look (a rejection, an unusual field): the
    item-by-item path then gives the same readings and the exact reasons."""
    if c.columns is None or set(map(type, items)) != {dict}:
        return None
    value_keys, ts_key = c.columns
    n = len(items)
    sensors = list(map(dict.get, items, repeat(BATCH_SENSOR_FIELD)))
    kinds = set(map(type, sensors))
    if kinds == {type(None)}:
        sensors = [sensor] * n
    else:
        if not _ID_OR_NONE.issuperset(kinds):
            return None
        if type(None) in kinds:
            sensors = [sensor if s is None else s for s in sensors]
        if not valid_sensor_ids(dict.fromkeys(sensors)):
            return None
    columns = []
    for key in value_keys:
        col = _number_column(list(map(dict.get, items, repeat(key))))
        if col is None:
            return None
        columns.append(col)
    values = columns[0].reshape(n, 1) if len(columns) == 1 else np.stack(columns, axis=1)
    if ts_key is None:
        return Chunk(sensors, np.full(n, now, dtype=np.float64), values)
    raw = list(map(dict.get, items, repeat(ts_key)))
    if not _NUMBERS_OR_NONE.issuperset(map(type, raw)):
        return None
    ts = np.array(raw, dtype=np.float64)  # None (no timestamp) -> NaN -> the arrival time
    if c.ts_unit != "s":
        ts /= _UNIT_DIVISOR[c.ts_unit]
    missing = np.isnan(ts)
    ts[missing] = now
    if not ((ts >= 0.0) & (ts <= MAX_TIMESTAMP)).all():
        return None
    return Chunk(sensors, ts, values)


def _map_columns(doc: dict, c: _Compiled, now: float):
    """A sensor map of numbers (or of number lists) as one chunk, or None when some entry needs
    the entry-by-entry path (a rejection, a reading object)."""
    keys = list(doc)
    if not valid_sensor_ids(keys):
        return None
    raw = list(doc.values())
    kinds = set(map(type, raw))
    if kinds.issubset(_NUMBERS) and c.arity == 1:
        values = _number_column(raw)
    elif kinds == {list} and set(map(len, raw)) == {c.arity}:
        flat = _number_column(list(chain.from_iterable(raw)))
        values = None if flat is None else flat.reshape(len(raw), c.arity)
    else:
        return None
    if values is None:
        return None
    return Chunk(keys, np.full(len(keys), now, dtype=np.float64), values.reshape(len(keys), c.arity))


class PayloadParser:
    """Turns (topic, payload) into readings for the inputs of the config, in order.

    The first input whose template matches the topic handles the message. Thread-safe: no state
    changes after construction. ``json_backend``: auto (orjson if importable), orjson or json.
    """

    def __init__(self, inputs, clock: Callable[[], float] = time.time, *,
                 json_backend: str = "auto", max_batch: int = MAX_BATCH_READINGS,
                 max_depth: int = MAX_JSON_DEPTH):
        inputs = list(inputs)
        for spec in inputs:
            if not isinstance(spec, InputSpec):
                raise ValueError(f"inputs must be InputSpec objects, got {type(spec).__name__}")
        if type(max_batch) is not int or max_batch <= 0:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        # Depths near 1000 reach the stdlib decoder's recursion limit: results would then differ.
        if type(max_depth) is not int or not 2 <= max_depth <= 512:
            raise ValueError(f"max_depth must be an integer in [2, 512], got {max_depth!r}")
        self.inputs = tuple(inputs)
        self._compiled = tuple(_Compiled(s) for s in inputs)
        self._clock = clock
        self.json_backend, self._loads = _json_loader(json_backend)
        self.max_batch = max_batch
        self.max_depth = max_depth

    @property
    def subscriptions(self) -> tuple:
        """MQTT topic filters to subscribe to, deduplicated, in input order."""
        return tuple(dict.fromkeys(c.template.subscription for c in self._compiled))

    def match(self, topic: str):
        """(InputSpec, sensor id) of the first input whose template matches, or None."""
        for c in self._compiled:
            sensor = c.template.match(topic)
            if sensor is not None:
                return c.spec, sensor
        return None

    def parse(self, topic: str, payload: bytes) -> ParseResult:
        try:
            result = self._parse(topic, payload)
        except _Reject as r:
            result = ParseResult([], [(r.reason, r.detail)])
        except Exception as e:  # noqa: BLE001 - a bug here must not kill paho's network thread
            return ParseResult([], [("bad_json", f"unexpected {type(e).__name__}")])
        rejected = result.rejected
        for i, (reason, detail) in enumerate(rejected):
            # Details carry sensor ids from topics/payloads: keep log lines short and one line.
            if len(detail) > 2 * _DETAIL_CHARS or not detail.isprintable():
                rejected[i] = (reason, _short(detail, 2 * _DETAIL_CHARS))
        return result

    # -----------------------------------------------------------------------------------------

    def _parse(self, topic, payload) -> ParseResult:
        sensor = None
        for c in self._compiled:
            sensor = c.template.match(topic)
            if sensor is not None:
                break
        else:
            return ParseResult([], [("unknown_topic", f"topic {_short(topic)}")])
        if type(payload) is not bytes:
            if isinstance(payload, str):
                payload = payload.encode("utf-8", "surrogatepass")
            else:
                payload = bytes(payload)  # bytearray / memoryview
        if len(payload) > c.max_bytes:
            return ParseResult([], [("too_large", f"{sensor}: {len(payload)} bytes, limit "
                                                  f"{c.max_bytes}")])
        if c.format == "influx":
            return self._influx(payload, sensor, c)
        if c.selector is not None:
            return self._fields(payload, sensor, c)
        result = self._parse_one(payload, sensor, c)
        if not c.namer.simple:
            result = _renamed(result, c)
        return result

    def _parse_one(self, payload, sensor, c) -> ParseResult:
        fmt = c.format
        if fmt == "number":
            value = _plain_number(payload, sensor)
            return ParseResult([Chunk.one(sensor, self._clock(), (value,))], [])
        if fmt == "auto":
            head = payload.lstrip()[:1]
            if head != b"{" and head != b"[":
                value = _plain_number(payload, sensor)
                if c.arity != 1:
                    raise _Reject("wrong_arity", f"{sensor}: 1 value, expected {c.arity}")
                return ParseResult([Chunk.one(sensor, self._clock(), (value,))], [])
        doc = self._decode(payload, sensor)
        now = self._clock()
        t = type(doc)
        if fmt == "batch":
            if t is list:
                return self._batch_list(doc, sensor, c, now)
            if t is dict:
                return self._batch_map(doc, c, now)
            raise _Reject("bad_json", f"{sensor}: batch must be an array or object, got "
                                      f"{_json_type(doc)}")
        if t is dict:
            return _one(_reading_from_object(doc, sensor, c, now))
        if t is list:
            # auto: an empty array is an empty batch (a gateway with nothing to report).
            if fmt == "auto" and (not doc or any(type(x) is dict for x in doc)):
                return self._batch_list(doc, sensor, c, now)
            if fmt == "json" and any(type(x) is dict for x in doc):
                raise _Reject("bad_json", f"{sensor}: array of objects on a json input "
                                          "(use format batch or auto)")
            return ParseResult([Chunk.one(sensor, now, _vector(doc, sensor, c))], [])
        return ParseResult([Chunk.one(sensor, now, _scalar(doc, sensor, c))], [])

    def _decode(self, payload: bytes, sensor: str):
        if _too_deep(payload, self.max_depth):
            raise _Reject("bad_json", f"{sensor}: nested deeper than {self.max_depth}")
        try:
            return self._loads(payload)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise _Reject("bad_json", f"{sensor}: invalid JSON") from None

    def _check_batch_size(self, n, sensor):
        if n > self.max_batch:
            raise _Reject("too_large", f"{sensor}: batch of {n} readings, limit {self.max_batch}")

    def _batch_list(self, items: list, sensor: str, c: _Compiled, now: float) -> ParseResult:
        self._check_batch_size(len(items), sensor)
        if not items:
            return ParseResult([], [])
        chunk = _batch_columns(items, sensor, c, now)
        if chunk is not None:
            return ParseResult([chunk], [])
        return self._batch_items(items, sensor, c, now)

    @staticmethod
    def _batch_items(items: list, sensor: str, c: _Compiled, now: float) -> ParseResult:
        """A batch array item by item: every item's own reason."""
        readings = []
        rejected = []
        for i, item in enumerate(items):
            if type(item) is not dict:
                rejected.append(("bad_json", f"{sensor}: batch item {i} is {_json_type(item)}, "
                                             "not an object"))
                continue
            item_sensor = item.get(BATCH_SENSOR_FIELD)
            if item_sensor is None:
                item_sensor = sensor
            elif not valid_sensor_id(item_sensor):
                rejected.append(("bad_sensor_id", f"{sensor}: batch item {i}: invalid sensor id "
                                                  f"{_show(item_sensor)}"))
                continue
            try:
                readings.append(_reading_from_object(item, item_sensor, c, now))
            except _Reject as r:
                rejected.append((r.reason, r.detail))
        return _result(readings, rejected)

    def _batch_map(self, doc: dict, c: _Compiled, now: float) -> ParseResult:
        self._check_batch_size(len(doc), "batch")
        if not doc:
            return ParseResult([], [])
        chunk = _map_columns(doc, c, now)
        if chunk is not None:
            return ParseResult([chunk], [])
        return self._map_items(doc, c, now)

    @staticmethod
    def _map_items(doc: dict, c: _Compiled, now: float) -> ParseResult:
        """A sensor map entry by entry: every entry's own reason."""
        readings = []
        rejected = []
        for key, raw in doc.items():
            if not valid_sensor_id(key):
                rejected.append(("bad_sensor_id", f"invalid sensor id {_short(key, 40)}"))
                continue
            try:
                t = type(raw)
                if t is list:
                    readings.append(Reading(key, now, _vector(raw, key, c)))
                elif t is dict:
                    readings.append(_reading_from_object(raw, key, c, now))
                else:
                    readings.append(Reading(key, now, _scalar(raw, key, c)))
            except _Reject as r:
                rejected.append((r.reason, r.detail))
        return _result(readings, rejected)

    # --- one message, several sensors (fields.py, influx.py) --------------------------------

    def _fields(self, payload: bytes, sensor: str, c: _Compiled) -> ParseResult:
        doc = self._decode(payload, sensor)
        if type(doc) is not dict:
            want = "every numeric field" if c.selector.every else \
                "the fields " + ", ".join(name for name, _ in c.selector.paths)
            raise _Reject("bad_json", f"{sensor}: expected a JSON object with {want}, got "
                                      f"{_json_type(doc)}")
        now = self._clock()
        ts = now
        if c.ts_path is not None:
            raw = _lookup(doc, c.ts_path)
            if raw is not _MISSING and raw is not None:
                ts = _timestamp(raw, c.ts_unit, sensor, c.tz, now)
        readings, rejected = [], []
        self._field_readings(c.selector.select(doc), sensor, c, ts, None, None, readings, rejected)
        if not readings and not rejected:
            rejected.append(("missing_field", f"{sensor}: no numeric field in the object"))
        return _result(readings, rejected)

    @staticmethod
    def _field_readings(selected, sensor, c, ts, measurement, tags, readings, rejected) -> None:
        for name, raw in selected:
            if raw is _FIELD_MISSING:
                rejected.append(("missing_field", f"{sensor}: no field {name!r}"))
                continue
            sid = c.namer.render(sensor, field=name, measurement=measurement, tags=tags)
            if not valid_sensor_id(sid):
                rejected.append(("missing_field", f"{sensor}: field {_short(name, 40)} gives an invalid "
                                                  f"sensor id {_short(sid, 40)}"))
                continue
            try:
                readings.append(Reading(sid, ts, (_number(raw, sid, name),)))
            except _Reject as r:
                rejected.append((r.reason, r.detail))

    def _influx(self, payload: bytes, sensor: str, c: _Compiled) -> ParseResult:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject("bad_line_protocol", f"{sensor}: not UTF-8 text; expected InfluxDB line "
                                               f"protocol: {_INFLUX_SYNTAX}") from None
        if text.lstrip()[:1] in ("{", "["):
            raise _Reject("bad_line_protocol", f"{sensor}: JSON on a format: influx input; expected InfluxDB "
                                               f"line protocol: {_INFLUX_SYNTAX}")
        now = self._clock()
        readings, rejected = [], []
        for line in parse_lines(text):
            if isinstance(line, LineError):
                rejected.append(("bad_line_protocol", f"{sensor}: line {line.number}: {line.problem} "
                                                      f"(expected {_INFLUX_SYNTAX})"))
                continue
            missing = c.namer.missing_tag(line.tags)
            if missing is not None:
                rejected.append(("missing_field", f"{sensor}: line {line.number}: no tag {missing!r} "
                                                  f"(sensor_name {c.namer.template!r})"))
                continue
            ts = now
            if line.timestamp is not None:
                try:
                    ts = _timestamp(line.timestamp, c.ts_unit, sensor)
                except _Reject as r:
                    rejected.append((r.reason, r.detail))
                    continue
            self._field_readings(c.selector.select(dict(line.fields)), sensor, c, ts, line.measurement,
                                 line.tags, readings, rejected)
        if not readings and not rejected:
            rejected.append(("bad_line_protocol", f"{sensor}: no numeric field; expected InfluxDB line "
                                                  f"protocol: {_INFLUX_SYNTAX}"))
        self._check_batch_size(len(readings), sensor)
        return _result(readings, rejected)
