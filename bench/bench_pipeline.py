#!/usr/bin/env python3
"""Where the daemon's time goes, per reading, without a broker: CPU time by thread.

    python bench/bench_pipeline.py                 # 1000 sensors, 150 readings each, both payload shapes
    python bench/bench_pipeline.py --profile       # plus a CPU-time cProfile of the worker thread

The bench_daemon.py payloads go through the daemon's own code in one process: `Daemon._on_message`
(parse + queue: the work of paho's network thread) for 1000 messages, then `Daemon._handle` on
micro-batches of `pipeline.max_batch` (the worker: columns, detector, metrics, events, acks), with
a stand-in MQTT client that accepts every publish and ack. Reported once every sensor trains
(past detector.scaling_warmup), as CPU seconds per reading (time.thread_time / process_time, so
other jobs on a shared VM disturb it far less than wall time):

* network thread: parsing and queueing (paho's own work per message comes on top: bench_daemon's
  bare subscriber measures it);
* worker thread: Python around the pass plus the kernels it runs itself (narrow rounds);
* all threads: the worker plus the pass's kernel threads (the compiled kernels' CPU).
"""
from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import bench_daemon  # noqa: E402
from streamlstm.batch_output import BatchOutput  # noqa: E402
from streamlstm.config import parse_config  # noqa: E402
from streamlstm.daemon import Daemon  # noqa: E402
from streamlstm.factory import build_detector  # noqa: E402
from streamlstm.metrics import Metrics  # noqa: E402

MESSAGES_PER_ROUND = 1000


class _Mqtt:
    def publish(self, *args, **kwargs):
        return True

    def ack(self, token):
        return True


def _daemon(hidden: int, workdir: str) -> Daemon:
    cfg = parse_config({"mqtt": {"host": "127.0.0.1"}, "model": {"hidden_size": hidden},
                        "metrics": {"enabled": False}, "logging": {"level": "WARNING"},
                        "checkpoint": {"directory": workdir}})
    d = Daemon(cfg)
    d.metrics = Metrics(d.registry, version="bench", backend="cpu")
    d.metrics.init_groups([g.name for g in cfg.groups])
    d.mqtt = _Mqtt()
    d._ack = d.mqtt.ack  # what Daemon._setup picks for source: mqtt
    d.output = BatchOutput(cfg, d.mqtt, d.metrics, d.rlog)
    d.detector = build_detector(cfg)
    return d


def _run(d: Daemon, messages, profile=None) -> tuple[float, float, float]:
    """(network thread, worker thread, all threads while the worker ran) CPU seconds."""
    net = worker = every = 0.0
    max_batch = d.config.pipeline.max_batch
    for start in range(0, len(messages), MESSAGES_PER_ROUND):
        t0 = time.thread_time()
        for token, (topic, payload) in enumerate(messages[start:start + MESSAGES_PER_ROUND]):
            d._on_message(topic, payload, token)
        t1 = time.thread_time()
        p0 = time.process_time()
        if profile is not None:
            profile.enable()
        while len(d.queue):
            d._handle(d.queue.get_batch(max_batch, 0.0, 0.0))
        if profile is not None:
            profile.disable()
        net += t1 - t0
        worker += time.thread_time() - t1
        every += time.process_time() - p0
    return net, worker, every


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sensors", type=int, default=1000)
    p.add_argument("--readings", type=int, default=150, help="readings per sensor")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="cProfile (CPU time) of the worker thread")
    args = p.parse_args(argv)
    print(f"streamlstm pipeline, {args.sensors} sensors, H={args.hidden}, {args.readings} readings/sensor; "
          "CPU us per reading")
    for batched in (False, True):
        d = _daemon(args.hidden, tempfile.mkdtemp(prefix="bench-pipeline-"))
        messages = [(t, x.encode()) for t, x in bench_daemon.messages(args.sensors, args.readings, batched)]
        warm = d.config.detector.scaling_warmup + 5
        split = len(messages) * warm // args.readings
        _run(d, messages[:split])
        prof = cProfile.Profile(time.thread_time) if args.profile else None
        net, worker, every = _run(d, messages[split:], prof)
        n = (args.readings - warm) * args.sensors
        name = f"{bench_daemon.BATCH} readings/message" if batched else "1 reading/message"
        print(f"  {name:<20} network thread {net / n * 1e6:6.2f}   worker thread {worker / n * 1e6:6.2f}   "
              f"all threads while the worker ran {every / n * 1e6:6.2f}")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
