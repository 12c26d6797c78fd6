"""`streamlstm check-config / warmup / replay / evaluate` (in-process `main()` and `python -m`)."""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import yaml

from streamlstm.cli import main

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "streamlstm.example.yaml"
START = dt.datetime(2014, 1, 1)
SPIKE = 500


def _python_m(*args, cwd=None, timeout=300):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the suite's simulator setting is not for subprocesses
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "streamlstm", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _config(tmp_path) -> pathlib.Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"hidden_size": 8, "window": 8, "optimizer": "sgd", "learning_rate": 0.02},
        "detector": {"warmup": 100, "long_window": 100, "threshold": 0.5},
        "backend": {"kind": "cpu"},  # not the CUDA simulator the suite enables for other tests
        "checkpoint": {"directory": str(tmp_path / "state")},
    }))
    return path


def _write_series(path: pathlib.Path, n=600, seed=0, spike=SPIKE):
    rng = np.random.default_rng(seed)
    values = np.sin(np.arange(n) / 5) + 0.1 * rng.normal(size=n)
    if spike is not None:
        values[spike] += 5.0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("timestamp,value\n")
        for i, v in enumerate(values):
            f.write(f"{(START + dt.timedelta(minutes=i)).strftime('%Y-%m-%d %H:%M:%S')},{v:.6f}\n")


def _window(spike=SPIKE, before=10, after=20):
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    return [(START + dt.timedelta(minutes=spike - before)).strftime(fmt),
            (START + dt.timedelta(minutes=spike + after)).strftime(fmt)]


# --------------------------------------------------------------------------------- check-config

def test_check_config_ok(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert main(["check-config", "-c", str(EXAMPLE)]) == 0


def test_check_config_error_names_the_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  window: 0\ndetector:\n  threshold: 2\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.window" in err and "detector.threshold" in err
    r = _python_m("check-config", str(bad))
    assert r.returncode == 2 and "model.window" in r.stderr and "Traceback" not in r.stderr
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2


# ---------------------------------------------------------------------------------------- warmup

def test_warmup_compiles_and_leaves_nothing_behind(tmp_path):
    config = _config(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _python_m("warmup", "-c", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "group default: kernels ready" in r.stdout and "warmup done" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no checkpoint, no state dir


def test_warmup_with_a_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dtype: float16}\n")
    r = _python_m("warmup", "-c", str(bad))
    assert r.returncode == 2 and "model.dtype" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------- replay

def test_replay_writes_rows_events_and_nab_score(tmp_path, capsys):
    csv = tmp_path / "data" / "pump.csv"
    _write_series(csv)
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"data/pump.csv": [_window()]}))
    out = tmp_path / "out"
    rc = main(["replay", str(csv), "--labels", str(labels), "--out", str(out), "-c", str(_config(tmp_path))])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = (out / "pump.replay.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["timestamp", "value", "prediction"] and len(rows) == 601
    events = [json.loads(line) for line in (out / "pump.events.jsonl").read_text().splitlines()]
    spike_epoch = (START + dt.timedelta(minutes=SPIKE) - dt.datetime(1970, 1, 1)).total_seconds()  # naive = UTC
    assert [e["start"] for e in events] == [spike_epoch]
    assert len(events) == 1 and events[0]["sensor"] == "pump"
    assert "NAB standard score" in text and "precision 1.00 recall 1.00" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "pump.png").stat().st_size > 0


def test_replay_unknown_labels_and_missing_file(tmp_path, capsys):
    csv = tmp_path / "x.csv"
    _write_series(csv, n=50, spike=None)
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"other.csv": []}))
    assert main(["replay", str(csv), "--labels", str(labels), "--out", str(tmp_path / "o"),
                 "-c", str(_config(tmp_path))]) == 1
    assert main(["replay", str(tmp_path / "nope.csv"), "-c", str(_config(tmp_path))]) == 1
    assert "cannot read" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- evaluate

def test_evaluate_scores_a_corpus(tmp_path, capsys):
    data = tmp_path / "corpus"
    _write_series(data / "a.csv", seed=1)
    _write_series(data / "b.csv", seed=2, spike=400)
    labels = tmp_path / "windows.json"
    labels.write_text(json.dumps({"a.csv": [_window()], "b.csv": [_window(400)]}))
    rc = main(["evaluate", str(data), "--labels", str(labels), "-c", str(_config(tmp_path)), "--processes", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "a.csv" in text and "b.csv" in text
    assert "NAB standard" in text and "event precision 1.00 recall 1.00" in text


def test_evaluate_empty_dir(tmp_path, capsys):
    labels = tmp_path / "windows.json"
    labels.write_text("{}")
    assert main(["evaluate", str(tmp_path), "--labels", str(labels)]) == 1
