"""Builds the detector a config describes (shared by the daemon, replay and warmup)."""
from __future__ import annotations

from .backend import make_backend
from .detector import Detector


def build_detector(config, backend_kind: str | None = None) -> Detector:
    b = config.backend
    kind = backend_kind or b.kind
    cap = config.pipeline.max_sensors

    def backend_for(group_name: str):
        return make_backend(kind, b.parallel_min_batch, b.cuda_min_batch)

    return Detector(config.groups, backend_for, max_sensors=cap)
