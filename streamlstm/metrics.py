"""Prometheus metrics of the daemon (names: docs/design.md), on a registry passed in.

`Metrics(registry, ...)` creates every metric of the design table; the daemon feeds it with
`observe_batch` after each micro-batch and a few setters. `serve(config.metrics, registry)`
starts the /metrics HTTP(S) endpoint and returns a handle with `.close()` and `.port`.

Per-sensor gauges (score, residual, prediction) are opt-in and capped: the first
`per_sensor_cap` sensors get series, later ones are not exported and reported once in the log
(series are never dropped: Prometheus would see them vanish and reappear).
"""
from __future__ import annotations

import base64
import hmac
import logging
import math
import socket
import ssl
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import make_wsgi_app

from .config import ConfigError, read_secret
from .connguard import ConnectionGuard
from .ratelimit import RateLimitedLogger
from .reasons import CODES, REJECTION_REASONS

__all__ = ["Metrics", "MetricsServer", "REJECTION_REASONS", "serve"]

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)
SILENT_EVERY_S = 5.0  # recount silent sensors at most this often (O(sensors) per recount)


class Metrics:
    """Every streamlstm metric, registered on `registry`. Thread-safe like prometheus_client."""

    def __init__(self, registry, *, version: str = "unknown", backend: str = "unknown",
                 per_sensor: bool = False, per_sensor_cap: int = 1000, silent_after_s: float = 300.0,
                 monotonic: Callable[[], float] = time.monotonic):
        r = registry
        self.build_info = Gauge("streamlstm_build_info", "Build information (always 1).",
                                ["version", "backend"], registry=r)
        self.build_info.labels(version, backend).set(1)
        self._version, self._backend = version, backend
        self._group_backends: dict = {}  # group -> backend that last ran it (auto moves groups to CUDA)
        self.readings = Counter("streamlstm_readings_total", "Readings accepted by the detector.",
                                ["group"], registry=r)
        self.rejected = Counter("streamlstm_readings_rejected_total", "Readings or payloads rejected, by reason.",
                                ["reason"], registry=r)
        self.anomalies = Counter("streamlstm_anomalies_total", "Anomaly incidents opened (one per incident).",
                                 ["group"], registry=r)
        self.step_seconds = Histogram("streamlstm_step_seconds", "Model kernel time of one micro-batch, per group.",
                                      ["group"], buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("streamlstm_batch_size", "Readings per micro-batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("streamlstm_queue_depth", "Readings waiting in the input queue.", registry=r)
        self.queue_capacity = Gauge("streamlstm_queue_capacity", "Capacity of the input queue (readings).",
                                    registry=r)
        self.mqtt_connected = Gauge("streamlstm_mqtt_connected", "1 while connected to the MQTT broker.",
                                    registry=r)
        self.mqtt_reconnects = Counter("streamlstm_mqtt_reconnects_total", "Successful MQTT reconnections.",
                                       registry=r)
        self.events_published = Counter("streamlstm_events_published_total", "Anomaly/resolved events published.",
                                        registry=r)
        self.publish_failures = Counter("streamlstm_publish_failures_total",
                                        "MQTT publishes refused or lost (not connected for QoS 0, queue full, "
                                        "broker error).", registry=r)
        self.model_loss = Gauge("streamlstm_model_loss", "Mean training loss of the last micro-batch (scaled units).",
                                ["group"], registry=r)
        self.model_resets = Counter("streamlstm_model_resets_total", "Per-sensor model state resets.",
                                    ["group", "reason"], registry=r)
        self.sensors = Gauge("streamlstm_sensors", "Sensors known to the detector.", ["group"], registry=r)
        self.silent_sensors = Gauge("streamlstm_silent_sensors", "Sensors with no reading for metrics.silent_after_s.",
                                    ["group"], registry=r)
        self.checkpoint_age = Gauge("streamlstm_checkpoint_age_seconds",
                                    "Seconds since the last successful checkpoint (since start if none).", registry=r)
        self.checkpoint_errors = Counter("streamlstm_checkpoint_errors_total", "Failed checkpoint saves or loads.",
                                         registry=r)
        self.last_progress = Gauge("streamlstm_last_progress_timestamp_seconds",
                                   "Unix time of the worker loop's last iteration.", registry=r)
        self.sensor_score = Gauge("streamlstm_sensor_anomaly_score", "Last anomaly score of a sensor (opt-in).",
                                  ["group", "sensor"], registry=r)
        self.sensor_residual = Gauge("streamlstm_sensor_residual",
                                     "Last residual of a sensor, first predicted feature (opt-in).",
                                     ["group", "sensor"], registry=r)
        self.sensor_prediction = Gauge("streamlstm_sensor_prediction",
                                       "Last prediction of a sensor, first predicted feature (opt-in).",
                                       ["group", "sensor"], registry=r)
        self.http_connections = Gauge("streamlstm_metrics_connections",
                                      "Open connections to this /metrics endpoint (capped).", registry=r)
        self.http_dropped = Counter("streamlstm_metrics_connections_dropped_total",
                                    "/metrics connections closed by the server: over_cap (the oldest, when "
                                    "metrics.max_connections are open) or timeout (metrics.request_timeout_s).",
                                    ["reason"], registry=r)
        for reason in ("over_cap", "timeout"):
            self.http_dropped.labels(reason)
        for reason in REJECTION_REASONS:  # all exported from the start (0): rate() works from the first scrape
            self.rejected.labels(reason)
        self.per_sensor = per_sensor
        self.per_sensor_cap = per_sensor_cap
        self.silent_after_s = silent_after_s
        self._monotonic = monotonic
        self._children: dict = {}  # (group, sensor) -> (score, residual, prediction) gauge children
        self._over_cap: set = set()
        self._cap_logged = False
        self._last_seen: dict = {}  # group -> {sensor: monotonic time of its last accepted reading}
        self._silent_at = -math.inf
        self._start = monotonic()

    # --- set-up ------------------------------------------------------------------------

    def init_groups(self, groups) -> None:
        """Export the group-labelled series at 0 before the first reading."""
        groups = list(groups)
        self._group_backends = {g: b for g, b in self._group_backends.items() if g in groups}  # reload
        for g in groups:
            self.readings.labels(g)
            self.anomalies.labels(g)
            self.sensors.labels(g)
            self.silent_sensors.labels(g)
            self._last_seen.setdefault(g, {})

    def track_queue(self, depth: Callable[[], float], capacity: int) -> None:
        self.queue_depth.set_function(depth)
        self.queue_capacity.set(capacity)

    def track_checkpoint_age(self, age: Callable[[], Optional[float]]) -> None:
        """`age()`: seconds since the last good checkpoint, or None for none yet (then: since start)."""
        def value():
            a = age()
            return self._monotonic() - self._start if a is None else a
        self.checkpoint_age.set_function(value)

    # --- per batch ---------------------------------------------------------------------

    def observe_batch(self, batch, step_seconds: Optional[dict] = None) -> None:
        """Count one `DetectorBatch` (see detector.py); `step_seconds`: {group: kernel seconds},
        by default the batch's own."""
        self._note_backends(batch.backends)
        if step_seconds is None:
            step_seconds = batch.step_seconds
        self.batch_size.observe(len(batch))
        for group, seconds in step_seconds.items():
            self.step_seconds.labels(group).observe(seconds)
        now = self._monotonic()
        code = batch.code
        # Counted with array operations: no Python step per reading.
        accepted = np.bincount(batch.group[code == 0], minlength=len(batch.group_names))
        for g in np.flatnonzero(accepted).tolist():
            self.readings.labels(batch.group_names[g]).inc(int(accepted[g]))
        rejected = np.bincount(code, minlength=len(CODES))
        for c in np.flatnonzero(rejected[1:]).tolist():
            self.rejected.labels(CODES[c + 1]).inc(int(rejected[c + 1]))
        sensors, rows = batch.accepted()
        if len(rows):
            names = list(map(batch.names.__getitem__, sensors.tolist()))
            groups = batch.group[rows]
            for g in np.unique(groups).tolist():
                mine = np.flatnonzero(groups == g).tolist()
                group = batch.group_names[g]
                seen = self._last_seen.get(group)
                if seen is None:
                    seen = self._last_seen[group] = {}
                seen.update(dict.fromkeys(map(names.__getitem__, mine), now))
            if self.per_sensor:  # the gauges keep a sensor's last accepted reading of the batch
                for sensor, group, i in zip(names, groups.tolist(), rows.tolist()):
                    self._observe_sensor(batch.group_names[group], sensor, batch, i)
        for kind, incident in batch.events:
            if kind == "anomaly":
                self.anomalies.labels(incident.group).inc()
        for group, sensor, reason in batch.resets:
            self.model_resets.labels(group, reason).inc()
        for group, loss in batch.losses.items():
            if loss == loss:  # NaN: no training step ran in this batch
                self.model_loss.labels(group).set(loss)

    def _note_backends(self, backends: dict) -> None:
        """build_info{backend} says what runs: e.g. "cuda" once `auto` moved every group there,
        "cpu+cuda" while only some are."""
        self._group_backends.update(backends)
        label = "+".join(sorted(set(self._group_backends.values()))) or self._backend
        if label != self._backend:
            self.build_info.remove(self._version, self._backend)
            self.build_info.labels(self._version, label).set(1)
            self._backend = label

    def _observe_sensor(self, group, sensor, batch, i) -> None:
        key = (group, sensor)
        children = self._children.get(key)
        if children is None:
            if key in self._over_cap:
                return
            if len(self._children) >= self.per_sensor_cap:
                self._note_over_cap(key)
                return
            children = (self.sensor_score.labels(group, sensor), self.sensor_residual.labels(group, sensor),
                        self.sensor_prediction.labels(group, sensor))
            self._children[key] = children
        score, residual, prediction = children
        score.set(float(batch.score[i]))
        residual.set(float(batch.residual[i, 0]))
        prediction.set(float(batch.prediction[i, 0]))

    def _note_over_cap(self, key) -> None:
        # The set is bounded by pipeline.max_sensors: the detector refuses sensors beyond it.
        self._over_cap.add(key)
        if not self._cap_logged:
            self._cap_logged = True
            log.warning("per-sensor metrics: cap metrics.per_sensor_cap=%d reached; sensor %r and later new "
                        "sensors get no per-sensor series", self.per_sensor_cap, key[1])

    @property
    def sensors_over_cap(self) -> int:
        """Sensors seen so far that got no per-sensor series because of the cap."""
        return len(self._over_cap)

    # --- other updates -----------------------------------------------------------------

    def rejected_payload(self, reason: str, count: int = 1) -> None:
        self.rejected.labels(reason).inc(count)

    def set_sensor_counts(self, counts: dict) -> None:
        for group, n in counts.items():
            self.sensors.labels(group).set(n)

    def update_silent(self, force: bool = False) -> None:
        """Recount silent sensors per group (cheap enough every few seconds)."""
        now = self._monotonic()
        if not force and now - self._silent_at < SILENT_EVERY_S:
            return
        self._silent_at = now
        limit = now - self.silent_after_s
        for group, seen in list(self._last_seen.items()):
            self.silent_sensors.labels(group).set(sum(1 for t in list(seen.values()) if t < limit))

    def forget_sensors(self, keep: Callable[[str, str], bool]) -> None:
        """Drop silence bookkeeping of sensors the detector no longer has (after a reload)."""
        for group, seen in list(self._last_seen.items()):
            for sensor in [s for s in seen if not keep(group, s)]:
                del seen[sensor]

    def progress(self, unix_time: Optional[float] = None) -> None:
        self.last_progress.set(time.time() if unix_time is None else unix_time)


# ----------------------------------------------------------------------------------- HTTP server

class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature from BaseHTTPRequestHandler
        pass  # scrapes every 15 s would flood the journal


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper must not hold up shutdown
    request_queue_size = 128  # listen backlog (socketserver's default of 5 drops connects under load)
    request_timeout_s = 10.0
    ssl_context: Optional[ssl.SSLContext] = None
    guard: Optional[ConnectionGuard] = None  # connection cap and deadline (connguard.py)

    def process_request(self, request, client_address):
        self.guard.register(request)
        super().process_request(request, client_address)

    def service_actions(self):
        self.guard.reap()  # serve_forever calls this every poll interval

    def shutdown_request(self, request):
        self.guard.unregister(request)  # before the socket is closed (see connguard.py)
        super().shutdown_request(request)

    def finish_request(self, request, client_address):
        fd = request.fileno()
        request.settimeout(self.request_timeout_s)
        try:
            if self.ssl_context is None:
                return super().finish_request(request, client_address)
            # Handshake here, in the per-request thread: wrapping the listening socket would do it in
            # the accept loop, where one slow client blocks every scrape.
            try:
                tls = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.debug("metrics: TLS handshake with %s failed: %s", client_address, exc)
                return
            try:
                super().finish_request(tls, client_address)
            finally:
                self.guard.unregister(fd)  # wrap_socket detached `request`: by descriptor
                try:
                    tls.close()
                except OSError:
                    pass
        finally:
            self.guard.unregister(fd)

    def handle_error(self, request, client_address):
        log.debug("metrics: error serving %s", client_address, exc_info=True)


def _basic_auth(app, user: str, password: str):
    expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8"))

    def guarded(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="streamlstm"'),
                                            ("Content-Type", "text/plain")])
        return [b"401 Unauthorized\n"]

    return guarded


class MetricsServer:
    """Handle of a running /metrics endpoint."""

    def __init__(self, httpd: _Server, thread: threading.Thread, scheme: str):
        self._httpd = httpd
        self._thread = thread
        self.address = httpd.server_address[0]
        self.port = httpd.server_address[1]
        self.scheme = scheme

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


def _ssl_context(cfg) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cfg.tls_cert_file, keyfile=cfg.tls_key_file)
    except FileNotFoundError as exc:
        key = "metrics.tls_cert_file" if exc.filename == cfg.tls_cert_file else "metrics.tls_key_file"
        raise ConfigError(key, f"cannot read {exc.filename!r}: {exc.strerror}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("metrics.tls_cert_file",
                          f"cannot load certificate {cfg.tls_cert_file!r} / key {cfg.tls_key_file!r}: {exc}") from None
    return ctx


