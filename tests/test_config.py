"""Tests for streamlstm.config: schema vs example file, every error kind, YAML traps, fuzzing."""
import dataclasses
import os
import pathlib
import re
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm import config as C
from streamlstm.factory import build_detector
from streamlstm.config import (
    Config, ConfigError, DetectorConfig, GroupConfig, ModelConfig, describe_schema, load_config,
    loads_config, parse_config, read_secret,
)

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "config" / "streamlstm.example.yaml"


def errors_of(text_or_mapping):
    """The error lines raised for a YAML text (str) or a mapping (dict)."""
    with pytest.raises(ConfigError) as info:
        if isinstance(text_or_mapping, str):
            loads_config(text_or_mapping)
        else:
            parse_config(text_or_mapping)
    return str(info.value).splitlines()


def one_error(text_or_mapping):
    lines = errors_of(text_or_mapping)
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------- example == defaults

def test_example_loads_and_equals_defaults():
    # Equality proves the example shows the defaults; completeness is checked below.
    cfg = load_config(EXAMPLE)
    assert cfg == parse_config({}) == parse_config(None) == Config()
    assert cfg == loads_config("") == loads_config("# nothing\n") == loads_config("~\n")


def _schema_keys(cls, prefix=""):
    out = set()
    for f in dataclasses.fields(cls):
        spec = f.metadata["spec"]
        p = f"{prefix}.{f.name}" if prefix else f.name
        out.add(p)
        if spec.kind == "section":
            out |= _schema_keys(spec.cls, p)
        elif spec.kind in ("entries", "groups"):
            out |= _schema_keys(spec.cls, p + "[]")
    return out


def _raw_keys(node, prefix=""):
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= _raw_keys(v, p)
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for item in node:
            out |= _raw_keys(item, prefix + "[]")
    return out


def test_example_documents_every_key():
    raw = yaml.safe_load(EXAMPLE.read_text())
    # Group overrides are shown as comments in the example (they have no value of their own).
    expected = _schema_keys(Config) - {"groups[].model", "groups[].detector"}
    assert _raw_keys(raw) == expected


def test_example_choice_comments_match_schema():
    # Comments like "# adam | sgd" must list exactly the accepted choices.
    choices = {}
    for cls in (C.Config, C.KafkaConfig, C.MqttConfig, C.InputConfig, ModelConfig, DetectorConfig, GroupConfig, C.BackendConfig,
                C.LoggingConfig):
        for f in dataclasses.fields(cls):
            if f.metadata["spec"].kind == "choice":
                choices[f.name] = set(f.metadata["spec"].choices)
    seen = set()
    for line in EXAMPLE.read_text().splitlines():
        m = re.match(r"\s*(?:- )?(\w+):.*?#\s*([\w.-]+(?:\s*\|\s*[\w.-]+)+)", line)
        if m:
            key, listed = m.group(1), {w.strip() for w in m.group(2).split("|")}
            assert choices.get(key) == listed, (key, listed)
            seen.add(key)
    assert seen == set(choices), set(choices) - seen


def test_types_of_defaults():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg.mqtt.reconnect_min_delay_s, float)  # written as 1 in the example
    assert isinstance(cfg.detector.gap_reset_intervals, float)
    assert type(cfg.model.hidden_size) is int
    assert cfg.mqtt.protocol == "5"
    assert cfg.inputs[0].value_fields == ("value",)
    assert cfg.inputs[0].subscription == "sensors/+"


def test_config_is_frozen_and_hashable():
    cfg = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt.host = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.groups[0].model.hidden_size = 3
    assert hash(cfg) == hash(load_config(EXAMPLE))


def test_describe_schema_lists_every_key_with_a_description():
    text = describe_schema()
    for key in _schema_keys(Config):
        assert re.search(rf"^{re.escape(key)}: \S", text, re.M), key
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata["spec"].doc


# --------------------------------------------------------------------------- errors with key paths

