"""Pure logic of issue 14's input features: per-field sensors (fields.py), sensor_name templates,
time zones of naive ISO timestamps (DST), InfluxDB line protocol (influx.py), and the routing
algebra that refuses colliding ids and mixed widths (routing.py). End-to-end: test_devices.py."""
from __future__ import annotations

import datetime
import fnmatch
import zoneinfo

import pytest
from hypothesis import given, settings, strategies as st

from streamlstm.config import ConfigError, parse_config
from streamlstm.influx import Line, LineError, parse_lines
from streamlstm.payload import InputSpec, PayloadParser
from streamlstm.routing import contained, glob_pattern, input_patterns, intersects

NOW = 1.7e9


def parse(spec: InputSpec, topic: str, payload: bytes, now: float = NOW):
    return PayloadParser([spec], clock=lambda: now).parse(topic, payload)


# ------------------------------------------------------------------------------- fields

def test_listed_fields_each_a_sensor_missing_one_rejected_alone():
    spec = InputSpec("z2m/{sensor}", fields=("temperature", "humidity", "air.pm25"))
    r = parse(spec, "z2m/hall", b'{"temperature": 21.5, "air": {"pm25": 7}, "humidity": "n/a"}')
    assert [(x.sensor, x.values) for x in r.readings] == [("hall/temperature", (21.5,)), ("hall/air.pm25", (7.0,))]
    assert [reason for reason, _ in r.rejected] == ["not_a_number"]


def test_every_numeric_field_with_exclusions_skips_text_bools_arrays_and_the_timestamp():
    spec = InputSpec("tele/{sensor}/SENSOR", fields=("*",), exclude_fields=("ENERGY.To*",),
                     timestamp_field="ts")
    doc = (b'{"ts": 1700000000, "on": true, "state": "ON", "list": [1, 2], "AM2301": {"Temperature": 21.3},'
           b' "ENERGY": {"Power": 120, "Total": 5, "Today": 1}}')
    r = parse(spec, "tele/t1/SENSOR", doc)
    assert {x.sensor: x.values for x in r.readings} == {"t1/AM2301.Temperature": (21.3,), "t1/ENERGY.Power": (120.0,)}
    assert all(x.timestamp == 1.7e9 for x in r.readings) and r.rejected == []


def test_fields_need_an_object_and_say_what_was_expected():
    spec = InputSpec("z2m/{sensor}", fields=("temperature",))
    r = parse(spec, "z2m/hall", b"[1, 2]")
    assert r.rejected == [("bad_json", "hall: expected a JSON object with the fields temperature, got array")]
    r = parse(InputSpec("z2m/{sensor}", fields=("*",)), "z2m/hall", b'{"state": "ON"}')
    assert r.rejected == [("missing_field", "hall: no numeric field in the object")]


def test_sensor_name_renames_plain_inputs_and_refuses_wildcards_in_field_names():
    r = parse(InputSpec("vec/{sensor}", value_fields=("a", "b"), sensor_name="vec/{sensor}"),
              "vec/p1", b'{"a": 1, "b": 2}')
    assert [(x.sensor, x.values) for x in r.readings] == [("vec/p1", (1.0, 2.0))]
    r = parse(InputSpec("z2m/{sensor}", fields=("*",)), "z2m/hall", b'{"a+b": 1, "ok": 2}')
    assert [x.sensor for x in r.readings] == ["hall/ok"] and r.rejected[0][0] == "missing_field"


def test_home_assistant_placeholder_states_have_their_own_reason():
    spec = InputSpec("ha/{sensor}", format="number")
    assert parse(spec, "ha/t", b"unavailable").rejected == [("unavailable", "t: state unavailable")]
    assert parse(spec, "ha/t", b"unknown").rejected[0][0] == "unavailable"
    assert parse(spec, "ha/t", b"on").rejected[0][0] == "not_a_number"


# ------------------------------------------------------------------------------- time zones

BERLIN = "Europe/Berlin"


def ts_of(spec, text, now):
    r = parse(spec, "t/s", f'{{"value": 1, "ts": "{text}"}}'.encode(), now=now)
    assert r.rejected == [], r.rejected
    return r.readings[0].timestamp


def _utc(text):
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()


def test_naive_iso_times_are_in_timestamp_tz_and_utc_without_it():
    local = InputSpec("t/{sensor}", timestamp_unit="iso", timestamp_tz=BERLIN)
    utc = InputSpec("t/{sensor}", timestamp_unit="iso")
    assert ts_of(local, "2026-07-01T14:00:00", NOW) == _utc("2026-07-01T12:00:00")  # CEST
    assert ts_of(local, "2026-01-15T14:00:00", NOW) == _utc("2026-01-15T13:00:00")  # CET
    assert ts_of(utc, "2026-07-01T14:00:00", NOW) == _utc("2026-07-01T14:00:00")
    # An explicit offset wins over timestamp_tz.
    assert ts_of(local, "2026-07-01T14:00:00+00:00", NOW) == _utc("2026-07-01T14:00:00")


def test_dst_fall_back_repeated_hour_follows_the_arrival_time():
    # 2026-10-25 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    spec = InputSpec("t/{sensor}", timestamp_unit="iso", timestamp_tz=BERLIN)
    first, second = _utc("2026-10-25T00:30:00"), _utc("2026-10-25T01:30:00")
    assert ts_of(spec, "2026-10-25T02:30:00", now=first + 5) == first
    assert ts_of(spec, "2026-10-25T02:30:00", now=second + 5) == second
    # A device stamping every 20 minutes through the change: strictly increasing times.
    stamps = ["02:10", "02:30", "02:50", "02:10", "02:30", "02:50", "03:10"]
    arrivals = [_utc("2026-10-25T00:10:00") + 1200 * i for i in range(len(stamps))]
    got = [ts_of(spec, f"2026-10-25T{s}:00", now=a + 2) for s, a in zip(stamps, arrivals)]
    assert got == arrivals


