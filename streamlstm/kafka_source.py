"""`source: kafka`: readings from a Kafka topic keyed by sensor id, read by a consumer group.

`KafkaSource` stands where `ReadingQueue` stands for MQTT: the worker calls `get_batch`, hands
the entries to the detector and `ack`s their tokens. Unlike the queue it is polled on the worker
thread itself, so the rebalance callbacks (which run inside the poll) find the batch in hand
finished and may snapshot, drop and load detector state (partition_state.py) without a lock.

Each record goes through the daemon's own `_on_message(topic, payload, token)` (the payload
parser, rejection counting), which hands its entries back through `put`: the topic the inputs'
templates match is the record's ``kafka.topic_header`` header (the MQTT topic a bridge read it
from), else its key; a reading without a timestamp in its payload gets the record's timestamp
(`RecordClock`), so replaying the log gives every reading the time it had the first time.
Tokens are ``(partition, offset)``; `ack` moves the partition's position past the record.

Offsets are committed (asynchronously, about once a second) for lag monitoring only: where a
partition resumes is the offset in its snapshot. confluent-kafka is imported only here, when
``source: kafka`` is configured (`require_kafka`).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from .config import ConfigError, read_secret
from .partition_state import PartitionStates
from .reading import Chunk, block_of

__all__ = ["KafkaSource", "RecordClock", "client_settings", "require_kafka"]

log = logging.getLogger("streamlstm")

COMMIT_EVERY_S = 1.0
CONFLICT = "partition_conflict"


def require_kafka():
    """The confluent_kafka module, or ConfigError naming the key that asked for it."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError("source", f"kafka needs the confluent-kafka package ({exc}): "
                                    "pip install 'streamlstm[kafka]'") from None
    return confluent_kafka


def client_settings(cfg) -> dict:
    """librdkafka properties every client of `cfg` (a KafkaConfig) shares: brokers, id, TLS, SASL.
    Secrets are read here (ConfigError with the key path when a file is unusable)."""
    tls, sasl = cfg.tls.enabled, cfg.username is not None
    out = {"bootstrap.servers": ",".join(cfg.brokers), "client.id": cfg.client_id,
           "security.protocol": {(False, False): "plaintext", (True, False): "ssl",
                                 (False, True): "sasl_plaintext", (True, True): "sasl_ssl"}[(tls, sasl)]}
    if tls:
        for key, prop in (("ca_file", "ssl.ca.location"), ("cert_file", "ssl.certificate.location"),
                          ("key_file", "ssl.key.location")):
            path = getattr(cfg.tls, key)
            if path is not None:
                _readable(path, f"kafka.tls.{key}")
                out[prop] = path
        if cfg.tls.key_password_file is not None:
            out["ssl.key.password"] = read_secret(cfg.tls.key_password_file, "kafka.tls.key_password_file")
        if cfg.tls.insecure:
            out["ssl.endpoint.identification.algorithm"] = "none"
    if sasl:
        out.update({"sasl.mechanism": cfg.sasl_mechanism, "sasl.username": cfg.username,
                    "sasl.password": read_secret(cfg.password_file, "kafka.password_file")})
    return out


