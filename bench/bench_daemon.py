#!/usr/bin/env python3
"""End-to-end daemon throughput through a real mosquitto, learning on.

    python bench/bench_daemon.py                  # 1000 sensors, H=32, 150 readings each
    python bench/bench_daemon.py --quick          # 200 sensors, 80 readings: checks the harness

What is measured (one run, same broker, same machine):

* start-to-READY: `python -m streamlstm run` spawned -> READY=1 on a test $NOTIFY_SOCKET, with
  a warm Numba cache (`streamlstm warmup` runs first), median of --starts starts.
* daemon readings/s: the readings are queued in the broker for the daemon's persistent session
  while it is stopped (QoS 1), then the daemon starts and drains them; the rate is taken from
  /metrics (streamlstm_readings_total polled every 0.1 s) once every sensor is past
  detector.scaling_warmup, i.e. while every reading also trains its model. This measures what the
  daemon can consume, not how fast a Python publisher can produce.
  Two payload shapes: one reading per message, and 100 readings per message (format batch).
* bare subscriber: a plain paho client (QoS 1, persistent session, automatic acks, no parsing)
  draining the same pre-queued messages: the ceiling the MQTT path alone allows.

Default config otherwise (hidden_size 32, window 32, sgd, likelihood score, queue 100000,
max_batch 4096, max_delay 20 ms); backend as configured (auto: CPU without a GPU).
Prints a table; JSON goes to bench/results/daemon-<host>-<time>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from mosquitto import Mosquitto, free_port  # noqa: E402

T0 = 1.7e9
BATCH = 100  # readings per message in the batched run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sensors", type=int, default=1000)
    p.add_argument("--readings", type=int, default=150, help="readings per sensor and run")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--starts", type=int, default=3, help="daemon starts timed for start-to-READY")
    p.add_argument("--quick", action="store_true", help="200 sensors, 80 readings, 1 start")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/daemon-<host>-<time>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.sensors, args.readings, args.starts = 200, 80, 1
    return args


# --------------------------------------------------------------------------------- plumbing

def _env(notify_path=None):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    return env


class Daemon:
    def __init__(self, workdir: pathlib.Path, config: dict):
        self.workdir = workdir
        self.config = config
        self.path = workdir / "bench.yaml"
        import yaml
        self.path.write_text(yaml.safe_dump(config))
        self.metrics_url = f"http://127.0.0.1:{config['metrics']['port']}/metrics"
        self.proc = None

    def start(self) -> float:
        """Spawn and wait for READY=1; returns seconds from spawn to READY."""
        sock_dir = tempfile.mkdtemp(prefix="sdn")
        notify = os.path.join(sock_dir, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(1.0)
        log = open(self.workdir / "daemon.log", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "streamlstm", "run", "-c", str(self.path)],
                                     cwd=self.workdir, env=_env(notify), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.workdir}/daemon.log")
                try:
                    data = sock.recv(4096).decode()
                except socket.timeout:
                    continue
                if "READY=1" in data.split("\n"):
                    return time.perf_counter() - t0
            raise RuntimeError("no READY=1 within 600 s")
        finally:
            sock.close()
            shutil.rmtree(sock_dir, ignore_errors=True)

    def readings(self) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("streamlstm_readings_total{"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(300)


def _client(broker, client_id="", persistent=False, inflight=20):
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv5)
    c.max_inflight_messages_set(inflight)  # only before connecting
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    c.connect(broker.host, broker.port, clean_start=not persistent, properties=props)
    return c


def messages(sensors: int, readings: int, batched: bool):
    """(topic, payload) in time order: every sensor's reading r before any reading r + 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, size=sensors)
    out = []
    for r in range(readings):
        values = base + np.sin(r / 5 + base) + 0.1 * rng.normal(size=sensors)
        ts = T0 + r
        if batched:
            for start in range(0, sensors, BATCH):
                items = [{"sensor": f"s{k}", "value": round(float(values[k]), 6), "ts": ts}
                         for k in range(start, min(sensors, start + BATCH))]
                out.append((f"sensors/gw{start // BATCH}", json.dumps(items)))
        else:
            for k in range(sensors):
                out.append((f"sensors/s{k}", json.dumps({"value": round(float(values[k]), 6), "ts": ts})))
    return out


def publish_all(broker, items):
    c = _client(broker, inflight=1000)
    c.loop_start()
    t0 = time.perf_counter()
    try:
        # Message ids are 16 bits: keep well under 65535 unacknowledged publishes.
        for start in range(0, len(items), 20000):
            infos = [c.publish(topic, payload, qos=1) for topic, payload in items[start:start + 20000]]
            for info in infos:
                info.wait_for_publish(120)
    finally:
        c.disconnect()
        c.loop_stop()
    return time.perf_counter() - t0


def drain(d: Daemon, cfg: dict, sensors: int, total: int) -> tuple:
    """Start `d` on its backlog of `total` readings: (readings/s once every sensor trains,
    readings/s from READY to the last), from /metrics polled every 0.1 s."""
    samples = []
    d.start()
    t_ready = time.perf_counter()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        n = d.readings()
        samples.append((time.perf_counter(), n))
        if n >= total:
            break
        time.sleep(0.1)
    assert d.stop() == 0
    from streamlstm.config import parse_config
    warm = parse_config(cfg).detector.scaling_warmup
    skip = sensors * (warm + 5)  # every sensor trains from here on
    return drain_rate(samples, skip, total), total / (samples[-1][0] - t_ready)


