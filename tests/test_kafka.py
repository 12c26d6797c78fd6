"""source: kafka against a real Kafka-protocol broker (Tansu, tests/tansu.py): worker processes of
one consumer group move partitions and their state (a join, a graceful leave, a kill -9), and the
bridge forwards MQTT readings keyed by sensor id.

Timeouts are short (session 3 s) and the model tiny (hidden size 4) so the three-worker run takes
well under a minute on two cores; the eager roundrobin assignor (cooperative-sticky once
misbehaved against Tansu).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed (the kafka extra)")

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402
from daemon_harness import REPO, SMALL_DETECTOR, Publisher, daemon_config, wait_for  # noqa: E402

from streamlstm.checkpoint import load_checkpoint  # noqa: E402
from streamlstm.config import parse_config  # noqa: E402
from streamlstm.factory import build_detector  # noqa: E402
from streamlstm.kafka_source import RecordClock  # noqa: E402
from streamlstm.payload import PayloadParser  # noqa: E402
from streamlstm.runtime_config import input_specs  # noqa: E402
from streamlstm.warmup import warm_kernels  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOPIC = "readings"
PARTITIONS = 8
SENSORS = 10_000
T0 = 1.7e9


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's Java DefaultPartitioner: murmur2 of the key, made positive, modulo partitions."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(key)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = key[length - length % 4:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def worker_config(mosquitto, tansu, tmp_path, name, shared_dir, **kafka) -> dict:
    return daemon_config(
        mosquitto.port, tmp_path / name, source="kafka",
        kafka={"brokers": [tansu.bootstrap], "topic": TOPIC, "group_id": "workers", "assignor": "roundrobin",
               "session_timeout_s": 3, "heartbeat_interval_s": 0.5, "max_poll_interval_s": 30,
               "snapshot_directory": str(shared_dir), **kafka},
        # Records carry no MQTT topic header: the key (the sensor id) is matched.
        inputs=[{"topic": "{sensor+}"}],
        groups=[{"name": "ps", "match": "*", "weights": "per_sensor"}],
        detector={**SMALL_DETECTOR, "seasonal_periods": []},
        pipeline={"max_sensors": 2 * SENSORS},
        checkpoint={"directory": str(tmp_path / name / "state"), "interval_s": 2},
        metrics={"enabled": False},
    )


class Log:
    """The topic's records as produced: per sensor, reading k at T0 + 10 k."""

    def __init__(self, tansu, seed=7):
        tansu.create_topic(TOPIC, PARTITIONS)
        self.producer = Producer({"bootstrap.servers": tansu.bootstrap, "partitioner": "murmur2_random",
                                  "linger.ms": 20, "enable.idempotence": True})
        self.rng = np.random.default_rng(seed)
        self.rounds = 0
        # Partition ends from the delivery reports (Tansu's high watermarks lag behind).
        self.ends = [0] * PARTITIONS

    def _delivered(self, err, msg) -> None:
        assert err is None, err
        self.ends[msg.partition()] = max(self.ends[msg.partition()], msg.offset() + 1)

    def produce(self, rounds: int) -> None:
        for _ in range(rounds):
            k = self.rounds
            values = self.rng.normal(size=SENSORS) + np.sin(k / 3.0)
            for i in range(SENSORS):
                payload = b'{"value":%r,"ts":%r}' % (float(values[i]), T0 + 10.0 * k)
                while True:
                    try:
                        self.producer.produce(TOPIC, key=f"s{i:05d}", value=payload, on_delivery=self._delivered)
                        break
                    except BufferError:
                        self.producer.poll(0.05)
            self.rounds += 1
        assert self.producer.flush(30) == 0


def read_topic(bootstrap, ends) -> dict:
    """{partition: [records]} of the whole topic, in offset order."""
    ends = dict(enumerate(ends))
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out = {p: [] for p in range(PARTITIONS)}
    deadline = time.monotonic() + 60
    while sum(map(len, out.values())) < sum(ends.values()) and time.monotonic() < deadline:
        for m in c.consume(5000, 1.0):
            assert m.error() is None, m.error()
            out[m.partition()].append(m)
    c.close()
    assert {p: [m.offset() for m in v] for p, v in out.items()} == {p: list(range(n)) for p, n in ends.items()}
    return out