@pytest.mark.parametrize("text, expected", [
    ("model: {hidden_size: abc}", "model.hidden_size: expected an integer >= 1 and <= 4096, got 'abc'"),
    ("model: {hidden_size: 0}", "model.hidden_size: expected an integer >= 1 and <= 4096, got 0"),
    ("model: {hidden_size: true}", "model.hidden_size: expected an integer >= 1 and <= 4096, got true"),
    ("model: {hidden_size: 32.0}", "model.hidden_size: expected an integer >= 1 and <= 4096, got 32.0 (write 32)"),
    ("model: {hidden_size: null}", "model.hidden_size: expected an integer >= 1 and <= 4096, got null"),
    ("mqtt: {port: 70000}", "mqtt.port: expected an integer >= 1 and <= 65535, got 70000"),
    ("mqtt: {hots: x}", "mqtt.hots: unknown key (did you mean 'host'?)"),
    ("mqtt: {tls: {enabeld: true}}", "mqtt.tls.enabeld: unknown key (did you mean 'enabled'?)"),
    ("modle: {}", "modle: unknown key (did you mean 'model'?)"),
    ("model: {threshold: 0.5}", "model.threshold: unknown key (threshold belongs under detector)"),
    ("mqtt: localhost", "mqtt: expected a mapping of keys, got 'localhost'"),
    ("model: {optimizer: Adam}", "model.optimizer: expected one of 'adam', 'sgd', got 'Adam' (did you mean 'adam'?)"),
    ("mqtt: {tls: {enabled: 'yes'}}", "mqtt.tls.enabled: expected true or false, got 'yes' (a quoted string: remove the quotes)"),
    ("mqtt: {host: ''}", "mqtt.host: expected a non-empty string, got ''"),
    ("mqtt: {host: 'mqtt://b:1883'}", "mqtt.host: must be a host name or address (no scheme, path or spaces; "
                                       "the port is a separate key), got 'mqtt://b:1883'"),
    ("mqtt: {username: None}",
     "mqtt.username: expected a non-empty string or null, got the string 'None' (write null or ~ for no value)"),
    ("detector: {threshold: 1}", "detector.threshold: expected a number > 0 and < 1, got 1"),
    ("detector: {threshold: 0}", "detector.threshold: expected a number > 0 and < 1, got 0"),
    ("detector: {hysteresis: 0}", "detector.hysteresis: expected a number > 0 and <= 1, got 0"),
    ("detector: {ksigma: .inf}", "detector.ksigma: expected a number > 0, got inf"),
    ("detector: {ksigma: .nan}", "detector.ksigma: expected a number > 0, got nan"),
    ("inputs: {topic: x}", "inputs: expected a list of entries, got a mapping"),
    ("inputs: []", "inputs: expected at least one entry (remove the key to use the default)"),
    ("inputs: [{format: json}]", "inputs[0].topic: required key is missing"),
    ("inputs: [{topic: 'a/{sensor}', value_fields: value}]",
     "inputs[0].value_fields: expected a non-empty list of strings, got 'value' (write [value])"),
    ("inputs: [{topic: 'a/{sensor}', value_fields: [a, 'b..c']}]",
     "inputs[0].value_fields[1]: is not a valid dotted field path, got 'b..c'"),
    ("groups: []", "groups: expected at least one group (remove the key to use the default group)"),
    ("groups: [{match: '*'}]", "groups[0].name: required key is missing"),
    ("groups: [{name: 'a b', match: '*'}]",
     "groups[0].name: must be 1-64 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-'), "
     "got 'a b'"),
    ("groups: [{name: g, match: '*', model: 5}]", "groups[0].model: expected a mapping of model keys to override, got 5"),
    ("groups: [{name: g, match: '*', model: {windw: 3}}]", "groups[0].model.windw: unknown key (did you mean 'window'?)"),
    ("groups: [{name: g, match: '*', detector: {hidden_size: 3}}]",
     "groups[0].detector.hidden_size: unknown key (hidden_size belongs under model)"),
    ("groups: [{name: g, match: '*', weights: shard}]",
     "groups[0].weights: expected one of 'shared', 'per_sensor', got 'shard' (did you mean 'shared'?)"),
    ("- 1\n- 2\n", "(top level): expected a mapping of sections (mqtt, inputs, model, ...), got a list"),
    ("hello", "(top level): expected a mapping of sections (mqtt, inputs, model, ...), got 'hello'"),
    ("1: x", "1: unknown key (keys must be strings)"),
])
def test_single_error_messages(text, expected):
    assert one_error(text) == expected


