"""`streamlstm bridge -c FILE`: forward the inputs' MQTT topics into the Kafka topic, keyed by
sensor id, for `source: kafka` workers (tests, small sites; larger ones use the broker's own
Kafka sink, docs/scaling.md).

Per MQTT message, one record: key = the sensor id the input's topic template gives (the topic
itself for a template without one), value = the payload as it came, header ``kafka.topic_header``
= the MQTT topic (the workers' parser matches the inputs' templates against it), timestamp = now
(the workers give it to readings without a timestamp of their own). Partitions are chosen by
murmur2 of the key like Java clients (librdkafka's default, crc32, would put the same key
elsewhere than a Java producer of the same topic).

Delivery is at-least-once: the MQTT message is acknowledged (in arrival order, as MQTT asks)
only once Kafka has it; the producer is idempotent, so its retries neither duplicate nor reorder
a partition's records. While the producer holds `MAX_PENDING` unacknowledged records the network
thread reads no MQTT message (backpressure, as in the daemon).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import threading
import time

from .config import ConfigError, input_loop_problems, load_config
from .errors import EXIT_FAILURE, EXIT_OK, config_error
from .kafka_source import client_settings, require_kafka
from .logfmt import configure_logging
from .mqtt_io import MqttIO
from .runtime_config import expand_paths, input_specs

__all__ = ["Bridge", "run"]

log = logging.getLogger("streamlstm")

MAX_PENDING = 100_000      # records handed to the producer and not yet acknowledged by Kafka
REPORT_EVERY_S = 30.0


class _InOrderAcks:
    """MQTT wants PUBACKs in the order the messages arrived; Kafka confirms partitions in any
    order. Entries are acknowledged once they and every earlier one are confirmed."""

    def __init__(self, ack):
        self._ack = ack
        self._lock = threading.Lock()
        self._entries: collections.deque = collections.deque()  # [token, confirmed]

    def add(self, token) -> list:
        entry = [token, False]
        with self._lock:
            self._entries.append(entry)
        return entry

    def confirm(self, entry) -> None:
        with self._lock:
            entry[1] = True
            while self._entries and self._entries[0][1]:
                token = self._entries.popleft()[0]
                if token is not None:
                    self._ack(token)

    def __len__(self) -> int:
        return len(self._entries)


class Bridge:
    def __init__(self, config):
        problems = input_loop_problems(config)
        if problems:
            raise ConfigError("", errors=problems)
        kafka = require_kafka()
        from .payload import PayloadParser

        self.config = config
        self.parser = PayloadParser(input_specs(config))
        k = config.kafka
        self.topic, self.header = k.topic, k.topic_header
        settings = client_settings(k)
        settings.update({"partitioner": "murmur2_random",  # Java's partitioner (keys of a Java producer agree)
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         "message.max.bytes": max(1 << 20, config.mqtt.max_payload_bytes + 65536)})
        self.producer = kafka.Producer(settings)
        # The bridge, not the workers, holds the MQTT inputs' persistent session now.
        mqtt = dataclasses.replace(config.mqtt, client_id=f"{config.mqtt.client_id}-bridge")
        self.mqtt = MqttIO(mqtt, f"{config.output.status_topic}/bridge", self.parser.subscriptions, self._on_message,
                           receive_maximum=config.pipeline.queue_size, read_gate=self._room,
                           log_interval_s=config.logging.rejected_log_interval_s)
        self.acks = _InOrderAcks(self.mqtt.ack)
        self._stop = threading.Event()
        self.forwarded = 0
        self.unknown = 0

    def _room(self, timeout: float) -> bool:
        """MqttIO's read gate: room in the producer (else wait a little, serving callbacks)."""
        if len(self.acks) < MAX_PENDING:
            return True
        time.sleep(min(timeout, 0.01))
        return len(self.acks) < MAX_PENDING

    def _on_message(self, topic, payload, token) -> None:
        """paho's network thread: one record per message, acked once Kafka confirms it."""
        matched = None if topic is None else self.parser.match(topic)
        entry = self.acks.add(token)
        if matched is None:
            self.unknown += 1
            self.acks.confirm(entry)  # not ours: nothing to forward
            return
        sensor = matched[1]
        self._produce(topic, sensor if sensor is not None else topic, bytes(payload), entry)

    def _produce(self, topic, key, payload, entry) -> None:
        def delivered(err, _msg):
            if err is None:
                self.forwarded += 1
                self.acks.confirm(entry)
            else:  # the producer gave up (message.timeout.ms): again, acks wait in order
                log.warning("kafka did not take a record of %s (%s): retrying", key, err)
                self._produce(topic, key, payload, entry)

        while True:
            try:
                self.producer.produce(self.topic, value=payload, key=key.encode("utf-8", "surrogatepass"),
                                      headers=[(self.header, topic.encode("utf-8", "surrogatepass"))],
                                      on_delivery=delivered)
                return
            except BufferError:  # librdkafka's own queue is full: let it drain
                self.producer.poll(0.05)

    def request_stop(self, *_args) -> None:
        self._stop.set()

    def run(self) -> int:
        self.mqtt.start()
        log.info("bridge: MQTT %s -> Kafka topic %s (%s)", ", ".join(self.parser.subscriptions), self.topic,
                 ",".join(self.config.kafka.brokers))
        next_report = time.monotonic() + REPORT_EVERY_S
        while not self._stop.is_set():
            self.producer.poll(0.1)  # delivery callbacks run here
            if time.monotonic() >= next_report:
                log.info("bridge: %d records forwarded, %d pending, %d messages of no input",
                         self.forwarded, len(self.acks), self.unknown)
                next_report = time.monotonic() + REPORT_EVERY_S
        self.mqtt.close_intake()
        left = self.producer.flush(30)
        self.mqtt.stop()
        if left:
            log.error("bridge: %d records not confirmed by Kafka (their MQTT messages stay unacknowledged)", left)
            return EXIT_FAILURE
        log.info("bridge stopped after %d records", self.forwarded)
        return EXIT_OK


def run(config_path: str) -> int:
    """`streamlstm bridge -c FILE`. Returns the exit status."""
    configure_logging("INFO")
    try:
        config = expand_paths(load_config(config_path))
        configure_logging(config.logging.level, "json" if config.logging.json else "text")
        bridge = Bridge(config)
    except ConfigError as exc:
        return config_error(config_path, exc)
    except ValueError as exc:
        return config_error(config_path, f"inputs: {exc}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, bridge.request_stop)
    return bridge.run()
