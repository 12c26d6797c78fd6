"""Fuzzing PayloadParser: it never raises, readings are finite, rejections have known reasons.

Hypothesis costs ~0.5 ms per example on a small box, far too much for 10^5 single payloads in a
minute. So most tests draw a seed plus raw bytes and derive a few dozen payloads from them with a
seeded generator (replayable from the printed example); a few use plain strategies (with a
semantic oracle) for shrinkable cases. Each test asserts it produced its planned number of
payloads, and the plans add up to >= 100_000.

When orjson is installed every payload is also parsed by the stdlib backend and both results
must be identical.
"""
import datetime
import importlib.util
import json
import math
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm.payload import (
    MAX_TIMESTAMP,
    REASONS,
    InputSpec,
    ParseResult,
    PayloadParser,
    Reading,
    TopicTemplate,
    _batch_columns,
    _map_columns,
)

HAVE_ORJSON = importlib.util.find_spec("orjson") is not None
NOW = 1_700_000_000.0

SPECS = [
    InputSpec("a/{sensor}"),
    InputSpec("n/{sensor}", format="number"),
    InputSpec("j/{sensor}", format="json", value_fields=["x", "y.z"], timestamp_field="t",
              timestamp_unit="ms"),
    InputSpec("b/{sensor+}", format="batch", timestamp_unit="iso"),
    InputSpec("w/+/{sensor}/#", value_fields=["v"], timestamp_field="meta.ts"),
    InputSpec("s/{sensor}", max_payload_bytes=64),
]
TOPICS = ["a/t1", "n/t1", "j/t1", "b/x/y", "w/p/t1/q", "s/t1"]
UNKNOWN_TOPICS = ["", "/", "a", "a/", "a/t1/x", "x/t1", "$SYS/a", "a/+", "a/#", "b/", "b//x",
                  "w/p", "a/\x00", "A/t1", "n/t1/", "a/" + "x" * 2000]

PARSER = PayloadParser(SPECS, clock=lambda: NOW, json_backend="json")
OTHER = PayloadParser(SPECS, clock=lambda: NOW, json_backend="orjson") if HAVE_ORJSON else None

