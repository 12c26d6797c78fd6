"""Compile (and cache) every Numba kernel a configuration needs, before the service starts.

`streamlstm warmup` runs this from the unit's ExecStartPre with NUMBA_CACHE_DIR set, so
the daemon itself starts from a warm cache (start to READY in about a second).
"""
from __future__ import annotations

import numpy as np

from .backend import CpuBackend
from .bank import ModelBank
from .spec import ModelSpec


def compile_kernels(dtype: str = "float32") -> None:
    """Trigger the serial and parallel forward and training kernels for one dtype."""
    spec = ModelSpec(input_size=1, hidden_size=2, window=2, dtype=dtype)
    for parallel_min_batch in (10**9, 1):  # serial, then prange
        backend = CpuBackend(parallel_min_batch=parallel_min_batch)
        if backend._threads <= 1 and parallel_min_batch == 1:
            continue  # a one-thread machine never calls the parallel kernels
        for shared in (True, False):
            bank = ModelBank(spec, shared, backend, capacity=2)
            bank.add_slot()
            bank.add_slot()
            for _ in range(3):
                bank.step([0, 1], np.ones((2, 1)))


def compile_detector() -> None:
    """The small scoring kernels of the detector."""
    from .detector.scores import neg_log10_upper_tail, z_for_score

    neg_log10_upper_tail(np.array([0.0, 10.0]))
    z_for_score(0.5)


def compile_all(dtypes=("float32", "float64")) -> None:
    for dtype in dtypes:
        compile_kernels(dtype)
    compile_detector()


def dtypes_of(config) -> tuple:
    return tuple(sorted({g.model.dtype for g in config.groups} | {config.model.dtype}))
