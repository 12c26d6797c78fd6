"""Unit tests for streamlstm.payload (formats, rejections, templates) and streamlstm.ratelimit."""
import importlib.util
import logging
import math
import json
import threading

import numpy as np
import pytest

from streamlstm.payload import (
    MAX_BATCH_READINGS,
    REASONS,
    InputSpec,
    ParseResult,
    PayloadParser,
    Reading,
    TopicTemplate,
)
from streamlstm.ratelimit import RateLimitedLogger

HAVE_ORJSON = importlib.util.find_spec("orjson") is not None
NOW = 1_700_000_000.0

BACKENDS = ["json", pytest.param("orjson", marks=pytest.mark.skipif(
    not HAVE_ORJSON, reason="orjson not installed"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make(backend="json", **spec):
    spec.setdefault("topic", "sensors/{sensor}")
    return PayloadParser([InputSpec(**spec)], clock=lambda: NOW, json_backend=backend)


def reasons(result):
    return [r for r, _ in result.rejected]


def one(result):
    assert result.rejected == [], result.rejected
    assert len(result.readings) == 1
    return result.readings[0]


# --- topic templates ------------------------------------------------------------------------

@pytest.mark.parametrize("template, subscription", [
    ("plant/{sensor}/temperature", "plant/+/temperature"),
    ("{sensor}", "+"),
    ("plant/{sensor+}", "plant/#"),
    ("{sensor+}", "#"),
    ("site/+/{sensor}/#", "site/+/+/#"),
    ("$SYS/{sensor}", "$SYS/+"),
    ("a//{sensor}", "a//+"),
    ("zone/température/{sensor}", "zone/température/+"),
])
def test_template_subscription(template, subscription):
    assert TopicTemplate(template).subscription == subscription


@pytest.mark.parametrize("template, topic, sensor", [
    ("plant/{sensor}/temperature", "plant/boiler-1/temperature", "boiler-1"),
    ("plant/{sensor}/temperature", "plant/boiler-1/humidity", None),
    ("plant/{sensor}/temperature", "plant/boiler-1", None),
    ("plant/{sensor}/temperature", "plant/boiler-1/temperature/x", None),
    ("plant/{sensor}/temperature", "plant//temperature", None),  # empty id
    ("plant/{sensor}/temperature", "Plant/b/temperature", None),  # case-sensitive
    ("plant/{sensor+}", "plant/hall/a/t1", "hall/a/t1"),
    ("plant/{sensor+}", "plant/t1", "t1"),
    ("plant/{sensor+}", "plant", None),
    ("plant/{sensor+}", "plant/", None),
    ("plant/{sensor+}", "plant/a//b", None),
    ("site/+/{sensor}", "site/north/t1", "t1"),
    ("site/+/{sensor}", "site//t1", "t1"),  # '+' matches an empty level, as in MQTT
    ("site/+/{sensor}", "site/north/t1/x", None),
    ("site/{sensor}/#", "site/t1", "t1"),  # '#' includes the parent level
    ("site/{sensor}/#", "site/t1/a/b", "t1"),
    ("site/{sensor}/#", "site", None),
    ("{sensor}/temp", "$SYS/temp", None),  # wildcards never match '$' topics at level 1
    ("{sensor+}", "$SYS/x", None),
    ("+/{sensor}", "$SYS/x", None),
    ("$SYS/{sensor}", "$SYS/x", "x"),
    ("{sensor}/temp", "dev1/temp", "dev1"),
    ("zone/température/{sensor}", "zone/température/ü1", "ü1"),
    ("plant/{sensor}", "plant/a+b", None),  # wildcard characters are never in a topic name
    ("plant/{sensor}", "plant/#", None),
    ("plant/{sensor}", "plant/a\x00", None),
    ("plant/{sensor}", "", None),
    ("plant/{sensor}", "plant/" + "x" * 5000, None),  # id too long for an event topic
])
def test_template_match(template, topic, sensor):
    assert TopicTemplate(template).match(topic) == sensor


def test_template_match_non_string():
    t = TopicTemplate("a/{sensor}")
    assert t.match(None) is None
    assert t.match(b"a/x") is None


@pytest.mark.parametrize("template, message", [
    ("plant/temperature", "no {sensor}"),
    ("", "empty"),
    ("plant/{sensor}/{sensor}", "more than one"),
    ("plant/{sensor+}/temp", "must be the last level"),
    ("plant/#/temp", "'#' must be the last level"),
    ("plant/x{sensor}", "not a valid placeholder"),
    ("plant/{sensr}", "not a valid placeholder"),
    ("plant/a+/{sensor}", "whole level"),
    ("plant/{sensor}\x00", "NUL"),
    ("plant/\ud800/{sensor}", "UTF-8"),
    (42, "must be a string"),
])
def test_template_invalid(template, message):
    with pytest.raises(ValueError, match=message):
        TopicTemplate(template)


# --- input specs ----------------------------------------------------------------------------

def test_input_spec_defaults_and_freeze():
    spec = InputSpec("sensors/{sensor}", value_fields=["a", "b.c"])
    assert spec.value_fields == ("a", "b.c")
    assert spec.arity == 2
    assert spec.format == "auto" and spec.timestamp_field == "ts" and spec.timestamp_unit == "s"
    assert spec.template.subscription == "sensors/+"
    with pytest.raises(Exception):
        spec.format = "json"
    assert spec == InputSpec("sensors/{sensor}", value_fields=("a", "b.c"))
    hash(spec)


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="xml"), "format"),
    (dict(value_fields=[]), "empty"),
    (dict(value_fields=["a..b"]), "empty segment"),
    (dict(value_fields=["a", "a"]), "duplicates"),
    (dict(value_fields=[3]), "non-empty string"),
    (dict(value_fields=["a", "b"], format="number"), "one value"),
    (dict(timestamp_unit="minutes"), "timestamp_unit"),
    (dict(timestamp_field=""), "non-empty"),
    (dict(max_payload_bytes=0), "max_payload_bytes"),
    (dict(max_payload_bytes=True), "max_payload_bytes"),
    (dict(topic="no/placeholder"), "no {sensor}"),
])
def test_input_spec_invalid(kwargs, message):
    kwargs.setdefault("topic", "sensors/{sensor}")
    with pytest.raises(ValueError, match=message):
        InputSpec(**kwargs)