def single_process_state(config: dict, records: dict, batch: int = 3000):
    """The detector after one process read every partition in offset order, in batches that
    interleave partitions differently from any worker."""
    cfg = parse_config(config)
    clock = RecordClock()
    parser = PayloadParser(input_specs(cfg), clock=clock)
    detector = build_detector(cfg)
    queues = {p: list(v) for p, v in records.items()}
    pending = []
    while any(queues.values()):
        for p in range(PARTITIONS):
            n = batch // PARTITIONS + 97 * p  # unequal shares: batches cut partitions elsewhere
            take, queues[p] = queues[p][:n], queues[p][n:]
            for m in take:
                clock.now = m.timestamp()[1] / 1000.0
                result = parser.parse(m.key().decode(), m.value())
                assert not result.rejected, result.rejected
                pending.extend(result.readings)
        batch_out = detector.process(pending)
        assert not any(batch_out.reason), set(batch_out.reason)
        pending = []
    return detector


def statuses(workers) -> dict:
    """sensor -> readings it has seen, over the status files of the live workers."""
    seen = {}
    for w in workers:
        path = pathlib.Path(w.config["checkpoint"]["directory"]) / "status.json"
        if w.alive() and path.exists():
            try:
                rows = json.loads(path.read_text())["sensors"]
            except (ValueError, KeyError):
                continue  # being replaced
            for row in rows:
                seen[row["sensor"]] = max(seen.get(row["sensor"], 0), row["readings"])
    return seen


def wait_all_seen(workers, rounds, timeout=60, sensors=SENSORS):
    def done():
        seen = statuses(workers)
        return len(seen) == sensors and min(seen.values()) >= rounds
    wait_for(done, timeout, step=0.5, what=f"every sensor at {rounds} readings; logs:\n"
             + "\n".join(w.log_tail(15) for w in workers))


def assignments(worker) -> list:
    """(partition, resume offset or None, how) for every assignment line of a worker's log."""
    out = []
    for line in worker.log_text().splitlines():
        if "partition " in line and " assigned: " in line:
            words = line.split("partition ", 1)[1].split()
            offset = words[7]
            out.append((int(words[0]), None if offset == "start" else int(offset), line.rsplit("(", 1)[1].rstrip(")")))
    return out


