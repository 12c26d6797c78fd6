"""streamlstm.metrics: a real detector batch observed, served over real HTTP(S), checked by promtool."""
import base64
import logging
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from deploy_metrics import PROMETHEUS_BUILTINS, deployed_metric_names, design_metric_names, normalise
from streamlstm.backend import CpuBackend
from streamlstm.config import parse_config
from streamlstm.detector import Detector
from streamlstm.factory import build_detector
from streamlstm.reading import Reading
from streamlstm.metrics import REJECTION_REASONS, Metrics, serve

# backend cpu: under the test suite NUMBA_ENABLE_CUDASIM=1 makes "auto" pick the (slow) CUDA simulator.
SMALL = {"model": {"hidden_size": 8, "window": 8, "optimizer": "sgd", "learning_rate": 0.02},
         "detector": {"warmup": 100, "long_window": 100, "threshold": 0.5},
         "backend": {"kind": "cpu"}}
N = 300  # readings per sensor; sensor s0 gets a spike at N - 50


def _promtool():
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return tool


def _fetch(url, *, auth=None, context=None, timeout=10):
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return resp.status, resp.read().decode()


def _sample_names(text):
    """Metric names of every sample line, histogram suffixes stripped."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(normalise(line.split("{", 1)[0].split(" ", 1)[0]))
    return names


def _metrics_config(**overrides):
    return parse_config({"metrics": {"address": "127.0.0.1", "port": 0, **overrides}}).metrics


def _observed_metrics(per_sensor=True, cap=1000):
    """Metrics fed with real DetectorBatches: 3 sensors, training, a spike, a gap reset."""
    registry = CollectorRegistry()
    config = parse_config(SMALL)
    m = Metrics(registry, version="test", backend="cpu", per_sensor=per_sensor, per_sensor_cap=cap,
                silent_after_s=1e-6)
    m.init_groups(["default"])
    m.track_queue(lambda: 3, 10)
    m.track_checkpoint_age(lambda: None)
    det = build_detector(config)
    rng = np.random.default_rng(0)
    readings = []
    for t in range(N):
        for k in range(3):
            value = np.sin(t / 5) + 0.1 * rng.normal() + k + (5.0 if (k == 0 and t == N - 50) else 0.0)
            readings.append(Reading(f"s{k}", 1000.0 + t, (float(value),)))
    readings.append(Reading("s1", 5000.0, (1.0,)))  # a long gap: model reset "gap"
    readings.append(Reading("s1", 4000.0, (1.0,)))  # out_of_order
    for start in range(0, len(readings), 100):
        batch = det.process(readings[start:start + 100])
        m.observe_batch(batch, {name: 0.001 for name in batch.losses})
    m.set_sensor_counts({name: len(g.names) for name, g in det.active.items()})
    m.rejected_payload("bad_json")
    m.update_silent(force=True)
    m.progress()
    return registry, m


def test_live_exposition_passes_promtool_and_has_every_deployed_name():
    tool = _promtool()
    registry, m = _observed_metrics()
    server = serve(_metrics_config(), registry)
    try:
        status, text = _fetch(server.url)
    finally:
        server.close()
    assert status == 200
    r = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

    live = _sample_names(text)
    missing = (deployed_metric_names() - PROMETHEUS_BUILTINS) - live
    assert not missing, f"deployed dashboards/rules query metrics the daemon does not export: {missing}"
    assert design_metric_names() <= live

    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("streamlstm_readings_total", (("group", "default"),))] == 3 * N + 1
    assert samples[("streamlstm_readings_rejected_total", (("reason", "out_of_order"),))] == 1
    assert samples[("streamlstm_readings_rejected_total", (("reason", "bad_json"),))] == 1
    for reason in REJECTION_REASONS:  # exported from the start
        assert ("streamlstm_readings_rejected_total", (("reason", reason),)) in samples
    assert samples[("streamlstm_model_resets_total", (("group", "default"), ("reason", "gap")))] >= 1
    assert samples[("streamlstm_anomalies_total", (("group", "default"),))] == 1
    assert samples[("streamlstm_sensors", (("group", "default"),))] == 3
    assert samples[("streamlstm_silent_sensors", (("group", "default"),))] == 3
    assert samples[("streamlstm_queue_depth", ())] == 3
    assert samples[("streamlstm_queue_capacity", ())] == 10
    assert samples[("streamlstm_batch_size_count", ())] == 10
    assert samples[("streamlstm_build_info", (("backend", "cpu"), ("version", "test")))] == 1
    assert samples[("streamlstm_checkpoint_age_seconds", ())] >= 0
    assert samples[("streamlstm_last_progress_timestamp_seconds", ())] > 1.7e9
    scored = {dict(labels)["sensor"] for (name, labels) in samples if name == "streamlstm_sensor_anomaly_score"}
    assert scored == {"s0", "s1", "s2"}


def test_per_sensor_series_are_capped_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="streamlstm.metrics")
    registry, m = _observed_metrics(per_sensor=True, cap=2)
    text = _exposition(registry)
    for name in ("streamlstm_sensor_anomaly_score", "streamlstm_sensor_residual", "streamlstm_sensor_prediction"):
        series = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert len(series) == 2, series
    assert m.sensors_over_cap == 1
    cap_lines = [r for r in caplog.records if "per_sensor_cap" in r.getMessage()]
    assert len(cap_lines) == 1


def test_per_sensor_series_off_by_default():
    registry, _ = _observed_metrics(per_sensor=False)
    text = _exposition(registry)
    assert "streamlstm_sensor_anomaly_score{" not in text
    assert "# TYPE streamlstm_sensor_anomaly_score gauge" in text


def _exposition(registry):
    from prometheus_client import generate_latest
    return generate_latest(registry).decode()


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_and_basic_auth(tmp_path):
    cert, key = _self_signed(tmp_path)
    password = tmp_path / "metrics-password"
    password.write_text("s3cret\n")
    cfg = _metrics_config(tls_cert_file=str(cert), tls_key_file=str(key), basic_auth_user="prom",
                          basic_auth_password_file=str(password))
    registry, _ = _observed_metrics(per_sensor=False)
    server = serve(cfg, registry)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        status, text = _fetch(server.url, auth=("prom", "s3cret"), context=ctx)
        assert status == 200 and "streamlstm_readings_total" in text
        for auth in (None, ("prom", "wrong"), ("other", "s3cret")):
            with pytest.raises(urllib.error.HTTPError) as err:
                _fetch(server.url, auth=auth, context=ctx)
            assert err.value.code == 401
            assert "Basic" in err.value.headers.get("WWW-Authenticate", "")
        # Plain HTTP to the TLS port gets no metrics.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _fetch(server.url.replace("https://", "http://"), auth=("prom", "s3cret"))
    finally:
        server.close()


def test_close_releases_the_port():
    registry = CollectorRegistry()
    Metrics(registry)
    server = serve(_metrics_config(), registry)
    port = server.port
    assert _fetch(server.url)[0] == 200
    server.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again


def test_registries_are_independent():
    # No global registry: two daemons (or tests) in one process do not collide.
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).readings.labels("g").inc()
    Metrics(b)
    assert a.get_sample_value("streamlstm_readings_total", {"group": "g"}) == 1
    assert b.get_sample_value("streamlstm_readings_total", {"group": "g"}) is None


def test_build_info_reports_the_backend_that_runs():
    # What `auto` reports once it has moved a group's bank to the GPU (AutoBackend.name).
    class MovedToCuda(CpuBackend):
        name = "cuda"

    registry = CollectorRegistry()
    m = Metrics(registry, version="test", backend="cpu")
    groups = parse_config({"groups": [{"name": "big", "match": "big*"}, {"name": "rest", "match": "*"}]}).groups
    det = Detector(groups, lambda name: MovedToCuda() if name == "big" else CpuBackend())

    def label():
        return [s.labels["backend"] for f in registry.collect() if f.name == "streamlstm_build_info" for s in f.samples]

    m.observe_batch(det.process([Reading("other", 1.0, (1.0,))]))
    assert label() == ["cpu"]
    m.observe_batch(det.process([Reading("big1", 1.0, (1.0,))]))
    assert label() == ["cpu+cuda"]
    m.init_groups(["big"])  # a reload without group "rest"
    m.observe_batch(det.process([Reading("big1", 2.0, (1.0,))]))
    assert label() == ["cuda"]