def test_parser_constructor_checks():
    with pytest.raises(ValueError):
        PayloadParser([{"topic": "a/{sensor}"}])
    with pytest.raises(ValueError, match="json_backend"):
        PayloadParser([], json_backend="simdjson")
    with pytest.raises(ValueError):
        PayloadParser([], max_batch=0)
    with pytest.raises(ValueError):
        PayloadParser([], max_depth=10_000)
    p = PayloadParser([])
    assert p.json_backend == ("orjson" if HAVE_ORJSON else "json")
    assert reasons(p.parse("a/b", b"1")) == ["unknown_topic"]


@pytest.mark.skipif(HAVE_ORJSON, reason="orjson is installed")
def test_orjson_requested_but_missing():
    with pytest.raises(ValueError, match="orjson"):
        PayloadParser([], json_backend="orjson")


# --- plain numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("payload, value", [
    (b"21.5", 21.5), (b" 21.5\n", 21.5), (b"\t-3\r\n", -3.0), (b"+4", 4.0), (b"1e3", 1000.0),
    (b"1E-3", 0.001), (b".5", 0.5), (b"5.", 5.0), (b"0", 0.0), (b"-0.0", -0.0),
    (b"1e-400", 0.0), (b"123456789012345678901234567890", 1.2345678901234568e29),
])
def test_plain_number(backend, payload, value):
    for fmt in ("auto", "number"):
        r = one(make(backend, format=fmt).parse("sensors/t1", payload))
        assert r == Reading("t1", NOW, (value,))
        assert type(r.values[0]) is float


@pytest.mark.parametrize("payload, reason", [
    (b"nan", "non_finite"), (b"NaN", "non_finite"), (b"-inf", "non_finite"),
    (b"Infinity", "non_finite"), (b"1e400", "non_finite"), (b"-1e400", "non_finite"),
    (b"1" * 400, "non_finite"),
    (b"1_000", "not_a_number"), ("١٢".encode(), "not_a_number"), ("１２".encode(), "not_a_number"),
    ("²".encode(), "not_a_number"), (b"0x10", "not_a_number"), (b"1,5", "not_a_number"),
    (b"", "not_a_number"), (b"   ", "not_a_number"), (b"abc", "not_a_number"),
    (b"1 2", "not_a_number"), (b"--1", "not_a_number"), (b"1e", "not_a_number"),
    (b".", "not_a_number"), (b"true", "not_a_number"), (b"null", "not_a_number"),
    (b'"21.5"', "not_a_number"), (b"\xff\xfe", "not_a_number"), (b"\x00", "not_a_number"),
    (b"21.5\x00", "not_a_number"), ("\u00a021.5".encode(), "not_a_number"),
])
def test_plain_number_rejected(backend, payload, reason):
    for fmt in ("auto", "number"):
        res = make(backend, format=fmt).parse("sensors/t1", payload)
        assert res.readings == [] and reasons(res) == [reason], res