def test_list_index_paths_in_groups():
    text = """
groups:
  - {name: a, match: "a*"}
  - {name: b, match: "b*", model: {window: 0}}
"""
    assert one_error(text) == "groups[1].model.window: expected an integer >= 1 and <= 10000, got 0"


def test_all_errors_are_collected():
    text = """
mqtt: {port: 0, hots: x, tls: {cert_file: /c}}
model: {hidden_size: abc, window: -1}
detector: {threshold: 2}
groups:
  - {name: a, match: "*", model: {dropout: 1}}
  - {name: a, match: "x"}
logging: {level: info}
"""
    with pytest.raises(ConfigError) as info:
        loads_config(text)
    paths = [p for p, _ in info.value.errors]
    assert paths == [
        "mqtt.hots", "mqtt.port", "mqtt.tls.key_file", "model.hidden_size", "model.window",
        "detector.threshold", "groups[0].model.dropout", "groups[1].name", "groups[1].match", "logging.level",
    ]
    assert len(str(info.value).splitlines()) == len(paths)
    assert info.value.path == "mqtt.hots" and "did you mean 'host'" in info.value.reason


def test_config_error_fields():
    e = ConfigError("model.window", "bad")
    assert str(e) == "model.window: bad" and e.errors == (("model.window", "bad"),) and e.source is None
    assert isinstance(e, ValueError)


# --------------------------------------------------------------------------- numbers and types

def test_ints_accepted_for_floats_and_converted():
    cfg = parse_config({"detector": {"ksigma": 3, "threshold": 0.5}, "mqtt": {"reconnect_max_delay_s": 5}})
    assert cfg.detector.ksigma == 3.0 and isinstance(cfg.detector.ksigma, float)
    assert isinstance(cfg.mqtt.reconnect_max_delay_s, float)


def test_bool_is_not_a_number():
    assert one_error({"detector": {"ksigma": True}}) == "detector.ksigma: expected a number > 0, got true"
    assert one_error({"model": {"seed": False}}) == (
        "model.seed: expected an integer >= 0 and <= 4294967295, got false")


def test_ipv6_host_is_accepted():
    assert parse_config({"mqtt": {"host": "::1"}, "metrics": {"address": "::"}}).mqtt.host == "::1"


def test_nullable_fields():
    cfg = parse_config({"model": {"target_feature": 2}, "detector": {"scale_min": None}})
    assert cfg.model.target_feature == 2 and cfg.detector.scale_min is None
    assert one_error({"model": {"target_feature": -1}}) == (
        "model.target_feature: expected an integer >= 0 or null, got -1")


def test_null_section_and_list_mean_defaults():
    assert loads_config("mqtt:\nmodel:\ngroups:\ninputs:\n") == Config()


def test_huge_numbers_do_not_crash():
    assert one_error({"detector": {"ksigma": 10 ** 400}}) == (
        "detector.ksigma: expected a number > 0, got a very large integer")
    assert "integer too large" in one_error("mqtt: {port: " + "9" * 5000 + "}")


# --------------------------------------------------------------------------- YAML 1.1 traps

@pytest.mark.parametrize("value", ["5", "'5'", '"5"'])
def test_protocol_5_as_number_or_string(value):
    assert loads_config(f"mqtt: {{protocol: {value}}}").mqtt.protocol == "5"


def test_protocol_311_quoted_or_not():
    assert loads_config("mqtt: {protocol: 3.1.1}").mqtt.protocol == "3.1.1"
    assert loads_config("mqtt: {protocol: '3.1.1'}").mqtt.protocol == "3.1.1"
    assert one_error("mqtt: {protocol: 3.1}") == "mqtt.protocol: expected '5' or '3.1.1', got 3.1 (write '3.1.1' in quotes)"
    assert one_error("mqtt: {protocol: 4}").startswith("mqtt.protocol: expected '5' or '3.1.1', got 4")