# Counts each test must reach (distinct payloads, or templates); asserted per test, and the
# payload plans are summed in test_plan_total.
PLAN = {}
PAYLOAD_PLANS = set()
FUZZ = dict(deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


def planned(name, examples, per_example, payloads=True):
    PLAN[name] = examples * per_example
    if payloads:
        PAYLOAD_PLANS.add(name)
    return settings(max_examples=examples, **FUZZ)


def check(topic, payload, parser=PARSER):
    """Parse with both backends and check every invariant; returns the result."""
    res = parser.parse(topic, payload)
    where = f"topic={topic!r} payload={payload[:200]!r}"
    assert type(res) is ParseResult, where
    assert type(res.readings) is list and type(res.rejected) is list, where
    match = parser.match(topic)
    if match is None:
        assert res.readings == [] and [r for r, _ in res.rejected] == ["unknown_topic"], where
    for r in res.readings:
        assert type(r) is Reading, where
        assert type(r.sensor) is str and r.sensor, where
        assert not any(c in r.sensor for c in "+#\x00"), where
        assert type(r.timestamp) is float and 0.0 <= r.timestamp <= MAX_TIMESTAMP, where
        assert type(r.values) is tuple and len(r.values) == match[0].arity, where
        for v in r.values:
            assert type(v) is float and math.isfinite(v), where
    for item in res.rejected:
        assert type(item) is tuple and len(item) == 2, where
        reason, detail = item
        assert reason in REASONS, where
        assert type(detail) is str and detail.isprintable() and len(detail) <= 200, where
    if not res.readings and not res.rejected:
        assert json.loads(payload) in ([], {}), where  # only an empty batch yields nothing
    if OTHER is not None and parser is PARSER:
        assert OTHER.parse(topic, payload) == res, where
    return res


# --- seeded payload generator ---------------------------------------------------------------

NUMBER_TOKENS = [
    "0", "-0", "1", "-1", "21.5", "1e3", "1E-3", "1e308", "1.7976931348623157e308", "1e309",
    "1e400", "-1e400", "1e-400", "5e-324", "2.2250738585072011e-308", "18446744073709551615",
    "18446744073709551616", "-9223372036854775809", "9" * 30, "9" * 400, "9" * 5000,
    "0.1", "123456789.123456789", "nan", "NaN", "-nan", "inf", "-Infinity", "Infinity",
    "1_000", "1__0", "١٢", "١.٥", "１２", "²", "𝟙", "٣e2", "0x10", "0o7", "1,5", "1.2.3", "--1",
    "+1", ".5", "5.", ".", "e5", "1e", "1e+", "true", "false", "null", '"21.5"', '"nan"', "[]",
    "{}", "01", "-", "+", " 1 ", "1\u00a0", "\u20071",
]
TEXT_NOISE = ["", " ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", "\ufeff", "\u00a0", "\u2028"]
KEYS = ["value", "x", "y", "z", "t", "ts", "v", "meta", "sensor", "", "a", "a.b", "\ud800",
        "😀", "value ", "VALUE"]
ISO = ['"2023-11-14T22:13:20Z"', '"2023-11-14T22:13:20"', '"2023-11-14 22:13:20.5+01:00"',
       '"1969-12-31T23:59:59Z"', '"3001-01-01"', '"2023-13-01"', '"yesterday"', '""',
       '"２０２３-11-14"', '"0001-01-01T00:00:00+14:00"', '"9999-12-31T23:59:59-14:00"',
       '"2023-11-14T22:13:20+24:00"', '"20231114T221320"']
MAP_KEYS = ['"t1"', '"t2/x"', '"a+b"', '"#"', '""', '"k"', '"\\ud800"', '"\\u0000"']
SENSORS = ['"t1"', '"t2/x"', '"a+b"', '"#"', '""', "1", "null", "true", '"\\u0000"',
           '"\\ud800"', '"\\ud83d\\ude00"', '"' + "s" * 2000 + '"', "[]", "{}"]


def gen_number(rng):
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(NUMBER_TOKENS)
    if roll < 0.6:
        return repr(rng.uniform(-1e6, 1e6))
    if roll < 0.75:
        mantissa = f"{rng.choice('-+')}{rng.randint(0, 9)}.{rng.randint(0, 999)}"
        return f"{mantissa}e{rng.randint(-500, 500)}"
    if roll < 0.9:
        return str(rng.randint(-(10 ** rng.randint(1, 40)), 10 ** rng.randint(1, 40)))
    return repr(rng.choice([math.inf, -math.inf, math.nan, 1e308 * 10, -0.0, 5e-324]))


def gen_value(rng, depth=0):
    roll = rng.random()
    if roll < 0.55 or depth > 3:
        return gen_number(rng)
    if roll < 0.65:
        return rng.choice(ISO + SENSORS)
    if roll < 0.8:
        return "[" + ",".join(gen_value(rng, depth + 1) for _ in range(rng.randint(0, 4))) + "]"
    return gen_object(rng, depth + 1)


def gen_object(rng, depth=0):
    parts = []
    for _ in range(rng.randint(0, 5)):
        key = rng.choice(KEYS)
        if key == "y" and rng.random() < 0.7:
            parts.append(f'"y": {{"z": {gen_number(rng)}}}')
        elif key == "meta" and rng.random() < 0.7:
            parts.append(f'"meta": {{"ts": {gen_timestamp(rng)}}}')
        elif key in ("t", "ts"):
            parts.append(f'"{key}": {gen_timestamp(rng)}')
        elif key == "sensor":
            parts.append(f'"sensor": {rng.choice(SENSORS)}')
        else:
            parts.append(f"{json.dumps(key)}: {gen_value(rng, depth)}")
    return "{" + ", ".join(parts) + "}"


def gen_timestamp(rng):
    roll = rng.random()
    if roll < 0.3:
        return str(rng.randint(-10, 4 * 10 ** 10))
    if roll < 0.5:
        return str(rng.randint(0, 4 * 10 ** 13))  # ms
    if roll < 0.7:
        return rng.choice(ISO)
    return gen_value(rng, 3)


def gen_good_number(rng):
    return rng.choice([str(rng.randint(-1000, 1000)), repr(rng.uniform(-1e3, 1e3)),
                       repr(rng.uniform(-1e300, 1e300)), gen_number(rng)])


def gen_reading(rng, spec):
    """Mostly well-formed reading for `spec`, so the accepting paths get fuzzed too."""
    if spec is not None and spec.format == "number" and rng.random() < 0.9:
        return gen_good_number(rng)
    doc = {}
    for path in spec.value_fields if spec is not None else ["value"]:
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = gen_good_number(rng) if rng.random() < 0.9 else gen_value(rng, 2)
    ts_field = spec.timestamp_field if spec is not None else "ts"
    if ts_field is not None and rng.random() < 0.7:
        unit = spec.timestamp_unit if spec is not None else "s"
        if rng.random() < 0.8:
            ts = rng.uniform(0, 3.2e10)
            good = {"s": repr(ts), "ms": str(int(ts * 1000)),
                    "iso": f'"{datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)}"'}
            value = good[unit]
        else:
            value = gen_timestamp(rng)
        node = doc
        *parents, leaf = ts_field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if rng.random() < 0.2:
        doc["sensor"] = rng.choice(SENSORS)
    return render(doc)


def render(doc):
    if isinstance(doc, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in doc.items()) + "}"
    return doc


def gen_batch(rng, spec=None):
    if rng.random() < 0.5:
        items = [gen_reading(rng, spec) if rng.random() < 0.6 else
                 gen_object(rng) if rng.random() < 0.8 else gen_value(rng)
                 for _ in range(rng.randint(0, 12))]
        return "[" + ", ".join(items) + "]"
    items = [f"{rng.choice(MAP_KEYS)}: {gen_value(rng)}" for _ in range(rng.randint(0, 8))]
    return "{" + ", ".join(items) + "}"


def mutate(rng, data: bytes, raw: bytes) -> bytes:
    if not data:
        return raw[:rng.randint(0, 32)]
    i = rng.randrange(len(data) + 1)
    roll = rng.random()
    if roll < 0.2:
        return data[:i]
    if roll < 0.4:
        return data[:i] + bytes([rng.randrange(256)]) + data[i:]
    if roll < 0.55:
        return data[:i] + data[rng.randint(i, len(data)):]
    if roll < 0.7 and i < len(data):
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    if roll < 0.85:
        j = rng.randint(0, len(raw))
        return data[:i] + raw[j:j + rng.randint(0, 16)] + data[i:]
    return data[:i] + data[i:i + rng.randint(1, 8)] * rng.randint(2, 5) + data[i:]


def gen_payload(rng, raw: bytes, spec=None) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        j = rng.randint(0, len(raw))
        text = raw[j:j + rng.randint(0, 64)]
    elif roll < 0.15:
        return rng.randbytes(rng.randint(0, 300))
    else:
        if roll < 0.3:
            text = gen_number(rng)
        elif roll < 0.45:
            text = gen_object(rng)
        elif roll < 0.65:
            text = gen_reading(rng, spec)
        elif roll < 0.85:
            text = gen_batch(rng, spec)
        else:
            text = gen_value(rng)
        if rng.random() < 0.3:
            text = rng.choice(TEXT_NOISE) + text + rng.choice(TEXT_NOISE)
        text = text.encode("utf-8", "surrogatepass")
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 4])):
        text = mutate(rng, text, raw)
    return text