def test_plain_number_on_vector_input_is_wrong_arity():
    res = make(value_fields=["a", "b"]).parse("sensors/t1", b"1.5")
    assert reasons(res) == ["wrong_arity"]


# --- single JSON readings -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["auto", "json"])
def test_json_object(backend, fmt):
    p = make(backend, format=fmt)
    assert one(p.parse("sensors/t1", b'{"value": 21.5}')) == Reading("t1", NOW, (21.5,))
    assert one(p.parse("sensors/t1", b'{"value": 3, "ts": 1700000001.25}')) == \
        Reading("t1", 1700000001.25, (3.0,))
    # Null or absent timestamp: arrival time. Unknown fields are ignored.
    assert one(p.parse("sensors/t1", b'{"value": 1, "ts": null, "unit": "C"}')).timestamp == NOW
    # Big integers are fine as long as they fit a float.
    assert one(p.parse("sensors/t1", b'{"value": 123456789012345678901234567890}')).values == \
        (1.2345678901234568e29,)


def test_json_bare_number_and_vector(backend):
    p = make(backend, format="json")
    assert one(p.parse("sensors/t1", b" 7 ")) == Reading("t1", NOW, (7.0,))
    assert reasons(p.parse("sensors/t1", b"[1, 2]")) == ["wrong_arity"]
    assert reasons(p.parse("sensors/t1", b"NaN")) == ["bad_json"]
    assert reasons(p.parse("sensors/t1", b'"7"')) == ["not_a_number"]
    assert reasons(p.parse("sensors/t1", b"null")) == ["not_a_number"]
    assert reasons(p.parse("sensors/t1", b'[{"value": 1}]')) == ["bad_json"]  # batch on json
    v = make(backend, format="json", value_fields=["x", "y"])
    assert one(v.parse("sensors/t1", b"[1, 2.5]")) == Reading("t1", NOW, (1.0, 2.5))
    assert reasons(v.parse("sensors/t1", b"3")) == ["wrong_arity"]


def test_vector_reading_dotted_paths(backend):
    p = make(backend, value_fields=["temp", "env.humidity", "env.pressure.hpa", "list.1"],
             timestamp_field="meta.time", timestamp_unit="ms")
    payload = (b'{"temp": 21, "env": {"humidity": 40.5, "pressure": {"hpa": 1013}},'
               b' "list": [9, 8], "meta": {"time": 1700000000123}}')
    r = one(p.parse("sensors/t1", payload))
    assert r == Reading("t1", 1700000000.123, (21.0, 40.5, 1013.0, 8.0))
    res = p.parse("sensors/t1", b'{"temp": 21, "env": {"humidity": 40.5}, "list": [1, 2]}')
    assert reasons(res) == ["missing_field"] and "env.pressure.hpa" in res.rejected[0][1]
    res = p.parse("sensors/t1", b'{"temp": 21, "env": 5, "list": [1, 2]}')
    assert reasons(res) == ["missing_field"]
    res = p.parse("sensors/t1", b'{"temp": 21, "env": {"humidity": 40.5, "pressure": {"hpa": 1}},'
                                b' "list": [1]}')
    assert reasons(res) == ["missing_field"]


@pytest.mark.parametrize("payload, reason", [
    (b'{"value": "21.5"}', "not_a_number"),
    (b'{"value": true}', "not_a_number"),
    (b'{"value": false}', "not_a_number"),
    (b'{"value": null}', "not_a_number"),
    (b'{"value": [1]}', "not_a_number"),
    (b'{"value": {"v": 1}}', "not_a_number"),
    (b'{"value": NaN}', "bad_json"),
    (b'{"value": Infinity}', "bad_json"),
    (b'{"value": 1e400}', "bad_json"),  # orjson refuses it, json is made to agree
    (b'{"value": ' + b"9" * 5000 + b"}", "bad_json"),
    (b'{"temp": 1}', "missing_field"),
    (b'{"value": 1', "bad_json"),
    (b'{"value": 1,}', "bad_json"),
    (b"{'value': 1}", "bad_json"),
    (b'\xef\xbb\xbf{"value": 1}', "not_a_number"),  # BOM: not JSON, not a number either
    (b'{"value": 1, "x": "\xff"}', "bad_json"),
    (b'{"value": 1, "x": "\\ud800"}', "bad_json"),  # lone surrogate escape
    (b'{"value": 1, "x": "\xed\xa0\x80"}', "bad_json"),  # UTF-8-encoded surrogate
    (b'{"value": 1} {"value": 2}', "bad_json"),
    (b'{"value": 1, "ts": -5}', "bad_timestamp"),
    (b'{"value": 1, "ts": 4e10}', "bad_timestamp"),
    (b'{"value": 1, "ts": "1700000000"}', "bad_timestamp"),
    (b'{"value": 1, "ts": true}', "bad_timestamp"),
    (b'{"value": 1, "ts": 18446744073709551616}', "bad_timestamp"),
])
def test_json_rejected(backend, payload, reason):
    for fmt in (["auto", "json"] if not payload.startswith(b"\xef") else ["auto"]):
        res = make(backend, format=fmt).parse("sensors/t1", payload)
        assert res.readings == [] and reasons(res) == [reason], (fmt, res)


