"""The daemon's checkpoint: what its metadata holds, and how a detector is restored from it
(or started fresh when the file is missing or unusable). The file format is checkpoint.py's."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

from .checkpoint import CheckpointError, CheckpointStore, quarantine
from .version import package_version

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "FRESH", "MOVED_ASIDE", "RESTORED", "checkpoint_meta",
           "model_shapes", "restore_detector"]

log = logging.getLogger("streamlstm")

CHECKPOINT_FORMAT = "streamlstm-daemon"
CHECKPOINT_FORMAT_VERSION = 1


def model_shapes(config) -> dict:
    """What must match for a checkpoint to be reusable, per configured group (for humans)."""
    return {g.name: {"weights": g.weights, "hidden_size": g.model.hidden_size, "num_layers": g.model.num_layers,
                     "window": g.model.window, "dtype": g.model.dtype, "target_feature": g.model.target_feature}
            for g in config.groups}


def checkpoint_meta(config, detector_meta: dict, last_scores: Optional[dict] = None) -> dict:
    # last_scores: for `streamlstm status` while the daemon is down (the detector keeps no scores).
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
            "streamlstm_version": package_version(), "saved_at": time.time(),
            "config_shape": model_shapes(config), "detector": detector_meta,
            "last_scores": {k: (v if math.isfinite(v) else None) for k, v in (last_scores or {}).items()}}


RESTORED, FRESH, MOVED_ASIDE = "restored", "fresh", "moved aside"


def restore_detector(config, store: CheckpointStore, build):
    """(detector, outcome) from the store: RESTORED, FRESH (no checkpoint) or MOVED_ASIDE (an
    unusable checkpoint was quarantined -> cold start).

    CheckpointError other than corrupt/incompatible (e.g. permission denied) propagates.
    """
    detector = build(config)
    existed = store.path.exists()
    loaded = store.load()  # moves a corrupt or incompatible file aside itself
    if loaded is None:
        return detector, MOVED_ASIDE if existed else FRESH
    arrays, meta = loaded
    problem = None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        problem = f"not a {CHECKPOINT_FORMAT} v{CHECKPOINT_FORMAT_VERSION} checkpoint (meta format " \
                  f"{meta.get('format')!r} v{meta.get('format_version')!r})"
    else:
        try:
            detector.load_state_dict(arrays, meta["detector"])
        except Exception as exc:  # noqa: BLE001 - any unusable content: keep it aside, start fresh
            problem = f"does not fit the configured models: {type(exc).__name__}: {exc}"
    if problem is None:
        return detector, RESTORED
    try:
        moved = quarantine(store.path)
        log.error("checkpoint %s %s; moved to %s, cold start", store.path, problem, moved)
    except CheckpointError as exc:
        log.error("checkpoint %s %s; cold start (and: %s)", store.path, problem, exc)
    return build(config), MOVED_ASIDE

