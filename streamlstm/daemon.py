"""The daemon pipeline: MQTT in -> bounded queue -> micro-batches -> detector -> events out.

Threads

* paho's network thread (`mqtt_io`): parses each message (`PayloadParser`, never raises),
  counts rejected payloads, and puts ``(chunk, ack token)`` entries into `ReadingQueue` (a chunk:
  the message's readings as arrays, reading.Chunk).
* worker (the only thread that touches the detector): takes up to ``pipeline.max_batch``
  readings, waiting at most ``pipeline.max_delay_ms`` for a batch to fill, joins their chunks
  into columns (`reading.concat`), makes one `Detector.process` call, hands the batch to `BatchOutput` (metrics, logs, events, state,
  Home Assistant discovery), acks, pings the watchdog, takes checkpoint snapshots and applies
  reloads (`reload_policy`) between batches.
* checkpoint writer (`Checkpointer`): writes the snapshots the worker hands over (a slow disk
  does not stall the worker); the final checkpoint at shutdown is written by the main thread.
* main: start-up, signals (SIGTERM/SIGINT stop, SIGHUP reload), shutdown.

`source: kafka` (kafka_source.py): a `KafkaSource` takes the queue's place and the worker polls
it itself, so the consumer group's rebalance callbacks run between two batches and move
per-partition state (partition_state.py); records go through the same `_on_message`, tokens are
(partition, offset), MQTT carries the output only. docs/scaling.md.

Backpressure and acks: the queue holds ``pipeline.queue_size`` readings (a payload without
readings counts one), plus at most the one message read when it was last below that. While it is full the network thread reads no packet (`MqttIO` read gate): TCP flow
control and the MQTT 5 Receive Maximum stop the broker, which keeps the rest queued in our
persistent session, while the thread goes on sending acks and keepalive pings. (It used to
block inside the message callback instead: no acks and no pings left then, and a burst cost
the session when the keepalive lapsed; issue 12.)

A message is acknowledged only after all of its readings went through the detector: its
token rides on its chunk (on the last part when a batch boundary splits it; on a marker entry
when it had no readings, e.g. a rejected payload), and the FIFO order makes every earlier
entry done by then. Acks therefore leave in
the order the messages arrived. Delivery is at-least-once: after a crash or a reconnect the
broker redelivers what was not acked yet (readings with a timestamp are then rejected as
``duplicate_timestamp``).
"""
from __future__ import annotations

import dataclasses
import faulthandler
import logging
import math
import signal
import threading
import time
from functools import partial
from operator import is_not, itemgetter
from typing import Optional

from prometheus_client import CollectorRegistry

from .backend import BackendUnavailable, make_backend
from .batch_output import BatchOutput
from .checkpoint import CheckpointError, CheckpointStore
from .checkpointer import Checkpointer
from .config import ConfigError, load_config
from .errors import EXIT_FAILURE, EXIT_OK, config_error
from .factory import build_detector
from .homeassistant import BIRTH_ONLINE, birth_topic, state_topic
from .logfmt import configure_logging
from .metrics import Metrics, serve
from .mqtt_io import MqttIO
from .payload import ParseResult, PayloadParser
from .preflight import preflight
from .ratelimit import RateLimitedLogger
from .reading import concat
from .reading_queue import ReadingQueue
from .reload_policy import ReloadRefused, check_shapes, keep_restart_only, restart_only_changes
from .restore import MOVED_ASIDE, RESTORED, checkpoint_meta, restore_detector
from .runtime_config import expand_paths, input_specs
from .sdnotify import SdNotifier
from .status import detector_rows
from .version import package_version
from .warmup import warm_kernels

__all__ = ["Daemon", "ReloadRefused", "run"]

log = logging.getLogger("streamlstm")

DRAIN_TIMEOUT_S = 60.0        # SIGTERM: longest drain before the final checkpoint (TimeoutStopSec=120)
IDLE_WAKE_S = 0.5             # worker wakes at least this often (watchdog, checkpoints, reloads)
STATUS_EVERY_S = 30.0         # STATUS= line for `systemctl status`
STATUS_FILE_EVERY_S = 5.0     # status.json for `streamlstm status` (status.py) ...
STATUS_FILE_SENSORS_PER_S = 2000  # ... but less often with many sensors (100k: every 50 s)
RELOAD_TIMEOUT_S = 120.0

_ITEM, _TOKEN = itemgetter(0), itemgetter(1)  # of a queue entry (chunk or None, ack token or None)
_not_none = partial(is_not, None)  # C-level, as the getters: no Python call per message


