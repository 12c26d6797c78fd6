"""Replay speed: one long series through the detector, as `streamlstm replay` does.

    NUMBA_NUM_THREADS=1 python bench/bench_replay.py [--rows 100000] [--numpy-rows 3000]

One sensor, default config (compiled pass), chunks of 512 readings (replay.replay_series):
readings per second on one core, beside the NumPy detector path (the oracle) measured in the
same run on a shorter stretch of the same series. The series: a noisy daily wave sampled every
5 minutes with a few spikes and a level shift, so incidents open and close as in real replays.
Issue 13's target: >= 100,000 readings/s on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def series(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    seconds = 1.7e9 + 300.0 * np.arange(rows)
    values = np.sin(2 * np.pi * seconds / 86400.0) + 0.1 * rng.standard_normal(rows)
    for at in rng.choice(rows, size=max(1, rows // 20000), replace=False):
        values[at] += 6.0
    values[rows // 2:] += 1.5
    return seconds, values[:, None]


def replay_rate(config, seconds, values, engine: str) -> tuple[float, float]:
    from streamlstm.factory import build_detector
    from streamlstm.tools.replay import replay_series

    # compile / load the kernels outside the timing
    replay_series(build_detector(config), "warm", seconds[:600], values[:600])
    detector = build_detector(config)
    replay_series(detector, "s", seconds[:1], values[:1])  # creates the sensor's group
    if engine == "numpy":
        for group in detector.active.values():
            group._compiled = None  # the NumPy detector path (same kernels for the model)
    t0, c0 = time.perf_counter(), time.process_time()
    replay_series(detector, "s", seconds[1:], values[1:])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kernel = sum(g.kernel_seconds for g in detector.active.values())
    return (len(seconds) - 1) / wall, kernel / wall, (len(seconds) - 1) / cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--numpy-rows", type=int, default=3_000, help="rows for the NumPy path (slow)")
    p.add_argument("--repeats", type=int, default=3, help="compiled-pass runs; the median is reported")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)

    from streamlstm.config import parse_config

    config = parse_config(None)
    seconds, values = series(args.rows)
    rates = [replay_rate(config, seconds, values, "auto") for _ in range(args.repeats)]
    rate, share, _ = sorted(rates)[len(rates) // 2]
    cpu_rate = sorted(r[2] for r in rates)[len(rates) // 2]
    np_rate, _, _ = replay_rate(config, seconds[:args.numpy_rows], values[:args.numpy_rows], "numpy")
    result = dict(
        date=time.strftime("%Y-%m-%d"), machine=platform.node(), cpu=platform.processor() or platform.machine(),
        threads=os.environ.get("NUMBA_NUM_THREADS", "default"), rows=args.rows,
        compiled_readings_per_s=round(rate), compiled_runs=[round(r[0]) for r in rates],
        compiled_readings_per_cpu_s=round(cpu_rate),  # process CPU time: less disturbed by other jobs
        kernel_share=round(share, 3), numpy_path_readings_per_s=round(np_rate), ratio=round(rate / np_rate, 1),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