def _readable(path: str, key: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None


class RecordClock:
    """The payload parser's clock while a record is parsed: the record's timestamp."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class KafkaSource:
    """One consumer-group member; see the module docstring. Worker thread only, but `close`."""

    def __init__(self, config, partitions: PartitionStates, on_message: Callable, clock: RecordClock, *,
                 metrics=None, rlog=None):
        kafka = require_kafka()
        self._kafka = kafka
        k = config.kafka
        self.topic = k.topic
        self.capacity = config.pipeline.max_batch
        self.partitions = partitions
        self._on_message = on_message
        self._clock = clock
        self._header = k.topic_header
        self.metrics = metrics
        self.rlog = rlog
        self._eager = k.assignor != "cooperative-sticky"
        self._start = kafka.OFFSET_BEGINNING if k.start_without_snapshot == "earliest" else kafka.OFFSET_END
        settings = client_settings(k)
        settings.update({
            "group.id": k.group_id,
            "partition.assignment.strategy": k.assignor,
            "enable.auto.commit": False,         # committed offsets are for lag monitoring only
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.start_without_snapshot,
            "session.timeout.ms": int(k.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(k.heartbeat_interval_s * 1000),
            "max.poll.interval.ms": int(k.max_poll_interval_s * 1000),
            "max.partition.fetch.bytes": max(1 << 20, config.mqtt.max_payload_bytes + 65536),
        })
        self._consumer = kafka.Consumer(settings)
        self._consumer.subscribe([k.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)
        self._entries: list = []
        self._readings = 0  # in self._entries
        self._backlog: collections.deque = collections.deque()  # records polled, not yet taken
        self._partition = -1          # partition of the record being parsed (for `put`)
        self._expect: dict = {}       # partition -> offset of the next record to take (None: any)
        self._close_requested = threading.Event()
        self._closed = False
        self._commit_at = 0.0

    # --- what the worker loop sees of a ReadingQueue ---------------------------------------

    def __len__(self) -> int:
        return 0  # nothing is buffered between polls

    @property
    def closed(self) -> bool:
        """True once the consumer left the group (its partitions snapshotted)."""
        return self._closed

    def close(self) -> None:
        """Ask the worker to leave the group at its next `get_batch` (any thread)."""
        self._close_requested.set()

    def get_batch(self, max_items: int, max_wait_s: float, idle_s: float) -> list:
        """Entries of about `max_items` readings (whole records), from any owned partition."""
        if self._closed:
            return []
        if self._close_requested.is_set():
            self._leave()
            return []
        if not self._backlog:  # poll only between records: the callbacks find every taken record acked
            deadline = time.monotonic() + idle_s
            while True:
                records = self._consumer.consume(max_items, max(max_wait_s, 0.001))  # callbacks run here
                if records or self._close_requested.is_set() or time.monotonic() >= deadline:
                    break
            self._backlog.extend(records)
        # Up to max_items readings, as from the MQTT queue (a record may hold many).
        while self._backlog and self._readings < max_items:
            self._take(self._backlog.popleft())
        entries, self._entries, self._readings = self._entries, [], 0
        self.partitions.snapshot_due()  # between batches: the state is that of every acked record
        self._commit()
        return entries

    def put(self, entries: list, block: bool = False) -> bool:
        """The daemon's `_on_message` hands over the entries (chunk, token) of the record being
        parsed; rows of sensors that belong to another partition are refused."""
        p = self._partition
        for chunk, token in entries:
            if chunk is not None:
                chunk = self._claimed(chunk, p)
            if chunk is not None:
                self._readings += len(chunk)
            if chunk is not None or token is not None:
                self._entries.append((chunk, token))
        return True

    def _claimed(self, chunk, p):
        """The chunk's rows whose sensor this partition owns (claimed on first sight), or None."""
        verdict = {s: self.partitions.claim(s, p) for s in dict.fromkeys(chunk.sensors)}
        if all(verdict.values()):
            return chunk
        for sensor in (s for s, ok in verdict.items() if not ok):
            if self.metrics is not None:
                self.metrics.rejected_payload(CONFLICT)
            if self.rlog is not None:
                self.rlog.log(("rejected", CONFLICT), logging.WARNING, "rejected (%s): sensor %r came in "
                              "partition %d but belongs to another (is the topic keyed by sensor id?)",
                              CONFLICT, sensor, p)
        rows = [i for i, s in enumerate(chunk.sensors) if verdict[s]]
        if not rows:
            return None
        return Chunk([chunk.sensors[i] for i in rows], np.asarray(chunk.timestamps, dtype=np.float64)[rows],
                     block_of(chunk.values)[rows])

    def ack(self, token) -> bool:
        if token is not None:
            self.partitions.processed(*token)
        return True

    # --- records ----------------------------------------------------------------------------

    def _take(self, record) -> None:
        err = record.error()
        if err is not None:
            if self.rlog is not None:
                self.rlog.log("kafka-error", logging.WARNING, "kafka: %s", err)
            return
        p, offset = record.partition(), record.offset()
        if not self.partitions.owns(p):
            return  # fetched before a rebalance took the partition away
        expect = self._expect.get(p)
        if expect is not None and offset < expect:
            return  # fetched before the partition was re-assigned and sought back: taken already
        self._expect[p] = offset + 1
        kind, ms = record.timestamp()
        self._clock.now = ms / 1000.0 if kind != self._kafka.TIMESTAMP_NOT_AVAILABLE else time.time()
        self._partition = p
        self._on_message(self._topic_of(record), record.value() or b"", (p, offset))

    def _topic_of(self, record) -> Optional[str]:
        raw = None
        for name, value in record.headers() or ():
            if name == self._header:
                raw = value
        if raw is None:
            raw = record.key()
        if raw is None:
            return None
        try:
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            return None  # counted as unknown_topic by the daemon

    def _commit(self) -> None:
        now = time.monotonic()
        if now < self._commit_at:
            return
        self._commit_at = now + COMMIT_EVERY_S
        offsets = [self._kafka.TopicPartition(self.topic, p, self.partitions.position(p))
                   for p in self.partitions.owned if self.partitions.position(p) is not None]
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            except self._kafka.KafkaException as exc:
                log.debug("offset commit: %s", exc)

    # --- rebalance callbacks (inside consume, on the worker thread) -----------------------------

    def _assigned(self, consumer, assigned) -> None:
        offsets = self.partitions.assign([tp.partition for tp in assigned])
        tps = []
        for p, offset in offsets.items():
            self._expect[p] = offset
            tps.append(self._kafka.TopicPartition(self.topic, p, self._start if offset is None else offset))
        if self._eager:
            consumer.assign(tps)
        else:
            consumer.incremental_assign(tps)

    def _revoked(self, consumer, revoked) -> None:
        self.partitions.revoke([tp.partition for tp in revoked], park=self._eager and not self._close_requested.is_set())
        for tp in revoked:
            self._expect.pop(tp.partition, None)

    def _lost(self, consumer, lost) -> None:
        self.partitions.lose([tp.partition for tp in lost])
        for tp in lost:
            self._expect.pop(tp.partition, None)

    def _leave(self) -> None:
        """Leave the group: the revoke callback snapshots every owned partition first (records
        polled but not taken are the next owner's, from the snapshot's offset)."""
        self._backlog.clear()
        try:
            self._consumer.close()
        finally:
            self.partitions.close()
            self._closed = True
            log.info("left consumer group; partition snapshots written")