# ----------------------------------------------------------------------------------------- daemon

@dataclasses.dataclass
class _Reload:
    config: object
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: Optional[str] = None


class Daemon:
    """One running pipeline. `run()` blocks until stopped and returns the exit status."""

    def __init__(self, config, config_path: Optional[str] = None, *, notifier=None, registry=None):
        self.config = config
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else SdNotifier()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rlog = RateLimitedLogger(log, config.logging.rejected_log_interval_s)
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._fatal: Optional[str] = None
        self._reload: Optional[_Reload] = None
        self.metrics = None
        self.metrics_server = None
        self.mqtt = None
        self.detector = None
        self.queue = ReadingQueue(config.pipeline.queue_size)  # source: kafka replaces it (_setup_kafka)
        self._ack = None  # the source's ack: MqttIO.ack or KafkaSource.ack
        self.partitions = None  # source: kafka: the owned partitions' state (partition_state.py)
        # Readings without a timestamp get the arrival time; from Kafka, their record's timestamp.
        self._reading_clock = time.time
        if config.source == "kafka":
            from .kafka_source import RecordClock
            self._reading_clock = RecordClock()
        self.parser = PayloadParser(input_specs(config), clock=self._reading_clock)
        self.store = CheckpointStore(config.checkpoint.directory)
        self.checkpointer: Optional[Checkpointer] = None
        self.output: Optional[BatchOutput] = None
        self._worker: Optional[threading.Thread] = None
        self._counts = (0, 0)  # (sensors, active groups), written by the worker for status lines
        self._backend_name = "unknown"
        self.processed = 0
        self._last_scores: dict = {}  # sensor -> score of its last accepted reading (worker only)

    # --- signals (main thread) -------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_args) -> None:
        self._reload_requested.set()
        self._wake.set()

    # --- start-up --------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        b = cfg.backend
        backend_name = make_backend(b.kind, b.parallel_min_batch, b.cuda_min_batch).name
        m = cfg.metrics
        self.metrics = Metrics(self.registry, version=package_version(), backend=backend_name,
                               per_sensor=m.per_sensor, per_sensor_cap=m.per_sensor_cap,
                               silent_after_s=m.silent_after_s)
        self.checkpointer = Checkpointer(self.store, self._snapshot, self.metrics, self.rlog)
        self.metrics.init_groups([g.name for g in cfg.groups])
        if cfg.source == "kafka":
            self._setup_kafka()
        self.metrics.track_queue(lambda: len(self.queue), self.queue.capacity)
        self.metrics.track_checkpoint_age(self.checkpointer.age if self.partitions is None else self.partitions.age)
        # Before anything slow: secrets and TLS files are checked here (ConfigError -> exit 2).
        mqtt_cfg = cfg.mqtt
        if self.partitions is not None:  # output only, one client per worker (same id: they would evict each other)
            mqtt_cfg = dataclasses.replace(cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-{self.partitions.worker}",
                                           session_expiry_s=0)
        self.mqtt = MqttIO(mqtt_cfg, cfg.output.status_topic, self._subscriptions(self.parser), self._on_message,
                           metrics=self.metrics, receive_maximum=cfg.pipeline.queue_size,
                           read_gate=self.queue.wait_for_room if self.partitions is None else None,
                           log_interval_s=cfg.logging.rejected_log_interval_s, on_connected=self._on_connected)
        self.output = BatchOutput(cfg, self.mqtt, self.metrics, self.rlog)
        self._ack = self._ack or self.mqtt.ack
        if cfg.output.homeassistant.enabled and cfg.output.state_topic is None:
            log.info("Home Assistant discovery: per-sensor state on %s", state_topic(cfg.output))
        if m.enabled:
            self.metrics_server = serve(m, self.registry, self.metrics)
            log.info("metrics on %s", self.metrics_server.url)

        self.notifier.status("loading models")
        if self.partitions is not None:  # state comes with the partitions the group assigns
            self.detector, outcome = build_detector(cfg), None
        else:
            self.detector, outcome = restore_detector(cfg, self.store, build_detector)
        if outcome == MOVED_ASIDE:
            self.metrics.checkpoint_errors.inc()
        if self.partitions is not None:
            log.info("source kafka: topic %s, group %s, snapshots in %s", cfg.kafka.topic, cfg.kafka.group_id,
                     self.partitions.store.root)
        elif outcome == RESTORED:
            age = self.store.age_seconds()
            self.checkpointer.last_unix = None if age is None else time.time() - age
            log.info("checkpoint %s loaded: %d sensors", self.store.path, self.detector.sensor_count())
        else:
            log.info("no usable checkpoint in %s: starting with fresh models", self.store.directory)
        self._sync_sensor_gauges()
        self._backend_name = backend_name
        self.output.announced(n for g in self.detector.active.values() for n in g.names)

    def _setup_kafka(self) -> None:
        """source: kafka: a consumer-group member polled by the worker stands where the MQTT
        queue stands; MQTT carries the output only."""
        from .kafka_source import KafkaSource
        from .partition_state import PartitionStates, SnapshotStore

        cfg = self.config
        store = SnapshotStore(cfg.kafka.snapshot_directory, cfg.kafka.topic)
        self.partitions = PartitionStates(store, lambda: self.detector, lambda: self.config,
                                          interval_s=cfg.checkpoint.interval_s, metrics=self.metrics)
        self.queue = KafkaSource(cfg, self.partitions, self._on_message, self._reading_clock,
                                 metrics=self.metrics, rlog=self.rlog)
        self._ack = self.queue.ack

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or `request_stop`), shut down. Exit status."""
        try:
            self._setup()
        except CheckpointError as exc:
            log.error("cannot read the checkpoint: %s", exc)
            return EXIT_FAILURE
        # Connect while the kernels load: early messages wait in the bounded queue (backpressure)
        # until the worker starts; READY needs both.
        self.mqtt.start()
        self.notifier.status("loading kernels")
        t0 = time.perf_counter()
        warm_kernels(self.config)
        log.info("kernels ready in %.1f s (backend %s)", time.perf_counter() - t0, self._backend_name)
        self._worker = threading.Thread(target=self._worker_main, name="worker", daemon=True)
        self._worker.start()
        self.notifier.status(f"connecting to MQTT broker {self.config.mqtt.host}:{self.config.mqtt.port}")
        t0 = time.monotonic()
        while not self._stop.is_set() and not self.mqtt.wait_subscribed(0.2):
            if time.monotonic() - t0 > 10:
                self.notifier.status(f"waiting for MQTT broker {self.config.mqtt.host}:{self.config.mqtt.port}")
                t0 = time.monotonic()
        if not self._stop.is_set():
            self.notifier.ready(self._status_text())
            log.info("ready")
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._fatal is not None:
                break
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._do_reload()
        return self._shutdown()

    def _status_text(self) -> str:
        sensors, groups = self._counts
        return f"running: {sensors} sensors in {groups} groups, {self.processed} readings processed"

    # --- network thread ---------------------------------------------------------------------

    def _subscriptions(self, parser) -> tuple:
        if self.config.source == "kafka":
            return ()  # readings come from Kafka; MQTT carries the output
        subs = parser.subscriptions
        if self.config.output.homeassistant.enabled:
            subs = subs + (birth_topic(self.config.output),)
        return subs

    def _on_connected(self) -> None:
        """Network thread, after each (re)connect: a broker without persistence lost our retained
        discovery messages."""
        self.output.announce_all("connected")

    def _on_message(self, topic, payload, token) -> None:
        if (topic is not None and self.config.output.homeassistant.enabled
                and topic == birth_topic(self.config.output)):
            # Home Assistant (re)started: it forgot the entities, announce them again.
            if bytes(payload).strip() == BIRTH_ONLINE:
                self.output.announce_all("Home Assistant birth message")
            if token is not None:
                self.queue.put([(None, token)])  # acked in turn: PUBACKs keep the arrival order
            return
        if topic is None:
            result = ParseResult([], [("unknown_topic", "topic is not UTF-8")])
        else:
            result = self.parser.parse(topic, payload)
        for reason, detail in result.rejected:
            self.metrics.rejected_payload(reason)
            # An offline Home Assistant entity is routine, not a malformed payload: counted, DEBUG.
            level = logging.DEBUG if reason == "unavailable" else logging.WARNING
            self.rlog.log(("rejected", reason), level, "rejected (%s): %s", reason, detail)
        chunks = result.chunks
        if len(chunks) == 1:  # a message's readings are one chunk (one width per input)
            entries = [(chunks[0], token)]
        elif chunks:
            entries = [(c, None) for c in chunks[:-1]]
            entries.append((chunks[-1], token))
        elif token is not None:
            entries = [(None, token)]  # nothing to process: acked in turn, after earlier messages
        else:
            return
        # Never wait here: MqttIO reads no message while the queue is full (read_gate), so this
        # one message may take it over capacity, once.
        self.queue.put(entries, block=False)

    # --- worker -----------------------------------------------------------------------------

    def _worker_main(self) -> None:
        try:
            self._worker_loop()
        except BaseException as exc:  # noqa: BLE001 - report and let main exit non-zero
            log.critical("worker failed: %s", exc, exc_info=True)
            self._fatal = f"worker failed: {exc}"
            self._wake.set()

    def _worker_loop(self) -> None:
        wd = self.notifier.watchdog_interval_s()
        ping_every = wd / 4 if wd else None
        idle = min(IDLE_WAKE_S, ping_every) if ping_every else IDLE_WAKE_S
        last_ping = -math.inf
        next_ckpt = time.monotonic() + self.config.checkpoint.interval_s
        next_status = time.monotonic() + STATUS_EVERY_S
        next_status_file = time.monotonic()
        drain_deadline = None
        while True:
            req = self._reload
            if req is not None:
                self._reload = None
                self._apply_reload(req)
            p = self.config.pipeline
            entries = self.queue.get_batch(p.max_batch, p.max_delay_ms / 1000.0, idle)
            if entries:
                self._handle(entries)
            now = time.monotonic()
            self.metrics.progress()
            self.metrics.update_silent()
            if ping_every is not None and now - last_ping >= ping_every:
                self.notifier.watchdog()  # only from here: a stuck worker stops the pings
                last_ping = now
            if now >= next_ckpt and self.partitions is None:  # kafka: KafkaSource snapshots per partition
                self.checkpointer.save_async()
                next_ckpt = now + self.config.checkpoint.interval_s
            if now >= next_status_file and not self.queue.closed:
                self.checkpointer.status_async(lambda: detector_rows(self.detector, self._last_scores))
                next_status_file = now + max(STATUS_FILE_EVERY_S, self._counts[0] / STATUS_FILE_SENSORS_PER_S)
            if now >= next_status and not self.queue.closed:
                self.notifier.status(f"{self._status_text()}, queue {len(self.queue)}/{self.queue.capacity}")
                next_status = now + STATUS_EVERY_S
            if self.queue.closed:
                if drain_deadline is None:
                    drain_deadline = now + DRAIN_TIMEOUT_S
                if not len(self.queue):
                    break
                if now > drain_deadline:
                    log.warning("drain timeout: %d queued readings left unacknowledged (redelivered on "
                                "the next start)", len(self.queue))
                    break

    def _handle(self, entries: list) -> None:
        chunks = list(filter(_not_none, map(_ITEM, entries)))  # markers (None) carry only a token
        if chunks:
            columns = concat(chunks)
            try:
                self._process(columns)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the daemon
                self.rlog.log("process", logging.ERROR, "processing a batch of %d readings failed: %s: %s",
                              len(columns), type(exc).__name__, exc)
                log.debug("traceback", exc_info=True)
        for token in filter(_not_none, map(_TOKEN, entries)):
            self._ack(token)

    def _process(self, columns) -> None:
        batch = self.detector.process(columns)
        self.processed += len(batch)
        self._last_scores.update(batch.last_scores())
        self._sync_sensor_gauges()
        self.output.handle(batch, self.detector)

    def _sync_sensor_gauges(self) -> None:
        counts = {name: len(g.names) for name, g in self.detector.active.items()}
        self.metrics.set_sensor_counts(counts)
        self._counts = (sum(counts.values()), len(counts))

    # --- checkpoints ----------------------------------------------------------------------

    def _snapshot(self):
        arrays, meta = self.detector.state_dict()  # copies: the worker may go on at once
        return arrays, checkpoint_meta(self.config, meta, dict(self._last_scores))

    # --- reload -----------------------------------------------------------------------------

    def _do_reload(self) -> None:
        """SIGHUP (main thread): re-read the config and apply what can change at runtime."""
        self.notifier.reloading()
        old = self.config
        try:
            new = expand_paths(load_config(self.config_path))
        except ConfigError as exc:
            log.error("reload: configuration %s has errors, keeping the running one:\n%s", self.config_path, exc)
            self.notifier.ready(self._status_text())
            return
        ignored = restart_only_changes(old, new)
        if ignored:
            log.warning("reload: changes to %s need a restart; keeping the running values", ", ".join(ignored))
        new = keep_restart_only(old, new)
        try:
            parser = PayloadParser(input_specs(new), clock=self._reading_clock)
        except ValueError as exc:
            log.error("reload refused: inputs: %s; keeping the running configuration", exc)
            self.notifier.ready(self._status_text())
            return
        req = _Reload(new)
        self._reload = req
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while not req.done.wait(0.5):
            if self._fatal or not self._worker.is_alive() or time.monotonic() > deadline:
                self._reload = None
                log.error("reload: the worker did not apply it; keeping the running configuration")
                self.notifier.ready(self._status_text())
                return
        if req.error is not None:
            log.error("reload refused: %s; keeping the running configuration", req.error)
            self.notifier.ready(self._status_text())
            return
        self.parser = parser  # one reference swap: the network thread picks it up with the next message
        self.mqtt.set_subscriptions(self._subscriptions(parser))
        self.rlog.interval_s = float(new.logging.rejected_log_interval_s)
        configure_logging(new.logging.level, "json" if new.logging.json else "text")
        log.info("reload: configuration %s applied (thresholds: %s)", self.config_path,
                 ", ".join(f"{g.name}={g.detector.threshold}" for g in new.groups))
        self.notifier.ready(self._status_text())

    def _apply_reload(self, req: _Reload) -> None:
        """Worker thread: move the learned state into a detector built from the new config."""
        try:
            old = self.detector
            check_shapes(old, req.config)
            detector = build_detector(req.config)
            arrays, meta = old.state_dict()
            try:
                detector.load_state_dict(arrays, meta)
            except (ValueError, KeyError, IndexError) as exc:
                raise ReloadRefused(f"cannot carry the learned state over: {exc}") from None
            self.detector = detector
            self.config = self.output.config = req.config
            self.metrics.init_groups([g.name for g in req.config.groups])
            self.metrics.forget_sensors(lambda group, sensor: group in detector.active
                                        and sensor in detector.active[group].sensors)
            self._sync_sensor_gauges()
        except ReloadRefused as exc:
            req.error = str(exc)
        except Exception as exc:  # noqa: BLE001
            req.error = f"{type(exc).__name__}: {exc}"
        finally:
            req.done.set()

    # --- shutdown ---------------------------------------------------------------------------

    def _shutdown(self) -> int:
        status = EXIT_FAILURE if self._fatal else EXIT_OK
        self.notifier.stopping("stopping: draining the queue")
        log.info("stopping: %d queued readings to process", len(self.queue))
        self.mqtt.close_intake()
        self.queue.close()
        if self._worker is not None:
            self._worker.join(DRAIN_TIMEOUT_S + 30)
            if self._worker.is_alive():
                log.error("worker did not stop in time")
                status = EXIT_FAILURE
        if self._fatal:
            log.error("no final checkpoint: %s (the last periodic one stays)", self._fatal)
        elif self.partitions is not None:  # leaving the consumer group snapshotted every owned partition
            if not self.queue.closed:
                log.error("the worker did not leave the consumer group: no partition snapshot at shutdown "
                          "(the periodic ones stay)")
                status = EXIT_FAILURE
        elif self._worker is None or not self._worker.is_alive():
            self.notifier.status("stopping: final checkpoint")
            if self.checkpointer.save_final():
                log.info("final checkpoint written to %s", self.store.path)
            else:  # the service manager must see it: the learning since the last good one is gone
                status = EXIT_FAILURE
        self.checkpointer.close()
        self.mqtt.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.rlog.flush()
        log.info("stopped after %d readings", self.processed)
        return status


# ------------------------------------------------------------------------------------------- entry

def run(config_path: str) -> int:
    """`streamlstm run -c FILE`: the service's main process. Returns the exit status."""
    faulthandler.enable()  # SIGABRT from the systemd watchdog dumps every thread's stack
    configure_logging("INFO")
    try:
        config = preflight(load_config(config_path))  # the same checks as `check-config`
    except ConfigError as exc:
        return config_error(config_path, exc)
    configure_logging(config.logging.level, "json" if config.logging.json else "text")
    try:
        daemon = Daemon(config, config_path)
    except ValueError as exc:  # inputs the parser refuses although the schema accepted them
        return config_error(config_path, f"inputs: {exc}")
    handlers = {}
    for sig, fn in ((signal.SIGTERM, daemon.request_stop), (signal.SIGINT, daemon.request_stop),
                    (signal.SIGHUP, daemon.request_reload)):
        handlers[sig] = signal.signal(sig, fn)
    try:
        return daemon.run()
    except ConfigError as exc:
        return config_error(config_path, exc)
    except Exception as exc:  # backend unavailable, port in use, ...
        if isinstance(exc, BackendUnavailable):
            return config_error(config_path, f"backend.kind: {exc}")
        log.critical("cannot run: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return EXIT_FAILURE
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
