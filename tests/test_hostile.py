"""Hostile input and hostile clients against the real daemon and a real mosquitto on loopback
(issue 12): sensor ids that would poison the MQTT session, huge finite values, far-future
timestamps, slowloris on /metrics, oversized payloads, millions of distinct ids, bursts that
used to block paho's network thread. Each test here failed against the daemon before the fix
it names (docs/reliability.md, "Hostile input").
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest

pytest.importorskip("paho.mqtt.client")

from daemon_harness import T0, Publisher, Subscriber, daemon_config, report, wait_for  # noqa: E402

pytestmark = [pytest.mark.timeout(300)]

FAST_DETECTOR = {"scaling_warmup": 10, "warmup": 50, "long_window": 100, "seasonal_periods": []}


def wave(sensor: int, i: int) -> float:
    """A noisy slow wave, deterministic per (sensor, reading)."""
    return 10.0 + math.sin(i / 7.0 + sensor) + ((i * 7919 + sensor * 104729) % 1000) / 2000.0


def batch(items) -> bytes:
    return json.dumps([{"sensor": s, "value": v, "ts": ts} for s, v, ts in items]).encode()


def stream(sensors: list, first: int, last: int, *, spikes: dict = (), per_message: int = 200):
    """(topic, payload, readings) of readings first..last-1 of every sensor, round by round;
    `spikes`: {reading index: value} applied to every sensor."""
    spikes = dict(spikes)
    chunk = []
    for i in range(first, last):
        for k, s in enumerate(sensors):
            chunk.append((s, spikes.get(i, wave(k, i)), T0 + i))
            if len(chunk) == per_message:
                yield "sensors/batch", batch(chunk), len(chunk)
                chunk = []
    if chunk:
        yield "sensors/batch", batch(chunk), len(chunk)


def publish(broker, items) -> int:
    pub = Publisher(broker.host, broker.port)
    try:
        pub.publish_all(items)
        return pub.wait_acked(120)
    finally:
        pub.close()


def events_of(sub: Subscriber, sensor: str) -> list:
    return [json.loads(m[1]) for m in sub.seen if m[0] == f"streamlstm/events/{sensor}"]


# ------------------------------------------------------------------------------ defect 1

def test_control_characters_in_sensor_ids_are_rejected_and_cannot_poison_the_session(mosquitto, tmp_path,
                                                                                        daemons):
    cfg = daemon_config(mosquitto.port, tmp_path, detector=FAST_DETECTOR)
    d = daemons(tmp_path, cfg).start()
    d.wait_ready()
    sub = Subscriber(mosquitto.host, mosquitto.port, "streamlstm/events/#")
    try:
        hostile = ["ctl\u0001x", "nl\nERROR forged line", "del\u007fx", "wild+card", "c1\u0085x", "x" * 2000]
        n = 400
        published = publish(mosquitto, stream(["good"] + hostile, 0, n, spikes={300: 1000.0}))
        assert published == n * (1 + len(hostile))
        s = d.wait_handled(published, 120)
        assert s.rejected == {"bad_sensor_id": n * len(hostile)}, s.rejected
        assert s.readings == n and s.value("streamlstm_sensors", group="default") == 1
        sub.wait(lambda m: m[0] == "streamlstm/events/good", what="the good sensor's event")
        time.sleep(1.0)  # a poisoned session would be reconnecting by now
        s = d.scrape()
        assert s.total("streamlstm_mqtt_reconnects_total") == 0, d.log_tail()
        assert s.total("streamlstm_publish_failures_total") == 0
        assert s.total("streamlstm_events_published_total") >= 1
        assert not [line for line in d.log_text().splitlines() if line.startswith("ERROR forged")]
        assert "bad_sensor_id" in d.log_text()
    finally:
        sub.close()
    assert d.stop() == 0, d.log_tail()
    report("hostile/bad_sensor_ids", published=published, processed=s.readings, lost=0, rejected=s.rejected,
           notes="6 hostile ids x 400 readings; reconnects 0; good sensor's event delivered")
