"""Shared helpers for the daemon, fault, load and security tests (tests/test_daemon.py,
test_faults.py, test_load.py, test_security.py): the real daemon (`python -m streamlstm run -c
FILE`) as a subprocess against a real mosquitto (tests/mosquitto.py) on loopback.

* `daemon_config(port, tmp_path, **overrides)`: a small, fast configuration (hidden_size 4,
  window 4, train_every 8, CPU backend) on free ports; overrides are merged per section.
* `DaemonProcess`: start, wait for READY on a test $NOTIFY_SOCKET (or for the retained ``online``
  status), scrape /metrics, stop with SIGTERM / kill with SIGKILL; stderr is read through a pipe
  (never a file the daemon writes, so a file-size limit set on it hits only its checkpoints), or
  with ``log_file=True`` written by the daemon straight into its log file (test_daemon.py).
* `Publisher`: QoS 1, waits for every PUBACK, resends in order what was not acknowledged after a
  reconnect, so a broker restart costs duplicates (rejected by the daemon as
  duplicate_timestamp / out_of_order), never a gap.
* `Subscriber`, `wait_online`: readiness as the broker sees it (retained ``online`` status).
* `batch_payloads`: batched JSON readings; per sensor, timestamps T0 + 0, 1, 2, ...
* `report(test, **figures)`: one JSON line per test into $STREAMLSTM_RELIABILITY_REPORT.

Every wait has a timeout: nothing here can hang a test.
"""
from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import pathlib
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Optional

import yaml
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
from prometheus_client.parser import text_string_to_metric_families

from mosquitto import free_port

REPO = pathlib.Path(__file__).resolve().parent.parent
T0 = 1.7e9  # reading timestamps: T0 + i seconds
REPORT_ENV = "STREAMLSTM_RELIABILITY_REPORT"
# A cold Numba cache compiles the kernels for minutes; a warm one starts in seconds.
READY_TIMEOUT_S = float(os.environ.get("STREAMLSTM_TEST_READY_TIMEOUT", "240"))

# The small model every reliability test uses (speed, not accuracy, matters here).
SMALL_MODEL = {"hidden_size": 4, "window": 4, "train_every": 8}
SMALL_DETECTOR = {"scaling_warmup": 10, "warmup": 50, "long_window": 100}