def pick_topic(rng):
    roll = rng.random()
    if roll < 0.85:
        return rng.choice(TOPICS)
    if roll < 0.95:
        return rng.choice(UNKNOWN_TOPICS)
    return "".join(rng.choice("ab/+#$\x00x") for _ in range(rng.randint(0, 8)))


PER_EXAMPLE = 40


@planned("generated_payloads", 2000, PER_EXAMPLE)
@given(seed=st.integers(0, 2 ** 64), raw=st.binary(max_size=256))
def test_generated_payloads(seed, raw):
    rng = random.Random(seed)
    for _ in range(PER_EXAMPLE):
        topic = pick_topic(rng)
        match = PARSER.match(topic)
        check(topic, gen_payload(rng, raw, match[0] if match else None))
        COUNT["generated_payloads"] += 1


@planned("random_bytes", 700, 55)
@given(seed=st.integers(0, 2 ** 64), raw=st.binary(max_size=512))
def test_random_bytes(seed, raw):
    rng = random.Random(seed)
    # Hypothesis' own bytes on every topic, then seeded random bytes of random sizes.
    for topic in TOPICS:
        check(topic, raw)
    COUNT["random_bytes"] += 1
    for _ in range(54):
        check(rng.choice(TOPICS), rng.randbytes(rng.choice([0, 1, 2, 8, 64, 1000])))
        COUNT["random_bytes"] += 1


# --- plain strategies with an oracle --------------------------------------------------------

