"""The daemon end to end: a real mosquitto, real paho clients, `python -m streamlstm run` as a
subprocess with a test $NOTIFY_SOCKET. Pure pipeline logic (queue, messages, paths) in-process."""
from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5  # noqa: E402

from mosquitto import free_port  # noqa: E402
from streamlstm.checkpoint import load_checkpoint  # noqa: E402
from streamlstm.config import ConfigError, load_config, parse_config  # noqa: E402
from streamlstm.detector.incidents import Incident  # noqa: E402
from streamlstm.factory import build_detector  # noqa: E402
from streamlstm.messages import event_message  # noqa: E402
from streamlstm.mqtt_io import read_password  # noqa: E402
from streamlstm.reading import Chunk, Reading, concat  # noqa: E402
from streamlstm.reading_queue import ReadingQueue  # noqa: E402
from streamlstm.runtime_config import expand_paths  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
T0 = 1.7e9  # reading timestamps: T0 + i seconds
SPIKE_AT = 500
N_SPIKE = 600


# ------------------------------------------------------------------------------------ helpers

def wait_for(predicate, timeout=30.0, step=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def series(n, seed=0, spike_at=None, magnitude=5.0):
    rng = np.random.default_rng(seed)
    values = np.sin(np.arange(n) / 5) + 0.1 * rng.normal(size=n)
    if spike_at is not None:
        values[spike_at] += magnitude
    return [float(v) for v in values]


def small_config(broker, tmp_path, **overrides) -> dict:
    cfg = {
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"streamlstm-{tmp_path.name}",
                 "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1},
        "model": {"hidden_size": 8, "window": 8, "optimizer": "sgd", "learning_rate": 0.02},
        "detector": {"warmup": 100, "long_window": 100, "threshold": 0.5},
        # cpu: the suite sets NUMBA_ENABLE_CUDASIM, with which "auto" could pick the simulator.
        "backend": {"kind": "cpu"},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "checkpoint": {"directory": str(tmp_path / "state"), "interval_s": 300},
        "output": {"state_topic": "streamlstm/state/{sensor}"},
        "logging": {"rejected_log_interval_s": 0},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture
def daemons(daemons):
    """The shared fixture (conftest.py, tests/daemon_harness.py), with the systemd watchdog on and
    the output written straight to the log file (the tests read log lines right after a READY)."""
    def make(tmp_path, config, name="daemon", env=None):
        return daemons(tmp_path, config, name=name, env={"WATCHDOG_USEC": "1000000", **(env or {})}, log_file=True)
    return make


class Subscriber:
    """A paho client collecting (topic, payload, retain, properties) of everything under `topics`."""

    def __init__(self, broker, *topics):
        self.messages: queue.Queue = queue.Queue()
        self.seen: list = []
        subscribed = threading.Event()
        c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe([(t, 1) for t in topics])
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, m.payload, m.retain, m.properties))
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert subscribed.wait(10)
        self.client = c

    def collect(self, timeout=0.2):
        while True:
            try:
                self.seen.append(self.messages.get(timeout=timeout))
            except queue.Empty:
                return self.seen

    def wait(self, predicate, timeout=30.0, what="message"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.collect(0.1)
            found = [m for m in self.seen if predicate(m)]
            if found:
                return found
        raise AssertionError(f"timed out waiting for {what}; got {self.seen[-5:]}")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def publish_all(broker, items, qos=1, auth=None):
    """Publish (topic, payload) pairs with QoS 1 and wait until the broker has every one."""
    c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    c.max_inflight_messages_set(100)
    if auth:
        c.username_pw_set(*auth)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish(topic, payload, qos=qos) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        c.disconnect()
        c.loop_stop()


def reading_payload(value, i):
    return json.dumps({"value": value, "ts": T0 + i})


# ------------------------------------------------------------------------------- end to end

def test_spike_gives_one_anomaly_event_metrics_and_rejections(mosquitto, tmp_path, daemons):
    promtool = shutil.which("promtool")
    # A small queue and batch: messages of 50 readings exceed the queue, so backpressure and
    # split messages are exercised; nothing may be lost. One sensor allowed: a second one is
    # refused (sensor_cap).
    cfg = small_config(mosquitto, tmp_path, pipeline={"queue_size": 16, "max_batch": 8, "max_delay_ms": 5,
                                                      "max_sensors": 1},
                       metrics={"per_sensor": True}, output={"homeassistant": {"enabled": True}})
    d = daemons(tmp_path, cfg).start()
    d.wait_ready()
    d.notify.wait("WATCHDOG", timeout=10)
    sub = Subscriber(mosquitto, "streamlstm/events/#", "streamlstm/status", "homeassistant/#")
    try:
        sub.wait(lambda m: m[0] == "streamlstm/status" and m[1] == b"online", what="online status")
        values = series(N_SPIKE, seed=0, spike_at=SPIKE_AT)
        items = [("sensors/pump1", reading_payload(values[i], i)) for i in range(300)]
        for start in range(300, N_SPIKE, 50):  # batch payloads: one message, 50 readings
            batch = [{"value": values[i], "ts": T0 + i} for i in range(start, start + 50)]
            items.append(("sensors/pump1", json.dumps(batch)))
        bad = {
            "not_a_number": ("sensors/pump1", b"abc"),
            "bad_json": ("sensors/pump1", b"{not json"),
            "missing_field": ("sensors/pump1", b'{"temperature": 1}'),
            "non_finite": ("sensors/pump1", b"nan"),
            "bad_timestamp": ("sensors/pump1", b'{"value": 1, "ts": "yesterday"}'),
            "duplicate_timestamp": ("sensors/pump1", reading_payload(1.0, N_SPIKE - 1)),
            "out_of_order": ("sensors/pump1", reading_payload(1.0, 3)),
            "sensor_cap": ("sensors/pump2", reading_payload(1.0, 0)),
        }
        items += list(bad.values())
        publish_all(mosquitto, items)

        d.wait_processed(N_SPIKE)
        for reason in bad:
            wait_for(lambda: d.sample("streamlstm_readings_rejected_total", reason=reason) == 1, 10,
                     what=f"rejection {reason} counted")
        assert d.proc.poll() is None, "bad payloads must not stop the daemon"

        sub.wait(lambda m: m[0] == "streamlstm/events/pump1", what="an event")
        sub.collect(0.5)
        event_msgs = [m for m in sub.seen if m[0] == "streamlstm/events/pump1"]
        events = [json.loads(m[1]) for m in event_msgs]
        anomalies = [e for e in events if e["event"] == "anomaly"]
        assert len(anomalies) == 1, events
        a = anomalies[0]
        assert a["sensor"] == "pump1" and a["group"] == "default"
        assert a["start"] == a["timestamp"] == T0 + SPIKE_AT and a["end"] is None
        assert a["value"] == pytest.approx(values[SPIKE_AT])
        assert isinstance(a["prediction"], float) and isinstance(a["residual"], float)
        assert a["score"] >= a["threshold"] == 0.5 and a["peak_score"] == a["score"]
        assert a["evidence"] in ("model", "range") and a["reason"] is None  # a spike: the residual or the range
        resolved = [e for e in events if e["event"] == "resolved"]
        assert all(e["start"] == a["start"] and e["end"] > e["start"] for e in resolved)
        assert all(e["reason"] == "returned" and e["evidence"] == a["evidence"] for e in resolved)
        assert all(0 < m[3].MessageExpiryInterval <= 3600 for m in event_msgs)  # MQTT 5 expiry

        discovery = [m for m in sub.seen if m[0].startswith("homeassistant/binary_sensor/")]
        assert len(discovery) == 1 and discovery[0][0].endswith("/config")
        announced = json.loads(discovery[0][1])
        assert announced["device_class"] == "problem"
        assert announced["state_topic"] == "streamlstm/state/pump1"
        assert announced["availability_topic"] == "streamlstm/status"

        text = d.exposition()
        assert d.sample("streamlstm_anomalies_total", group="default") == 1
        assert d.sample("streamlstm_events_published_total") == len(events)
        assert d.sample("streamlstm_sensors", group="default") == 1
        assert d.sample("streamlstm_queue_capacity") == 16
        assert d.sample("streamlstm_mqtt_connected") == 1
        assert d.sample("streamlstm_publish_failures_total") == 0
        assert d.sample("streamlstm_sensor_anomaly_score", group="default", sensor="pump1") is not None
        if promtool:
            r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr

        assert d.stop() == 0, d.log_text()
        d.notify.wait("STOPPING")
        sub.wait(lambda m: m[0] == "streamlstm/status" and m[1] == b"offline", what="offline status")
        log = d.log_text()
        assert "Traceback" not in log
        assert "rejected (not_a_number)" in log and "rejected (sensor_cap)" in log
        assert (tmp_path / "state" / "streamlstm.ckpt").exists()
    finally:
        sub.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_restart_resumes_from_checkpoint_and_gets_readings_sent_while_down(mosquitto, tmp_path, daemons, protocol):
    cfg = small_config(mosquitto, tmp_path, mqtt={"protocol": protocol})
    values = series(250, seed=3)
    first = daemons(tmp_path, cfg, name="first").start()
    first.wait_ready()
    publish_all(mosquitto, [("sensors/s1", reading_payload(values[i], i)) for i in range(150)])
    first.wait_processed(150)
    assert first.stop() == 0, first.log_text()
    ckpt = tmp_path / "state" / "streamlstm.ckpt"
    arrays1, meta1 = load_checkpoint(ckpt)
    assert meta1["format"] == "streamlstm-daemon" and meta1["detector"]["groups"]["default"]["sensors"] == ["s1"]

    # Down: these wait in the broker for the daemon's persistent session.
    publish_all(mosquitto, [("sensors/s1", reading_payload(values[i], i)) for i in range(150, 250)])

    # What the restored model must do with them: the first run's final checkpoint + these readings.
    expected = build_detector(load_config(first.config_path))
    expected.load_state_dict(arrays1, meta1["detector"])
    batch = expected.process([Reading("s1", T0 + i, (values[i],)) for i in range(150, 250)])
    assert all(r == "" for r in batch.reason)
    expected_arrays, expected_meta = expected.state_dict()

    sub = Subscriber(mosquitto, "streamlstm/state/#")
    try:
        second = daemons(tmp_path, cfg, name="second").start()
        second.wait_ready()
        second.wait_processed(100)  # counters start at 0 in the new process
        states = sub.wait(lambda m: json.loads(m[1])["timestamp"] >= T0 + 150, what="state of a resumed reading")
        assert second.stop() == 0, second.log_text()
    finally:
        sub.close()
    assert "checkpoint" in second.log_text() and "loaded: 1 sensors" in second.log_text()

    for _, payload, *_ in states:
        state = json.loads(payload)
        i = int(round(state["timestamp"] - T0)) - 150
        assert state["prediction"] == batch.prediction[i, 0]  # bit-identical: same model state
        assert state["score"] == batch.score[i]

    arrays2, meta2 = load_checkpoint(ckpt)
    assert set(arrays2) == set(expected_arrays)
    for name, value in expected_arrays.items():
        np.testing.assert_array_equal(arrays2[name], value, err_msg=name)
    assert meta2["detector"]["groups"]["default"]["sensors"] == expected_meta["groups"]["default"]["sensors"]


def test_sighup_reloads_threshold_and_refuses_a_shape_change(mosquitto, tmp_path, daemons):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "streamlstm.ckpt").write_bytes(b"SLSTMCKP" + b"\x00" * 100)  # corrupt: moved aside
    cfg = small_config(mosquitto, tmp_path, checkpoint={"interval_s": 0.5})
    d = daemons(tmp_path, cfg).start()
    ready = d.wait_ready()
    assert list(state_dir.glob("streamlstm.ckpt.corrupt-*")), "corrupt checkpoint not moved aside"
    sub = Subscriber(mosquitto, "streamlstm/state/#")
    values = series(1000, seed=5)
    sent = [0]

    def feed(n=5):
        i0 = sent[0]
        publish_all(mosquitto, [("sensors/s1", reading_payload(values[i], i)) for i in range(i0, i0 + n)])
        sent[0] += n

    def state_threshold_becomes(value):
        def check():
            feed()
            sub.collect(0.2)
            return [m for m in sub.seen if json.loads(m[1])["threshold"] == value]
        wait_for(check, 30, step=0.3, what=f"state with threshold {value}")

    try:
        state_threshold_becomes(0.5)

        cfg["detector"]["threshold"] = 0.7
        d.write_config(cfg)
        d.proc.send_signal(signal.SIGHUP)
        reloading = d.notify.wait("RELOADING", after=ready)
        ready = d.wait_ready(after=reloading)
        state_threshold_becomes(0.7)
        assert "reload: configuration" in d.log_text()

        cfg["model"]["hidden_size"] = 16
        cfg["detector"]["threshold"] = 0.8
        d.write_config(cfg)
        d.proc.send_signal(signal.SIGHUP)
        reloading = d.notify.wait("RELOADING", after=ready)
        d.wait_ready(after=reloading)
        log = d.log_text()
        assert "reload refused" in log and "model shape would change" in log, log
        n = len(sub.seen)
        feed(20)
        wait_for(lambda: d.sample("streamlstm_readings_total", group="default") == sent[0], 30,
                 what="readings after the refused reload")
        sub.collect(1.5)
        assert all(json.loads(p)["threshold"] == 0.7 for _, p, *_ in sub.seen[n:])
        assert d.proc.poll() is None

        # Checkpoints that cannot be written are logged and counted; the daemon carries on.
        wait_for(lambda: (state_dir / "streamlstm.ckpt").exists(), 30, what="a periodic checkpoint")
        # rename, not rmtree: the checkpoint thread may be writing a temp file in there right now
        state_dir.rename(tmp_path / "state-removed")
        state_dir.write_text("a file where the checkpoint directory was")
        wait_for(lambda: (d.sample("streamlstm_checkpoint_errors_total") or 0) >= 1, 30,
                 what="a failed checkpoint counted")
        feed(5)
        wait_for(lambda: d.sample("streamlstm_readings_total", group="default") == sent[0], 30,
                 what="readings after failed checkpoints")
        # The final checkpoint fails too: a failed exit, so the service manager sees it (issue 12).
        assert d.stop() == 1, d.log_text()
        assert "checkpoint failed (the daemon keeps running)" in d.log_text()
    finally:
        sub.close()