def test_yes_no_on_off_where_a_string_is_expected():
    assert one_error("detector: {learning_protection: off}") == (
        "detector.learning_protection: expected one of 'off', 'skip', 'damp', got false "
        "(YAML 1.1 reads unquoted off as a boolean: write it quoted, 'off')")
    assert loads_config("detector: {learning_protection: 'off'}").detector.learning_protection == "off"
    msg = one_error("mqtt: {protocol: yes}")
    assert msg.startswith("mqtt.protocol: expected '5' or '3.1.1', got true") and "quote" in msg
    msg = one_error("mqtt: {client_id: no}")
    assert msg.startswith("mqtt.client_id: expected a non-empty string, got false") and "quote" in msg
    msg = one_error("groups: [{name: on, match: '*'}]")
    assert msg.startswith("groups[0].name: expected a non-empty string, got true") and "quote" in msg
    assert one_error("on: 1") == (
        "true: unknown key (YAML 1.1 reads unquoted yes/no/on/off as booleans: quote the key)")


def test_yes_no_accepted_for_booleans():
    cfg = loads_config("mqtt: {tls: {enabled: yes, insecure: off}}")
    assert cfg.mqtt.tls.enabled is True and cfg.mqtt.tls.insecure is False


def test_octal_and_base60_are_refused():
    msg = one_error("mqtt: {port: 010}")
    assert msg.startswith("mqtt.port: expected an integer >= 1 and <= 65535: unquoted 010 is an octal number")
    assert "(= 8)" in msg
    msg = one_error("mqtt: {client_id: 0123}")
    assert msg.startswith("mqtt.client_id:") and "octal" in msg and "quote" in msg
    assert loads_config("mqtt: {client_id: '0123'}").mqtt.client_id == "0123"
    msg = one_error("mqtt: {keepalive_s: 1:30}")
    assert msg.startswith("mqtt.keepalive_s:") and "base-60" in msg and "(= 90)" in msg
    assert loads_config("mqtt: {port: 0x50}").mqtt.port == 80  # hex is unambiguous
    assert loads_config("model: {seed: 0}").model.seed == 0


def test_exponent_without_dot_is_text_in_yaml11():
    assert one_error("detector: {ksigma: 1e3}") == (
        "detector.ksigma: expected a number > 0, got '1e3' "
        "(YAML 1.1 reads 1e3 as text, not a number; write 1000 or 1.0e+3)")
    assert "write 1000 or 1.0e+3" in one_error("detector: {ksigma: 1.0e3}")
    assert one_error("pipeline: {queue_size: 1e3}") == (
        "pipeline.queue_size: expected an integer >= 1, got '1e3' (YAML 1.1 reads 1e3 as text, not a number; write 1000)")
    assert loads_config("detector: {ksigma: 1.0e+3}").detector.ksigma == 1000.0


def test_quoted_numbers_are_refused_with_a_hint():
    assert one_error("mqtt: {port: '1883'}") == (
        "mqtt.port: expected an integer >= 1 and <= 65535, got '1883' (a quoted string: remove the quotes)")


def test_numbers_where_text_is_expected():
    assert one_error("mqtt: {username: 1234}") == (
        "mqtt.username: expected a non-empty string or null, got 1234 (quote it if it is text)")
    msg = one_error("mqtt: {host: 2024-01-01}")
    assert msg.startswith("mqtt.host: expected a non-empty string, got the date/time 2024-01-01")


# --------------------------------------------------------------------------- corrupt YAML, files

def _yaml_error(text):
    with pytest.raises(ConfigError) as info:
        loads_config(text, source="cfg.yaml")
    assert info.value.path == "cfg.yaml" and info.value.source == "cfg.yaml"
    return info.value.reason


def test_syntax_error_has_line_and_column():
    assert _yaml_error("mqtt:\n  host: a\n  port: [1, 2\n").startswith("invalid YAML at line 4, column 1:")
    assert _yaml_error("mqtt:\n  host: a\n bad: x: y\n").startswith("invalid YAML at line 3,")


def test_tabs():
    reason = _yaml_error("mqtt:\n\thost: a\n")
    assert reason.startswith("invalid YAML at line 2, column 1:") and "tabs" in reason


def test_duplicate_keys_are_refused():
    reason = _yaml_error("mqtt:\n  port: 1\n  port: 2\n")
    assert reason.startswith("invalid YAML at line 3, column 3: duplicate key 'port' (first at line 2)")


