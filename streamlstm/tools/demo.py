"""`streamlstm demo`: broker + simulated plant + daemon, with injected vs detected anomalies live.

What runs (all stopped on exit, whatever ends the demo):

* a local broker (``broker.local_broker``: mosquitto, else amqtt), free loopback port;
* the daemon, ``python -m streamlstm run -c <temp config>``: small fast model, warm-up sized to
  the demo's pace, metrics on a free port, checkpoints in the temp dir;
* the simulated plant (``simulate.py``) publishing ``plant/{sensor}`` once the daemon is
  ``online``, with an ``AnomalyInjector`` schedule;
* a listener on the daemon's events, matched against the schedule: an ``anomaly`` event on a
  sensor while an injected anomaly is active there (or up to ``GRACE_S`` after it) detects it;
  any other event is false. ``match_events`` is that rule as a pure function.

Ctrl-C or ``--duration`` ends it with a summary table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import MappingProxyType
from typing import Iterable, Optional, Sequence, TextIO

import yaml

from . import broker as broker_mod
from ..config import ConfigError, load_config
from .simulate import KINDS, Anomaly, AnomalyInjector, Plant, Simulator

__all__ = ["Detection", "Match", "add_arguments", "classify_event", "daemon_config", "main", "match_events",
           "render_summary"]

GRACE_S = 5.0               # an event this long after an anomaly ended still counts as its detection
DAY_S = 180.0               # one simulated day in demo seconds
MEAN_INTERVAL_S = 6.0       # mean time between injected anomalies
STARTUP_TIMEOUT_S = 300.0   # first start compiles the Numba kernels
DAEMON_STOP_TIMEOUT_S = 30.0
DRAIN_S = 2.0               # after the last reading: time for the last events to arrive
STATUS_TOPIC = "streamlstm/status"
EVENTS_TOPIC = "streamlstm/events/{sensor}"
INPUT_TOPIC = "plant/{sensor}"


# --------------------------------------------------------------------------- matching (pure)

@dataclasses.dataclass(frozen=True)
class Detection:
    anomaly: Anomaly
    t: float          # demo time of the first matching event (its incident's start)
    delay: float      # t - anomaly.start
    events: int       # matching events (an anomaly may open several incidents)


@dataclasses.dataclass(frozen=True)
class Match:
    injected: tuple[Anomaly, ...]      # started by `now`
    detections: tuple[Detection, ...]
    missed: tuple[Anomaly, ...]        # over (plus grace) by `now`, never detected
    pending: tuple[Anomaly, ...]       # undetected but still within their window at `now`
    false_events: tuple[tuple[str, float], ...]  # (sensor, demo time)

    def median_delay(self, kind: Optional[str] = None) -> Optional[float]:
        delays = [d.delay for d in self.detections if kind is None or d.anomaly.kind == kind]
        return statistics.median(delays) if delays else None


def classify_event(anomalies: Iterable[Anomaly], sensor: str, t: float, grace_s: float = GRACE_S) -> Optional[Anomaly]:
    """The injected anomaly an event on ``sensor`` at demo time ``t`` detects, or None (false)."""
    best = None
    for a in anomalies:
        if a.sensor == sensor and a.start <= t <= a.end + grace_s and (best is None or a.start > best.start):
            best = a
    return best


def match_events(anomalies: Sequence[Anomaly], events: Iterable[tuple[str, float]], now: float,
                 grace_s: float = GRACE_S) -> Match:
    """Injected ``anomalies`` vs ``events`` ((sensor, demo time) of each ``anomaly`` event) at ``now``."""
    injected = [a for a in anomalies if a.start <= now]
    hits: dict[Anomaly, list[float]] = {}
    false_events = []
    for sensor, t in events:
        a = classify_event(injected, sensor, t, grace_s)
        if a is None:
            false_events.append((sensor, t))
        else:
            hits.setdefault(a, []).append(t)
    detections = tuple(Detection(a, min(ts), min(ts) - a.start, len(ts))
                       for a in injected if (ts := hits.get(a)))
    missed = tuple(a for a in injected if a not in hits and a.end + grace_s <= now)
    pending = tuple(a for a in injected if a not in hits and a.end + grace_s > now)
    return Match(tuple(injected), detections, missed, pending, tuple(false_events))


def render_summary(m: Match) -> str:
    """The summary table: per kind injected / detected / missed / median delay, then totals."""
    def delay(x):
        return f"{x:.1f} s" if x is not None else "-"

    rows = [("kind", "injected", "detected", "missed", "median delay")]
    for kind in KINDS:
        inj = sum(a.kind == kind for a in m.injected)
        if not inj:
            continue
        rows.append((kind, str(inj), str(sum(d.anomaly.kind == kind for d in m.detections)),
                     str(sum(a.kind == kind for a in m.missed)), delay(m.median_delay(kind))))
    rows.append(("total", str(len(m.injected)), str(len(m.detections)), str(len(m.missed)), delay(m.median_delay())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if len(rows) > 2:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append(f"false events: {len(m.false_events)} (events with no injected anomaly on that sensor)")
    if m.pending:
        lines.append(f"still open at the end, not counted as missed: {len(m.pending)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- configuration

def warmup_seconds(duration: Optional[float]) -> float:
    """Seconds of normal readings before the first anomaly: 30, less for short runs."""
    return 30.0 if duration is None else max(10.0, min(30.0, 0.4 * duration))


def daemon_config(*, mqtt_port: int, protocol: str, metrics_port: int, state_dir: str, rate: float,
                  warmup_s: float, seed: int = 0, host: str = "127.0.0.1") -> dict:
    """The daemon's config for the demo, sized in readings from the demo's pace (``rate``/s per sensor)."""
    warm = max(20, int(0.8 * warmup_s * rate))   # detector armed a bit before the first injection
    return {
        "mqtt": {"host": host, "port": mqtt_port, "protocol": protocol, "client_id": "streamlstm-demo",
                 "keepalive_s": 10},
        "inputs": [{"topic": INPUT_TOPIC, "format": "json", "value_fields": ["value"], "timestamp_field": "ts",
                    "timestamp_unit": "s"}],
        # Pinned rather than left to the defaults (tuned on NAB, stricter): the plant's anomalies
        # are sized for these, and the demo should not change when the defaults are retuned.
        "model": {"hidden_size": 16, "window": 16, "optimizer": "sgd", "learning_rate": 0.2, "seed": seed},
        "detector": {
            "threshold": 0.6,                         # the default: with the range channel 0.5 raised false events
            "warmup": warm,
            "scaling_warmup": max(10, warm // 4),
            "short_window": 3,                        # short anomalies (spikes) must not be smoothed away
            "long_window": max(100, int(60 * rate)),  # about a minute of residuals
            "cooldown": max(1, int(2 * rate)),        # about two seconds
            "seasonal_periods": [],                   # a demo lasts minutes, not days
            "peak_memory": 0,                         # each injected anomaly is reported alike
        },
        "output": {"events_topic": EVENTS_TOPIC, "status_topic": STATUS_TOPIC},
        "metrics": {"enabled": True, "address": host, "port": metrics_port, "per_sensor": True},
        "checkpoint": {"directory": state_dir, "interval_s": 60},
        "logging": {"level": "INFO"},
    }


# --------------------------------------------------------------------------- terminal output

class Screen:
    """Log lines plus (on a colour terminal) a status line redrawn below them; plain ANSI only."""

    COLORS = MappingProxyType({"inject": "36", "detect": "32;1", "false": "33", "missed": "31;1", "dim": "2",
                               "bold": "1"})

    def __init__(self, out: TextIO, color: bool):
        self.out = out
        self.color = color
        self.status = ""

    def paint(self, text: str, style: str) -> str:
        return f"\x1b[{self.COLORS[style]}m{text}\x1b[0m" if self.color else text

    def line(self, text: str = "") -> None:
        if self.color:
            self.out.write("\r\x1b[2K" + text + "\n" + self.status)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def set_status(self, text: str) -> None:
        if self.color:
            self.status = self.paint(text, "dim")
            self.out.write("\r\x1b[2K" + self.status)
            self.out.flush()

    def clear_status(self) -> None:
        if self.color and self.status:
            self.out.write("\r\x1b[2K")
            self.out.flush()
        self.status = ""


def _stamp(t: float) -> str:
    return f"{t:7.1f}s"


# --------------------------------------------------------------------------- the run

class _Listener:
    """paho client on the status and events topics; messages go to a queue for the main thread."""

    def __init__(self, host: str, port: int, protocol: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.queue: "queue.Queue[tuple[str, bytes]]" = queue.Queue()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="streamlstm-demo-listener", protocol=proto)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.queue.put((msg.topic, msg.payload))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        events_filter = EVENTS_TOPIC.replace("{sensor}", "+")
        client.subscribe([(STATUS_TOPIC, 1), (events_filter, 1)])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _is_online(payload: bytes) -> bool:
    text = payload.decode("utf-8", "replace").strip()
    if text.lower() == "online":
        return True
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and any(str(doc.get(k, "")).lower() == "online" for k in ("status", "state"))


def _log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_process(proc: Optional[subprocess.Popen], sig=signal.SIGTERM,
                  timeout: float = DAEMON_STOP_TIMEOUT_S) -> tuple[Optional[int], bool]:
    """Signal, wait, SIGKILL after ``timeout``. Returns (exit status, whether it had to be killed)."""
    if proc is None:
        return None, False
    killed = False
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
    return proc.returncode, killed


class _Demo:
    def __init__(self, opts: argparse.Namespace, out: TextIO):
        self.opts = opts
        color = not opts.no_color and "NO_COLOR" not in os.environ and out.isatty()
        self.screen = Screen(out, color)
        self.stop = threading.Event()
        self.failure: Optional[str] = None
        self.events: list[tuple[str, float]] = []     # (sensor, demo time) of anomaly events
        self.announced: set[Anomaly] = set()
        self.reported: set[Anomaly] = set()
        self.daemon: Optional[subprocess.Popen] = None
        self.listener: Optional[_Listener] = None
        self.sim: Optional[Simulator] = None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.stop.set()

    # --- start-up ---------------------------------------------------------------------

    def _start_daemon(self, cfg_path: str, log_path: str, workdir: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The daemon runs from the temp dir: make sure it imports this very package.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        base = shlex.split(self.opts.daemon_command) if self.opts.daemon_command else [sys.executable, "-m", "streamlstm"]
        with open(log_path, "ab") as log:
            # Own session: Ctrl-C goes to the demo only, which then stops the daemon in order.
            return subprocess.Popen(base + ["run", "-c", cfg_path],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=workdir, env=env, start_new_session=True)

    def _wait_online(self, daemon: subprocess.Popen, listener: _Listener, log_path: str) -> bool:
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        next_note = started + 15.0
        while not self.stop.is_set():
            if time.monotonic() >= next_note:  # a cold Numba cache takes a while: show we are alive
                next_note += 15.0
                self.screen.line(self.screen.paint(f"  still waiting ({time.monotonic() - started:.0f} s)", "dim"))
            if daemon.poll() is not None:
                self.fail(f"the daemon exited with {daemon.returncode} during start-up; its log:\n"
                          f"{_log_tail(log_path)}")
                return False
            if time.monotonic() > deadline:
                self.fail(f"the daemon was not online after {STARTUP_TIMEOUT_S:g}s; its log:\n{_log_tail(log_path)}")
                return False
            try:
                topic, payload = listener.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if topic == STATUS_TOPIC and _is_online(payload):
                return True
        return False

    # --- live view --------------------------------------------------------------------

    def _handle(self, topic: str, payload: bytes, sim: Simulator, anomalies: Sequence[Anomaly]) -> None:
        if topic == STATUS_TOPIC:
            if not _is_online(payload):
                self.screen.line(self.screen.paint(f"daemon status: {payload.decode('utf-8', 'replace')}", "dim"))
            return
        try:
            ev = json.loads(payload)
            kind, sensor = ev["event"], str(ev["sensor"])
            ts = ev.get("start") if isinstance(ev.get("start"), (int, float)) else ev["timestamp"]
            t = float(ts) - sim.t0
        except (ValueError, KeyError, TypeError) as e:
            self.screen.line(self.screen.paint(f"unreadable event on {topic}: {e}", "dim"))
            return
        score = ev.get("peak_score", ev.get("score"))
        score_text = f"score {score:.3f}" if isinstance(score, (int, float)) else ""
        if kind == "resolved":
            end = ev.get("end")
            if isinstance(end, (int, float)):
                t_end = float(end) - sim.t0
                text = f"{_stamp(t_end)}  resolved  {sensor:<22} after {t_end - t:.1f} s  peak {score_text}"
            else:
                text = f"{_stamp(t)}  resolved  {sensor:<22}"
            self.screen.line(self.screen.paint(text, "dim"))
            return
        if kind != "anomaly":
            return
        self._announce_injected(anomalies, t)  # "injected" before its detection, whatever the timing
        self.events.append((sensor, t))
        hit = classify_event(anomalies, sensor, t)
        if hit is None:
            self.screen.line(self.screen.paint(f"{_stamp(t)}  FALSE     {sensor:<22}", "false") + f"  {score_text}")
        elif hit in self.reported:
            self.screen.line(self.screen.paint(f"{_stamp(t)}  again     {sensor:<22} {hit.kind}", "dim"))
        else:
            self.reported.add(hit)
            self.screen.line(self.screen.paint(f"{_stamp(t)}  DETECTED  {sensor:<22} {hit.kind:<12}", "detect")
                             + f" delay {t - hit.start:.1f} s  {score_text}")

    def _announce_injected(self, anomalies: Sequence[Anomaly], now: float) -> None:
        for a in anomalies:
            if a.start > now:
                break  # sorted by start
            if a not in self.announced:
                self.announced.add(a)
                self.screen.line(self.screen.paint(f"{_stamp(a.start)}  injected  {a.sensor:<22} {a.kind:<12}", "inject")
                                 + f" for {a.duration:.1f} s")

    def _announce(self, anomalies: Sequence[Anomaly], now: float) -> None:
        self._announce_injected(anomalies, now)
        m = match_events(anomalies, self.events, now)
        for a in m.missed:
            if a not in self.reported:
                self.reported.add(a)
                self.screen.line(self.screen.paint(f"{_stamp(a.end + GRACE_S)}  MISSED    {a.sensor:<22} {a.kind}",
                                                   "missed"))

    def _status(self, anomalies, now: float, sim: Simulator, metrics_url: str) -> str:
        m = match_events(anomalies, self.events, now)
        return (f"{_stamp(now)}  readings {sim.sent}  injected {len(m.injected)}  detected {len(m.detections)}  "
                f"missed {len(m.missed)}  false {len(m.false_events)}  |  {metrics_url}")

    # --- the whole thing --------------------------------------------------------------

    def run(self) -> int:
        workdir = tempfile.mkdtemp(prefix="streamlstm-demo-")
        try:
            with broker_mod.local_broker(self.opts.broker) as broker:
                try:
                    return self._run(broker, workdir)
                except KeyboardInterrupt:  # Ctrl-C before our handler was installed
                    self.stop.set()
                    return self._finish(None)
                finally:
                    # Clients first, the broker last (when the with block ends).
                    if self.sim is not None:
                        self.sim.stop()
                    code, killed = _stop_process(self.daemon)
                    if killed:
                        self.screen.line(f"daemon did not stop within {DAEMON_STOP_TIMEOUT_S:g} s of SIGTERM: killed")
                    elif code not in (None, 0):
                        self.screen.line(f"daemon exit status {code}")
                    if self.listener is not None:
                        self.listener.close()
                    self.screen.clear_status()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(self, broker, workdir: str) -> int:
        o = self.opts
        screen = self.screen
        metrics_port = broker_mod.free_port()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        warmup_s = warmup_seconds(o.duration)
        cfg = daemon_config(mqtt_port=broker.port, protocol=broker.protocol, metrics_port=metrics_port,
                            state_dir=os.path.join(workdir, "state"), rate=o.rate, warmup_s=warmup_s, seed=o.seed)
        cfg_path = os.path.join(workdir, "streamlstm.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        load_config(cfg_path)  # our own config must be valid: fail here, not in the daemon
        log_path = os.path.join(workdir, "daemon.log")
        self.daemon = daemon = self._start_daemon(cfg_path, log_path, workdir)
        screen.line(screen.paint("streamlstm demo", "bold"))
        screen.line(f"broker   {broker.kind} on {broker.url} (MQTT {broker.protocol})")
        screen.line(f"daemon   {shlex.join(daemon.args)}")
        screen.line(f"metrics  {metrics_url}")
        screen.line(f"workdir  {workdir} (daemon log: {log_path})")
        screen.line(f"processes: broker={broker.pid} daemon={daemon.pid}")
        screen.line(f"plant    {o.sensors} sensors x {o.rate:g} readings/s on {INPUT_TOPIC}, seed {o.seed}, "
                    f"a day lasts {DAY_S:g} s; anomalies from {warmup_s:g} s on")
        screen.line("waiting for the daemon to come online (the first start compiles kernels)...")
        self.listener = listener = _Listener(broker.host, broker.port, broker.protocol)
        if not self._wait_online(daemon, listener, log_path):
            return self._finish(None)
        screen.line("daemon online; starting the plant. Ctrl-C ends the demo.")

        plant = Plant(o.sensors, seed=o.seed, rate=o.rate, day_s=DAY_S)
        horizon = (o.duration - GRACE_S) if o.duration is not None else 24 * 3600.0
        anomalies = AnomalyInjector(plant.sensors, seed=o.seed, warmup_s=warmup_s, rate=o.rate, day_s=DAY_S,
                                    mean_interval_s=MEAN_INTERVAL_S).schedule(horizon)
        self.sim = sim = Simulator(plant, anomalies, host=broker.host, port=broker.port, protocol=broker.protocol,
                                   topic=INPUT_TOPIC, on_error=lambda e: self.fail(f"simulator: {e!r}"))
        sim.start()
        while sim.t0 is None and not self.stop.is_set():
            time.sleep(0.01)
        wall_end = None if o.duration is None else time.monotonic() + o.duration + 5.0
        last_status = 0.0
        while not self.stop.is_set():
            now = sim.demo_time()
            if o.duration is not None and (now >= o.duration or time.monotonic() >= wall_end):
                break
            if daemon.poll() is not None:
                self.fail(f"the daemon exited with {daemon.returncode}; its log:\n{_log_tail(log_path)}")
                break
            self._drain(listener, sim, anomalies, timeout=0.2)
            self._announce(anomalies, sim.demo_time())
            if time.monotonic() - last_status >= (1.0 if screen.color else 10.0):
                last_status = time.monotonic()
                text = self._status(anomalies, sim.demo_time(), sim, metrics_url)
                screen.set_status(text) if screen.color else screen.line(text)
        sim.stop()
        now = sim.demo_time()
        # Events of the last readings may still be on their way.
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and daemon.poll() is None:
            self._drain(listener, sim, anomalies, timeout=0.1)
        self._announce(anomalies, now)
        return self._finish(match_events(anomalies, self.events, now), sim)

    def _drain(self, listener: _Listener, sim: Simulator, anomalies, timeout: float) -> None:
        try:
            topic, payload = listener.queue.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(topic, payload, sim, anomalies)
        while True:
            try:
                topic, payload = listener.queue.get_nowait()
            except queue.Empty:
                return
            self._handle(topic, payload, sim, anomalies)

    def _finish(self, match: Optional[Match], sim: Optional[Simulator] = None) -> int:
        screen = self.screen
        screen.clear_status()
        if self.failure:
            screen.line(screen.paint(f"demo failed: {self.failure}", "missed"))
        screen.line()
        screen.line(screen.paint("summary", "bold"))
        if match is not None:
            screen.line(render_summary(match))
            if sim is not None:
                screen.line(f"readings published: {sim.sent} over {sim.demo_time():.0f} s of demo time")
        else:
            screen.line("no readings were published")
        return 1 if self.failure else 0


# --------------------------------------------------------------------------- entry point

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, for `streamlstm demo` (cli.py) and ``python -m streamlstm.tools.demo``."""
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="end after this many seconds of plant time (default: run until Ctrl-C)")
    p.add_argument("--sensors", type=int, default=50, help="simulated sensors (default 50)")
    p.add_argument("--rate", type=float, default=5.0, help="readings per second per sensor (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the plant and the anomaly schedule (default 0)")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours (also: NO_COLOR set, or not a terminal)")
    # Hidden, for tests and troubleshooting: force a broker; run another daemon command
    # (given "run -c CONFIG" like `python -m streamlstm`).
    p.add_argument("--broker", choices=broker_mod.KINDS, default="auto", help=argparse.SUPPRESS)
    p.add_argument("--daemon-command", default=None, help=argparse.SUPPRESS)
    return p