def test_timestamp_units_and_the_hint_for_nanoseconds():
    for unit, raw in (("s", 1.7e9), ("ms", 1.7e12), ("us", 1.7e15), ("ns", 1.7e18)):
        r = parse(InputSpec("t/{sensor}", timestamp_unit=unit), "t/x", f'{{"value": 1, "ts": {raw:.0f}}}'.encode())
        assert r.readings[0].timestamp == pytest.approx(1.7e9), unit
    r = parse(InputSpec("t/{sensor}"), "t/x", b'{"value": 1, "ts": 1700000000000000000}')
    assert "it looks like ns: set the input's timestamp_unit: ns" in r.rejected[0][1]


def test_unknown_time_zone_is_refused_with_the_key_path():
    with pytest.raises(ConfigError) as e:
        parse_config({"inputs": [{"topic": "t/{sensor}", "timestamp_unit": "iso", "timestamp_tz": "Europe/Atlantis"}]})
    assert e.value.path == "inputs[0].timestamp_tz"
    with pytest.raises(ConfigError) as e:
        parse_config({"inputs": [{"topic": "t/{sensor}", "timestamp_tz": "Europe/Berlin"}]})
    assert e.value.path == "inputs[0].timestamp_tz" and "timestamp_unit: iso" in e.value.reason


def test_zoneinfo_has_data():
    # tzdata (PyPI) is a dependency for machines without /usr/share/zoneinfo.
    assert zoneinfo.ZoneInfo(BERLIN).utcoffset(datetime.datetime(2026, 7, 1)) == datetime.timedelta(hours=2)


# ------------------------------------------------------------------------------- line protocol

def test_line_protocol_escapes_types_and_comments():
    text = ('# comment\n'
            'weather\\ station,loc=a\\,b,k\\=v=x temp=21.5,count=3i,u=7u,ok=t,name="a \\"q\\" b, c" 1700000000000000000\n'
            '\n'
            'mem used=1\n')
    a, b = parse_lines(text)
    assert a == Line(2, "weather station", {"loc": "a,b", "k=v": "x"},
                     [("temp", 21.5), ("count", 3), ("u", 7), ("ok", True), ("name", 'a "q" b, c')],
                     1700000000000000000)
    assert b == Line(4, "mem", {}, [("used", 1.0)], None)


@pytest.mark.parametrize("line, problem", [
    ("cpu", "no field set"),
    ("cpu usage=abc", "is not a number (1.5, 12i, 12u), a boolean or a \"string\""),
    ("cpu usage=1 12ab", "is not an integer"),
    ("cpu,host usage=1", "tag 'host' is not key=value"),
    ('cpu name="open', "no closing quote"),
    ("cpu a=1 2 3", "4 space-separated parts"),
])
def test_line_protocol_errors_say_what_is_wrong(line, problem):
    (err,) = parse_lines(line)
    assert isinstance(err, LineError) and problem in err.problem


def test_influx_input_template_with_tags_and_missing_tag():
    spec = InputSpec("telegraf/{sensor+}", format="influx", timestamp_unit="ns",
                     sensor_name="{tag.host}/{measurement}/{field}")
    r = parse(spec, "telegraf/h/cpu", b"cpu,host=h1 idle=99,user=1 1700000000000000000\ncpu idle=1")
    assert [(x.sensor, x.timestamp) for x in r.readings] == [("h1/cpu/idle", 1.7e9), ("h1/cpu/user", 1.7e9)]
    assert r.rejected == [("missing_field", "h/cpu: line 2: no tag 'host' (sensor_name '{tag.host}/{measurement}/{field}')")]


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=200))
def test_line_protocol_parser_never_raises(text):
    for item in parse_lines(text):
        assert isinstance(item, (Line, LineError))


# ------------------------------------------------------------------------------- routing algebra

ALPHABET = "ab/"


def _strings(max_len=5):
    out = [""]
    for _ in range(max_len):
        out += [s + c for s in out if len(s) == len(out[-1]) for c in ALPHABET]
    return sorted(set(out))


STRINGS = _strings()


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet="ab/*?", min_size=1, max_size=5), st.text(alphabet="ab/*?", min_size=1, max_size=5))
def test_glob_intersection_and_containment_agree_with_fnmatch(g1, g2):
    p, q = glob_pattern(g1), glob_pattern(g2)
    both = [s for s in STRINGS if fnmatch.fnmatchcase(s, g1) and fnmatch.fnmatchcase(s, g2)]
    if both:
        assert intersects(p, q)  # exact: a common string exists
    if contained(p, q):  # sound: never claims containment wrongly
        assert all(fnmatch.fnmatchcase(s, g2) for s in STRINGS if fnmatch.fnmatchcase(s, g1))


def test_input_patterns_know_topic_levels_and_field_names():
    cfg = parse_config({"inputs": [
        {"topic": "a/{sensor}"},
        {"topic": "z/{sensor}", "fields": ["t", "h"], "sensor_name": "z/{sensor}/{field}"},
        {"topic": "b/{sensor+}", "sensor_name": "b/{sensor}"},
    ]})
    one_level, fields, multi = (input_patterns(i) for i in cfg.inputs)
    assert [p.text for p, _ in fields] == ["z/*/t", "z/*/h"] and all(w == 1 for _, w in fields)
    # {sensor} is one topic level: no '/' in it, so "z/x/t" cannot come from a/{sensor}.
    assert not intersects(one_level[0][0], fields[0][0])
    assert intersects(multi[0][0], glob_pattern("b/x/y")) and not intersects(one_level[0][0], glob_pattern("x/y"))