def test_merge_keys_and_anchors_work():
    text = """
model: &m {hidden_size: 8}
groups:
  - {name: big, match: "big*", model: {<<: *m, window: 4}}
  - {name: rest, match: "*"}
"""
    cfg = loads_config(text)
    assert cfg.groups[0].model.hidden_size == 8 and cfg.groups[0].model.window == 4


@pytest.mark.parametrize("text, fragment", [
    ("a: [1, 2", "line 1, column 9"),
    ("x: \x00", "line 1, column 4: character #x0000 is not allowed"),
    ("---\na: 1\n---\nb: 2\n", "line 3, column 1"),
    ("a: *nope", "found undefined alias"),
    ("!!python/object:os.system {}", "could not determine a constructor"),
    ("mqtt: {host: 2024-02-30}", "invalid date"),
    ("? [a, b]\n: 1\n", "unhashable key"),
    ("[" * 10000 + "]" * 10000, "nesting deeper than"),
    ("a: &a [*a]\n", "recursive alias"),
    ("a: &a {<<: *a}\n", "recursive alias"),
], ids=["unclosed", "nul", "two-docs", "undefined-alias", "python-tag", "bad-date", "unhashable-key",
        "deep-nesting", "recursive-list", "recursive-merge"])
def test_corrupt_yaml(text, fragment):
    assert fragment in _yaml_error(text)


def test_billion_laughs_is_refused_quickly():
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join(["*" + chr(97 + i)] * 9) + "]\n" for i in range(8))
    t = time.monotonic()
    assert "aliases expand this document past" in _yaml_error(text)
    assert time.monotonic() - t < 2


def test_binary_garbage(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == str(p) and info.value.reason.startswith("not UTF-8 text")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.path == str(tmp_path / "nope.yaml")
    assert info.value.reason == "cannot read config file: No such file or directory"
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory
    p = tmp_path / "secret.yaml"
    p.write_text("mqtt: {}\n")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ConfigError, match="Permission denied"):
            load_config(p)
    finally:
        p.chmod(0o600)