def test_broker_restart_reconnects_and_resubscribes_and_a_crash_leaves_the_will(mosquitto, tmp_path, daemons):
    d = daemons(tmp_path, small_config(mosquitto, tmp_path)).start()
    d.wait_ready()
    publish_all(mosquitto, [("sensors/s1", reading_payload(1.0, 0))])
    d.wait_processed(1)
    mosquitto.restart()  # no persistence: the session and its subscription are gone
    wait_for(lambda: d.sample("streamlstm_mqtt_reconnects_total") == 1 and d.sample("streamlstm_mqtt_connected") == 1,
             30, what="reconnected")
    # Only a new subscription (made in on_connect) can bring these in.
    wait_for(lambda: publish_all(mosquitto, [("sensors/s1", reading_payload(2.0, 1))]) or
             d.sample("streamlstm_readings_total", group="default") >= 2, 30, step=0.5, what="resubscribed")
    sub = Subscriber(mosquitto, "streamlstm/status")
    try:
        sub.wait(lambda m: m[1] == b"online" and m[2], what="retained online")
        d.proc.kill()  # no clean disconnect: the broker publishes the will
        sub.wait(lambda m: m[1] == b"offline", what="last will")
    finally:
        sub.close()


def _tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.pem")
    return tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"


def test_tls_and_password_from_the_credentials_directory(mosquitto_factory, tmp_path, daemons):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    ca, cert, key = _tls_files(tmp_path)
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "streamlstm", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    broker = mosquitto_factory(extra_config=["allow_anonymous false", f"password_file {passwords}"])
    tls_port = broker.add_tls_listener(cert, key)
    broker.restart()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    cfg = small_config(broker, tmp_path, mqtt={
        "port": tls_port, "username": "streamlstm", "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password",
        "tls": {"enabled": True, "ca_file": str(ca)}})
    d = daemons(tmp_path, cfg, env={"CREDENTIALS_DIRECTORY": str(creds)}).start()
    d.wait_ready()  # subscribed: TLS verified against our CA, password accepted
    publish_all(broker, [("sensors/s1", reading_payload(1.0, 0))], auth=("streamlstm", "s3cret"))
    d.wait_processed(1)
    assert d.stop() == 0, d.log_text()
    assert "s3cret" not in d.log_text()


