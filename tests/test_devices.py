"""Devices as users have them, end to end: the README's "Devices" input blocks run verbatim
against a real mosquitto and the real daemon (`python -m streamlstm run`), published with
mosquitto_pub and paho, observed through /metrics, the retained state topics and Home Assistant
discovery topics. Also: mixed widths and colliding ids refused by check-config, the wrong_arity
log line, and check-config's file checks agreeing with `run`."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from daemon_harness import Subscriber, daemon_config, wait_for
from streamlstm.config import parse_config

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def readme_device_blocks() -> dict:
    """{device heading: YAML text} of every ```yaml block in README's "Devices" section."""
    text = README.read_text()
    section = text.split("\n## Devices\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for m in re.finditer(r"```yaml\n(.*?)```", section, re.S):
        heading = re.findall(r"\*\*([^*]+)\*\*", section[:m.start()])[-1]  # the bold name before it
        assert heading not in blocks, f"two blocks under {heading!r}"
        blocks[heading] = m.group(1)
    return blocks


def until(sub: Subscriber, cond, timeout: float, what: str) -> None:
    """Until `cond()` holds over what `sub` has seen (it may hold already)."""
    if not cond():
        sub.wait(lambda _m: cond(), timeout, what)


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def mosquitto_pub(broker, topic: str, payload: str) -> None:
    exe = shutil.which("mosquitto_pub")
    if exe is None:
        pytest.skip("mosquitto_pub not installed (apt-get install mosquitto-clients)")
    subprocess.run([exe, "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic, "-m", payload],
                   check=True, timeout=30)


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run([sys.executable, "-m", "streamlstm", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


# ------------------------------------------------------------------------------- README blocks

def test_readme_has_a_block_per_device_and_each_is_a_valid_config_alone_and_together():
    blocks = readme_device_blocks()
    assert {"Zigbee2MQTT", "Tasmota", "Shelly Gen2/Gen3", "Home Assistant statestream", "Telegraf"} <= set(blocks)
    combined = []
    for name, text in blocks.items():
        raw = yaml.safe_load(text)
        parse_config(raw)  # each alone
        combined += raw["inputs"]
    parse_config({"inputs": combined, "output": {"homeassistant": {"enabled": True}}})


# ------------------------------------------------------------------------------- end to end

DEVICE_MESSAGES = [
    # Zigbee2MQTT: two devices x (3 fields kept + linkquality + update.* excluded + a text field)
    ("zigbee2mqtt/living_room", {"temperature": 21.5, "humidity": 40, "battery": 90, "linkquality": 120,
                                 "state": "ON", "update": {"state": "idle", "installed_version": 3}}),
    ("zigbee2mqtt/kitchen", {"temperature": 23.0, "humidity": 55, "battery": 80, "linkquality": 90}),
    # Tasmota: local time without offset (Europe/Berlin, CEST = UTC+2 in July)
    ("tele/tasmota_1/SENSOR", {"Time": "2026-07-01T14:00:00", "AM2301": {"Temperature": 21.3, "Humidity": 45.1},
                               "ENERGY": {"Power": 120, "Total": 5.5, "Today": 0.4, "Yesterday": 1.1},
                               "TempUnit": "C"}),
    # Shelly Gen2 status
    ("shellyplusht-1/status/temperature:0", {"id": 0, "tC": 21.3, "tF": 70.3}),
    ("shellyplusht-1/status/humidity:0", {"id": 0, "rh": 45.0}),
]
TELEGRAF_LINES = [
    ("telegraf/web1/mem", "mem,host=web1 used_percent=41.5,available=123456i,name=\"x\" 1782907200000000000"),
    ("telegraf/web1/cpu", "cpu,cpu=cpu-total,host=web1 usage_idle=97.5,usage_user=1.5 1782907200000000000"),
]
EXPECTED_SENSORS = {
    "zigbee/living_room/temperature", "zigbee/living_room/humidity", "zigbee/living_room/battery",
    "zigbee/kitchen/temperature", "zigbee/kitchen/humidity", "zigbee/kitchen/battery",
    "tasmota/tasmota_1/AM2301.Temperature", "tasmota/tasmota_1/AM2301.Humidity", "tasmota/tasmota_1/ENERGY.Power",
    "shelly/shellyplusht-1/temperature", "shelly/shellyplusht-1/humidity",
    "ha/living_room_temperature",
    "telegraf/web1/mem/used_percent", "telegraf/web1/mem/available",
    "telegraf/web1/cpu/usage_idle", "telegraf/web1/cpu/usage_user",
}


def test_readme_device_configs_end_to_end_with_home_assistant_discovery(mosquitto, tmp_path, daemons):
    inputs = []
    for text in readme_device_blocks().values():
        inputs += yaml.safe_load(text)["inputs"]  # verbatim from README
    cfg = daemon_config(mosquitto.port, tmp_path, output={"homeassistant": {"enabled": True}})
    cfg["inputs"] = inputs
    d = daemons(tmp_path, cfg).start()
    d.wait_ready()
    host, port = mosquitto.host, mosquitto.port
    sub = Subscriber(host, port, "homeassistant/+/+/+/config", "streamlstm/state/#")
    try:
        for topic, doc in DEVICE_MESSAGES:
            mosquitto_pub(mosquitto, topic, json.dumps(doc))
        mosquitto_pub(mosquitto, "homeassistant/sensor/living_room_temperature/state", "21.5")
        mosquitto_pub(mosquitto, "homeassistant/sensor/living_room_temperature/state", "unavailable")
        for topic, line in TELEGRAF_LINES:
            mosquitto_pub(mosquitto, topic, line)
        mosquitto_pub(mosquitto, "telegraf/web1/mem", '{"used_percent": 41.5}')  # JSON on a line-protocol input

        s = d.wait_handled(len(EXPECTED_SENSORS) + 2, 60)
        assert s.readings == len(EXPECTED_SENSORS)
        assert s.rejected == {"unavailable": 1, "bad_line_protocol": 1}, s.rejected
        assert s.total("streamlstm_sensors") == len(EXPECTED_SENSORS)

        def states():
            return {json.loads(m[1])["sensor"]: json.loads(m[1]) for m in sub.seen
                    if m[0].startswith("streamlstm/state/")}
        until(sub, lambda: set(states()) == EXPECTED_SENSORS, 30, "a state per sensor")
        st = states()
        # Every field its own sensor, named from the topic and the field; devices not merged.
        assert st["zigbee/kitchen/humidity"]["value"] == 55.0
        assert st["tasmota/tasmota_1/ENERGY.Power"]["value"] == 120.0
        # Tasmota's local 14:00 in Berlin (CEST) is 12:00 UTC, not 14:00 UTC.
        assert st["tasmota/tasmota_1/AM2301.Temperature"]["timestamp"] == _epoch("2026-07-01T12:00:00+00:00")
        assert st["telegraf/web1/cpu/usage_idle"]["timestamp"] == _epoch("2026-07-01T12:00:00+00:00")

        # Home Assistant: a binary_sensor and a score sensor per sensor, with default_entity_id.
        def configs():
            return {m[0]: json.loads(m[1]) for m in sub.seen if m[0].endswith("/config")}
        until(sub, lambda: len(configs()) == 2 * len(EXPECTED_SENSORS), 30, "discovery of every sensor")
        by_kind = {}
        for topic, doc in configs().items():
            by_kind.setdefault(topic.split("/")[1], []).append(doc)
        assert len(by_kind["binary_sensor"]) == len(by_kind["sensor"]) == len(EXPECTED_SENSORS)
        flag = next(c for c in by_kind["binary_sensor"] if c["name"] == "zigbee/kitchen/humidity anomaly")
        score = next(c for c in by_kind["sensor"] if c["name"] == "zigbee/kitchen/humidity anomaly score")
        assert "object_id" not in flag and "object_id" not in score
        assert flag["default_entity_id"].startswith("binary_sensor.streamlstm_zigbee_kitchen_humidity_")
        assert score["default_entity_id"].startswith("sensor.streamlstm_zigbee_kitchen_humidity_")
        assert re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+", flag["default_entity_id"])
        assert flag["state_topic"] == score["state_topic"] == "streamlstm/state/zigbee/kitchen/humidity"
        assert flag["device_class"] == "problem" and score["value_template"] == "{{ value_json.score }}"
        assert flag["unique_id"] != score["unique_id"]

        # HA restarts: its birth message makes the daemon announce everything again.
        before = sum(1 for m in sub.seen if m[0].endswith("/config"))
        mosquitto_pub(mosquitto, "homeassistant/status", "online")
        until(sub, lambda: sum(1 for x in sub.seen if x[0].endswith("/config")) >= before + 2 * len(EXPECTED_SENSORS),
              30, "discovery re-published after the birth message")
    finally:
        sub.close()

    # The broker restarts without persistence: retained discovery is gone until we reconnect.
    mosquitto.restart()
    wait_for(lambda: (s := d.try_scrape()) is not None and s.value("streamlstm_mqtt_reconnects_total") == 1
             and s.value("streamlstm_mqtt_connected") == 1, 60, what="reconnected")
    sub = Subscriber(host, port, "homeassistant/+/+/+/config")
    try:
        until(sub, lambda: len({x[0] for x in sub.seen if x[2]}) == 2 * len(EXPECTED_SENSORS), 30,
              "retained discovery again after the reconnect")
    finally:
        sub.close()
    assert d.stop() == 0
    log = d.log_text()
    assert "Traceback" not in log
    assert "rejected (unavailable)" not in log  # counted, DEBUG only
    assert "rejected (bad_line_protocol): web1/mem: JSON on a format: influx input; expected InfluxDB line protocol" in log


# ------------------------------------------------------------------------------- widths, ids

def test_check_config_refuses_mixed_widths_and_colliding_ids_with_the_key_path(tmp_path):
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump({"inputs": [
        {"topic": "plant/{sensor}", "value_fields": ["x", "y", "z"], "sensor_name": "plant/{sensor}"},
        {"topic": "zigbee2mqtt/{sensor}", "fields": ["temperature"], "sensor_name": "zigbee/{sensor}/{field}"},
    ]}))
    r = cli("check-config", str(mixed))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "inputs[1]: its sensors ('zigbee/*/temperature', 1 value(s) per reading) and those of inputs[0] " \
           "('plant/*', 3 value(s)) can land in group 'default'" in r.stderr
    # The fix the message suggests: a group for the vector sensors.
    fixed = yaml.safe_load(mixed.read_text())
    fixed["groups"] = [{"name": "width3", "match": "plant/*"}]
    mixed.write_text(yaml.safe_dump(fixed))
    r = cli("check-config", str(mixed))
    assert r.returncode == 0, r.stderr

    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump({"inputs": [{"topic": "a/{sensor}"}, {"topic": "b/{sensor}/value"}]}))
    r = cli("check-config", str(same))
    assert r.returncode == 2
    assert "inputs[1]: can produce the same sensor ids as inputs[0]" in r.stderr
    assert 'sensor_name: "b/{sensor}"' in r.stderr


def test_wrong_arity_log_says_group_expected_and_got(mosquitto, tmp_path, daemons):
    # The one way left to feed a group another width: a reload that changes an input's fields
    # (the running model keeps its width).
    cfg = daemon_config(mosquitto.port, tmp_path)
    cfg["inputs"] = [{"topic": "plant/{sensor}", "value_fields": ["a", "b"]}]
    d = daemons(tmp_path, cfg).start()
    d.wait_ready()
    mosquitto_pub(mosquitto, "plant/p1", json.dumps({"a": 1.0, "b": 2.0, "ts": 1.7e9}))
    d.wait_handled(1, 30)
    cfg["inputs"] = [{"topic": "plant/{sensor}", "value_fields": ["a"]}]
    d.config_path.write_text(yaml.safe_dump(cfg))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: configuration" in d.log_text() and "applied" in d.log_text(), 60, what="reload")
    mosquitto_pub(mosquitto, "plant/p1", json.dumps({"a": 1.0, "ts": 1.7e9 + 1}))
    d.wait_metric(lambda s: s.rejected.get("wrong_arity") == 1, 30, "wrong_arity counted")
    assert d.stop() == 0
    assert ("rejected (wrong_arity): sensor 'p1' sent 1 value(s) per reading, but the model of group "
            "'default' takes 2") in d.log_text()


# ------------------------------------------------------------------------------- check-config == run

def test_check_config_checks_the_files_run_needs_and_run_agrees(mosquitto, tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "empty_pw").write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "username": "u",
                 "password_file": str(tmp_path / "missing_pw"),
                 "tls": {"enabled": True, "ca_file": str(tmp_path / "ca.pem")}},
        "metrics": {"basic_auth_user": "m", "basic_auth_password_file": str(tmp_path / "empty_pw")},
        "checkpoint": {"directory": str(tmp_path / "afile" / "state")},
    }))
    r = cli("check-config", str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()[1:]
    assert [ln.split(":")[0] for ln in lines] == ["mqtt.password_file", "mqtt.tls.ca_file",
                                                 "metrics.basic_auth_password_file", "checkpoint.directory"]
    assert "No such file or directory" in lines[0] and "certificate" in lines[1].lower()
    assert "is empty" in lines[2] and "exists and is not a directory" in lines[3]
    # `run` refuses the same configuration with the same lines, before connecting.
    rr = cli("run", "-c", str(bad))
    assert rr.returncode == 2 and rr.stderr.splitlines()[-4:] == lines

    good = yaml.safe_load(bad.read_text())
    good["mqtt"] = {"host": mosquitto.host, "port": mosquitto.port}
    good["metrics"] = {"enabled": False}
    good["checkpoint"] = {"directory": str(tmp_path / "new" / "state")}  # created at start
    bad.write_text(yaml.safe_dump(good))
    r = cli("check-config", str(bad))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_check_config_leaves_systemd_credentials_to_the_service(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"mqtt": {"username": "u", "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"},
                                   "checkpoint": {"directory": str(tmp_path / "state")}}))
    r = cli("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("note: mqtt.password_file: not checked: $CREDENTIALS_DIRECTORY is set by systemd")
    # With the variable set (as under systemd) the file is checked, and run refuses it likewise.
    env_dir = tmp_path / "creds"
    env_dir.mkdir()
    r = subprocess.run([sys.executable, "-m", "streamlstm", "check-config", str(cfg)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, CREDENTIALS_DIRECTORY=str(env_dir),
                                             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 2 and "mqtt.password_file: cannot read secret file" in r.stderr