def test_huge_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("# " + "x" * (C.MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(p)


def test_validation_errors_from_a_file_carry_the_source(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {window: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.source == str(p) and info.value.path == "model.window"


# --------------------------------------------------------------------------- groups

def test_group_overrides_merge_with_top_level():
    cfg = loads_config("""
model: {hidden_size: 16, window: 20}
detector: {threshold: 0.95}
groups:
  - name: big
    match: "big/*"
    weights: per_sensor
    model: {hidden_size: 64}
    detector: {threshold: 0.999, cooldown: 5}
  - {name: rest, match: "*"}
""")
    big, rest = cfg.groups
    assert big.model == ModelConfig(hidden_size=64, window=20)
    assert big.detector == DetectorConfig(threshold=0.999, cooldown=5)
    assert big.weights == "per_sensor" and rest.weights == "shared"
    assert rest.model == cfg.model == ModelConfig(hidden_size=16, window=20)
    assert rest.detector == cfg.detector
    routes = build_detector(cfg)
    assert routes.group_for("big/1") is big and routes.group_for("small/1") is rest


def test_implicit_default_group_is_appended():
    cfg = loads_config("groups: [{name: temp, match: 'temp_*'}]\nmodel: {window: 8}\n")
    assert [(g.name, g.match, g.weights) for g in cfg.groups] == [("temp", "temp_*", "shared"), ("default", "*", "shared")]
    assert cfg.groups[1].model.window == 8
    assert build_detector(cfg).group_for("hum_1").name == "default"
    assert "implicit group 'default'" in one_error("groups: [{name: default, match: 'x*'}]")


def test_explicit_catch_all_group_is_not_duplicated():
    cfg = loads_config("groups: [{name: a, match: 'x'}, {name: all, match: '*'}]")
    assert [g.name for g in cfg.groups] == ["a", "all"]


def test_group_names_unique_and_unreachable_groups():
    lines = errors_of("groups: [{name: a, match: '*'}, {name: a, match: 'x'}]")
    assert lines == ["groups[1].name: duplicate group name 'a' (also groups[0])",
                     "groups[1].match: never used: groups[0] (match '*') takes every sensor first"]
    assert one_error("groups: [{name: a, match: 'x*'}, {name: b, match: 'x*'}]") == (
        "groups[1].match: never used: groups[0] has the same match and comes first")


def test_group_cross_checks_only_for_overridden_keys():
    # The top-level problem is reported once, not again for every group that inherits it.
    lines = errors_of("""
detector: {scaling: fixed}
groups: [{name: a, match: 'x'}, {name: b, match: '*', detector: {scale_min: 0, scale_max: 1}}]
""")
    assert lines == ["detector.scale_min: required when scaling is fixed",
                     "detector.scale_max: required when scaling is fixed"]
    assert errors_of("groups: [{name: a, match: '*', detector: {scaling: fixed, scale_min: 2, scale_max: 1}}]") == [
        "groups[0].detector.scale_max: must be > scale_min (2), got 1"]
    cfg = loads_config("groups: [{name: a, match: '*', detector: {scaling: fixed, scale_min: 0, scale_max: 5}}]")
    assert cfg.groups[0].detector.scaling == "fixed" and cfg.detector.scaling == "running"


# --------------------------------------------------------------------------- cross-field checks

@pytest.mark.parametrize("text, expected", [
    ("mqtt: {reconnect_min_delay_s: 90}",
     ["mqtt.reconnect_min_delay_s: must be <= reconnect_max_delay_s (60), got 90"]),
    ("mqtt: {tls: {cert_file: /c}}", ["mqtt.tls.key_file: cert_file and key_file must be given together"]),
    ("mqtt: {tls: {key_file: /k}}", ["mqtt.tls.cert_file: cert_file and key_file must be given together"]),
    ("mqtt: {tls: {key_password_file: /p}}", ["mqtt.tls.key_password_file: requires key_file"]),
    ("mqtt: {password_file: /run/pw}", ["mqtt.password_file: requires username"]),
    ("detector: {scaling: fixed, scale_min: 0}", ["detector.scale_max: required when scaling is fixed"]),
    ("detector: {scaling: fixed, scale_min: 1, scale_max: 1}", ["detector.scale_max: must be > scale_min (1), got 1"]),
    ("detector: {short_window: 50, long_window: 20}", ["detector.short_window: must be <= long_window (20), got 50"]),
    ("pipeline: {queue_size: 10}", ["pipeline.max_batch: must be <= queue_size (10), got 4096"]),
    ("metrics: {tls_cert_file: /c}", ["metrics.tls_key_file: tls_cert_file and tls_key_file must be given together"]),
    ("metrics: {basic_auth_user: u}",
     ["metrics.basic_auth_password_file: basic_auth_user and basic_auth_password_file must be given together"]),
])
def test_cross_field_checks(text, expected):
    assert errors_of(text) == expected


def test_cross_checks_pass_when_consistent():
    cfg = loads_config("""
mqtt: {username: u, password_file: /run/pw, tls: {enabled: true, cert_file: /c, key_file: /k}}
detector: {scaling: fixed, scale_min: -1.5, scale_max: 40}
""")
    assert cfg.mqtt.password_file == "/run/pw" and cfg.detector.scale_max == 40.0


def test_cross_check_skipped_when_a_value_is_already_bad():
    assert errors_of("mqtt: {reconnect_min_delay_s: abc}") == [
        "mqtt.reconnect_min_delay_s: expected a number > 0, got 'abc'"]


@pytest.mark.parametrize("topic, reason", [
    ("sensors/x", "must contain {sensor} or {sensor+} exactly once"),
    ("a/{sensor}/{sensor}", "must contain {sensor} or {sensor+} exactly once"),
    ("a/{sensor}/{sensor+}", "must contain {sensor} or {sensor+} exactly once"),
    ("a/x{sensor}", "the placeholder must be a whole topic level, e.g. 'sensors/{sensor}'"),
    ("a/{sensor+}/b", "{sensor+} (several levels) must be the last topic level"),
    ("a/+/{sensor}", "must not contain the MQTT wildcards + or # (the {sensor} placeholder is the wildcard)"),
    ("a/{sensr}", "unknown placeholder {sensr} (allowed: {sensor} or {sensor+})"),
])
def test_input_topic_template(topic, reason):
    assert one_error({"inputs": [{"topic": topic}]}) == f"inputs[0].topic: {reason}, got {topic!r}"


def test_input_topic_ok_and_subscription():
    # The second input names its sensors apart: both could otherwise produce the id "x" (routing.py).
    cfg = parse_config({"inputs": [{"topic": "a/{sensor}/v"},
                                   {"topic": "z2m/{sensor+}", "format": "json", "sensor_name": "z2m/{sensor}"}]})
    assert [i.subscription for i in cfg.inputs] == ["a/+/v", "z2m/#"]


def test_output_topics_must_not_loop_back():
    assert one_error({"output": {"events_topic": "sensors/events"}}) == (
        "output.events_topic: is also matched by inputs[0].topic 'sensors/{sensor}': "
        "the daemon would read its own messages")
    assert one_error({"output": {"state_topic": "x/y"}}) == (
        "output.state_topic: must contain {sensor} (one retained topic per sensor), got 'x/y'")


# --------------------------------------------------------------------------- secrets

def test_read_secret(tmp_path):
    p = tmp_path / "pw"
    p.write_bytes(b"s3cret\n")
    assert read_secret(p) == "s3cret"
    p.write_bytes(b"s3cret\n\n")
    assert read_secret(p) == "s3cret\n"  # exactly one trailing newline is stripped
    p.write_bytes(b"s3cret\r\n")
    assert read_secret(str(p)) == "s3cret"
    p.write_bytes(b"  spaced  ")
    assert read_secret(p) == "  spaced  "


def test_read_secret_errors_never_show_the_secret(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_secret(tmp_path / "missing", key="mqtt.password_file")
    assert info.value.path == "mqtt.password_file" and "No such file" in info.value.reason
    p = tmp_path / "pw"
    p.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(p)
    p.write_bytes(b"\xffhunter2")
    with pytest.raises(ConfigError) as info:
        read_secret(p)
    assert "hunter2" not in str(info.value) and "not UTF-8" in str(info.value)
    p.write_bytes(b"x" * (C.MAX_SECRET_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        read_secret(p)


def test_config_stores_secret_paths_only(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    cfg = parse_config({"mqtt": {"username": "u", "password_file": str(pw)}})
    assert "hunter2" not in repr(cfg)
    assert read_secret(cfg.mqtt.password_file) == "hunter2"


# --------------------------------------------------------------------------- fuzzing

_KEYS = sorted({k.split(".")[-1].replace("[]", "") for k in _schema_keys(Config)})
_TOKENS = _KEYS + [
    ": ", ":", "\n", "\n  ", "\n    ", "  ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "&b ", "*b", "<<: ",
    "!!str ", "!!binary ", "!!python/name:os.system ", "|", ">", "'", '"', "#", "? ", "---", "...", "%YAML 1.1\n",
    "yes", "no", "off", "on", "~", "null", "010", "1e3", "1:30", "0x1F", "3.1.1", "5", "-1", "0", "1", "0.5",
    ".inf", ".nan", "2024-02-30", "2024-01-01", "{sensor}", "sensors/{sensor}", "*", "\t", "\\", "\x00", "\ud800",
    "9" * 30, "é",
]
_text = st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=4)), max_size=40).map("".join)


def _assert_only_config_error(fn, arg):
    try:
        cfg = fn(arg)
    except ConfigError as e:
        assert e.errors and all(isinstance(p, str) and isinstance(r, str) for p, r in e.errors)
        str(e).encode("utf-8")  # printable in a log
    else:
        assert isinstance(cfg, Config)
        hash(cfg)


def _fuzz(n):
    # ~2700 examples in all; the example-file mutations cost a full (pure-Python) YAML parse each.
    # STREAMLSTM_FUZZ_SCALE=20 runs a longer campaign.
    n = int(n * float(os.environ.get("STREAMLSTM_FUZZ_SCALE", "1")))
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@_fuzz(1200)
@given(_text)
def test_fuzz_yaml_text(text):
    _assert_only_config_error(loads_config, text)


_EXAMPLE_TEXT = EXAMPLE.read_text()


@_fuzz(300)
@given(st.lists(st.tuples(st.integers(0, len(_EXAMPLE_TEXT)), st.integers(0, 20), _text), min_size=1, max_size=4))
def test_fuzz_mutated_example(edits):
    text = _EXAMPLE_TEXT
    for pos, cut, insert in edits:
        text = text[:pos] + insert + text[pos + cut:]
    _assert_only_config_error(loads_config, text)


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(_TOKENS),
    st.binary(max_size=4), st.dates(),
)
_key = st.one_of(st.sampled_from(_KEYS), st.text(max_size=8), st.integers(), st.booleans(), st.none())
_tree = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(_key, kids, max_size=5)), max_leaves=12)


@_fuzz(600)
@given(st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)), _tree, max_size=6))
def test_fuzz_structures(mapping):
    _assert_only_config_error(parse_config, mapping)


