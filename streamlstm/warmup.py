"""Kernel warm-up: compile (or load from Numba's cache) every kernel the configured models use,
before the daemon reports READY (and for `streamlstm warmup`)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

__all__ = ["warm_kernels"]


def _glob_free(config):
    """Per configured group, a one-group copy matching every sensor (dummy sensors need no
    name that fits the group's glob)."""
    return [dataclasses.replace(g, match="*") for g in config.groups]


def warm_kernels(config, drivers=("serial", "parallel")) -> dict:
    """Compile (or load from Numba's cache) every kernel the configured models use.

    Steps dummy sensors of each group, through the backend the daemon would pick, long enough
    to train, on throwaway detectors: nothing is kept. Returns {group: seconds}.
    """
    from .backend import make_backend
    from .detector.detector import Detector
    from .reading import Reading
    from .spec import ModelSpec

    b = config.backend
    widths = sorted({i.width for i in config.inputs} | {1})  # fields / influx inputs: one value each
    timings = {}
    for group in _glob_free(config):
        t0 = time.perf_counter()
        for width in widths:
            try:
                spec = ModelSpec.from_config(group.model, width)
            except ValueError:
                continue  # e.g. target_feature outside this width: such readings are refused anyway
            rounds = group.detector.scaling_warmup + spec.window + spec.train_every + 2
            for driver in drivers:
                sensors = 1 if driver == "serial" else 2
                pmb = 2 if driver == "parallel" else 1 << 30

                def backend(name, pmb=pmb):
                    return make_backend(b.kind, pmb, b.cuda_min_batch)

                det = Detector([group], backend, max_sensors=sensors)
                t = np.arange(rounds, dtype=np.float64)
                wave = np.sin(t / 3.0)
                readings = [Reading(f"warmup-{k}", 1.0e9 + t[r],
                                     tuple(float(wave[r] + 0.1 * k + 0.01 * j) for j in range(width)))
                            for r in range(rounds) for k in range(sensors)]
                det.process(readings)
                for active in det.active.values():
                    if active._compiled is not None and driver == drivers[0]:
                        active._compiled.compile_entry_points()
        timings[group.name] = time.perf_counter() - t0
    return timings