def test_surrogate_pair_escape_is_fine(backend):
    p = make(backend, format="batch")
    r = one(p.parse("sensors/t1", b'[{"sensor": "\\ud83d\\ude00", "value": 1}]'))
    assert r.sensor == "\U0001F600"
    # An escaped backslash before 'ud800' is plain text, not a surrogate.
    r = one(p.parse("sensors/t1", b'[{"sensor": "a\\\\ud800", "value": 1}]'))
    assert r.sensor == "a\\ud800"


@pytest.mark.parametrize("unit, raw, expected", [
    ("s", b"1700000000", 1700000000.0),
    ("s", b"1700000000.5", 1700000000.5),
    ("s", b"0", 0.0),
    ("ms", b"1700000000500", 1700000000.5),
    ("iso", b'"2023-11-14T22:13:20Z"', 1700000000.0),
    ("iso", b'"2023-11-14T22:13:20"', 1700000000.0),  # naive = UTC
    ("iso", b'"2023-11-14T23:13:20+01:00"', 1700000000.0),
    ("iso", b'"2023-11-14 22:13:20.250000+00:00"', 1700000000.25),
])
def test_timestamps(backend, unit, raw, expected):
    p = make(backend, timestamp_unit=unit)
    r = one(p.parse("sensors/t1", b'{"value": 1, "ts": ' + raw + b"}"))
    assert r.timestamp == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("unit, raw", [
    ("s", b"-1"), ("s", b"32503680001"), ("s", b"1e300"), ("ms", b"-1"), ("ms", b"4e13"),
    ("s", b'"2023-11-14T22:13:20Z"'), ("iso", b"1700000000"), ("iso", b'"yesterday"'),
    ("iso", b'"1969-12-31T23:59:59Z"'), ("iso", b'"3001-01-01T00:00:00"'),
    ("iso", b'"2023-13-01T00:00:00"'), ("iso", b'"2023-11-14T22:13:20+25:00"'),
    ("iso", '"２０２３-11-14"'.encode()), ("iso", b'""'), ("iso", b"[]"),
    ("iso", b'"0001-01-01T00:00:00+14:00"'), ("iso", b'"9999-12-31T23:59:59-14:00"'),
])
def test_bad_timestamps(backend, unit, raw):
    p = make(backend, timestamp_unit=unit)
    res = p.parse("sensors/t1", b'{"value": 1, "ts": ' + raw + b"}")
    assert reasons(res) == ["bad_timestamp"], res


def test_no_timestamp_field_uses_arrival_time(backend):
    p = make(backend, timestamp_field=None)
    assert one(p.parse("sensors/t1", b'{"value": 1, "ts": -5}')).timestamp == NOW


def test_clock_is_read_per_message():
    ticks = iter(range(100, 200))
    p = PayloadParser([InputSpec("s/{sensor}")], clock=lambda: float(next(ticks)),
                      json_backend="json")
    assert one(p.parse("s/a", b"1")).timestamp == 100.0
    res = p.parse("s/a", b'[{"value": 1}, {"value": 2}]')
    assert [r.timestamp for r in res.readings] == [101.0, 101.0]  # one arrival time per batch


