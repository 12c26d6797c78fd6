#!/usr/bin/env python3
"""One worker's throughput through Kafka (source: kafka) beside its MQTT throughput, same run.

    python bench/bench_kafka.py                 # 1000 sensors, H=32, 150 readings each
    python bench/bench_kafka.py --quick         # 200 sensors, 80 readings: checks the harness

What is measured (same machine, same workload, the default model otherwise):

* MQTT: bench_daemon.py's measurement (readings queued in mosquitto for the daemon's persistent
  session, then drained; rate from /metrics once every sensor trains).
* Kafka: the same messages as records of a topic (Tansu, memory-only, one node: tests/tansu.py)
  with `--partitions` partitions, key = the sensor id of the MQTT topic, header mqtt_topic = the
  topic (what `streamlstm bridge` writes); then one worker (`source: kafka`, eager roundrobin
  assignor) starts and drains them; rate from /metrics the same way.
* bare consumer: a plain confluent-kafka consumer draining the same records (no parsing): the
  ceiling the Kafka path alone allows here.
* snapshot: one partition of `--snapshot-sensors` sensors, in-process: export + atomic write
  (`Detector.export_sensors` + checkpoint.py, fsync'ed) and load + adopt (`load_checkpoint` +
  `Detector.adopt_sensors`), bytes per sensor (`--snapshot-only`: this alone).

Two payload shapes, as bench_daemon.py: one reading per message, 100 readings per message.
Prints a table; JSON goes to bench/results/kafka-<host>-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench_daemon import BATCH, Daemon, bench_daemon, drain, machine, messages, report  # noqa: E402
from mosquitto import Mosquitto, free_port  # noqa: E402
from tansu import Tansu, find_tansu  # noqa: E402

TOPIC = "readings"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sensors", type=int, default=1000)
    p.add_argument("--readings", type=int, default=150, help="readings per sensor and run")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the table shows medians)")
    p.add_argument("--snapshot-sensors", type=int, default=20000, help="sensors in the snapshot measurement")
    p.add_argument("--snapshot-dir", default=None, help="where the snapshot is written (default: the temp dir)")
    p.add_argument("--snapshot-only", action="store_true", help="only the snapshot measurement")
    p.add_argument("--quick", action="store_true", help="200 sensors, 80 readings")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kafka-<host>-<time>.json)")
    args = p.parse_args(argv)
    args.starts = 1
    if args.quick:
        args.sensors, args.readings = 200, 80
    return args


def produce(tansu: Tansu, topic: str, items) -> float:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": tansu.bootstrap, "partitioner": "murmur2_random",
                         "linger.ms": 20, "enable.idempotence": True})
    t0 = time.perf_counter()
    for mqtt_topic, payload in items:
        key = mqtt_topic.rsplit("/", 1)[1]
        while True:
            try:
                producer.produce(topic, key=key, value=payload, headers=[("mqtt_topic", mqtt_topic.encode())])
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    return time.perf_counter() - t0


def bench_worker(tansu, broker, workdir, args, batched: bool, result: dict) -> dict:
    name = "batched" if batched else "single"
    topic = f"{TOPIC}-{name}-{workdir.name}"
    tansu.create_topic(topic, args.partitions)
    items = messages(args.sensors, args.readings, batched)
    total = args.sensors * args.readings
    produce_s = produce(tansu, topic, items)
    snapshots = workdir / f"snapshots-{topic}"
    cfg = {
        "source": "kafka",
        "kafka": {"brokers": [tansu.bootstrap], "topic": topic, "group_id": f"bench-{topic}",
                  "assignor": "roundrobin", "snapshot_directory": str(snapshots)},
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"bench-kafka-{name}"},
        "model": {"hidden_size": args.hidden},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "checkpoint": {"directory": str(workdir / f"state-{topic}"), "interval_s": 300},
        "logging": {"level": "WARNING"},
    }
    d = Daemon(workdir, cfg)
    rate, overall = drain(d, cfg, args.sensors, total)
    files = sorted(snapshots.rglob("*.ckpt"))
    out = {"records": len(items), "readings": total, "readings_per_record": total // len(items),
           "produce_s": produce_s, "readings_per_s_training": rate,
           "readings_per_s_overall_from_ready": overall,
           "snapshot_files": len(files), "snapshot_bytes": sum(f.stat().st_size for f in files)}
    result.setdefault(f"kafka_{name}", []).append(out)
    return out


def bench_bare(tansu, workdir, args, batched: bool, result: dict) -> dict:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    name = "batched" if batched else "single"
    topic = f"{TOPIC}-bare-{name}-{workdir.name}"
    tansu.create_topic(topic, args.partitions)
    items = messages(args.sensors, args.readings, batched)
    produce(tansu, topic, items)
    c = Consumer({"bootstrap.servers": tansu.bootstrap, "group.id": "bare", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(args.partitions)])
    got = 0
    t0 = time.perf_counter()  # from the assignment: includes the first fetch's round trip
    deadline = time.monotonic() + 600
    while got < len(items) and time.monotonic() < deadline:
        got += len(c.consume(4096, 1.0))
    seconds = time.perf_counter() - t0
    c.close()
    per = args.sensors * args.readings / len(items)
    out = {"records": len(items), "records_per_s": got / seconds, "readings_per_s": got * per / seconds}
    result.setdefault(f"bare_kafka_{name}", []).append(out)
    return out


def bench_snapshot(args, result: dict) -> None:
    """One partition's snapshot of `--snapshot-sensors` sensors: export + atomic write (what a
    revoke and a periodic snapshot cost the worker), load + adopt (what an assign costs the next
    owner), bytes per sensor. No seasonal profile is allocated yet (they come once a sensor has
    lived a full period: 4 B per bin, docs/scaling.md)."""
    from streamlstm.checkpoint import load_checkpoint, save_checkpoint
    from streamlstm.config import parse_config
    from streamlstm.factory import build_detector
    from streamlstm.reading import Reading

    cfg = parse_config({"model": {"hidden_size": args.hidden}, "backend": {"kind": "cpu"},
                        "pipeline": {"max_sensors": args.snapshot_sensors}})
    det = build_detector(cfg)
    names = [f"s{k}" for k in range(args.snapshot_sensors)]
    for r in range(40):
        det.process([Reading(n, 1.7e9 + r, (float((k + r) % 7),)) for k, n in enumerate(names)])
    with tempfile.TemporaryDirectory(prefix="bench-snap-", dir=args.snapshot_dir) as tmp:
        path = pathlib.Path(tmp) / "p.ckpt"
        write, load = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            arrays, meta = det.export_sensors(names)
            save_checkpoint(path, arrays, {"detector": meta})
            write.append(time.perf_counter() - t0)
            del arrays
            t0 = time.perf_counter()
            arrays, meta = load_checkpoint(path)
            build_detector(cfg).adopt_sensors([(arrays, meta["detector"])])
            load.append(time.perf_counter() - t0)
            del arrays
        size = path.stat().st_size
    w, ld = median(write), median(load)
    result["snapshot"] = {"sensors": len(names), "bytes": size, "bytes_per_sensor": size / len(names),
                          "export_and_write_s_median": w, "write_sensors_per_s": len(names) / w,
                          "write_mb_per_s": size / w / 1e6, "load_and_adopt_s_median": ld,
                          "load_sensors_per_s": len(names) / ld, "load_mb_per_s": size / ld / 1e6}


def median(values):
    """Median of the measured values (NaN: a run too short to measure is left out)."""
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main(argv=None):
    args = parse_args(argv)
    binary, why = find_tansu()
    if binary is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    import confluent_kafka
    result = {**machine(), "sensors": args.sensors, "readings_per_sensor": args.readings, "hidden_size": args.hidden,
              "partitions": args.partitions, "confluent_kafka": confluent_kafka.version()[0],
              "librdkafka": confluent_kafka.libversion()[0]}
    if args.snapshot_only:
        bench_snapshot(args, result)
        print(json.dumps(result["snapshot"], indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        workdir = pathlib.Path(tmp)
        tansu = Tansu(binary, workdir / "tansu").start()
        try:
            result["tansu"] = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
            cfg_path = workdir / "warm.yaml"
            cfg_path.write_text(json.dumps({"model": {"hidden_size": args.hidden}}))
            subprocess.run([sys.executable, "-m", "streamlstm", "warmup", "-c", str(cfg_path)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=1200)
            for i in range(args.repeat):
                # Fresh daemon state and a fresh mosquitto (no session of the last run): the
                # same readings come again.
                rundir = workdir / f"run{i}"
                broker = Mosquitto(rundir / "broker", max_queued_messages=10 * args.sensors * args.readings + 10)
                broker.start()
                try:
                    result["mosquitto"] = subprocess.run([broker.binary, "-h"], capture_output=True,
                                                         text=True).stdout.split("\n")[0]
                    for batched in (False, True):
                        mqtt = {}
                        bench_daemon(broker, rundir, args, batched, mqtt)
                        for key, value in mqtt.items():
                            result.setdefault(key, []).append(value)
                        bench_worker(tansu, broker, rundir, args, batched, result)
                        bench_bare(tansu, rundir, args, batched, result)
                finally:
                    broker.stop()
            bench_snapshot(args, result)
        finally:
            tansu.stop()

    def med(key, field):
        return median([r[field] for r in result[key]])

    rows = []
    for name, label in (("single", "1 reading/message"), ("batched", f"{BATCH} readings/message")):
        m, k = med(f"daemon_{name}", "readings_per_s_training"), med(f"kafka_{name}", "readings_per_s_training")
        result[f"kafka_vs_mqtt_{name}"] = k / m
        rows += [(f"worker via MQTT, {label}: readings/s", f"{m:.0f}"),
                 (f"worker via Kafka, {label}: readings/s", f"{k:.0f}"),
                 (f"  Kafka / MQTT, {label}", f"{k / m:.2f}x"),
                 (f"bare consumer, {label}: readings/s", f"{med(f'bare_kafka_{name}', 'readings_per_s'):.0f}")]
    s = result["snapshot"]
    rows += [("snapshot bytes per sensor (no seasonal profile yet)", f"{s['bytes_per_sensor']:.0f}"),
             ("snapshot export + atomic write: sensors/s (MB/s)", f"{s['write_sensors_per_s']:.0f} ({s['write_mb_per_s']:.0f})"),
             ("snapshot load + adopt: sensors/s (MB/s)", f"{s['load_sensors_per_s']:.0f} ({s['load_mb_per_s']:.0f})")]
    report(f"streamlstm one worker, {args.sensors} sensors, H={args.hidden}, {args.readings} readings/sensor, "
           f"{args.partitions} partitions, {result['cpus']} CPUs, {result['tansu']}, medians of {args.repeat}",
           rows, result, args.out, "kafka")
    return 0


if __name__ == "__main__":
    sys.exit(main())