def wait_for(predicate: Callable, timeout: float, step: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def proc_status_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of /proc/PID/status in MiB (VmRSS: now, VmHWM: peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def daemon_config(port: int, tmp_path: pathlib.Path, **overrides) -> dict:
    cfg = {
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": f"streamlstm-{tmp_path.name}",
                 "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 1, "keepalive_s": 10},
        "inputs": [{"topic": "sensors/{sensor}"}],
        "model": dict(SMALL_MODEL),
        "detector": dict(SMALL_DETECTOR),
        # cpu: the suite sets NUMBA_ENABLE_CUDASIM, with which "auto" could pick the simulator.
        "backend": {"kind": "cpu"},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "checkpoint": {"directory": str(tmp_path / "state"), "interval_s": 300},
        "logging": {"level": "INFO", "rejected_log_interval_s": 1},
    }
    return merge(cfg, overrides)


# ----------------------------------------------------------------------------------- metrics

class Scrape:
    """One parsed /metrics exposition."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name: str, default: Optional[float] = None, **labels) -> Optional[float]:
        return self.samples.get((name, tuple(sorted(labels.items()))), default)

    def total(self, name: str) -> float:
        """Sum over every label set of `name`."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def by_label(self, name: str, label: str) -> dict:
        return {dict(lbl)[label]: v for (n, lbl), v in self.samples.items() if n == name and label in dict(lbl)}

    @property
    def readings(self) -> int:
        return int(self.total("streamlstm_readings_total"))

    @property
    def rejected(self) -> dict:
        """{reason: count} of the reasons with a non-zero count."""
        return {k: int(v) for k, v in self.by_label("streamlstm_readings_rejected_total", "reason").items() if v}

    @property
    def handled(self) -> int:
        """Readings accepted or rejected (each reading ends up in exactly one of the counters)."""
        return self.readings + sum(self.rejected.values())


def fetch(url: str, *, auth: Optional[tuple] = None, context: Optional[ssl.SSLContext] = None,
          timeout: float = 10.0) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth is not None:
        import base64
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
        return r.status, r.read().decode()


# ----------------------------------------------------------------------------------- daemon

class Notify:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sdn")  # sun_path is short: not the deep tmp_path
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict] = []

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536).decode(errors="replace")
        except (socket.timeout, OSError):
            return
        self.messages.append(dict(line.split("=", 1) for line in data.split("\n") if "=" in line))

    def drain(self) -> list[dict]:
        """Read whatever has arrived so far (non-blocking); returns every message seen."""
        while True:
            n = len(self.messages)
            self._drain(0.01)
            if len(self.messages) == n:
                return self.messages

    def wait(self, key: str, value: str = "1", timeout: float = 60.0, alive: Callable[[], bool] = lambda: True,
             after: int = 0) -> int:
        """Index of the first message (from index `after` on) with key=value."""
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for i in range(seen, len(self.messages)):
                if self.messages[i].get(key) == value:
                    return i
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0 or not alive():
                raise AssertionError(f"no {key}={value} on the notify socket; got {self.messages}")
            self._drain(min(left, 0.5))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class DaemonProcess:
    """`python -m streamlstm run -c FILE` with a generated config; stderr collected via a pipe
    (or written straight to the log file: `log_file`)."""

    def __init__(self, tmp_path: pathlib.Path, config: dict, name: str = "daemon", env: Optional[dict] = None,
                 scrape_auth: Optional[tuple] = None, scrape_context: Optional[ssl.SSLContext] = None,
                 log_file: bool = False):
        """`log_file`: the daemon writes its output straight into `log_path` (not through a pipe),
        so a line it logged before a notify message is in `log_text()` once that message is seen."""
        self.tmp_path = tmp_path
        self.name = name
        self.config_path = tmp_path / f"{name}.yaml"
        self.write_config(config)
        self.log_path = tmp_path / f"{name}.log"
        self.scrape_auth = scrape_auth
        self.scrape_context = scrape_context
        self.notify = Notify()
        self.env = dict(os.environ)
        self.env.pop("NUMBA_ENABLE_CUDASIM", None)  # the suite's simulator setting is not for the daemon
        self.env.pop("JOURNAL_STREAM", None)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["NOTIFY_SOCKET"] = self.notify.path
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self._lines: list[str] = []
        self._reader: Optional[threading.Thread] = None
        self.log_file = log_file
        self._log = None  # the log file the daemon writes (log_file)
        self.peak_rss_kib = 0  # VmHWM, refreshed by every scrape and before stop/kill

    def write_config(self, config: dict) -> None:
        """(Re)write the config file (a SIGHUP makes the daemon read it again)."""
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> "DaemonProcess":
        self._log = open(self.log_path, "ab") if self.log_file else None
        self.proc = subprocess.Popen([sys.executable, "-m", "streamlstm", "run", "-c", str(self.config_path)],
                                     cwd=self.tmp_path, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT)
        if self._log is None:
            self._reader = threading.Thread(target=self._read_output, args=(self.proc.stdout,), daemon=True)
            self._reader.start()
        return self

    def _read_output(self, pipe) -> None:
        with open(self.log_path, "ab") as out:
            for raw in iter(pipe.readline, b""):
                out.write(raw)
                out.flush()
                self._lines.append(raw.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, after: int = 0) -> int:
        """Index of the first READY=1 from notify message `after` on (after a reload: its RELOADING)."""
        try:
            return self.notify.wait("READY", timeout=timeout, alive=self.alive, after=after)
        except AssertionError:
            raise AssertionError(f"{self.name} not READY (exit {self.proc.poll()}); log:\n{self.log_tail()}") from None

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM (drain, final checkpoint) and wait. Returns the exit status."""
        self.update_peak_rss()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not stop within {timeout} s of SIGTERM; log:\n{self.log_tail()}")
        self._join_reader()
        return rc

    def kill(self) -> None:
        """SIGKILL: a crash (no drain, no final checkpoint)."""
        self.update_peak_rss()
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._join_reader()

    def cleanup(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._join_reader()
        self.notify.close()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
        if self._log is not None and self.proc.poll() is not None:
            self._log.close()

    # --- observation -------------------------------------------------------------------

    def log_text(self) -> str:
        if self.log_file:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "".join(self._lines)

    def log_tail(self, n: int = 60) -> str:
        if self.log_file:
            return "".join(self.log_text().splitlines(keepends=True)[-n:])
        return "".join(self._lines[-n:])

    def update_peak_rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except (OSError, ValueError, AttributeError):
            pass  # exited (or not started)
        return self.peak_rss_kib

    @property
    def peak_rss_mib(self) -> float:
        return round(self.peak_rss_kib / 1024, 1)

    @property
    def metrics_url(self) -> str:
        m = self.config["metrics"]
        scheme = "https" if m.get("tls_cert_file") else "http"
        return f"{scheme}://127.0.0.1:{m['port']}/metrics"

    def scrape(self, timeout: float = 10.0) -> Scrape:
        self.update_peak_rss()
        _, text = fetch(self.metrics_url, auth=self.scrape_auth, context=self.scrape_context, timeout=timeout)
        return Scrape(text)

    def exposition(self) -> str:
        return self.scrape().text

    def sample(self, name: str, **labels) -> Optional[float]:
        """One sample of a fresh scrape (None when absent)."""
        return self.scrape().value(name, **labels)

    def wait_processed(self, n: int, group: str = "default", timeout: float = 60.0) -> None:
        """Until exactly `n` readings of `group` went through the detector."""
        wait_for(lambda: (self.sample("streamlstm_readings_total", group=group) or 0) >= n, timeout,
                 step=0.1, what=f"{n} readings processed; log:\n{self.log_text()}")
        assert self.sample("streamlstm_readings_total", group=group) == n

    def try_scrape(self) -> Optional[Scrape]:
        try:
            return self.scrape(timeout=5.0)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_metric(self, predicate: Callable[[Scrape], bool], timeout: float, what: str) -> Scrape:
        def check():
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.poll()}) while waiting for {what}; "
                                     f"log:\n{self.log_tail()}")
            s = self.try_scrape()
            return s if s is not None and predicate(s) else None
        try:
            return wait_for(check, timeout, step=0.2, what=what)
        except AssertionError as exc:
            last = self.try_scrape()
            got = f"readings {last.readings}, rejected {last.rejected}" if last else "no scrape"
            raise AssertionError(f"{exc} ({got}); log:\n{self.log_tail()}") from None

    def wait_handled(self, n: int, timeout: float) -> Scrape:
        """Until accepted + rejected readings reach `n`."""
        return self.wait_metric(lambda s: s.handled >= n, timeout, f"{n} readings handled")

    def wait_settled(self, quiet_s: float, timeout: float) -> Scrape:
        """Until the counters stop moving for `quiet_s` with an empty queue and a connection."""
        state = {"key": None, "since": time.monotonic()}

        def check(s: Scrape):
            key = (s.handled, s.value("streamlstm_queue_depth"))
            if key != state["key"]:
                state.update(key=key, since=time.monotonic())
                return False
            return (s.value("streamlstm_queue_depth") == 0 and s.value("streamlstm_mqtt_connected") == 1
                    and time.monotonic() - state["since"] >= quiet_s)
        return self.wait_metric(check, timeout, f"counters quiet for {quiet_s} s")


# ----------------------------------------------------------------------------------- MQTT clients

class Publisher:
    """QoS 1 publisher, at least once and in order, whatever happens to the broker.

    A sender thread keeps up to `window` messages in flight and marks a message acknowledged
    on its PUBACK. When the connection drops it throws that paho client away, connects a new
    one and resends, in publish order, from the first unacknowledged message. (paho's own
    resend after a reconnect can let messages published during the CONNECT handshake overtake
    older ones; a reading overtaken that way is rejected as out_of_order, which would read as
    a loss.) A message the broker got but whose PUBACK was lost is sent twice: the daemon
    rejects the copy (duplicate_timestamp / out_of_order), so `acked_readings` is exactly what
    the broker accepted.
    """

    def __init__(self, host: str, port: int, *, window: int = 50, username: Optional[str] = None,
                 password: Optional[str] = None, tls: Optional[dict] = None):
        self.host, self.port = host, port
        self.window = window
        self.username, self.password, self.tls = username, password, tls
        self.connected = threading.Event()
        self.connects = 0
        self._items: list = []  # (topic, payload, readings)
        self._acked: list = []  # bool per item
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    # --- API ---------------------------------------------------------------------------

    def publish(self, topic: str, payload, readings: int = 1) -> None:
        with self._lock:
            self._items.append((topic, payload, readings))
            self._acked.append(False)
        self._wake.set()

    def publish_all(self, items: Iterable[tuple[str, bytes, int]]) -> None:
        for topic, payload, n in items:
            self.publish(topic, payload, n)

    @property
    def published_messages(self) -> int:
        return len(self._items)

    @property
    def acked_messages(self) -> int:
        return sum(self._acked)

    @property
    def acked_readings(self) -> int:
        with self._lock:
            return sum(item[2] for item, ok in zip(self._items, self._acked) if ok)

    @property
    def total_readings(self) -> int:
        with self._lock:
            return sum(item[2] for item in self._items)

    def wait_acked(self, timeout: float) -> int:
        """Until the broker acknowledged every message; returns the readings published."""
        wait_for(lambda: all(self._acked), timeout, step=0.05,
                 what=f"PUBACKs for {len(self._items)} messages ({self.acked_readings} of "
                      f"{self.total_readings} readings acknowledged)")
        return self.total_readings

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(15)

    # --- sender thread -----------------------------------------------------------------

    def _client(self):
        c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
        c.max_inflight_messages_set(self.window)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.tls is not None:
            c.tls_set(**self.tls)
        up, down = threading.Event(), threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            (down if reason_code.is_failure else up).set()

        def on_disconnect(*args):
            down.set()
            self._wake.set()

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_publish = lambda *args: self._wake.set()
        return c, up, down

    def _connect(self):
        while not self._closed:
            c, up, down = self._client()
            try:
                c.connect(self.host, self.port, keepalive=10)
            except (OSError, ssl.SSLError):
                time.sleep(0.2)
                continue
            c.loop_start()
            deadline = time.monotonic() + 5
            while not (up.is_set() or down.is_set()) and time.monotonic() < deadline:
                time.sleep(0.01)
            if up.is_set() and not down.is_set():
                self.connects += 1
                self.connected.set()
                return c, down
            self._drop(c)
            time.sleep(0.2)
        return None, None

    @staticmethod
    def _drop(c) -> None:
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001 - the connection is gone anyway
            pass
        c.loop_stop()

    def _run(self) -> None:
        while not self._closed:
            c, down = self._connect()
            if c is None:
                return
            inflight: collections.deque = collections.deque()  # (index, MQTTMessageInfo)
            with self._lock:
                nxt = self._acked.index(False) if False in self._acked else len(self._acked)
            while not self._closed and not down.is_set():
                while inflight and inflight[0][1]._published:  # PUBACKs come back in order
                    self._acked[inflight.popleft()[0]] = True
                while len(inflight) < self.window and nxt < len(self._items) and not down.is_set():
                    topic, payload, _ = self._items[nxt]
                    inflight.append((nxt, c.publish(topic, payload, qos=1)))
                    nxt += 1
                self._wake.wait(0.05)
                self._wake.clear()
            self.connected.clear()
            while inflight and inflight[0][1]._published:
                self._acked[inflight.popleft()[0]] = True
            self._drop(c)  # unacknowledged messages go out again on the next connection


class Subscriber:
    """Collects (topic, payload, retain) under some filters."""

    def __init__(self, host: str, port: int, *topics: str, **kw):
        self.messages: queue.Queue = queue.Queue()
        self.seen: list = []
        subscribed = threading.Event()
        c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
        if kw.get("username"):
            c.username_pw_set(kw["username"], kw.get("password"))
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe([(t, 1) for t in topics])
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, m.payload, m.retain))
        c.connect(host, port, keepalive=10)
        c.loop_start()
        if not subscribed.wait(10):
            raise AssertionError("subscriber: no SUBACK")
        self.client = c

    def wait(self, predicate, timeout: float = 30.0, what: str = "message"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.messages.get(timeout=0.1))
            except queue.Empty:
                continue
            if predicate(self.seen[-1]):
                return self.seen[-1]
        raise AssertionError(f"timed out waiting for {what}; got {self.seen[-5:]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_online(host: str, port: int, status_topic: str = "streamlstm/status", timeout: float = 60.0, **kw) -> None:
    """Until the retained status says ``online`` (readiness seen from the broker)."""
    sub = Subscriber(host, port, status_topic, **kw)
    try:
        sub.wait(lambda m: m[0] == status_topic and m[1] == b"online", timeout, "retained online status")
    finally:
        sub.close()


# ----------------------------------------------------------------------------------- payloads

def batch_payloads(n_sensors: int, per_sensor: int, per_message: int, *, topic: str = "sensors/batch",
                   first_round: int = 0, prefix: str = "s"):
    """(topic, payload, readings) items: batched JSON readings, round r = reading r of every sensor.

    Per sensor the timestamps are T0 + r: strictly increasing in publish order, so a reading
    delivered twice is rejected (duplicate_timestamp / out_of_order) instead of counted twice.
    """
    chunk: list[str] = []
    for r in range(first_round, first_round + per_sensor):
        ts = T0 + r
        for s in range(n_sensors):
            # A slow wave per sensor plus a deterministic wiggle: cheap to make, not constant.
            v = ((s * 7919 + r * 104729) % 1000) / 1000.0 + (r % 50) / 25.0
            chunk.append(f'{{"sensor":"{prefix}{s}","value":{v:.3f},"ts":{ts:.0f}}}')
            if len(chunk) == per_message:
                yield topic, ("[" + ",".join(chunk) + "]").encode(), len(chunk)
                chunk = []
    if chunk:
        yield topic, ("[" + ",".join(chunk) + "]").encode(), len(chunk)


# ----------------------------------------------------------------------------------- report

def report(test: str, **figures) -> None:
    """Append the test's figures as one JSON line to $STREAMLSTM_RELIABILITY_REPORT (if set)."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    row = {"test": test, "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), **figures}
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