# --- batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["auto", "batch"])
def test_batch_array_partly_bad(backend, fmt):
    p = make(backend, format=fmt)
    payload = (b'[{"value": 1, "ts": 1700000001},'      # topic sensor
               b' {"sensor": "b", "value": 2},'          # named sensor, arrival time
               b' {"sensor": "c", "value": "x"},'        # not_a_number
               b' {"sensor": "d"},'                      # missing_field
               b' {"sensor": "e", "value": 3, "ts": -1},'  # bad_timestamp
               b' {"sensor": "f+", "value": 4},'         # invalid id -> bad_sensor_id
               b' {"sensor": 7, "value": 4},'            # invalid id -> bad_sensor_id
               b' 5,'                                    # not an object -> bad_json
               b' {"sensor": "g", "value": 1e300, "ts": null}]')
    res = p.parse("sensors/t1", payload)
    assert res.readings == [Reading("t1", 1700000001.0, (1.0,)), Reading("b", NOW, (2.0,)),
                            Reading("g", NOW, (1e300,))]
    assert reasons(res) == ["not_a_number", "missing_field", "bad_timestamp", "bad_sensor_id",
                            "bad_sensor_id", "bad_json"]
    assert "c:" in res.rejected[0][1]


def test_batch_map(backend):
    p = make(backend, format="batch")
    res = p.parse("sensors/gw", b'{"t1": 21.5, "t2": 3, "t3": [4], "t4": "x", "t5": [1, 2],'
                                b' "t6": true}')
    assert res.readings == [Reading("t1", NOW, (21.5,)), Reading("t2", NOW, (3.0,)),
                            Reading("t3", NOW, (4.0,))]
    assert reasons(res) == ["not_a_number", "wrong_arity", "not_a_number"]
    assert p.parse("sensors/gw", b"{}") == ParseResult([], [])


def test_batch_map_vector_and_objects(backend):
    p = make(backend, format="batch", value_fields=["x", "y"])
    res = p.parse("sensors/gw", b'{"a": [1, 2], "b": [1, 2, 3], "c": 5, "d": [1, "2"],'
                                b' "e": {"x": 1, "y": 2, "ts": 1700000005}, "f": {"x": 1},'
                                b' "g+": [1, 2], "": [1, 2]}')
    assert res.readings == [Reading("a", NOW, (1.0, 2.0)), Reading("e", 1700000005.0, (1.0, 2.0))]
    assert reasons(res) == ["wrong_arity", "wrong_arity", "not_a_number", "missing_field",
                            "bad_sensor_id", "bad_sensor_id"]


def test_auto_object_is_one_reading(backend):
    p = make(backend)
    # Never a sensor map in auto: a misconfigured value field must not invent sensors.
    for payload in (b'{"temperature": 21.5}', b'{"a": 1, "b": 2}', b'{"data": {"value": 1}}',
                    b"{}"):
        assert reasons(p.parse("sensors/t1", payload)) == ["missing_field"]
    # Top-level "sensor" in a single object does not re-route it: topics decide.
    assert one(p.parse("sensors/t1", b'{"sensor": "x", "value": 1}')).sensor == "t1"


def test_auto_arrays(backend):
    p = make(backend)
    assert p.parse("sensors/t1", b"[]") == ParseResult([], [])
    assert one(p.parse("sensors/t1", b"[3]")) == Reading("t1", NOW, (3.0,))
    assert reasons(p.parse("sensors/t1", b"[1, 2]")) == ["wrong_arity"]
    assert reasons(make(backend, format="json").parse("sensors/t1", b"[]")) == ["wrong_arity"]
    assert reasons(p.parse("sensors/t1", b'["1"]')) == ["not_a_number"]
    assert reasons(p.parse("sensors/t1", b"[true]")) == ["not_a_number"]
    res = p.parse("sensors/t1", b'[1, {"value": 2}]')  # has an object: a batch
    assert res.readings == [Reading("t1", NOW, (2.0,))] and reasons(res) == ["bad_json"]


def test_batch_format_rejects_scalars(backend):
    p = make(backend, format="batch")
    assert reasons(p.parse("sensors/t1", b"5")) == ["bad_json"]
    assert reasons(p.parse("sensors/t1", b"abc")) == ["bad_json"]


def test_batch_size_limit(backend):
    p = PayloadParser([InputSpec("s/{sensor}", max_payload_bytes=10**8)], clock=lambda: NOW,
                      json_backend=backend, max_batch=3)
    assert len(p.parse("s/a", b"[" + b",".join([b'{"value": 1}'] * 3) + b"]").readings) == 3
    res = p.parse("s/a", b"[" + b",".join([b'{"value": 1}'] * 4) + b"]")
    assert res.readings == [] and reasons(res) == ["too_large"]
    p = PayloadParser([InputSpec("s/{sensor}", format="batch")], json_backend=backend,
                      max_batch=3)
    assert reasons(p.parse("s/a", b'{"a": 1, "b": 2, "c": 3, "d": 4}')) == ["too_large"]
    assert MAX_BATCH_READINGS == 100_000


