"""The everyday CLI: --version, `status` (running daemon and checkpoint), journald priority
prefixes and JSON log lines, the rate-limit summary in words, progress lines without a terminal.
The daemon runs for real against a real mosquitto (tests/daemon_harness.py)."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import pytest

from daemon_harness import T0, daemon_config, wait_for
from streamlstm.logfmt import make_formatter
from streamlstm.ratelimit import RateLimitedLogger
from streamlstm.tools.replay import Progress

REPO = pathlib.Path(__file__).resolve().parent.parent


def cli(*args, cwd=None, env=None):
    e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("JOURNAL_STREAM", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamlstm", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=e, stdin=subprocess.DEVNULL)


def publish(broker, items):
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5
    c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for topic, payload in items:
            c.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def test_version():
    from streamlstm.version import package_version
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"streamlstm {package_version()}"


def test_status_from_the_running_daemon_then_the_checkpoint_and_journald_json_logs(mosquitto, tmp_path, daemons):
    cfg = daemon_config(mosquitto.port, tmp_path,
                        detector={"threshold": 0.5, "min_duration": 1},
                        logging={"json": True, "rejected_log_interval_s": 600})
    d = daemons(tmp_path, cfg, env={"JOURNAL_STREAM": "8:12345"}).start()
    d.wait_ready()
    n = 300
    calm = [{"value": math.sin(i / 5), "ts": T0 + i} for i in range(n)]
    items = [("sensors/pump1", json.dumps(calm[k:k + 50])) for k in range(0, n, 50)]
    items += [("sensors/fan1", json.dumps(calm[:100]))]
    items += [("sensors/pump1", json.dumps({"value": 80.0, "ts": T0 + n}))]  # a spike: opens an incident
    items += [("sensors/fan1", b"abc")] * 3  # one log line, two held back
    items += [("sensors/fan1", json.dumps({"value": 0.0, "ts": T0 + 5}))]  # out of order
    publish(mosquitto, items)
    d.wait_handled(n + 1 + 100 + 3 + 1, 60)

    def running_status():
        r = cli("status", "-c", str(d.config_path), "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        rows = {row["sensor"]: row for row in doc["sensors"]}
        return (doc, rows) if rows.get("pump1", {}).get("readings") == n + 1 else None
    doc, rows = wait_for(running_status, 30, step=0.5, what="status.json with every reading")
    assert doc["source"].startswith(f"running daemon (pid {d.pid},")
    assert set(rows) == {"pump1", "fan1"}
    assert rows["pump1"]["group"] == "default" and rows["pump1"]["last_reading"] == T0 + n
    assert rows["fan1"]["readings"] == 100 and rows["fan1"]["incident"] is None
    assert rows["pump1"]["last_score"] >= 0.5
    assert rows["pump1"]["incident"]["start"] == T0 + n
    text = cli("status", "-c", str(d.config_path), cwd=tmp_path).stdout
    assert "2 sensors in 1 groups, 1 open incidents" in text
    assert "2023-11-14T22:18:20Z" in text  # pump1's last reading, T0 + 300, as a date

    assert d.stop() == 0
    r = cli("status", "-c", str(d.config_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = json.loads(r.stdout)
    assert after["source"].startswith("checkpoint ") and "the daemon is not running" in after["source"]
    assert {row["sensor"]: row for row in after["sensors"]} == rows  # the same rows from the checkpoint

    lines = [ln for ln in d.log_text().splitlines() if ln]
    assert lines and all(ln[0] == "<" and ln[2] == ">" for ln in lines), lines[:3]
    records = [(int(ln[1]), json.loads(ln[3:])) for ln in lines]
    assert all({"ts", "level", "logger", "message"} <= set(rec) for _, rec in records)
    assert (6, "INFO") in {(p, rec["level"]) for p, rec in records}
    warnings = [rec["message"] for p, rec in records if p == 4]
    assert any(m.startswith("rejected (not_a_number): fan1") for m in warnings)
    assert "rejected (not_a_number): 2 similar messages suppressed" in warnings  # words, not a tuple
    # Times in log lines are readable, and out_of_order says what it was compared with.
    assert ("rejected (out_of_order): sensor 'fan1' reading at 2023-11-14T22:13:25Z, its last accepted "
            "reading is at 2023-11-14T22:14:59Z") in warnings


def test_status_without_daemon_or_checkpoint_says_so(tmp_path):
    (tmp_path / "c.yaml").write_text(f"checkpoint: {{directory: {tmp_path / 'none'}}}\n")
    r = cli("status", "-c", str(tmp_path / "c.yaml"))
    assert r.returncode == 1 and "no running daemon and no checkpoint" in r.stderr


# ------------------------------------------------------------------------------- pure logic

def _record(level, msg):
    return logging.LogRecord("streamlstm", level, __file__, 1, msg, (), None)


def test_journald_prefix_on_every_line_and_plain_text_without_journal():
    journal = make_formatter("text", env={"JOURNAL_STREAM": "8:1"})
    assert journal.format(_record(logging.WARNING, "a\nb")) == "<4>WARNING streamlstm: a\n<4>b"
    assert journal.format(_record(logging.DEBUG, "d")).startswith("<7>")
    assert journal.format(_record(logging.ERROR, "e")).startswith("<3>")
    plain = make_formatter("text", env={}).format(_record(logging.INFO, "x"))
    assert not plain.startswith("<") and plain.endswith(" INFO streamlstm: x")
    doc = json.loads(make_formatter("json", env={}).format(_record(logging.INFO, "x\ny")))
    assert doc["message"] == "x\ny" and doc["ts"].endswith("Z")


def test_rate_limit_summary_is_words():
    out = []

    class Log:
        def isEnabledFor(self, level):
            return True

        def log(self, level, msg, *args):
            out.append(msg % args)

    clock = [0.0]
    rl = RateLimitedLogger(Log(), 10, clock=lambda: clock[0])
    for _ in range(3):
        rl.log(("rejected", "bad_json"), logging.WARNING, "x")
    rl.log("plain", logging.WARNING, "y")
    rl.log("plain", logging.WARNING, "y")
    assert rl.flush() == 2
    assert out[-2:] == ["rejected (bad_json): 2 similar messages suppressed", "plain: 1 similar messages suppressed"]


def test_progress_without_a_terminal_prints_periodic_lines():
    stream = io.StringIO()  # not a tty
    now = [0.0]
    p = Progress(100, "replay x.csv", stream=stream, every_s=10, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 0.5  # 50 s in all: lines at 10, 20, 30, 40 s and the end
        p.update(done)
    lines = stream.getvalue().splitlines()
    assert lines == ["replay x.csv: 20/100 (20%), 10 s", "replay x.csv: 40/100 (40%), 20 s",
                     "replay x.csv: 60/100 (60%), 30 s", "replay x.csv: 80/100 (80%), 40 s",
                     "replay x.csv: 100/100 (100%), 50 s"]
    assert "\r" not in stream.getvalue()


def test_replay_reports_progress_when_stderr_is_a_pipe(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("timestamp,value\n" + "".join(f"2026-01-01 00:{i // 60:02d}:{i % 60:02d},{math.sin(i / 5):.4f}\n"
                                                  for i in range(300)))
    r = cli("replay", str(csv), "--no-plot", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "replay s.csv: 300/300 (100%)" in r.stderr


@pytest.mark.parametrize("stamps, expected", [
    (["2014-04-01 00:00:00", "2014-04-01 00:05:00"], [1396310400.0, 1396310700.0]),  # NAB
    (["2014-04-01T00:00:00.5"], [1396310400.5]),
    (["1500000000", "1500000300"], [1.5e9, 1500000300.0]),  # epoch seconds, not years
    (["2014-04-01 00:00:00", "12"], [1396310400.0, 12.0]),  # a mixed column, stamp by stamp
])
def test_read_series_reads_iso_and_epoch_stamps(tmp_path, stamps, expected):
    from streamlstm.tools.replay import read_series
    path = tmp_path / "s.csv"
    path.write_text("timestamp,value\n" + "".join(f"{s},{i}.5\n" for i, s in enumerate(stamps)))
    seconds, texts, values = read_series(path)
    assert seconds.tolist() == expected and texts == stamps
    assert values.tolist() == [[i + 0.5] for i in range(len(stamps))]


def test_read_series_names_what_it_cannot_read(tmp_path):
    from streamlstm.tools.replay import read_series
    (tmp_path / "bad_time.csv").write_text("timestamp,value\n2014-04-01 00:00:00,1\nsoon,2\n")
    with pytest.raises(ValueError, match="soon"):
        read_series(tmp_path / "bad_time.csv")
    (tmp_path / "bad_value.csv").write_text("timestamp,value\n2014-04-01 00:00:00,one\n")
    with pytest.raises(ValueError, match="one"):
        read_series(tmp_path / "bad_value.csv")