ASCII_FLOAT = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
NON_FINITE_WORD = re.compile(rb"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(width=32).map(lambda f: f"{f:.3e}"),
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400).map(str),
    st.integers(min_value=0, max_value=10 ** 6).map(lambda i: f"{i:_}"),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Zs"]), max_size=6),
    st.text(alphabet="0123456789.eE+-_ \t\n", max_size=12),
    st.text(max_size=8),
)


@planned("plain_number_oracle", 500, 20)
@given(st.lists(number_text, min_size=20, max_size=20))
def test_plain_number_oracle(texts):
    for text in texts:
        payload = text.encode("utf-8", "surrogatepass")
        res = check("n/t1", payload)
        COUNT["plain_number_oracle"] += 1
        stripped = payload.strip()  # ASCII whitespace only, as the parser does
        if ASCII_FLOAT.fullmatch(stripped):
            expected = float(stripped)
            if math.isfinite(expected):
                assert res.readings == [Reading("t1", NOW, (expected,))], text
            else:
                assert [r for r, _ in res.rejected] == ["non_finite"], text
        elif NON_FINITE_WORD.fullmatch(stripped):
            assert [r for r, _ in res.rejected] == ["non_finite"], text
        else:
            # Includes what float() takes but is not ASCII float grammar: '1_000', '١٢', '１２'.
            assert [r for r, _ in res.rejected] == ["not_a_number"], text


json_number = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(
    allow_nan=False, allow_infinity=False))
json_scalar = st.one_of(json_number, st.booleans(), st.none(), st.text(max_size=8))
timestamps = st.one_of(st.none(), json_number, st.text(max_size=12),
                       st.datetimes(timezones=st.none() | st.timezones()).map(
                           lambda d: d.isoformat()))


@planned("json_reading_oracle", 250, 20)
@given(st.lists(st.tuples(json_scalar, json_scalar, timestamps, st.booleans()), min_size=20,
                max_size=20))
def test_json_reading_oracle(cases):
    for x, z, ts, with_ts in cases:
        doc = {"x": x, "y": {"z": z}}
        if with_ts:
            doc["t"] = ts
        payload = json.dumps(doc).encode()
        res = check("j/t1", payload)
        COUNT["json_reading_oracle"] += 1
        numbers = all(type(v) in (int, float) for v in (x, z))
        good_ts = not with_ts or ts is None or (
            type(ts) in (int, float) and 0 <= ts / 1000 <= MAX_TIMESTAMP)
        if numbers and good_ts:
            [reading] = res.readings
            assert reading.values == (float(x), float(z))
            assert reading.timestamp == (ts / 1000 if with_ts and ts is not None else NOW)
        else:
            assert res.readings == [] and len(res.rejected) == 1


json_docs = st.recursive(
    json_scalar,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["value", "v", "x", "sensor", "ts", "t", "meta", "k"]) | st.text(
            max_size=4), children, max_size=4),
    max_leaves=12)


@planned("arbitrary_json_documents", 250, 5)
@given(st.lists(json_docs, min_size=5, max_size=5))
def test_arbitrary_json_documents(docs):
    # Valid JSON of any shape on every kind of input: rejections, never exceptions, and the
    # two backends agree (floats/ints round-trip through both decoders identically).
    for doc in docs:
        payload = json.dumps(doc).encode()
        for topic in ("a/t1", "b/x/y"):
            check(topic, payload)
        COUNT["arbitrary_json_documents"] += 1


# --- big and deep ---------------------------------------------------------------------------

BIG = PayloadParser([InputSpec("big/{sensor}", max_payload_bytes=2 * 1024 * 1024),
                     InputSpec("bigb/{sensor}", format="batch",
                               max_payload_bytes=2 * 1024 * 1024)],
                    clock=lambda: NOW, json_backend="json")
BIG_OTHER = PayloadParser(BIG.inputs, clock=lambda: NOW, json_backend="orjson") \
    if HAVE_ORJSON else None


def check_big(topic, payload):
    res = check(topic, payload, parser=BIG)
    if BIG_OTHER is not None:
        assert BIG_OTHER.parse(topic, payload) == res
    return res


@planned("deep_nesting", 60, 2)
@given(depth=st.integers(100, 100_000),
       opener=st.sampled_from(["[", '{"a":', '[{"v":', '{"a":[']),
       closed=st.booleans(), noise=st.sampled_from(["", "1", '"x"', "]", "}", '"[[["']))
