"""`streamlstm warmup` fills exactly the cache the daemon then loads: after it, the daemon's own
start-up warm-up (warm_kernels, in a new process) compiles nothing and finds the compiled
pass's entry points in Numba's cache."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(600)  # a cold cache compiles for a minute or so

# What the daemon does before READY (daemon.py: warm_kernels(config)), with every Numba compile
# recorded (a load from the on-disk cache is no compile).
PROBE = """
import json
from numba.core import event
from streamlstm.config import parse_config
from streamlstm.detector import compiled
from streamlstm.warmup import warm_kernels

compiles = []

class Compiles(event.Listener):
    def on_start(self, ev):
        compiles.append(ev.data["dispatcher"].py_func.__qualname__)

    def on_end(self, ev):
        pass

with event.install_listener("numba:compile", Compiles()):
    warm_kernels(parse_config(None))
hits = {name: sum(getattr(compiled, name).stats.cache_hits.values()) for name in ("walk", "segment_update")}
print(json.dumps({"compiles": compiles, "hits": hits}))
"""


def _run(args):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the daemon's setting, not the suite's simulator
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=540)


def test_the_daemon_start_after_warmup_compiles_nothing():
    r = _run(["-m", "streamlstm", "warmup"])  # default configuration
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(["-c", PROBE])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["compiles"] == []
    assert report["hits"]["walk"] >= 1 and report["hits"]["segment_update"] >= 1