def drain_rate(samples, skip: float, total: float):
    """Readings/s between the first sample at or past `skip` readings and the end."""
    start = next((t, n) for t, n in samples if n >= skip)
    end = next((t, n) for t, n in samples if n >= total)
    return (end[1] - start[1]) / (end[0] - start[0]) if end[0] > start[0] else float("nan")


def machine() -> dict:
    """Where and when a bench ran (the head of its JSON)."""
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def report(title: str, rows: list, result: dict, out, prefix: str) -> None:
    """Print the table; write the JSON to `out` or bench/results/<prefix>-<host>-<time>.json."""
    print(title)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>10}")
    out = pathlib.Path(out) if out else RESULTS / (
        f"{prefix}-{platform.node()}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"JSON: {out}")


# --------------------------------------------------------------------------------- phases

def bench_daemon(broker, workdir, args, batched: bool, result: dict) -> dict:
    name = "batched" if batched else "single"
    cfg = {
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"bench-{name}"},
        "model": {"hidden_size": args.hidden},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "checkpoint": {"directory": str(workdir / f"state-{name}"), "interval_s": 3600},
        "logging": {"level": "WARNING"},
    }
    d = Daemon(workdir, cfg)
    d.start()  # creates the persistent session (subscription) ...
    assert d.stop() == 0  # ... which queues the readings below while the daemon is down
    items = messages(args.sensors, args.readings, batched)
    total = args.sensors * args.readings
    pub_s = publish_all(broker, items)
    rate, overall = drain(d, cfg, args.sensors, total)
    out = {"messages": len(items), "readings": total, "readings_per_message": total // len(items),
           "publish_s": pub_s, "readings_per_s_training": rate, "readings_per_s_overall_from_ready": overall,
           "messages_per_s_training": rate * len(items) / total}
    result[f"daemon_{name}"] = out
    return out


def bench_bare(broker, args, batched: bool, result: dict) -> dict:
    name = "batched" if batched else "single"
    items = messages(args.sensors, args.readings, batched)
    got = []
    done = threading.Event()
    cid = f"bare-{name}"

    def on_message(client, userdata, msg):
        got.append(time.perf_counter())
        if len(got) == len(items):
            done.set()

    c = _client(broker, cid, persistent=True)
    c.subscribe("sensors/+", qos=1)
    c.loop_start()
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    publish_all(broker, items)
    c = _client(broker, cid, persistent=True)
    c.on_message = on_message
    c.subscribe("sensors/+", qos=1)
    c.loop_start()
    done.wait(600)
    c.disconnect()
    c.loop_stop()
    seconds = got[-1] - got[0]
    per_msg = args.sensors * args.readings / len(items)
    out = {"messages": len(items), "messages_per_s": len(got) / seconds, "readings_per_s": len(got) * per_msg / seconds}
    result[f"bare_{name}"] = out
    return out


def bench_start(broker, workdir, args, result: dict):
    cfg = {
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": "bench-start"},
        "model": {"hidden_size": args.hidden},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "checkpoint": {"directory": str(workdir / "state-start")},
    }
    d = Daemon(workdir, cfg)
    r = subprocess.run([sys.executable, "-m", "streamlstm", "warmup", "-c", str(d.path)], env=_env(),
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    times = []
    for _ in range(args.starts):
        times.append(d.start())
        assert d.stop() == 0
    result["start_to_ready_s"] = {"median": statistics.median(times), "min": min(times), "all": times}


def main(argv=None):
    args = parse_args(argv)
    result = {**machine(), "sensors": args.sensors, "readings_per_sensor": args.readings, "hidden_size": args.hidden}
    try:
        import paho.mqtt
        result["paho"] = paho.mqtt.__version__
    except Exception:  # noqa: BLE001
        pass
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        workdir = pathlib.Path(tmp)
        broker = Mosquitto(workdir / "broker", max_queued_messages=10 * args.sensors * args.readings + 10)
        broker.start()
        try:
            result["mosquitto"] = subprocess.run([broker.binary, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
            bench_start(broker, workdir, args, result)
            for batched in (False, True):
                bench_daemon(broker, workdir, args, batched, result)
                bench_bare(broker, args, batched, result)
        finally:
            broker.stop()

    rows = [
        ("start to READY (warm cache), median s", f"{result['start_to_ready_s']['median']:.2f}"),
        ("daemon, 1 reading/message: readings/s (training)", f"{result['daemon_single']['readings_per_s_training']:.0f}"),
        ("bare paho, 1 reading/message: messages/s", f"{result['bare_single']['messages_per_s']:.0f}"),
        (f"daemon, {BATCH} readings/message: readings/s (training)",
         f"{result['daemon_batched']['readings_per_s_training']:.0f}"),
        (f"bare paho, {BATCH} readings/message: readings/s", f"{result['bare_batched']['readings_per_s']:.0f}"),
    ]
    report(f"streamlstm daemon, {args.sensors} sensors, H={args.hidden}, {args.readings} readings/sensor, "
           f"{result['cpus']} CPUs, {result.get('mosquitto', 'mosquitto')}", rows, result, args.out, "daemon")
    return 0


if __name__ == "__main__":
    sys.exit(main())