_RAW_EXAMPLE = yaml.safe_load(_EXAMPLE_TEXT)


def _leaf_paths(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaf_paths(v, path + (i,))
    yield path


_PATHS = [p for p in _leaf_paths(_RAW_EXAMPLE) if p]


@_fuzz(600)
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _tree), min_size=1, max_size=3))
def test_fuzz_example_with_replaced_values(replacements):
    import copy
    raw = copy.deepcopy(_RAW_EXAMPLE)
    for path, value in replacements:
        node = raw
        try:
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this path
    _assert_only_config_error(parse_config, raw)


# --------------------------------------------------------------------------- source: kafka

def test_kafka_keys_are_checked_with_their_paths():
    lines = errors_of({"source": "kafka", "kafka": {
        "brokers": ["kafka://k:9092", "k"], "topic": "a topic", "heartbeat_interval_s": 20,
        "max_poll_interval_s": 10, "password_file": "/run/pw", "assignor": "sticky"}})
    assert lines == [
        "kafka.brokers[0]: expected host:port (no scheme), e.g. kafka-1:9092, got 'kafka://k:9092'",
        "kafka.brokers[1]: expected host:port (no scheme), e.g. kafka-1:9092, got 'k'",
        "kafka.topic: must be 1-249 characters of letters, digits, '.', '_', '-', got 'a topic'",
        "kafka.assignor: expected one of 'roundrobin', 'range', 'cooperative-sticky', got 'sticky'",
        "kafka.heartbeat_interval_s: must be at most session_timeout_s / 3 (15), got 20",
        "kafka.max_poll_interval_s: must be >= session_timeout_s (45), got 10",
        "kafka.password_file: requires username",
    ]
    assert one_error({"source": "queue"}).startswith("source: expected one of 'mqtt', 'kafka'")


