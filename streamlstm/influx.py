"""InfluxDB line protocol, as Telegraf's MQTT output publishes it (``data_format = "influx"``).

One line per metric, several lines per message allowed::

    measurement[,tag=value...] field=value[,field=value...] [timestamp]

Escapes (backslash): ``,`` and space in measurements; ``,`` ``=`` and space in tag keys, tag
values and field keys; ``"`` and ``\\`` inside string field values. Field values: floats
(``1.5``, ``-3e2``), integers (``12i``), unsigned integers (``12u``), booleans (``t``, ``true``,
``F``, ...) and double-quoted strings. ``#`` starts a comment line; blank lines are skipped.
The timestamp is an integer in the input's ``timestamp_unit`` (Telegraf's default precision is
nanoseconds: ``timestamp_unit: ns``).

`parse_lines` never raises for bad input: each line is either a `Line` or a `LineError` whose
text says what was expected.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

__all__ = ["Line", "LineError", "SYNTAX", "parse_lines"]

SYNTAX = "measurement[,tag=value...] field=value[,field=value...] [timestamp]"
# Telegraf batches many metrics per message at most; this bounds the work per payload.
MAX_LINES = 10_000

_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_INT = re.compile(r"[+-]?[0-9]+[iu]\Z")
_TRUE = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE = frozenset({"f", "F", "false", "False", "FALSE"})
_TIMESTAMP = re.compile(r"-?[0-9]+\Z")


class Line(NamedTuple):
    number: int            # 1-based line number in the payload
    measurement: str
    tags: dict
    fields: list           # [(key, value)]: value float, int, bool or str
    timestamp: Optional[int]


class LineError(NamedTuple):
    number: int
    problem: str


def _split_unescaped(text: str, sep: str, quotes: bool = False) -> list:
    """Split at `sep` not preceded by a backslash (and, with `quotes`, not inside "...")."""
    parts, buf = [], []
    i, n = 0, len(text)
    in_quotes = False
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            buf.append(ch)
            buf.append(text[i + 1])
            i += 2
            continue
        if quotes and ch == '"':
            in_quotes = not in_quotes
        elif ch == sep and not in_quotes:
            parts.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    parts.append("".join(buf))
    if in_quotes:
        raise ValueError("a string field value has no closing quote")
    return parts


_UNESCAPE = re.compile(r"\\([,= \\\"])")


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(r"\1", text)


def _field_value(raw: str):
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ValueError(f"string value {raw[:40]!r} has no closing quote")
        return _unescape(raw[1:-1])
    if _FLOAT.match(raw):
        return float(raw)
    if _INT.match(raw):
        return int(raw[:-1])
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"field value {raw[:40]!r} is not a number (1.5, 12i, 12u), a boolean or a "
                     "\"string\"")


def _parse_line(number: int, line: str):
    try:
        return _parse_line_sections(number, line)
    except ValueError as exc:  # unbalanced quotes
        return LineError(number, str(exc))


def _parse_line_sections(number: int, line: str):
    sections = _split_unescaped(line, " ", quotes=True)
    sections = [s for s in sections if s != ""]  # runs of spaces between sections
    if len(sections) < 2:
        return LineError(number, f"no field set in {line[:60]!r}")
    if len(sections) > 3:
        return LineError(number, f"{len(sections)} space-separated parts (unescaped spaces?)")
    head = _split_unescaped(sections[0], ",")
    measurement = _unescape(head[0])
    if not measurement:
        return LineError(number, "the measurement is empty")
    tags = {}
    for tag in head[1:]:
        kv = _split_unescaped(tag, "=")
        if len(kv) != 2 or not kv[0] or not kv[1]:
            return LineError(number, f"tag {tag[:40]!r} is not key=value")
        tags[_unescape(kv[0])] = _unescape(kv[1])
    fields = []
    try:
        for item in _split_unescaped(sections[1], ",", quotes=True):
            kv = _split_unescaped(item, "=", quotes=True)
            if len(kv) != 2 or not kv[0] or not kv[1]:
                return LineError(number, f"field {item[:40]!r} is not key=value")
            fields.append((_unescape(kv[0]), _field_value(kv[1])))
    except ValueError as exc:
        return LineError(number, str(exc))
    timestamp = None
    if len(sections) == 3:
        if not _TIMESTAMP.match(sections[2]) or len(sections[2]) > 20:
            return LineError(number, f"timestamp {sections[2][:40]!r} is not an integer")
        timestamp = int(sections[2])
    return Line(number, measurement, tags, fields, timestamp)


def parse_lines(text: str) -> list:
    """[Line | LineError] for every non-blank, non-comment line of `text`."""
    out = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(out) >= MAX_LINES:
            out.append(LineError(number, f"more than {MAX_LINES} lines in one message"))
            break
        out.append(_parse_line(number, line))
    return out