def test_deep_nesting(depth, opener, closed, noise):
    closer = {"[": "]", '{"a":': "}", '[{"v":': "}]", '{"a":[': "]}"}[opener]
    body = opener * depth + noise + (closer * depth if closed else "")
    payload = body.encode()
    for topic in ("big/t1", "bigb/t1"):
        res = check_big(topic, payload)
        assert res.readings == []
        if depth > 200:
            assert [r for r, _ in res.rejected] == ["bad_json"]
    wrapped = b'{"value": 1, "deep": ' + payload + b"}"
    res = check_big("big/t1", wrapped)
    if depth > 200:
        assert [r for r, _ in res.rejected] == ["bad_json"]
    COUNT["deep_nesting"] += 2


@planned("huge_payloads", 40, 2)
@given(seed=st.integers(0, 2 ** 64), kind=st.sampled_from(
    ["batch", "map", "bytes", "digits", "spaces", "floats_array", "strings"]))
def test_huge_payloads(seed, kind):
    rng = random.Random(seed)
    size = rng.choice([1, 1000, 100_000, 1024 * 1024])
    if kind == "batch":
        n = max(1, size // 45)
        items = (f'{{"sensor": "s{i % 5000}", "value": {gen_number(rng) if i % 97 == 0 else i}}}'
                 for i in range(n))
        payload = ("[" + ",".join(items) + "]").encode()
    elif kind == "map":
        payload = ("{" + ",".join(f'"s{i}": {i}.5' for i in range(max(1, size // 12))) + "}"
                   ).encode()
    elif kind == "bytes":
        payload = rng.randbytes(size)
    elif kind == "digits":
        payload = b"7" * size
    elif kind == "spaces":
        payload = b" " * size + b"1"
    elif kind == "floats_array":
        payload = json.dumps([rng.uniform(-1, 1) for _ in range(max(1, size // 22))]).encode()
    else:
        payload = json.dumps({"value": 1, "s": "x" * size}).encode()
    for topic in ("big/t1", "bigb/t1"):
        res = check_big(topic, payload)
        assert len(res.readings) + len(res.rejected) >= 1 or json.loads(payload) in ([], {})
    # Over the default 1 MiB limit: too_large, without decoding.
    res = check("a/t1", payload + b" " * (1024 * 1024 + 1 - len(payload)))
    assert [r for r, _ in res.rejected] == ["too_large"]
    COUNT["huge_payloads"] += 2


planned("empty_and_one_megabyte", 1, 6)


def test_empty_and_one_megabyte():
    for payload in (b"", b" " * (1024 * 1024), b"1" + b" " * (1024 * 1024 - 1),
                    b"[" + b"1," * (512 * 1024 - 1) + b"1]", b"\x00" * (1024 * 1024),
                    b"{" * (1024 * 1024)):
        for topic in TOPICS:
            check(topic, payload)
        COUNT["empty_and_one_megabyte"] += 1


# --- topics ---------------------------------------------------------------------------------

TOPIC_PIECES = list("ab/+#$\x00{}\n\x1b") + ["sensor", "\ud800", "é", "a/t1", "b/x", "w/p/t1", "/"]
topic_text = st.lists(st.sampled_from(TOPIC_PIECES), max_size=12).map("".join)


def gen_topic(rng):
    return "".join(rng.choice(TOPIC_PIECES) for _ in range(rng.randint(0, 12)))


@planned("odd_topics", 600, 20)
@given(seed=st.integers(0, 2 ** 64))
def test_odd_topics(seed):
    rng = random.Random(seed)
    for _ in range(20):
        topic = gen_topic(rng)
        check(topic, rng.choice([b"1", b'{"value": 2}', b"x", b'[{"value": 3}]', b"[4]"]))
        COUNT["odd_topics"] += 1


def reference_match(template, topic):
    """Regex oracle for TopicTemplate.match (same rules, written differently)."""
    levels = template.split("/")
    regex = ""
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            regex += "(?:/.*)?" if i else ".*"
        elif level == "{sensor+}":
            regex += sep + "(?P<s>[^/]+(?:/[^/]+)*)"
        elif level == "{sensor}":
            regex += sep + "(?P<s>[^/]+)"
        elif level == "+":
            regex += sep + "[^/]*"
        else:
            regex += sep + re.escape(level)
    if not topic or any(c in topic for c in "+#\x00"):
        return None
    if topic.startswith("$") and levels[0] in ("#", "+", "{sensor}", "{sensor+}"):
        return None
    m = re.fullmatch(regex, topic, re.DOTALL)
    if m is None:
        return None
    sensor = m.group("s")
    if len(sensor) > 1024 or any("\ud800" <= c <= "\udfff" for c in sensor):
        return None
    return sensor


TEMPLATE_LEVELS = ["a", "b", "", "+", "#", "{sensor}", "{sensor+}", "$SYS", "é", "x{sensor}",
                   "{sensor", "a+"]
TOPIC_LEVELS = ["a", "b", "", "x", "$SYS", "é", "\ud800", "+", "#", "s" * 1100, "a b"]


@planned("template_fuzz", 500, 20, payloads=False)
@given(seed=st.integers(0, 2 ** 64))
def test_template_fuzz(seed):
    rng = random.Random(seed)
    for _ in range(20):
        levels = [rng.choice(TEMPLATE_LEVELS) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.8:  # mostly valid templates: exactly one placeholder
            levels = [lv for lv in levels if "{" not in lv and lv != "#"]
            if rng.random() < 0.3:
                levels.append("{sensor+}")
            else:
                levels.insert(rng.randint(0, len(levels)), "{sensor}")
                if rng.random() < 0.2:
                    levels.append("#")
        template = "/".join(levels)
        COUNT["template_fuzz"] += 1
        try:
            t = TopicTemplate(template)
        except ValueError:
            bad = [lv for lv in levels if lv in ("x{sensor}", "{sensor", "a+")]
            assert bad or template.count("{sensor") != 1 or "#" in levels[:-1] \
                or "{sensor+}" in levels[:-1], template
            continue
        assert "{" not in t.subscription and "}" not in t.subscription
        for _ in range(5):
            if rng.random() < 0.5:  # a topic near the template
                topic = "/".join(rng.choice(TOPIC_LEVELS) if lv in ("+", "#", "{sensor}",
                                                                     "{sensor+}") or
                                 rng.random() < 0.1 else lv
                                 for lv in template.split("/"))
                if rng.random() < 0.3:
                    topic += "/" + rng.choice(TOPIC_LEVELS)
            else:
                topic = "/".join(rng.choice(TOPIC_LEVELS) for _ in range(rng.randint(0, 5)))
            assert t.match(topic) == reference_match(template, topic), (template, topic)


@planned("template_strategy", 300, 4, payloads=False)
@given(st.lists(st.tuples(topic_text, topic_text), min_size=4, max_size=4))
def test_template_strategy(pairs):
    for template, topic in pairs:
        COUNT["template_strategy"] += 1
        try:
            t = TopicTemplate(template)
        except ValueError:
            continue
        assert t.match(topic) == reference_match(template, topic), (template, topic)


# --- batches read column by column -----------------------------------------------------------

# Inputs whose batch items the parser reads column by column (top-level fields, a numeric
# timestamp); the oracle is its item-by-item path, which gives every item its own reason.
COLUMN_SPECS = [
    InputSpec("c/{sensor}", format="batch", value_fields=["x", "y"], timestamp_field="t", timestamp_unit="ms"),
    InputSpec("d/{sensor}", timestamp_field="ts"),
    InputSpec("m/{sensor}", format="batch"),
    InputSpec("v/{sensor}", format="batch", value_fields=["a", "b"]),
]
COLUMN_PARSERS = [PayloadParser(COLUMN_SPECS, clock=lambda: NOW, json_backend=b)
                  for b in (("json", "orjson") if HAVE_ORJSON else ("json",))]
ODD_NUMBERS = [None, True, False, "1", [], {}, "nan"]
EDGE_NUMBERS = [0, -0.0, 5e-324, 1e308, -1.7976931348623157e308, 2 ** 53 + 1, 2 ** 63, -(2 ** 63), 2 ** 64 - 1]
ODD_STAMPS = [-1, -0.5, 4e13, 1e300, "2024-01-01", True, [], {}]
ODD_IDS = ["", "a+b", "x#", "tab\t", "\x00", 5, True, [], "é" * 200, "a" * 300]
GOOD_IDS = ["s1", "plant/boiler 1", "é", "温度", "a.b-c_d"]


def _good_number(rng):
    return rng.choice([rng.uniform(-1e6, 1e6), rng.randint(-10 ** 6, 10 ** 6), rng.choice(EDGE_NUMBERS)])


def _column_item(rng, fields, ts_key, ts_scale, odd):
    item = {f: _good_number(rng) for f in fields}
    if ts_key and rng.random() < 0.8:
        item[ts_key] = rng.choice([rng.uniform(0, 3e9) * ts_scale, rng.randint(0, 3 * 10 ** 9) * ts_scale, None])
    if rng.random() < 0.5:
        item["sensor"] = rng.choice(GOOD_IDS + [None])
    if rng.random() < 0.2:
        item["unit"] = "C"  # fields the input does not read are ignored
    if odd:
        what = rng.randrange(4)
        if what == 0:
            item[rng.choice(fields)] = rng.choice(ODD_NUMBERS)
        elif what == 1:
            del item[rng.choice(fields)]
        elif what == 2 and ts_key:
            item[ts_key] = rng.choice(ODD_STAMPS)
        else:
            item["sensor"] = rng.choice(ODD_IDS)
    return item


def _column_payloads(rng):
    """(topic, payload, items are all good) for batch arrays and sensor maps."""
    kind = rng.randrange(4)
    n = rng.randint(1, 30)
    odd = [rng.random() < 0.05 for _ in range(n)] if rng.random() < 0.5 else [False] * n
    if kind == 0:
        items = [_column_item(rng, ["x", "y"], "t", 1000, o) for o in odd]
        if rng.random() < 0.05:
            items.insert(rng.randrange(n + 1), rng.choice([1, "x", None, [1]]))
            odd.append(True)
        return "c/gw", items, not any(odd)
    if kind == 1:
        return "d/gw", [_column_item(rng, ["value"], "ts", 1, o) for o in odd], not any(odd)
    ids = [rng.choice(GOOD_IDS) + str(i) if not o or rng.random() < 0.5 else rng.choice(ODD_IDS[:5]) for i, o in enumerate(odd)]
    if kind == 2:
        return "m/gw", {k: (_good_number(rng) if not o else rng.choice(ODD_NUMBERS + [[1.0]])) for k, o in zip(ids, odd)}, \
            not any(odd)
    return "v/gw", {k: ([_good_number(rng), _good_number(rng)] if not o else rng.choice([[1.0], [1, "2"], 3.0, [1, 2, 3]]))
                    for k, o in zip(ids, odd)}, not any(odd)


@planned("batch_columns_oracle", 300, 20)
@given(seed=st.integers(0, 2 ** 64))
def test_batch_columns_oracle(seed):
    """A batch read column by column gives exactly what reading it item by item gives (readings,
    their order, rejections with their details), one chunk per message, and the column path is
    taken whenever every item is good."""
    rng = random.Random(seed)
    for _ in range(20):
        topic, doc, all_good = _column_payloads(rng)
        payload = json.dumps(doc).encode()
        COUNT["batch_columns_oracle"] += 1
        results = []
        for parser in COLUMN_PARSERS:
            res = check(topic, payload, parser)
            spec, sensor = parser.match(topic)
            c = parser._compiled[COLUMN_SPECS.index(spec)]
            decoded = parser._loads(payload)
            if isinstance(decoded, dict):
                oracle = PayloadParser._map_items(decoded, c, NOW)
            else:
                oracle = PayloadParser._batch_items(decoded, sensor, c, NOW)
            assert res == oracle, (payload, res, oracle)
            assert len(res.chunks) <= 1 and all(
                ch.timestamps.dtype == np.float64 and ch.values.dtype == np.float64 and
                ch.values.shape == (len(ch.sensors), spec.arity) for ch in res.chunks), payload
            if all_good:
                fast = _map_columns(decoded, c, NOW) if isinstance(decoded, dict) else \
                    _batch_columns(decoded, sensor, c, NOW)
                assert fast is not None and ParseResult([fast], []) == res, payload
                assert res.rejected == [] and len(res.chunks) == 1 and len(res.chunks[0]) == len(doc), payload
            results.append(res)
        assert all(r == results[0] for r in results), payload  # json and orjson agree


# --- bookkeeping ----------------------------------------------------------------------------

COUNT = {name: 0 for name in PLAN}


@pytest.fixture(autouse=True)
def _count_payloads(request):
    key = request.node.name.removeprefix("test_")
    if key not in PLAN:
        yield
        return
    COUNT[key] = 0
    yield
    assert COUNT[key] >= PLAN[key], f"{key}: {COUNT[key]} payloads, planned {PLAN[key]}"


def test_plan_total():
    assert sum(PLAN[name] for name in PAYLOAD_PLANS) >= 100_000, PLAN