def test_a_kafka_worker_may_match_any_key_but_the_bridge_may_not_read_its_own_output():
    # {sensor+} subscribes to '#', which also matches the events topic: fine for a worker (it
    # subscribes to no input topic), refused for the bridge (it does).
    cfg = parse_config({"source": "kafka", "inputs": [{"topic": "{sensor+}"}]})
    assert [p for p, _ in C.input_loop_problems(cfg)] == ["output.events_topic", "output.status_topic"]
    assert errors_of({"inputs": [{"topic": "{sensor+}"}]})[0].startswith("output.events_topic:")


def test_source_kafka_without_confluent_kafka_is_a_configuration_error(monkeypatch, tmp_path):
    import sys

    from streamlstm.preflight import preflight
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import fails as if not installed
    cfg = parse_config({"source": "kafka", "checkpoint": {"directory": str(tmp_path / "s")},
                        "kafka": {"snapshot_directory": str(tmp_path / "p")}})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert info.value.path == "source" and "pip install 'streamlstm[kafka]'" in info.value.reason
    preflight(parse_config({"checkpoint": {"directory": str(tmp_path / "s")}}))  # mqtt: not needed


def test_kafka_secrets_are_read_like_the_mqtt_ones(tmp_path):
    pytest.importorskip("confluent_kafka")
    from streamlstm.kafka_source import client_settings
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = parse_config({"kafka": {"username": "u", "password_file": str(pw), "tls": {"enabled": True}}})
    settings = client_settings(cfg.kafka)
    assert settings["security.protocol"] == "sasl_ssl" and settings["sasl.password"] == "s3cret"
    missing = parse_config({"kafka": {"tls": {"enabled": True, "ca_file": str(tmp_path / "nope.pem")}}})
    with pytest.raises(ConfigError) as info:
        client_settings(missing.kafka)
    assert info.value.path == "kafka.tls.ca_file"