def _run_cli(*args, env=None, unset=(), cwd=None, timeout=60):
    full_env = dict(os.environ)
    for name in ("NUMBA_ENABLE_CUDASIM", *unset):
        full_env.pop(name, None)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamlstm", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("config, key", [
    ({"model": {"window": 0}}, "model.window"),
    ({"mqtt": {"username": "u", "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"}}, "mqtt.password_file"),
    ({"mqtt": {"tls": {"enabled": True, "ca_file": "/nonexistent/ca.pem"}}}, "mqtt.tls.ca_file"),
])
def test_bad_config_exits_2_with_the_key_path(tmp_path, config, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"enabled": False}, **config}))
    r = _run_cli("run", "-c", str(path), unset=("CREDENTIALS_DIRECTORY",), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert key in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "state").exists()


def test_missing_config_file_exits_2(tmp_path):
    r = _run_cli("run", "-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "cannot read config file" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- pure logic

def _chunk(*stamps, sensor="s"):
    """A message's readings, one per timestamp (the value is the timestamp: easy to follow)."""
    return Chunk([sensor] * len(stamps), np.array(stamps, dtype=np.float64),
                 np.array(stamps, dtype=np.float64).reshape(-1, 1))


def _stamps(entries):
    return [t for c, _ in entries if c is not None for t in c.timestamps.tolist()]


def test_queue_backpressure_keeps_order_and_blocks_instead_of_dropping():
    q = ReadingQueue(3)
    done = threading.Event()
    entries = [(_chunk(i), None) for i in range(10)]

    def produce():
        assert q.put(entries)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    got = []
    wait_for(lambda: len(q) == 3, 5, what="queue full")
    assert not done.is_set()  # blocked, not dropped
    while len(_stamps(got)) < 10:
        got += q.get_batch(2, 0.0, 1.0)
    t.join(5)
    assert done.is_set() and _stamps(got) == list(range(10))


def test_queue_batches_wait_for_max_delay_and_close_releases_producers():
    q = ReadingQueue(2)
    assert q.get_batch(10, 0.0, 0.05) == []
    q.put([(_chunk(1), None)])
    late = threading.Timer(0.05, q.put, args=([(_chunk(2), None)],))
    late.start()
    assert _stamps(q.get_batch(2, 30.0, 1.0)) == [1, 2]  # waited for the batch to fill
    late.join()
    result = []
    q.put([(_chunk(1), None), (_chunk(2), None)])
    t = threading.Thread(target=lambda: result.append(q.put([(_chunk(3), None)])))
    t.start()
    time.sleep(0.1)
    q.close()
    t.join(5)
    assert result == [False]
    assert _stamps(q.get_batch(10, 1.0, 1.0)) == [1, 2]  # a closed queue still drains


def test_queue_counts_readings_and_splits_a_message_at_the_batch_limit_keeping_its_ack_last():
    """Capacity, depth and batch sizes count readings, as when an entry was one reading: a
    100-reading message fills a 100-reading queue, and a batch limit inside a message splits it,
    its token riding on the last part (acks leave after all of the message's readings)."""
    q = ReadingQueue(100)
    assert q.put([(_chunk(*range(60)), "m1"), (None, "m2"), (_chunk(*range(60, 100)), "m3")], block=False)
    assert len(q) == 101 and not q.wait_for_room(0.0)  # the read gate stays shut: full
    first = q.get_batch(50, 0.0, 0.0)
    assert [(len(c), tok) for c, tok in first] == [(50, None)] and len(q) == 51
    assert q.wait_for_room(0.0)
    second = q.get_batch(50, 0.0, 0.0)
    # the rest of m1 with its token, the marker (counts one), 39 readings of m3
    assert [(None if c is None else len(c), tok) for c, tok in second] == [(10, "m1"), (None, "m2"), (39, None)]
    third = q.get_batch(50, 0.0, 0.0)
    assert [(len(c), tok) for c, tok in third] == [(1, "m3")] and len(q) == 0
    assert _stamps(first + second + third) == list(range(100))
    # a blocking producer puts a message bigger than the room left in parts, in order
    q = ReadingQueue(4)
    got = []
    t = threading.Thread(target=lambda: q.put([(_chunk(*range(10)), "big")]))
    t.start()
    while len(_stamps(got)) < 10:
        got += q.get_batch(3, 0.0, 1.0)
    t.join(5)
    assert _stamps(got) == list(range(10)) and [tok for _, tok in got if tok] == ["big"] and got[-1][1] == "big"


def test_worker_joins_chunks_into_columns_of_several_widths():
    a = Chunk(["x", "y"], np.array([1.0, 2.0]), np.array([[1.0], [2.0]]))
    b = Chunk(["v"], np.array([3.0]), np.array([[4.0, 5.0]]))
    cols = concat([a, b, a])
    assert cols.sensors == ["x", "y", "v", "x", "y"] and cols.timestamps.tolist() == [1, 2, 3, 1, 2]
    assert cols.width.tolist() == [1, 1, 2, 1, 1]
    np.testing.assert_array_equal(cols.values, [[1, np.nan], [2, np.nan], [4, 5], [1, np.nan], [2, np.nan]])
    one = concat([a, a])
    assert one.values.shape == (4, 1) and one.width.tolist() == [1] * 4
    # one-reading messages keep lists; joined alone, with arrays, or with another width
    singles = [Chunk.one("p", 7.0, (1.5,)), Chunk.one("q", 8, (2,))]
    cols = concat(singles)
    assert cols.values.dtype == np.float64 and cols.values.tolist() == [[1.5], [2.0]] and cols.timestamps.tolist() == [7, 8]
    cols = concat(singles + [a])
    assert cols.sensors == ["p", "q", "x", "y"] and cols.values[:, 0].tolist() == [1.5, 2, 1, 2]
    cols = concat(singles + [Chunk.one("v", 9.0, (4.0, 5.0))])
    assert cols.width.tolist() == [1, 1, 2] and cols.values[2].tolist() == [4, 5]
    assert Chunk.one("p", 7.0, (1.5,)) == Chunk(["p"], np.array([7.0]), np.array([[1.5]]))


def test_anomaly_event_shows_the_incident_as_opened_even_if_closed_in_the_same_batch():
    inc = Incident(sensor="a/b", group="g", start=10.0, timestamp=10.0, value=[1.0], prediction=[0.5],
                   residual=[0.5], score=0.9, threshold=0.5, peak_score=0.95, peak_timestamp=11.0, end=12.0, readings=3)
    opened = json.loads(event_message("anomaly", inc))
    assert opened["end"] is None and opened["peak_score"] == 0.9 and opened["value"] == 1.0
    closed = json.loads(event_message("resolved", inc))
    assert closed["end"] == 12.0 and closed["peak_score"] == 0.95 and closed["readings"] == 3
    vec = Incident(sensor="v", group="g", start=1.0, timestamp=1.0, value=[1.0, 2.0], prediction=[float("nan"), 1.0],
                   residual=[0.0, 1.0], score=0.9, threshold=0.5)
    assert json.loads(event_message("anomaly", vec))["prediction"] == [None, 1.0]


def test_path_settings_expand_environment_variables():
    cfg = parse_config({"mqtt": {"username": "u", "password_file": "${CREDENTIALS_DIRECTORY}/pw"},
                        "checkpoint": {"directory": "$STATE/ckpt"}})
    out = expand_paths(cfg, {"CREDENTIALS_DIRECTORY": "/run/creds", "STATE": "/var/lib/x"})
    assert out.mqtt.password_file == "/run/creds/pw" and out.checkpoint.directory == "/var/lib/x/ckpt"
    with pytest.raises(ConfigError) as err:
        expand_paths(cfg, {})
    assert {p for p, _ in err.value.errors} == {"mqtt.password_file", "checkpoint.directory"}


def test_empty_password_file_means_no_password(tmp_path):
    p = tmp_path / "pw"
    p.write_text("")
    assert read_password(str(p), "mqtt.password_file") is None
    p.write_text("\n")
    assert read_password(str(p), "mqtt.password_file") is None
    p.write_text("secret\n")
    assert read_password(str(p), "mqtt.password_file") == "secret"
    assert read_password(None, "mqtt.password_file") is None
    with pytest.raises(ConfigError) as err:
        read_password(str(tmp_path / "missing"), "mqtt.password_file")
    assert err.value.path == "mqtt.password_file"