def test_three_workers_join_leave_crash_and_state_equals_one_process(mosquitto, tansu, tmp_path, daemons):
    shared = tmp_path / "snapshots"
    configs = {n: worker_config(mosquitto, tansu, tmp_path, n, shared) for n in "abc"}
    # c snapshots only when partitions leave it: what it processes after the last rebalance is
    # lost with it, and its partitions' next owner must replay it from the snapshots.
    configs["c"]["checkpoint"]["interval_s"] = 600
    for n in "abc":
        (tmp_path / n).mkdir()
    warm_kernels(parse_config(configs["a"]))  # the workers then load the kernels from Numba's cache
    log = Log(tansu)
    log.produce(2)

    a = daemons(tmp_path / "a", configs["a"], name="a").start()
    b = daemons(tmp_path / "b", configs["b"], name="b").start()
    a.wait_ready()
    b.wait_ready()
    wait_all_seen([a, b], 2)

    c = daemons(tmp_path / "c", configs["c"], name="c").start()  # joins: a rebalance
    c.wait_ready()
    # Produce once c holds partitions: records produced during the rebalance could all go to
    # a and b, and then c would leave no range of its own in the snapshots' histories.
    wait_for(lambda: assignments(c), 30, what="c got partitions")
    log.produce(2)
    wait_all_seen([a, b, c], 4)

    assert b.stop() == 0  # leaves gracefully: its partitions are snapshotted, then move
    log.produce(2)
    wait_all_seen([a, c], 6)

    log.produce(2)
    wait_all_seen([a, c], 8)
    owned_by_c = {p for p, _, _ in assignments(c)[-PARTITIONS // 2:]}
    c.kill()  # a crash: no snapshot of the last two rounds of c's partitions
    wait_all_seen([a], 8, timeout=90)
    wait_for(lambda: {p for p, _, _ in assignments(a)[-PARTITIONS:]} == set(range(PARTITIONS)), 30,
             what="a owns every partition")
    assert a.stop() == 0

    # --- every partition: one chain of owners over contiguous offset ranges, to its end ----
    records = read_topic(tansu.bootstrap, log.ends)
    final = {}
    workers_seen = set()
    for p in range(PARTITIONS):
        files = sorted((shared / TOPIC / f"{p:05d}").glob("*.ckpt"))
        assert files, f"partition {p}: no snapshot"
        arrays, meta = load_checkpoint(files[-1])
        final[p] = (arrays, meta["detector"])
        assert meta["next_offset"] == len(records[p]), p
        ranges = meta["history"]
        assert ranges[0]["from"] == 0 and ranges[-1]["to"] == len(records[p]), (p, ranges)
        for before, after in zip(ranges, ranges[1:]):
            assert after["from"] == before["to"], (p, ranges)  # contiguous: nothing skipped, nothing twice
        workers_seen.update(r["worker"] for r in ranges)
        # Sensors are where murmur2 of their key puts them, each in one partition.
        assert all(murmur2_partition(s.encode(), PARTITIONS) == p
                   for g in meta["detector"]["groups"].values() for s in g["sensors"])
    assert len(workers_seen) >= 3, workers_seen  # a, b and c all held partitions
    # The crashed worker's partitions resumed at a snapshot's offset, not at the end it reached.
    resumed = {p: off for p, off, how in assignments(a)[-PARTITIONS:] if p in owned_by_c}
    assert len(resumed) == PARTITIONS // 2
    assert all(off is not None and off < log.ends[p] for p, off in resumed.items()), (resumed, log.ends)

    # --- the state: bit for bit what one process reading the same log computes -------------
    merged = build_detector(parse_config(configs["a"]))
    merged.adopt_sensors(list(final.values()))
    reference = single_process_state(configs["a"], records)
    names = sorted(merged.active["ps"].sensors)
    assert len(names) == SENSORS and sorted(reference.active["ps"].sensors) == names
    got, got_meta = merged.export_sensors(names)
    want, want_meta = reference.export_sensors(names)
    assert got_meta == want_meta
    assert set(got) == set(want)
    for key in want:
        assert np.array_equal(got[key], want[key], equal_nan=True), key
    assert int(got["ps/seen"].min()) == log.rounds  # no reading lost, none counted twice


def test_bridge_forwards_mqtt_readings_keyed_by_sensor_to_a_worker(mosquitto, tansu, tmp_path, daemons):
    tansu.create_topic(TOPIC, PARTITIONS)
    (tmp_path / "w").mkdir()
    config = worker_config(mosquitto, tansu, tmp_path, "w", tmp_path / "snapshots")
    config["inputs"] = [{"topic": "sensors/{sensor}"}]  # the bridge subscribes; the worker matches the header
    path = tmp_path / "bridge.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = open(tmp_path / "bridge.log", "wb")
    bridge = subprocess.Popen([sys.executable, "-m", "streamlstm", "bridge", "-c", str(path)], env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: b"subscribed to sensors/+" in (tmp_path / "bridge.log").read_bytes(), 60,
                 what="the bridge's subscription")
        pub = Publisher(mosquitto.host, mosquitto.port)
        sensors, rounds = 40, 5
        for k in range(rounds):
            for i in range(sensors):
                pub.publish(f"sensors/dev{i:02d}", b'{"value":%r,"ts":%r}' % (float((i * 7 + k * 3) % 11), T0 + 10 * k), 1)
        pub.wait_acked(30)
        pub.close()

        c = Consumer({"bootstrap.servers": tansu.bootstrap, "group.id": "check", "enable.auto.commit": False})
        c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        records = []
        deadline = time.monotonic() + 60
        while len(records) < sensors * rounds and time.monotonic() < deadline:
            records.extend(m for m in c.consume(500, 0.5) if m.error() is None)
        c.close()
        assert len(records) == sensors * rounds
        by_key = {}
        for m in records:
            key = m.key().decode()
            assert m.partition() == murmur2_partition(m.key(), PARTITIONS)  # as a Java producer would
            assert dict(m.headers()) == {"mqtt_topic": f"sensors/{key}".encode()}
            by_key.setdefault(key, []).append(json.loads(m.value())["ts"])
        assert sorted(by_key) == [f"dev{i:02d}" for i in range(sensors)]
        assert all(ts == [T0 + 10 * k for k in range(rounds)] for ts in by_key.values())  # in order, once

        worker = daemons(tmp_path / "w", config, name="w").start()
        worker.wait_ready()
        wait_all_seen([worker], rounds, sensors=sensors)
        assert worker.stop() == 0
    finally:
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
        rc = bridge.wait(30)
        out.close()
    assert rc == 0, (tmp_path / "bridge.log").read_text()