def serve(cfg, registry, metrics: Optional[Metrics] = None) -> MetricsServer:
    """Serve `registry` on `cfg.address:cfg.port` (a `MetricsConfig`; paths already expanded).

    TLS when `tls_cert_file`/`tls_key_file` are set, basic auth when `basic_auth_user` is. At
    most `cfg.max_connections` connections, each closed after `cfg.request_timeout_s`; with
    `metrics`, the open connections and the dropped ones are exported.
    Raises ConfigError for unusable TLS/auth files, OSError when the port cannot be bound.
    """
    app = make_wsgi_app(registry)
    if cfg.basic_auth_user is not None:
        password = read_secret(cfg.basic_auth_password_file, "metrics.basic_auth_password_file")
        app = _basic_auth(app, cfg.basic_auth_user, password)
    ctx = _ssl_context(cfg) if cfg.tls_cert_file is not None else None

    family = socket.getaddrinfo(cfg.address, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    timeout = float(cfg.request_timeout_s)
    rlog = RateLimitedLogger(log, 60.0)
    why = {"over_cap": f"more than metrics.max_connections={cfg.max_connections} open",
           "timeout": f"open longer than metrics.request_timeout_s={timeout:g}"}

    def on_drop(reason: str) -> None:
        if metrics is not None:
            metrics.http_dropped.labels(reason).inc()
        rlog.log(("metrics-http", reason), logging.WARNING, "metrics: closed a connection (%s): %s (a slow or "
                 "hostile client?)", reason, why[reason])

    on_count = metrics.http_connections.set if metrics is not None else None

    class Server(_Server):
        address_family = family
        ssl_context = ctx
        request_timeout_s = timeout
        guard = ConnectionGuard(cfg.max_connections, timeout, on_drop=on_drop, on_count=on_count)

    httpd = make_server(cfg.address, cfg.port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                              name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread, "https" if ctx else "http")