def _check(opts: argparse.Namespace) -> Optional[str]:
    if opts.duration is not None and opts.duration <= GRACE_S:
        return f"--duration must be > {GRACE_S:g} seconds"
    if not 1 <= opts.sensors <= 100_000:
        return "--sensors must be between 1 and 100000"
    if not 0 < opts.rate <= 1000:
        return "--rate must be > 0 and <= 1000"
    if opts.seed < 0:
        return "--seed must be >= 0"
    return None


def main(args=None, out: Optional[TextIO] = None) -> int:
    """Run the demo. ``args``: an argv list (without the ``demo`` word) or a parsed Namespace."""
    parser = add_arguments(argparse.ArgumentParser(prog="streamlstm demo", description=__doc__.splitlines()[0]))
    if isinstance(args, argparse.Namespace):
        # A caller's own parser may lack some options: theirs over our defaults.
        opts = argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args)})
    else:
        if args is not None and list(args[:1]) == ["--"]:  # `streamlstm demo -- --duration 60`
            args = list(args[1:])
        opts = parser.parse_args(args)
    out = out or sys.stdout
    problem = _check(opts)
    if problem:
        print(f"streamlstm demo: {problem}", file=sys.stderr)
        return 2
    demo = _Demo(opts, out)
    # Ctrl-C / SIGTERM only set a flag: the main loop then stops everything in order.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: demo.stop.set())
    try:
        return demo.run()
    except broker_mod.BrokerError as e:
        print(f"streamlstm demo: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # daemon_config() out of step with config.py: a bug, said plainly
        print(f"streamlstm demo: the demo's daemon configuration is invalid:\n{e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
