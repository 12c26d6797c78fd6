"""Metric names used by deploy/ (Prometheus rules, Grafana dashboard) vs docs/design.md.

Reusable helpers (no pytest here), e.g. for a test that compares them with the daemon's
live /metrics exposition::

    from deploy_metrics import deployed_metric_names, design_metric_names
    assert deployed_metric_names() <= set(live_names)

Names are normalised like the design table: a histogram ``x`` is queried as
``x_bucket`` / ``x_sum`` / ``x_count``; those suffixes are stripped.
"""
from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Iterator

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
DESIGN_MD = REPO / "docs" / "design.md"
RULES = REPO / "deploy" / "prometheus" / "streamlstm.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "streamlstm.json"

# Series Prometheus itself creates per scrape target: allowed in queries, not in design.md.
PROMETHEUS_BUILTINS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"})

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_PROMQL_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-f]+|\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)(?![\w:])", re.I)
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*+)(?!\s*\()")  # possessive *+: "sum(" must not match as "su"
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*)\)\s*$", re.S)
_DESIGN_ROW = re.compile(r"^\|\s*`([a-zA-Z_:][a-zA-Z0-9_:]*)`\s*\|\s*([^|]*)\|")


def normalise(name: str) -> str:
    """``x_bucket`` / ``x_sum`` / ``x_count`` -> ``x`` (histogram series -> metric name)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metric_names(expr: str) -> set[str]:
    """Metric names selected by one PromQL expression (Grafana variables allowed).

    Approach: drop everything that may contain identifiers that are not metrics (strings,
    label matchers, ranges, ``by (...)``-style label lists, numbers, Grafana ``$vars``), then
    every remaining identifier not followed by ``(`` and not a keyword is a metric name.
    Grafana's ``label_values(metric, label)`` is handled specially.
    """
    m = _LABEL_VALUES.match(expr)
    if m:
        inner = m.group(1)
        # label_values(label) has no metric; label_values(selector, label): keep the selector.
        depth, split = 0, None
        for i, ch in enumerate(inner):
            depth += ch in "({["
            depth -= ch in ")}]"
            if ch == "," and depth == 0:
                split = i
        if split is None:
            return set()
        expr = inner[:split]
    s = _GRAFANA_VAR.sub(" ", expr)
    s = _STRING.sub(" ", s)
    while True:  # nested braces cannot occur in PromQL, but be safe
        t = _LABEL_MATCHERS.sub(" ", s)
        if t == s:
            break
        s = t
    s = _RANGE.sub(" ", s)
    s = _LABEL_LIST.sub(" ", s)
    s = _NUMBER.sub(" ", s)
    names = set()
    for ident in _IDENT.findall(s):
        if ident.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(normalise(ident))
    return names


def rule_expressions(path: pathlib.Path = RULES) -> Iterator[tuple[str, str]]:
    """(rule name, expr) for every alerting/recording rule in a Prometheus rules file."""
    doc = yaml.safe_load(path.read_text())
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            yield rule.get("alert") or rule.get("record"), str(rule["expr"])


def _walk(node, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "expr" and isinstance(value, str):
                yield here, value
            elif key == "query" and isinstance(value, str) and node.get("type") == "query":
                yield here, value  # templating variable (older string form)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield f"{here}.query", value["query"]  # templating variable (object form)
            else:
                yield from _walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]")


def dashboard_expressions(path: pathlib.Path = DASHBOARD) -> Iterator[tuple[str, str]]:
    """(JSON path with panel title, expr) for every panel target and templating query."""
    doc = json.loads(path.read_text())
    for i, panel in enumerate(_panels(doc.get("panels", []))):
        title = panel.get("title", f"panel {i}")
        for where, expr in _walk(panel.get("targets", []), f"panel[{title}].targets"):
            yield where, expr
    for where, expr in _walk(doc.get("templating", {}), "templating"):
        yield where, expr


def _panels(panels: Iterable[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def deployed_metric_names(rules: pathlib.Path = RULES, dashboard: pathlib.Path = DASHBOARD) -> set[str]:
    """Every metric name the rules and the dashboard query (normalised, builtins included)."""
    names: set[str] = set()
    for _, expr in list(rule_expressions(rules)) + list(dashboard_expressions(dashboard)):
        names |= metric_names(expr)
    return names


def design_metrics(path: pathlib.Path = DESIGN_MD) -> dict[str, str]:
    """name -> type column of the Metrics table in docs/design.md."""
    out = {}
    for line in path.read_text().splitlines():
        m = _DESIGN_ROW.match(line.strip())
        if m and m.group(1).startswith("streamlstm_"):
            out[m.group(1)] = m.group(2).strip()
    return out


def design_metric_names(path: pathlib.Path = DESIGN_MD) -> set[str]:
    return set(design_metrics(path))


def unknown_metric_names(rules: pathlib.Path = RULES, dashboard: pathlib.Path = DASHBOARD,
                         design: pathlib.Path = DESIGN_MD) -> dict[str, set[str]]:
    """{where: names not in design.md (nor Prometheus builtins)}; empty when all is well."""
    known = design_metric_names(design) | PROMETHEUS_BUILTINS
    bad: dict[str, set[str]] = {}
    for where, expr in [(f"rule {n}", e) for n, e in rule_expressions(rules)] + list(dashboard_expressions(dashboard)):
        unknown = metric_names(expr) - known
        if unknown:
            bad[where] = unknown
    return bad