def test_large_batch(backend):
    n = 20_000
    payload = b"[" + b",".join(b'{"sensor": "s%d", "value": %d.5, "ts": 1700000000}' % (i, i)
                               for i in range(n)) + b"]"
    res = make(backend, max_payload_bytes=len(payload)).parse("sensors/gw", payload)
    assert len(res.readings) == n and res.rejected == []
    assert res.readings[-1] == Reading(f"s{n - 1}", 1700000000.0, (n - 0.5,))


def test_a_batch_message_is_one_chunk_of_arrays(backend):
    """What the daemon queues: one chunk per message, sensors per row, float64 columns, payload
    order; a rejected item sends the message item by item with the same readings for the rest."""
    p = make(backend, format="batch", value_fields=["x", "y"], timestamp_field="ts", timestamp_unit="ms")
    items = [{"sensor": "a", "x": 1, "y": 2.5, "ts": 1700000000500}, {"x": -0.0, "y": 2 ** 63, "ts": None},
             {"sensor": "b", "x": 3, "y": 4, "ts": 1700000001000}]
    res = p.parse("sensors/gw", json.dumps(items).encode())
    assert res.rejected == [] and len(res.chunks) == 1
    [chunk] = res.chunks
    assert chunk.sensors == ["a", "gw", "b"] and len(chunk) == 3
    assert chunk.timestamps.dtype == np.float64 and chunk.timestamps.tolist() == [1700000000.5, NOW, 1700000001.0]
    assert chunk.values.dtype == np.float64 and chunk.values.tolist() == [[1.0, 2.5], [-0.0, 2.0 ** 63], [3.0, 4.0]]
    assert res.readings[1] == Reading("gw", NOW, (-0.0, 9223372036854775808.0))
    items[1]["y"] = True  # a bool is no number: the message goes item by item
    res = p.parse("sensors/gw", json.dumps(items).encode())
    assert reasons(res) == ["not_a_number"] and res.chunks[0].sensors == ["a", "b"]
    assert res.chunks[0].values.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    # sensor maps of numbers and of vectors
    m = make(backend, format="batch")
    [chunk] = m.parse("sensors/gw", b'{"t1": 21.5, "t2": 3}').chunks
    assert chunk.sensors == ["t1", "t2"] and chunk.values.tolist() == [[21.5], [3.0]]
    v = make(backend, format="batch", value_fields=["a", "b"])
    [chunk] = v.parse("sensors/gw", b'{"p1": [1, 2], "p2": [3.5, 4]}').chunks
    assert chunk.values.shape == (2, 2) and chunk.timestamps.tolist() == [NOW, NOW]


def test_sensor_name_renames_a_chunk_once_per_sensor(backend):
    p = make(backend, format="batch", sensor_name="plant/{sensor}")
    [chunk] = p.parse("sensors/gw", b'[{"sensor": "a", "value": 1}, {"sensor": "b", "value": 2},'
                                    b' {"sensor": "a", "value": 3}]').chunks
    assert chunk.sensors == ["plant/a", "plant/b", "plant/a"] and chunk.values[:, 0].tolist() == [1, 2, 3]


# --- size, depth, topics --------------------------------------------------------------------

def test_too_large_checked_before_decoding(backend):
    p = make(backend, max_payload_bytes=10)
    assert one(p.parse("sensors/t1", b"1234567890")).values == (1234567890.0,)
    for payload in (b"12345678901", b"\xff" * 11, b"{" * 11):
        assert reasons(p.parse("sensors/t1", payload)) == ["too_large"]


def test_unknown_topic_before_anything_else(backend):
    p = make(backend, max_payload_bytes=10)
    assert reasons(p.parse("other/t1", b"x" * 100)) == ["unknown_topic"]
    assert reasons(p.parse("sensors/t1/extra", b"1")) == ["unknown_topic"]
    assert reasons(p.parse("sensors/", b"1")) == ["unknown_topic"]
    assert reasons(p.parse(None, b"1")) == ["unknown_topic"]


def test_first_matching_input_wins(backend):
    p = PayloadParser([
        InputSpec("plant/{sensor}/raw", format="number"),
        InputSpec("plant/{sensor+}", format="json", value_fields=["v"]),
    ], clock=lambda: NOW, json_backend=backend)
    assert one(p.parse("plant/a/raw", b"1")).sensor == "a"
    assert one(p.parse("plant/a/b", b'{"v": 2}')) == Reading("a/b", NOW, (2.0,))
    assert reasons(p.parse("plant/a/raw", b'{"v": 2}')) == ["not_a_number"]
    assert p.match("plant/a/raw")[1] == "a" and p.match("elsewhere") is None


