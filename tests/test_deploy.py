"""deploy/: the systemd unit (verify + hardening gate), Prometheus rules/config, Grafana dashboard.

systemd-analyze and promtool come from apt (scripts/test.sh installs them); without them
the tool-specific tests skip.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from deploy_metrics import (
    DASHBOARD, DESIGN_MD, RULES, dashboard_expressions, deployed_metric_names,
    design_metric_names, metric_names, rule_expressions, unknown_metric_names,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "streamlstm.service"
PROM_DIR = REPO / "deploy" / "prometheus"
VENV_BIN = "/opt/streamlstm/venv/bin/streamlstm"
MAX_EXPOSURE = 2.0


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (scripts/test.sh installs it)")
    return path


def _run(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


# --- systemd unit -------------------------------------------------------------------


def _unit_settings(text):
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_required_settings():
    s = _unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "30"
    assert one["ExecStartPre"] == f"{VENV_BIN} warmup -c /etc/streamlstm/streamlstm.yaml"
    assert one["ExecStart"] == f"{VENV_BIN} run -c /etc/streamlstm/streamlstm.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "streamlstm"
    assert one["CacheDirectory"] == "streamlstm"
    assert one["ConfigurationDirectory"] == "streamlstm"
    assert "NUMBA_CACHE_DIR=/var/cache/streamlstm/numba" in s["Environment"]
    assert one["LoadCredential"] == "mqtt-password:/etc/streamlstm/mqtt-password"
    # Numba/LLVM JIT needs writable+executable memory.
    assert "MemoryDenyWriteExecute" not in s


@pytest.fixture
def unit_with_fake_binary(tmp_path):
    """The unit with ExecStart* pointing at an existing executable (verify checks that)."""
    fake = tmp_path / "venv" / "bin" / "streamlstm"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text().replace(VENV_BIN, str(fake))
    if not os.access("/bin/kill", os.X_OK):  # minimal images lack procps; every real host has it
        text = text.replace("/bin/kill ", f"{fake} ")
    unit = tmp_path / "streamlstm.service"
    unit.write_text(text)
    return unit


def test_systemd_analyze_verify(unit_with_fake_binary):
    tool = _tool("systemd-analyze")
    r = _run(tool, "verify", str(unit_with_fake_binary))
    assert r.returncode == 0, r.stdout + r.stderr
    # verify reports unknown directives/bad values as warnings but may still exit 0.
    noise = [l for l in (r.stdout + r.stderr).splitlines() if "streamlstm.service" in l]
    assert not noise, "\n".join(noise)


def test_systemd_exposure_gate():
    tool = _tool("systemd-analyze")
    r = _run(tool, "security", "--offline=true", "--no-pager", str(UNIT))
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m, out
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, out


# --- Prometheus ---------------------------------------------------------------------


def test_promtool_check_rules():
    r = _run(_tool("promtool"), "check", "rules", str(PROM_DIR / "streamlstm.rules.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    # Run from the directory: rule_files in the test file are relative to it.
    r = _run(_tool("promtool"), "test", "rules", "streamlstm.rules.test.yml", cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_rule_test():
    alerts = {name for name, _ in rule_expressions(RULES)}
    tests = yaml.safe_load((PROM_DIR / "streamlstm.rules.test.yml").read_text())["tests"]
    fired, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown not firing"


def test_prometheus_yml():
    doc = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert "streamlstm" in jobs
    targets = [t for sc in jobs["streamlstm"]["static_configs"] for t in sc["targets"]]
    assert "127.0.0.1:9107" in targets  # metrics.address/port defaults
    assert "streamlstm.rules.yml" in doc["rule_files"]


def test_promtool_check_config():
    r = _run(_tool("promtool"), "check", "config", "prometheus.yml", cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr


# --- Grafana ------------------------------------------------------------------------


def test_dashboard_structure():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "streamlstm"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance", "group"} <= names


def test_dashboard_promql_parses(tmp_path):
    """Every dashboard query, Grafana variables substituted, is valid PromQL for promtool."""
    tool = _tool("promtool")
    subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, (where, expr) in enumerate(dashboard_expressions(DASHBOARD)):
        if expr.startswith("label_values("):
            continue
        for k, v in subst.items():
            expr = expr.replace(k, v)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:check_{i}", "expr": expr})
    assert rules
    f = tmp_path / "dashboard.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run(tool, "check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


# --- metric names shared with the daemon -------------------------------------------


def test_metric_name_extraction():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, group) (rate(streamlstm_step_seconds_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"streamlstm_step_seconds"}
    assert metric_names("time() - streamlstm_last_progress_timestamp_seconds > 120") == {
        "streamlstm_last_progress_timestamp_seconds"}
    assert metric_names('up{job="streamlstm"} == 0') == {"up"}
    assert metric_names("label_values(streamlstm_build_info, job)") == {"streamlstm_build_info"}
    assert metric_names("a / ignoring(x) group_left(y) b_count offset 1h and on(z) c") == {"a", "b", "c"}


def test_design_table_parsed():
    names = design_metric_names(DESIGN_MD)
    assert "streamlstm_readings_total" in names and "streamlstm_step_seconds" in names
    assert len(names) >= 20


def test_deploy_uses_only_design_metric_names():
    assert unknown_metric_names() == {}


def test_dashboard_covers_every_design_metric():
    missing = design_metric_names() - deployed_metric_names()
    assert not missing, f"no panel/rule for {sorted(missing)}"
