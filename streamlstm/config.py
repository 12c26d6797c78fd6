"""YAML configuration: declarative schema, loading, validation with key paths.

The schema lives in the frozen dataclasses below: every field carries its type, default,
range or choices, nullability and a one-line description (``metadata["spec"]``), and
``config/streamlstm.example.yaml`` documents exactly these defaults (a test checks both agree).

Entry points:

* ``load_config(path)`` / ``loads_config(text)`` / ``parse_config(mapping)`` -> ``Config``.
  Missing keys (and sections or lists given as ``null``) take their defaults; an empty file
  or an empty mapping is a valid, all-defaults configuration.
* ``read_secret(path)``: the only way to read password files. A ``Config`` holds paths to
  secrets, never their contents.
* ``describe_schema()``: one line per key, for ``check-config`` style output.

The sections are also the runtime objects, so a default or a rule lives here only: the detector
runs on ``GroupConfig`` and ``DetectorConfig`` as they are; ``spec.ModelSpec`` is ``ModelConfig``
plus the input width the data decides; ``payload.InputSpec`` is ``InputConfig`` plus the payload
size limit and the compiled topic template (topic_template.py holds the topic grammar).

Every problem is collected and reported at once in one ``ConfigError`` (one
``key.path: reason`` per line, e.g. ``groups[1].model.window: expected an integer >= 1 and
<= 10000, got 0``). YAML syntax errors carry line and column; nothing in here lets another
exception escape for bad input.

Groups: ``groups`` is an ordered list; a sensor belongs to the first group whose ``match``
glob (``fnmatch.fnmatchcase``) matches its id. Each group's ``model`` and ``detector`` are
the top-level ``model`` / ``detector`` sections with the group's overrides applied, fully
merged. If no group has ``match: "*"``, an implicit group ``default`` (``match: "*"``, shared
weights, no overrides) is appended so that every sensor has a group. When ``groups`` is
absent, the configuration has exactly that one ``default`` group.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .topic_template import filter_matches, subscription_filter, template_problem, topic_problem

__all__ = [
    "BackendConfig", "CheckpointConfig", "Config", "ConfigError", "DetectorConfig",
    "GroupConfig", "HomeAssistantConfig", "InputConfig", "KafkaConfig", "LoggingConfig", "MetricsConfig",
    "ModelConfig", "MqttConfig", "OutputConfig", "PipelineConfig", "TlsConfig",
    "describe_schema", "input_loop_problems", "load_config", "loads_config", "parse_config", "parse_duration", "read_secret",
    "section_problems",
]

# Limits against hostile or broken files (a config is a few KiB).
MAX_FILE_BYTES = 1 << 20
MAX_SECRET_BYTES = 64 << 10
MAX_DEPTH = 50             # YAML nesting; PyYAML's composer recurses per level
MAX_EXPANDED_NODES = 100_000  # nodes after following aliases ("billion laughs")
MAX_SHOWN_ERRORS = 200     # str(ConfigError) lists at most this many lines

TOP = "(top level)"        # key path used for problems with the document as a whole


class ConfigError(ValueError):
    """Invalid configuration. ``str()`` is ``path: reason``, one line per problem.

    ``errors`` holds every ``(path, reason)``; ``path``/``reason`` are the first one;
    ``source`` is the file (or ``None`` for ``parse_config``).
    """

    def __init__(self, path: str, reason: str = "", *, errors=None, source: Optional[str] = None):
        self.errors: tuple[tuple[str, str], ...] = tuple(errors) if errors else ((path, reason),)
        self.path, self.reason = self.errors[0]
        self.source = source
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        lines = [f"{p}: {r}" for p, r in self.errors[:MAX_SHOWN_ERRORS]]
        if len(self.errors) > MAX_SHOWN_ERRORS:
            lines.append(f"... and {len(self.errors) - MAX_SHOWN_ERRORS} more problems")
        return "\n".join(lines)


# --------------------------------------------------------------------------- schema helpers

@dataclass(frozen=True)
class _Spec:
    kind: str                      # int float bool str choice protocol strlist section entries groups override
    doc: str
    nullable: bool = False
    required: bool = False         # only inside list entries (input topic, group name/match)
    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False         # exclusive lower bound
    max_open: bool = False         # exclusive upper bound
    choices: tuple = ()
    check: Optional[Callable[[Any], Optional[str]]] = None  # extra check on a converted value
    cls: Any = None                # section / entry dataclass


def _f(default, spec: _Spec, factory=None):
    md = {"spec": spec}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    if default is dataclasses.MISSING:
        return field(metadata=md)
    return field(default=default, metadata=md)


def _int(default, doc, *, min=None, max=None, nullable=False):
    return _f(default, _Spec("int", doc, nullable=nullable, min=min, max=max))


def _float(default, doc, *, min=None, max=None, min_open=False, max_open=False, nullable=False):
    return _f(default, _Spec("float", doc, nullable=nullable, min=min, max=max,
                             min_open=min_open, max_open=max_open))


def _bool(default, doc):
    return _f(default, _Spec("bool", doc))


def _str(default, doc, *, nullable=False, required=False, check=None):
    return _f(default, _Spec("str", doc, nullable=nullable, required=required, check=check))


def _choice(default, choices, doc):
    return _f(default, _Spec("choice", doc, choices=tuple(choices)))


def _section(cls, doc):
    return _f(None, _Spec("section", doc, cls=cls), factory=cls)


# --------------------------------------------------------------------------- value checks

CHANNELS = ("model", "seasonal", "range", "stuck")  # evidence an event names as what fired
SOURCES = ("mqtt", "kafka")
FORMATS = ("auto", "number", "json", "batch", "influx")
TIMESTAMP_UNITS = ("s", "ms", "us", "ns", "iso")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "1d", "7d", "12h", "90m", "3600s"."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as '1d', '12h', '30m' or '3600s', got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _reason(problem) -> Optional[str]:
    return problem.reason if problem else None


def _check_input_topic(t: str) -> Optional[str]:
    return _reason(template_problem(t))


def _check_publish_topic(t: str) -> Optional[str]:
    return _reason(topic_problem(t, ("{sensor}",)))


def _check_state_topic(t: str) -> Optional[str]:
    return _check_publish_topic(t) or (
        None if "{sensor}" in t else "must contain {sensor} (one retained topic per sensor)")


def _check_plain_topic(t: str) -> Optional[str]:
    return _reason(topic_problem(t))


def _check_host(h: str) -> Optional[str]:
    # A URL ("mqtt://broker:1883") is the usual mistake; IPv6 addresses do contain ':'.
    if "/" in h or any(c.isspace() for c in h):
        return "must be a host name or address (no scheme, path or spaces; the port is a separate key)"
    return None


def _check_broker(b: str) -> Optional[str]:
    host, sep, port = b.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or _check_host(host.strip("[]")):
        return "expected host:port (no scheme), e.g. kafka-1:9092"
    return None


_KAFKA_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")


def _check_kafka_name(name: str) -> Optional[str]:
    # Kafka's own rule for topic names (group ids are freer, but the same rule keeps them boring).
    if not _KAFKA_NAME.match(name) or name in (".", ".."):
        return "must be 1-249 characters of letters, digits, '.', '_', '-'"
    return None


_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")


def _check_group_name(name: str) -> Optional[str]:
    # Names end up in metric labels and checkpoint file names: keep them boring.
    if not _GROUP_NAME.match(name):
        return "must be 1-64 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-')"
    return None


def _check_duration(d: str) -> Optional[str]:
    try:
        parse_duration(d)
    except ValueError:
        return "expected a positive number with a unit s, m, h, d or w (e.g. 1d, 12h, 30m)"
    return None


def _check_channel(name: str) -> Optional[str]:
    return None if name in CHANNELS else f"expected one of {', '.join(CHANNELS)}"


def _check_field_path(p: str) -> Optional[str]:
    if any(part == "" for part in p.split(".")):
        return "is not a valid dotted field path"
    return None


def _check_field_selector(p: str) -> Optional[str]:
    return None if p == "*" else _check_field_path(p)


def _check_timezone(name: str) -> Optional[str]:
    import zoneinfo
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return ("is not an IANA time zone name (e.g. Europe/Berlin, America/New_York, UTC); "
                "if it is one, the time zone database is missing: pip install tzdata")
    return None


# --------------------------------------------------------------------------- the schema

@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = _bool(False, "connect to the broker over TLS")
    ca_file: Optional[str] = _str(None, "CA bundle (null: system default)", nullable=True)
    cert_file: Optional[str] = _str(None, "client certificate (mutual TLS)", nullable=True)
    key_file: Optional[str] = _str(None, "client private key (mutual TLS)", nullable=True)
    key_password_file: Optional[str] = _str(None, "file holding the private key's password", nullable=True)
    insecure: bool = _bool(False, "skip hostname verification (testing only)")

    def _problems(self):
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            yield missing, ("cert_file", "key_file"), "cert_file and key_file must be given together"
        if self.key_password_file is not None and self.key_file is None:
            yield "key_password_file", ("key_password_file", "key_file"), "requires key_file"


@dataclass(frozen=True)
class MqttConfig:
    host: str = _str("localhost", "broker host name or address", check=_check_host)
    port: int = _int(1883, "broker port", min=1, max=65535)
    protocol: str = _f("5", _Spec("protocol", 'MQTT protocol version: "5" or "3.1.1"'))
    client_id: str = _str("streamlstm", "client id, also the persistent-session id: keep it stable")
    keepalive_s: int = _int(30, "keepalive interval in seconds (0: none)", min=0, max=65535)
    session_expiry_s: int = _int(86400, "MQTT 5: how long the broker keeps the session and its queued messages",
                                 min=0, max=0xFFFFFFFF)
    qos: int = _int(1, "subscription QoS", min=0, max=2)
    username: Optional[str] = _str(None, "user name (null: anonymous)", nullable=True)
    password_file: Optional[str] = _str(None, "file holding the password (read with read_secret)", nullable=True)
    reconnect_min_delay_s: float = _float(1.0, "first reconnect delay", min=0, min_open=True)
    reconnect_max_delay_s: float = _float(60.0, "longest reconnect delay (exponential backoff)", min=0, min_open=True)
    max_payload_bytes: int = _int(1048576, "larger payloads are rejected (reason too_large); MQTT 5: the broker "
                                  "is told not to send packets much larger", min=1, max=268435455)
    tls: TlsConfig = _section(TlsConfig, "TLS to the broker")

    def _problems(self):
        if self.reconnect_min_delay_s > self.reconnect_max_delay_s:
            yield ("reconnect_min_delay_s", ("reconnect_min_delay_s", "reconnect_max_delay_s"),
                   f"must be <= reconnect_max_delay_s ({_num(self.reconnect_max_delay_s)}), "
                   f"got {_num(self.reconnect_min_delay_s)}")
        if self.password_file is not None and self.username is None:
            yield "password_file", ("password_file", "username"), "requires username"


@dataclass(frozen=True)
class KafkaConfig:
    brokers: tuple[str, ...] = _f(("localhost:9092",), _Spec("strlist", "bootstrap brokers, host:port",
                                                             check=_check_broker))
    topic: str = _str("streamlstm-readings", "topic of the readings, keyed by sensor id (partition count fixed for life)",
                      check=_check_kafka_name)
    group_id: str = _str("streamlstm", "consumer group: the workers sharing the topic's partitions", check=_check_kafka_name)
    client_id: str = _str("streamlstm", "client id (broker logs, quotas)")
    assignor: str = _choice("roundrobin", ("roundrobin", "range", "cooperative-sticky"),
                            "partition assignment: roundrobin / range (eager: a rebalance revokes every partition, "
                            "kept ones are not reloaded) or cooperative-sticky (only moved partitions)")
    session_timeout_s: float = _float(45.0, "a worker silent this long loses its partitions (failover time)",
                                      min=1, max=3600)
    heartbeat_interval_s: float = _float(3.0, "heartbeat interval (below session_timeout_s / 3)", min=0.01, max=3600)
    max_poll_interval_s: float = _float(300.0, "longest time between two polls before the worker is taken for stuck",
                                        min=1, max=86400)
    start_without_snapshot: str = _choice("earliest", ("earliest", "latest"),
                                          "a partition without a snapshot starts at the oldest record kept or the next one")
    snapshot_directory: str = _str("./partitions", "per-partition snapshots; one directory all workers share")
    topic_header: str = _str("mqtt_topic", "record header holding the MQTT topic the inputs' templates match "
                             "(a record without it: its key is matched)")
    username: Optional[str] = _str(None, "SASL user name (null: no SASL)", nullable=True)
    password_file: Optional[str] = _str(None, "file holding the SASL password", nullable=True)
    sasl_mechanism: str = _choice("SCRAM-SHA-512", ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), "SASL mechanism")
    tls: TlsConfig = _section(TlsConfig, "TLS to the brokers")

    def _problems(self):
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            yield ("heartbeat_interval_s", ("heartbeat_interval_s", "session_timeout_s"),
                   f"must be at most session_timeout_s / 3 ({_num(self.session_timeout_s / 3)}), "
                   f"got {_num(self.heartbeat_interval_s)}")
        if self.max_poll_interval_s < self.session_timeout_s:
            yield ("max_poll_interval_s", ("max_poll_interval_s", "session_timeout_s"),
                   f"must be >= session_timeout_s ({_num(self.session_timeout_s)}), got {_num(self.max_poll_interval_s)}")
        if self.password_file is not None and self.username is None:
            yield "password_file", ("password_file", "username"), "requires username"
        if self.username is not None and self.password_file is None:
            yield "username", ("username", "password_file"), "requires password_file"


@dataclass(frozen=True)
class InputConfig:
    topic: str = _str("sensors/{sensor}", "topic template; {sensor} (one level) or {sensor+} (last levels) is the sensor id",
                      required=True, check=_check_input_topic)
    format: str = _choice("auto", FORMATS, "payload format")
    value_fields: tuple[str, ...] = _f(("value",), _Spec("strlist", "JSON field paths (dotted) of the value(s); several = one vector reading",
                                                         check=_check_field_path))
    timestamp_field: Optional[str] = _str("ts", "JSON field of the timestamp (absent or null: arrival time)",
                                          nullable=True, check=_check_field_path)
    timestamp_unit: str = _choice("s", TIMESTAMP_UNITS, "unit of the timestamp field")
    timestamp_tz: Optional[str] = _str(None, "IANA time zone of ISO timestamps without an offset (null: UTC)",
                                       nullable=True, check=_check_timezone)
    fields: tuple[str, ...] = _f((), _Spec(
        "strlist", "each listed field (dotted path) becomes its own sensor; [\"*\"]: every numeric field "
        "([] or null: off, value_fields make one reading)", nullable=True, check=_check_field_selector))
    exclude_fields: tuple[str, ...] = _f((), _Spec(
        "strlist", "with fields: [\"*\"], fields to leave out (globs over field paths)", nullable=True))
    sensor_name: Optional[str] = _str(None, "sensor id template: {sensor}, {field}, {measurement}, {tag.NAME} "
                                      "(null: {sensor}; with fields or influx {sensor}/{field})", nullable=True)

    @property
    def subscription(self) -> str:
        """The MQTT subscription filter for this input ({sensor} -> +, {sensor+} -> #)."""
        return subscription_filter(self.topic)

    @property
    def every_field(self) -> bool:
        return self.fields == ("*",)

    @property
    def sensor_template(self) -> str:
        """The sensor_name template in force (the default when unset)."""
        from .sensor_names import default_sensor_name
        return self.sensor_name or default_sensor_name(self.format, bool(self.fields))

    @property
    def width(self) -> int:
        """Values per reading this input produces (a model group keeps one width)."""
        if self.fields or self.format in ("influx", "number"):
            return 1
        return len(self.value_fields)

    def _problems(self):
        from .sensor_names import template_problem
        has_fields = bool(self.fields)
        if self.format == "number" and len(self.value_fields) != 1:
            yield "value_fields", ("value_fields", "format"), \
                f"format number carries one value, but value_fields has {len(self.value_fields)}"
        if has_fields and self.format not in ("auto", "json", "influx"):
            yield "fields", ("fields", "format"), f"needs format auto, json or influx, got {self.format!r}"
        if has_fields and "*" in self.fields and len(self.fields) > 1:
            yield "fields", ("fields",), "'*' (every numeric field) stands alone; list fields or write [\"*\"]"
        if self.format == "influx" and self.timestamp_unit == "iso":
            yield "timestamp_unit", ("timestamp_unit", "format"), \
                "line protocol timestamps are integers: s, ms, us or ns (Telegraf's default precision: ns)"
        if self.exclude_fields and not (self.every_field or (self.format == "influx" and not has_fields)):
            yield "exclude_fields", ("exclude_fields", "fields"), 'needs fields: ["*"] (listed fields need no exclusions)'
        if self.sensor_name is not None or has_fields or self.format == "influx":
            problem = template_problem(self.sensor_template, self.format, has_fields)
            if problem:
                key = "sensor_name" if self.sensor_name is not None else "fields"
                yield key, ("sensor_name", "fields", "format"), f"{problem} (sensor_name {self.sensor_template!r})"
        if self.timestamp_tz is not None and self.timestamp_unit != "iso":
            yield "timestamp_tz", ("timestamp_tz", "timestamp_unit"), \
                f"applies to ISO timestamps only (timestamp_unit: iso), got timestamp_unit {self.timestamp_unit!r}"


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = _int(32, "LSTM hidden units", min=1, max=4096)
    num_layers: int = _int(1, "stacked LSTM layers", min=1, max=8)
    window: int = _int(32, "truncated-BPTT length T", min=1, max=10000)
    train_every: int = _int(16, "one training window (truncated BPTT over `window` readings) every N readings of a sensor", min=1)
    optimizer: str = _choice("sgd", ("adam", "sgd"), "optimizer (sgd: steadier for one update per reading)")
    learning_rate: float = _float(0.32, "step per training window; with sgd scale it with train_every (adam wants ~0.0005)",
                                  min=0, min_open=True, max=10)
    loss: str = _choice("huber", ("mse", "huber"), "training loss")
    huber_delta: float = _float(1.0, "Huber loss delta", min=0, min_open=True)
    grad_clip: float = _float(1.0, "global gradient-norm clip", min=0, min_open=True)
    weight_decay: float = _float(0.0, "L2 weight decay", min=0, max=1, max_open=True)
    dropout: float = _float(0.0, "dropout between stacked layers, training only", min=0, max=1, max_open=True)
    input_clip: float = _float(10.0, "scaled inputs are clipped to +-input_clip", min=0, min_open=True)
    seed: int = _int(0, "random seed of the weight init and dropout", min=0, max=2**32 - 1)
    dtype: str = _choice("float32", ("float32", "float64"), "floating-point type of weights and state")
    target_feature: Optional[int] = _int(None, "null: predict every input feature; else the index to predict",
                                         min=0, nullable=True)


@dataclass(frozen=True)
class DetectorConfig:
    scaling: str = _choice("running", ("running", "fixed"), "input scaling")
    scale_min: Optional[float] = _float(None, "fixed scaling lower bound (scaling: fixed)", nullable=True)
    scale_max: Optional[float] = _float(None, "fixed scaling upper bound (scaling: fixed)", nullable=True)
    scaling_warmup: int = _int(50, "readings that seed the running mean/std before the model trains", min=1)
    scaling_horizon: int = _int(5000, "readings the running mean/std remembers (slow drifts are followed)", min=1)
    warmup: int = _int(200, "no anomaly before this many readings of a sensor", min=0)
    score: str = _choice("likelihood", ("likelihood", "ksigma", "dynamic"), "anomaly score")
    threshold: float = _float(0.6, "score at or above which a reading is anomalous", min=0, max=1,
                              min_open=True, max_open=True)
    short_window: int = _int(10, "residual smoothing (readings)", min=1)
    long_window: int = _int(1000, "recent residual distribution (readings)", min=1)
    ksigma: float = _float(4.0, "k for score: ksigma", min=0, min_open=True)
    min_residual_scale: float = _float(0.05, "floor of the residual spread, in units of the sensor's std", min=0,
                                       min_open=True)
    channels: tuple[str, ...] = _f(CHANNELS, _Spec(
        "strlist", "evidence channels: model (LSTM residual), seasonal (time-of-day/week profiles), range "
        "(distance from the sensor's normal), stuck (a sensor that stops changing)", nullable=True,
        check=_check_channel))
    min_duration: int = _int(1, "readings above threshold before an incident opens", min=1)
    hysteresis: float = _float(0.9, "incident closes when the score drops below threshold * hysteresis",
                               min=0, max=1, min_open=True)
    cooldown: int = _int(50, "readings after an incident closes before a new one may open", min=0)
    learning_protection: str = _choice("damp", ("off", "skip", "damp"), "how to train on anomalous readings")
    damp_factor: float = _float(0.1, "learning-rate factor for anomalous readings (damp)", min=0, max=1)
    gap_reset_intervals: float = _float(10.0, "reset a sensor's state after a gap of N typical intervals (0: never)", min=0)
    seasonal_periods: tuple[str, ...] = _f(("1d", "7d"), _Spec(
        "strlist", "periods of the seasonal profiles, e.g. [1d, 7d] (null or []: none)", nullable=True,
        check=_check_duration))
    seasonal_alpha: float = _float(0.2, "share of a seasonal profile bin renewed per period", min=0, max=1, min_open=True)
    seasonal_max_bins: int = _int(2016, "most phase bins per seasonal profile (memory: 4 B per bin per sensor)", min=4)
    peak_memory: int = _int(2000, "readings over which a sensor's own peak surprise is remembered (0: off)", min=0)
    accept_after: int = _int(1000, "readings an incident may stay open before its level is accepted as the new "
                                   "normal and it closes with reason 'accepted' (0: never)", min=0)
    max_clock_skew_s: float = _float(86400.0, "readings stamped more than this ahead of the clock are rejected "
                                     "(clock_skew); 0: no check", min=0)
    clock_jump_readings: int = _int(20, "consecutive in-order readings more than max_clock_skew_s behind a "
                                    "sensor's last one that re-base its clock", min=1)

    @property
    def period_seconds(self) -> tuple:
        return tuple(parse_duration(p) for p in self.seasonal_periods)

    def _problems(self):
        lo, hi = self.scale_min, self.scale_max
        if self.scaling == "fixed":
            for key, val in (("scale_min", lo), ("scale_max", hi)):
                if val is None:
                    yield key, ("scaling", key), "required when scaling is fixed"
        if lo is not None and hi is not None and not lo < hi:
            yield "scale_max", ("scale_min", "scale_max"), f"must be > scale_min ({_num(lo)}), got {_num(hi)}"
        if self.short_window > self.long_window:
            yield ("short_window", ("short_window", "long_window"),
                   f"must be <= long_window ({self.long_window}), got {self.short_window}")


@dataclass(frozen=True)
class GroupConfig:
    # Required in the file; the defaults are the implicit catch-all group (and serve code
    # that builds a one-group detector).
    name: str = _str("default", "group name (metric label, checkpoint file name)", required=True,
                     check=_check_group_name)
    match: str = _str("*", "glob over sensor ids; the first matching group wins", required=True)
    weights: str = _choice("shared", ("shared", "per_sensor"), "one model for the group or one per sensor")
    model: ModelConfig = _f(None, _Spec("override", "overrides of the top-level model keys", cls=ModelConfig),
                            factory=ModelConfig)
    detector: DetectorConfig = _f(None, _Spec("override", "overrides of the top-level detector keys",
                                              cls=DetectorConfig), factory=DetectorConfig)


@dataclass(frozen=True)
class BackendConfig:
    kind: str = _choice("auto", ("auto", "cpu", "cuda", "numpy"), "compute backend")
    parallel_min_batch: int = _int(64, "below this batch size the serial CPU kernel is used", min=1)
    cuda_min_batch: int = _int(4096, "auto: CUDA only from this batch size on", min=1)


@dataclass(frozen=True)
class PipelineConfig:
    queue_size: int = _int(100000, "readings; a full queue applies backpressure", min=1)
    max_batch: int = _int(4096, "readings per micro-batch", min=1)
    max_delay_ms: float = _float(20.0, "longest wait to fill a micro-batch", min=0)
    max_sensors: int = _int(100000, "sensors beyond this are rejected (reason sensor_cap)", min=1)

    def _problems(self):
        if self.max_batch > self.queue_size:
            yield ("max_batch", ("max_batch", "queue_size"),
                   f"must be <= queue_size ({self.queue_size}), got {self.max_batch}")


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = _bool(False, "publish Home Assistant MQTT discovery")
    discovery_prefix: str = _str("homeassistant", "discovery topic prefix", check=_check_plain_topic)


@dataclass(frozen=True)
class OutputConfig:
    events_topic: str = _str("streamlstm/events/{sensor}", "topic of anomaly events", check=_check_publish_topic)
    events_qos: int = _int(1, "QoS of events", min=0, max=2)
    message_expiry_s: int = _int(3600, "MQTT 5 message expiry of events (0: none)", min=0, max=0xFFFFFFFF)
    status_topic: str = _str("streamlstm/status", "retained online/offline, also the last will",
                             check=_check_plain_topic)
    state_topic: Optional[str] = _str(None, "retained per-sensor state, e.g. streamlstm/state/{sensor} (null: off, or derived from "
                                      "status_topic when homeassistant.enabled)",
                                      nullable=True, check=_check_state_topic)
    homeassistant: HomeAssistantConfig = _section(HomeAssistantConfig, "Home Assistant discovery")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _bool(True, "serve Prometheus metrics")
    address: str = _str("127.0.0.1", "listen address", check=_check_host)
    port: int = _int(9107, "listen port (0: any free port)", min=0, max=65535)
    per_sensor: bool = _bool(False, "per-sensor gauges (score, residual, prediction)")
    per_sensor_cap: int = _int(1000, "at most this many sensors get per-sensor series", min=0)
    silent_after_s: float = _float(300.0, "a sensor with no reading for this long counts as silent",
                                   min=0, min_open=True)
    max_connections: int = _int(16, "open connections at most; beyond, the oldest is closed", min=1, max=1024)
    request_timeout_s: float = _float(10.0, "a connection is closed this long after it was opened", min=0,
                                      min_open=True)
    tls_cert_file: Optional[str] = _str(None, "HTTPS certificate", nullable=True)
    tls_key_file: Optional[str] = _str(None, "HTTPS private key", nullable=True)
    basic_auth_user: Optional[str] = _str(None, "basic-auth user name", nullable=True)
    basic_auth_password_file: Optional[str] = _str(None, "file holding the basic-auth password", nullable=True)

    def _problems(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            yield missing, ("tls_cert_file", "tls_key_file"), "tls_cert_file and tls_key_file must be given together"
        if (self.basic_auth_user is None) != (self.basic_auth_password_file is None):
            missing = "basic_auth_password_file" if self.basic_auth_password_file is None else "basic_auth_user"
            yield (missing, ("basic_auth_user", "basic_auth_password_file"),
                   "basic_auth_user and basic_auth_password_file must be given together")


@dataclass(frozen=True)
class CheckpointConfig:
    directory: str = _str("./state", "checkpoint directory (relative to the working directory)")
    interval_s: float = _float(300.0, "seconds between checkpoints", min=0, min_open=True)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _choice("INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), "log level")
    rejected_log_interval_s: float = _float(10.0, "at most one log line per rejection reason per interval", min=0)
    json: bool = _bool(False, "one JSON object per log line instead of text (under systemd both get journald priority prefixes)")


def _default_groups() -> tuple[GroupConfig, ...]:
    return (GroupConfig(name="default", match="*"),)


@dataclass(frozen=True)
class Config:
    source: str = _choice("mqtt", SOURCES, "where readings come from: mqtt (the inputs' topics) or kafka (a "
                          "topic keyed by sensor id, shared by a consumer group; docs/scaling.md)")
    mqtt: MqttConfig = _section(MqttConfig, "broker connection")
    kafka: KafkaConfig = _section(KafkaConfig, "Kafka input (source: kafka) and the bridge's output")
    inputs: tuple[InputConfig, ...] = _f(None, _Spec("entries", "where readings come from", cls=InputConfig),
                                         factory=lambda: (InputConfig(),))
    model: ModelConfig = _section(ModelConfig, "model defaults (groups may override)")
    detector: DetectorConfig = _section(DetectorConfig, "detector defaults (groups may override)")
    groups: tuple[GroupConfig, ...] = _f(None, _Spec("groups", "sensor groups, first match wins", cls=GroupConfig),
                                         factory=_default_groups)
    backend: BackendConfig = _section(BackendConfig, "compute backend")
    pipeline: PipelineConfig = _section(PipelineConfig, "queue and micro-batching")
    output: OutputConfig = _section(OutputConfig, "published topics")
    metrics: MetricsConfig = _section(MetricsConfig, "Prometheus endpoint")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpoints")
    logging: LoggingConfig = _section(LoggingConfig, "logging")


def _specs(cls) -> list[tuple[str, _Spec]]:
    # Runtime subclasses (spec.ModelSpec, payload.InputSpec) add fields that are no config keys.
    return [(f.name, f.metadata["spec"]) for f in dataclasses.fields(cls) if "spec" in f.metadata]


# --------------------------------------------------------------------------- value display

def _num(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _show(v) -> str:
    """A short, bounded rendering of any value for messages (never recurses, never huge)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, _Trap):
        return v.text if len(v.text) <= 40 else v.text[:37] + "..."
    if isinstance(v, int):
        return str(v) if v.bit_length() <= 200 else "a very large integer"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 60 else repr(v[:57]) + "..."
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, (bytes, bytearray)):
        return "binary data"
    if isinstance(v, (set, frozenset)):
        return "a set"
    if hasattr(v, "isoformat"):
        try:
            return f"the date/time {v.isoformat()} (quote it if it is text)"
        except Exception:  # pragma: no cover - exotic objects
            pass
    return f"a {type(v).__name__}"


# --------------------------------------------------------------------------- YAML loading

@dataclass(frozen=True)
class _Trap:
    """An unquoted scalar that YAML 1.1 reads as a surprising number (octal, base 60)."""
    text: str
    value: Any
    what: str

    def message(self) -> str:
        return (f"unquoted {_show(self)} is {self.what} in YAML 1.1 (= {_show(self.value)}); "
                f"write the number in plain decimal, or quote it if it is text")


_OCTAL = re.compile(r"[-+]?0[0-7_]+\Z")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and duplicate keys, and marks YAML 1.1 number traps."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        # PyYAML silently keeps the last of duplicate keys; a config must not.
        if isinstance(node, MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue
                if first is not None:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"duplicate key {_show(key)} (first at line {first.line + 1})",
                                           key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # Python refuses int() of > 4300 digits
            raise ConstructorError(None, None, "integer too large", node.start_mark) from None
        if ":" in text:
            return _Trap(text, value, "a base-60 number")
        if _OCTAL.match(text):
            return _Trap(text, value, "an octal number")
        return value

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as e:  # e.g. 2024-02-30
            raise ConstructorError(None, None, f"invalid date: {e}", node.start_mark) from None

    def construct_yaml_float(self, node):
        text = self.construct_scalar(node)
        value = super().construct_yaml_float(node)
        if ":" in text:
            return _Trap(text, value, "a base-60 number")
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _check_expansion(root) -> None:
    """Refuse recursive aliases and documents that alias-expand past MAX_EXPANDED_NODES.

    PyYAML shares aliased objects instead of copying them, so a "billion laughs" file loads
    cheaply, but anything that walks the result (or a later deep copy) would not.
    """
    def children(n):
        if isinstance(n, SequenceNode):
            return n.value
        if isinstance(n, MappingNode):
            return [x for pair in n.value for x in pair]
        return ()

    size: dict[int, int] = {}
    visiting: set[int] = set()
    stack = [(root, False)]
    while stack:
        n, leaving = stack.pop()
        i = id(n)
        if leaving:
            visiting.discard(i)
            size[i] = s = 1 + sum(size[id(c)] for c in children(n))
            if s > MAX_EXPANDED_NODES:
                raise ComposerError(None, None, f"aliases expand this document past {MAX_EXPANDED_NODES} "
                                    f"values (alias bomb?)", n.start_mark)
            continue
        if i in size:
            continue
        if i in visiting:
            raise ComposerError(None, None, "recursive alias (a value contains itself)", n.start_mark)
        visiting.add(i)
        stack.append((n, True))
        for c in children(n):
            if id(c) in visiting:
                raise ComposerError(None, None, "recursive alias (a value contains itself)", c.start_mark)
            if id(c) not in size:
                stack.append((c, False))


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        msg = f"invalid YAML at {where}{problem}"
        if e.context and e.problem and e.context_mark:
            msg += f" ({e.context} at line {e.context_mark.line + 1})"
        if "\\t" in problem or "\t" in problem:
            msg += "; YAML does not allow tabs for indentation, use spaces"
        return msg
    if isinstance(e, yaml.reader.ReaderError):
        pos = max(0, min(e.position, len(text)))
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        ch = e.character if isinstance(e.character, int) else 0
        return (f"invalid YAML at line {line}, column {col}: character #x{ch:04x} is not allowed "
                f"(is this a text file?)")
    return f"invalid YAML: {str(e)[:200]}"


def _load_yaml(text: str, source: str):
    loader = None
    try:
        loader = _Loader(text)  # the reader already refuses non-printable characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(source, _yaml_problem(e, text), source=source) from None
    except RecursionError:
        raise ConfigError(source, "invalid YAML: nested too deeply", source=source) from None
    except Exception as e:  # third-party parser on untrusted input: never leak a traceback
        raise ConfigError(source, f"cannot parse YAML: {type(e).__name__}: {str(e)[:200]}", source=source) from e
    finally:
        if loader is not None:
            loader.dispose()


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(source, f"not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, column {col})",
                          source=source) from None


# --------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class _Given:
    """A raw value the caller still has to resolve (groups, group overrides)."""
    value: Any


class _Errors:
    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append((path, reason))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _bounds(spec: _Spec) -> str:
    parts = []
    if spec.min is not None:
        parts.append(f"{'>' if spec.min_open else '>='} {_num(spec.min)}")
    if spec.max is not None:
        parts.append(f"{'<' if spec.max_open else '<='} {_num(spec.max)}")
    return " and ".join(parts)


def _expected(spec: _Spec) -> str:
    b = _bounds(spec)
    text = {
        "int": "an integer" + (f" {b}" if b else ""),
        "float": "a number" + (f" {b}" if b else ""),
        "bool": "true or false",
        "str": "a non-empty string",
        "choice": "one of " + ", ".join(repr(c) for c in spec.choices),
        "protocol": "'5' or '3.1.1'",
        "strlist": "a non-empty list of strings",
    }[spec.kind]
    return text + (" or null" if spec.nullable else "")


def _yaml_reads_as_number(s: str) -> bool:
    tag = yaml.resolver.Resolver().resolve(ScalarNode, s, (True, False))
    return tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _number_string_hint(s: str, want_int: bool) -> str:
    """Hint for a number field given a string that looks like a number."""
    t = s.strip().replace("_", "")
    try:
        x = float(t)
    except ValueError:
        return ""
    if not math.isfinite(x):
        return ""
    if _yaml_reads_as_number(s):
        return " (a quoted string: remove the quotes)"
    if want_int and x.is_integer() and abs(x) < 1e18:
        plain = str(int(x))
    elif x.is_integer() and abs(x) < 1e16:
        plain = str(int(x))
    else:
        plain = repr(x)
    extra = ""
    if "e" in t.lower() and not want_int:
        m = re.match(r"([-+]?[0-9.]+)[eE]([-+]?)([0-9]+)\Z", t)
        if m:
            mant = m.group(1) if "." in m.group(1) else m.group(1) + ".0"
            extra = f" or {mant}e{m.group(2) or '+'}{m.group(3)}"
    return f" (YAML 1.1 reads {s} as text, not a number; write {plain}{extra})"


def _bool_hint(v: bool, spec: _Spec) -> str:
    words = ("yes", "on", "true") if v else ("no", "off", "false")
    for c in spec.choices:
        if isinstance(c, str) and c.lower() in words:
            return f" (YAML 1.1 reads unquoted {c} as a boolean: write it quoted, '{c}')"
    return f" (YAML 1.1 reads unquoted {'/'.join(words)} as a boolean: quote the value)"


def _convert(spec: _Spec, v):
    """Convert one scalar value; returns (True, value) or (False, reason)."""
    def bad(hint=""):
        return False, f"expected {_expected(spec)}, got {_show(v)}{hint}"

    if v is None:
        return (True, None) if spec.nullable else bad()
    if isinstance(v, _Trap):
        return False, f"expected {_expected(spec)}: {v.message()}"
    kind = spec.kind
    if kind in ("int", "float"):
        if isinstance(v, str):
            return bad(_number_string_hint(v, kind == "int"))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return bad()
        if kind == "int":
            if not isinstance(v, int):
                return bad(f" (write {_num(v)})" if v.is_integer() and abs(v) < 1e16 else "")
            x = v
        else:
            try:
                x = float(v)
            except OverflowError:
                return bad()
            if not math.isfinite(x):
                return bad()
        if spec.min is not None and (x < spec.min or (spec.min_open and x == spec.min)):
            return bad()
        if spec.max is not None and (x > spec.max or (spec.max_open and x == spec.max)):
            return bad()
        return True, x
    if kind == "bool":
        if isinstance(v, bool):
            return True, v
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return bad(" (a quoted string: remove the quotes)")
        return bad()
    if kind == "protocol":
        if (isinstance(v, int) and not isinstance(v, bool) and v == 5) or v == "5":
            return True, "5"
        if v == "3.1.1":
            return True, "3.1.1"
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v in (3, 3.1, 4, 311):
            return bad(" (write '3.1.1' in quotes)")
        return bad(_bool_hint(v, spec) if isinstance(v, bool) else "")
    if kind in ("str", "choice"):
        if isinstance(v, bool):
            return bad(_bool_hint(v, spec))
        if isinstance(v, (int, float)):
            return bad(" (quote it if it is text)")
        if not isinstance(v, str):
            return bad()
        if "\0" in v or not _encodable(v):
            return False, f"expected {_expected(spec)}, got a string with a NUL or invalid Unicode character"
        if kind == "choice":
            if v in spec.choices:
                return True, v
            return bad(_did_you_mean(v, spec.choices))
        if not v.strip():
            return bad()
        if spec.nullable and v.strip().lower() in ("none", "nil", "null"):
            return False, f"expected {_expected(spec)}, got the string {v!r} (write null or ~ for no value)"
        if spec.check:
            problem = spec.check(v)
            if problem:
                return False, f"{problem}, got {_show(v)}"
        return True, v
    raise AssertionError(kind)  # pragma: no cover


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800" in YAML)
        return False
    return True


def _did_you_mean(word: str, options) -> str:
    opts = [str(o) for o in options]
    for o in opts:
        if o.lower() == word.lower():
            return f" (did you mean {o!r}?)"
    close = difflib.get_close_matches(word, opts, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _home_of(key: str, here) -> str:
    """Hint for a key that exists in another section (e.g. threshold under model)."""
    homes = []
    for name, spec in _specs(Config):
        if spec.kind in ("section", "entries") and spec.cls is not here:
            if key in {n for n, _ in _specs(spec.cls)}:
                homes.append(name)
    return f" ({key} belongs under {homes[0]})" if len(homes) == 1 else ""


def _convert_strlist(spec: _Spec, v, path: str, errs: _Errors):
    if spec.nullable and (v is None or (isinstance(v, (list, tuple)) and not v)):
        return True, ()
    if isinstance(v, str):
        errs.add(path, f"expected {_expected(spec)}, got {_show(v)} (write [{v}])")
        return False, None
    if not isinstance(v, (list, tuple)) or not v:
        got = "an empty list" if isinstance(v, (list, tuple)) else _show(v)
        errs.add(path, f"expected {_expected(spec)}, got {got}")
        return False, None
    out, ok = [], True
    item_spec = dataclasses.replace(spec, kind="str", nullable=False)  # [null] is no list of strings
    for i, item in enumerate(v):
        good, val = _convert(item_spec, item)
        if not good:
            errs.add(f"{path}[{i}]", val)
            ok = False
        elif val in out:
            errs.add(f"{path}[{i}]", f"{val!r} duplicates {path}[{out.index(val)}]")
            ok = False
        else:
            out.append(val)
    return ok, tuple(out)


def _parse_fields(cls, raw, path: str, errs: _Errors, *, base=None, entry=False,
                  what: str = "keys") -> tuple[Any, set]:
    """Build ``cls`` from a raw mapping. Returns (instance, names of bad keys).

    ``base``: an instance whose values are the defaults (group overrides); then cross-field
    problems are reported only when they involve a key the override actually sets, so one
    bad top-level value is not repeated for every group.
    """
    specs = _specs(cls)
    names = [n for n, _ in specs]
    values: dict[str, Any] = {}
    bad: set[str] = set()
    shape_bad = False
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errs.add(path or TOP, f"expected a mapping of {what}, got {_show(raw)}")
        raw = {}
        bad.update(names)
        shape_bad = True
    given = set()
    for key in raw:
        if isinstance(key, str) and key in names:
            given.add(key)
            continue
        if isinstance(key, bool):
            errs.add(_join(path, _show(key)),
                     "unknown key (YAML 1.1 reads unquoted yes/no/on/off as booleans: quote the key)")
        elif not isinstance(key, str):
            errs.add(_join(path, _show(key)), "unknown key (keys must be strings)")
        else:
            shown = key if re.fullmatch(r"[\w.-]{1,60}", key) else _show(key)
            errs.add(_join(path, shown), "unknown key" + (_did_you_mean(key, names) or _home_of(key, cls)))
    for name, spec in specs:
        p = _join(path, name)
        default = getattr(base, name) if base is not None else _default(cls, name)
        if name not in given:
            if spec.required and entry and not shape_bad:
                errs.add(p, "required key is missing")
                bad.add(name)
            values[name] = default
            continue
        v = raw[name]
        kind = spec.kind
        if kind == "section":
            values[name], sub_bad = _parse_fields(spec.cls, v, p, errs, base=default if base is not None else None)
            if sub_bad:
                bad.add(name)
        elif kind == "entries":
            values[name], ok = _parse_entries(spec, v, p, errs)
            if not ok:
                bad.add(name)
        elif kind in ("groups", "override"):
            values[name] = _Given(v)  # resolved by the caller, which knows the top-level sections
        elif kind == "strlist":
            ok, val = _convert_strlist(spec, v, p, errs)
            values[name] = val if ok else default
            if not ok:
                bad.add(name)
        else:
            ok, val = _convert(spec, v)
            if ok:
                values[name] = val
            else:
                errs.add(p, val)
                bad.add(name)
                values[name] = default
    if any(spec.kind in ("groups", "override") for _, spec in specs):
        return values, bad  # the caller finishes the object
    obj = cls(**values)
    _cross_check(obj, path, errs, bad, None if base is None else given)
    return obj, bad


def _default(cls, name):
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cross_check(obj, path: str, errs: _Errors, bad: set, given: Optional[set]) -> None:
    problems = getattr(obj, "_problems", None)
    if problems is None:
        return
    for key, involved, reason in problems():
        if bad & set(involved):
            continue  # already reported as a bad value
        if given is not None and not given & set(involved):
            continue  # inherited unchanged from the top level, reported there
        errs.add(_join(path, key), reason)


def _parse_entries(spec: _Spec, v, path: str, errs: _Errors):
    if v is None:
        return _default(Config, "inputs") if spec.cls is InputConfig else (), True
    if not isinstance(v, (list, tuple)):
        errs.add(path, f"expected a list of entries, got {_show(v)}")
        return (spec.cls(),), False
    if not v:
        errs.add(path, "expected at least one entry (remove the key to use the default)")
        return (spec.cls(),), False
    out, ok = [], True
    for i, item in enumerate(v):
        obj, bad = _parse_fields(spec.cls, item, f"{path}[{i}]", errs, entry=True)
        ok = ok and not bad
        out.append(obj)
    return tuple(out), ok


def _parse_groups(raw, path: str, errs: _Errors, model: ModelConfig, detector: DetectorConfig):
    if raw is None:
        raw = [{"name": "default", "match": "*"}]
    if not isinstance(raw, (list, tuple)):
        errs.add(path, f"expected a list of groups, got {_show(raw)}")
        raw = []
    elif not raw:
        errs.add(path, "expected at least one group (remove the key to use the default group)")
    groups: list[GroupConfig] = []
    seen_names: dict[str, int] = {}
    catch_all: Optional[int] = None
    seen_match: dict[str, int] = {}
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        values, bad = _parse_fields(GroupConfig, item, p, errs, entry=True, what="group keys")
        for key, top in (("model", model), ("detector", detector)):
            over = values.get(key)
            if not isinstance(over, _Given):  # no overrides: the top-level section as is
                values[key] = top
                continue
            values[key], _ = _parse_fields(type(top), over.value, _join(p, key), errs, base=top,
                                           what=f"{key} keys to override")
        g = GroupConfig(**values)
        if "name" not in bad:
            if g.name in seen_names:
                errs.add(_join(p, "name"), f"duplicate group name {g.name!r} (also groups[{seen_names[g.name]}])")
            else:
                seen_names[g.name] = i
        if "match" not in bad:
            if catch_all is not None:
                errs.add(_join(p, "match"), f"never used: groups[{catch_all}] (match '*') takes every sensor first")
            elif g.match in seen_match:
                errs.add(_join(p, "match"),
                         f"never used: groups[{seen_match[g.match]}] has the same match and comes first")
            seen_match.setdefault(g.match, i)
            if g.match == "*" and catch_all is None:
                catch_all = i
        groups.append(g)
    if catch_all is None and raw:
        if "default" in seen_names:
            errs.add(_join(f"{path}[{seen_names['default']}]", "name"),
                     "no group matches '*', so an implicit group 'default' is added, but this name is "
                     "taken: add a group with match '*' or rename this one")
        else:
            groups.append(GroupConfig(name="default", match="*", model=model, detector=detector))
    return tuple(groups) or _default_groups()


def _check_topics(cfg: Config, errs: _Errors) -> None:
    # Our own output must not come back in through an input subscription.
    seen: dict[str, int] = {}
    for i, inp in enumerate(cfg.inputs):
        if inp.topic in seen:
            errs.add(f"inputs[{i}].topic", f"duplicate of inputs[{seen[inp.topic]}].topic")
        seen.setdefault(inp.topic, i)
    outputs = [("output.events_topic", cfg.output.events_topic),
               ("output.status_topic", cfg.output.status_topic)]
    from .homeassistant import state_topic
    state = state_topic(cfg.output)  # derived when Home Assistant discovery needs one
    if state is not None:
        outputs.append(("output.state_topic", state))
    if cfg.output.homeassistant.enabled:
        outputs.append(("output.homeassistant.discovery_prefix",
                        cfg.output.homeassistant.discovery_prefix + "/sensor/x/x/config"))
    for key, topic in outputs:
        sample = topic.replace("{sensor}", "x")
        for i, inp in enumerate(cfg.inputs):
            if _check_input_topic(inp.topic) is None and filter_matches(inp.subscription, sample):
                errs.add(key, f"is also matched by inputs[{i}].topic {inp.topic!r}: "
                              f"the daemon would read its own messages")
                break


def input_loop_problems(cfg: Config) -> list[tuple[str, str]]:
    """[(key, reason)] where subscribing to the inputs' topics would read the daemon's own output
    (the `streamlstm bridge` subscribes to them whatever `source` says)."""
    errs = _Errors()
    _check_topics(cfg, errs)
    return errs.items


def _parse(raw, source: Optional[str]) -> Config:
    errs = _Errors()
    values, _ = _parse_fields(Config, raw, "", errs, what="sections (mqtt, inputs, model, ...)")
    groups = values["groups"]
    values["groups"] = _parse_groups(groups.value if isinstance(groups, _Given) else None, "groups", errs,
                                     values["model"], values["detector"])
    cfg = Config(**values)
    # A Kafka worker subscribes to no input topic (the bridge checks its own: input_loop_problems).
    if cfg.source == "mqtt" and not any(p.startswith(("inputs", "output")) for p, _ in errs.items):
        _check_topics(cfg, errs)
    if not any(p.startswith(("inputs", "groups")) for p, _ in errs.items):
        from .routing import check_routing
        for path, reason in check_routing(cfg.inputs, cfg.groups):
            errs.add(path, reason)
    if errs.items:
        # Groups are resolved last (they need model/detector); report in schema order anyway.
        order = {name: i for i, (name, _) in enumerate(_specs(Config))}
        errs.items.sort(key=lambda e: order.get(re.split(r"[.\[]", e[0], maxsplit=1)[0], -1))
        raise ConfigError("", errors=errs.items, source=source)
    return cfg


# --------------------------------------------------------------------------- public API

def parse_config(mapping: Optional[Mapping]) -> Config:
    """Validate an already-loaded mapping (``None`` or ``{}``: all defaults)."""
    try:
        return _parse(mapping, None)
    except RecursionError:  # a self-containing Python structure
        raise ConfigError(TOP, "structure nested too deeply") from None


def loads_config(text, source: str = "<string>") -> Config:
    """Parse and validate YAML text (``str`` or UTF-8 ``bytes``)."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_FILE_BYTES:
            raise ConfigError(source, f"larger than {MAX_FILE_BYTES} bytes; is this the right file?", source=source)
        text = _decode(bytes(text), source)
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(source, f"larger than {MAX_FILE_BYTES} bytes; is this the right file?", source=source)
    raw = _load_yaml(text, source)
    try:
        return _parse(raw, source)
    except RecursionError:
        raise ConfigError(TOP, "structure nested too deeply", source=source) from None


def load_config(path) -> Config:
    """Read, parse and validate a YAML config file. Any problem raises ``ConfigError``."""
    p = os.fsdecode(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: /dev/zero must not hang us
    except OSError as e:
        raise ConfigError(p, f"cannot read config file: {e.strerror or e}", source=p) from None
    return loads_config(data, p)


def read_secret(path, key: Optional[str] = None) -> str:
    """Contents of a secret file (password), minus one trailing newline.

    ``key`` (e.g. ``"mqtt.password_file"``) names the setting in errors; the secret itself is
    never part of a message.
    """
    p = os.fsdecode(path)
    where = key or p
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise ConfigError(where, f"cannot read secret file {p!r}: {e.strerror or e}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(where, f"secret file {p!r} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(where, f"secret file {p!r} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(where, f"secret file {p!r} is empty")
    return text


def section_problems(obj, skip=()) -> list[tuple[str, str]]:
    """[(key, reason)] for each value of a section object the schema refuses: objects built in
    code rather than parsed (payload.InputSpec) are held to the same rules."""
    errs = _Errors()
    bad: set[str] = set()
    for name, spec in _specs(type(obj)):
        if name in skip or spec.kind in ("section", "entries", "groups", "override"):
            continue
        value = getattr(obj, name)
        if spec.kind == "strlist":
            ok, _ = _convert_strlist(spec, value, name, errs)
        else:
            ok, reason = _convert(spec, value)
            if not ok:
                errs.add(name, reason)
        if not ok:
            bad.add(name)
    _cross_check(obj, "", errs, bad, None)
    return errs.items


def describe_schema() -> str:
    """Every key with type, default, constraints and description, one per line."""
    lines: list[str] = []

    def walk(cls, prefix):
        for name, spec in _specs(cls):
            p = _join(prefix, name)
            if spec.kind == "override":
                lines.append(f"{p}: mapping: {spec.doc} (any {name} key; unset keys keep the top-level value)")
            elif spec.kind == "section":
                lines.append(f"{p}: {spec.doc}")
                walk(spec.cls, p)
            elif spec.kind in ("entries", "groups"):
                lines.append(f"{p}: list: {spec.doc}")
                walk(spec.cls, p + "[]")
            else:
                d = _default(cls, name)
                dflt = "required" if spec.required else f"default {_show(d) if not isinstance(d, tuple) else list(d)}"
                lines.append(f"{p}: {_expected(spec)}; {dflt}; {spec.doc}")

    walk(Config, "")
    return "\n".join(lines)