@pytest.mark.parametrize("depth", [127, 128])
def test_depth_within_limit(backend, depth):
    p = make(backend, format="json", value_fields=["a" + ".a" * (depth - 1)])
    payload = b'{"a":' * depth + b"1" + b"}" * depth
    assert one(p.parse("sensors/t1", payload)).values == (1.0,)


@pytest.mark.parametrize("payload", [
    b'{"a":' * 129 + b"1" + b"}" * 129,
    b"[" * 129 + b"]" * 129,
    b"[" * 1000 + b"]" * 1000,  # near the stdlib decoder's recursion limit
    b"[" * 100_000 + b"]" * 100_000,  # orjson 3.8 overflows its stack on this without a bound
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[{" * 50_000,
    b"[" * 200 + b'"' + b'\\"' * 1000,  # unterminated string
])
def test_deep_json_is_bad_json(backend, payload):
    for fmt in ("auto", "json", "batch"):
        p = make(backend, format=fmt, max_payload_bytes=len(payload))
        assert reasons(p.parse("sensors/t1", payload)) == ["bad_json"]


def test_brackets_inside_strings_do_not_count(backend):
    p = make(backend, format="json")
    payload = b'{"value": 1, "note": "' + b"[" * 1000 + b'", "q": "\\"' + b"{" * 500 + b'"}'
    assert one(p.parse("sensors/t1", payload)).values == (1.0,)


def test_payload_types(backend):
    p = make(backend)
    assert one(p.parse("sensors/t1", bytearray(b"1"))).values == (1.0,)
    assert one(p.parse("sensors/t1", memoryview(b"2"))).values == (2.0,)
    assert one(p.parse("sensors/t1", "3")).values == (3.0,)
    res = p.parse("sensors/t1", None)
    assert res.readings == [] and set(reasons(res)) <= REASONS


def test_never_raises_on_broken_clock():
    def clock():
        raise RuntimeError("clock broke")
    p = PayloadParser([InputSpec("s/{sensor}")], clock=clock)
    res = p.parse("s/a", b"1")
    assert res.readings == [] and set(reasons(res)) <= REASONS


def test_details_are_short_and_printable(backend):
    p = make(backend, format="batch")
    res = p.parse("sensors/t1", b'[{"sensor": "\\n' + b"x" * 10_000 + b'", "value": 1},'
                                b' {"value": "' + b"y" * 10_000 + b'"}]')
    assert reasons(res) == ["bad_sensor_id", "not_a_number"]
    for _, detail in res.rejected:
        assert len(detail) < 300 and detail.isprintable()
    res = p.parse("sensors/" + "\x01" * 150, b"x")
    assert len(res.rejected[0][1]) <= 163 and res.rejected[0][1].isprintable()


def test_backends_agree_on_examples():
    if not HAVE_ORJSON:
        pytest.skip("orjson not installed")
    payloads = [b'{"value": 18446744073709551616}', b'{"value": -9223372036854775809}',
                b'{"value": 0.1e-320}', b'{"value": 2.2250738585072011e-308}', b"[1e400]",
                b'{"value": 1, "value": "x"}', b'{"value": 1}\n\t ', b"\x0c{}"]
    a = make("json", format="json")
    b = make("orjson", format="json")
    for payload in payloads:
        assert a.parse("sensors/x", payload) == b.parse("sensors/x", payload), payload


# --- rate-limited logger --------------------------------------------------------------------

class FakeLogger:
    def __init__(self, level=logging.DEBUG):
        self.level = level
        self.lines = []

    def isEnabledFor(self, level):
        return level >= self.level

    def log(self, level, msg, *args):
        record = logging.LogRecord("fake", level, __file__, 0, msg, args, None)
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # logging reports these in the handler, never raises
            text = "<format error>"
        self.lines.append((level, text))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_ratelimit_one_line_per_key_per_interval():
    log, clock = FakeLogger(), FakeClock()
    rl = RateLimitedLogger(log, 10.0, clock=clock)
    assert rl.log("bad_json", logging.WARNING, "rejected %s from %s", "bad_json", "t1")
    for _ in range(5):
        clock.t += 1
        assert not rl.log("bad_json", logging.WARNING, "rejected %s from %s", "bad_json", "t2")
    assert rl.log("too_large", logging.WARNING, "rejected too_large")  # other key, own window
    clock.t = 10.0
    assert rl.log("bad_json", logging.WARNING, "rejected %s from %s", "bad_json", "t3")
    clock.t = 20.0
    assert rl.log("bad_json", logging.WARNING, "100%% %s", "bad")
    assert log.lines == [
        (logging.WARNING, "rejected bad_json from t1"),
        (logging.WARNING, "rejected too_large"),
        (logging.WARNING, "rejected bad_json from t3 (5 similar messages suppressed)"),
        (logging.WARNING, "100% bad"),
    ]


def test_ratelimit_formats_odd_messages():
    log, clock = FakeLogger(), FakeClock()
    rl = RateLimitedLogger(log, 1.0, clock=clock)
    for msg, args in [("50%", ()), ("%(a)s!", ({"a": 1},)), ("%d", ("x",))]:
        rl.log(msg, logging.INFO, msg, *args)
        rl.log(msg, logging.INFO, msg, *args)
    clock.t = 1.0
    for msg, args in [("50%", ()), ("%(a)s!", ({"a": 1},)), ("%d", ("x",))]:
        rl.log(msg, logging.INFO, msg, *args)
    assert [line for _, line in log.lines[3:]] == [
        "50% (1 similar messages suppressed)",
        "1! (1 similar messages suppressed)",
        "%d ('x',) (1 similar messages suppressed)",
    ]


def test_ratelimit_disabled_level_and_flush():
    log, clock = FakeLogger(level=logging.WARNING), FakeClock()
    rl = RateLimitedLogger(log, 5.0, clock=clock)
    assert not rl.log("k", logging.DEBUG, "hidden")
    assert rl.log("k", logging.WARNING, "shown")
    assert not rl.log("k", logging.WARNING, "held")
    assert not rl.log("k", logging.WARNING, "held")
    assert rl.flush() == 1
    assert log.lines[-1] == (logging.WARNING, "k: 2 similar messages suppressed")
    assert rl.flush() == 0


def test_ratelimit_with_real_logger(caplog):
    clock = FakeClock()
    rl = RateLimitedLogger(logging.getLogger("streamlstm.test"), 10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="streamlstm.test"):
        for _ in range(3):
            rl.log("r", logging.WARNING, "rejected %d", 1)
        clock.t = 10.5
        rl.log("r", logging.WARNING, "rejected %d", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "rejected 1", "rejected 2 (2 similar messages suppressed)"]


def test_ratelimit_prunes_keys():
    log, clock = FakeLogger(), FakeClock()
    rl = RateLimitedLogger(log, 1.0, clock=clock, max_keys=10)
    for i in range(10):
        rl.log(i, logging.INFO, "x")
    clock.t = 2.0
    rl.log("new", logging.INFO, "x")
    assert len(rl._state) == 1


def test_ratelimit_threads_count_every_call():
    log, clock = FakeLogger(), FakeClock()
    rl = RateLimitedLogger(log, 100.0, clock=clock)
    emitted = []

    def worker():
        n = 0
        for _ in range(2000):
            n += rl.log("k", logging.INFO, "x")
        emitted.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(emitted) == 1
    clock.t = 100.0
    rl.log("k", logging.INFO, "x")
    assert log.lines[-1][1] == "x (7999 similar messages suppressed)"


def test_ratelimit_rejects_bad_interval():
    with pytest.raises(ValueError):
        RateLimitedLogger(FakeLogger(), -1)
    with pytest.raises(ValueError):
        RateLimitedLogger(FakeLogger(), math.nan)


@pytest.mark.parametrize("sensor", ["ctl\u0001x", "nl\nforged", "tab\tx", "del\u007fx", "c1\u0085x", "ls\u2028x",
                                    "bidi\u202ex", "nonchar\ufffe", "f+", "h#", "", "x" * 1025, "\u00e9" * 513])
def test_batch_sensor_ids_that_cannot_be_topic_levels_are_bad_sensor_id(backend, sensor):
    # Sensor ids become event-topic levels and log text: a broker drops the connection over a
    # control character in a topic, a newline forges a log line (issue 12, defect 1).
    p = make(backend, format="batch")
    for payload in (json.dumps([{"sensor": sensor, "value": 1}]), json.dumps({sensor: 1})):
        res = p.parse("sensors/gw", payload.encode())
        assert res.readings == [] and reasons(res) == ["bad_sensor_id"]
        assert res.rejected[0][1].isprintable()


def test_printable_unicode_sensor_ids_are_kept(backend):
    p = make(backend, format="batch")
    for sensor in ("k\u00fchlhaus/t 1", "\u6e29\u5ea6", "a" * 1024, "\u00e9" * 512):
        assert one(p.parse("sensors/gw", json.dumps({sensor: 1}).encode())).sensor == sensor
