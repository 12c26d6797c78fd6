"""What a reload (SIGHUP) may change in a running daemon: settings that need a restart keep
their running values, and a model group must keep its shape to keep its learned state."""
from __future__ import annotations

import dataclasses

from .spec import ModelSpec

__all__ = ["RESTART_ONLY", "ReloadRefused", "check_shapes", "keep_restart_only", "restart_only_changes"]

# Changing these needs a restart; a reload keeps the running values.
RESTART_ONLY = ("source", "mqtt", "kafka", "metrics", "backend", "pipeline.queue_size", "checkpoint.directory")


class ReloadRefused(Exception):
    pass


def restart_only_changes(old, new) -> list:
    """Keys of RESTART_ONLY whose value differs between two configs."""
    changed = []
    for key in RESTART_ONLY:
        a, b = old, new
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            changed.append(key)
    return changed


def keep_restart_only(old, new):
    """`new` with the RESTART_ONLY values of `old`."""
    new = dataclasses.replace(new, source=old.source, mqtt=old.mqtt, kafka=old.kafka, metrics=old.metrics,
                              backend=old.backend)
    new = dataclasses.replace(new, pipeline=dataclasses.replace(new.pipeline, queue_size=old.pipeline.queue_size))
    return dataclasses.replace(new, checkpoint=dataclasses.replace(new.checkpoint, directory=old.checkpoint.directory))


def check_shapes(detector, config) -> None:
    """ReloadRefused when a running group of `detector` would change its model's shape under
    `config` (its learned weights would not fit)."""
    new_groups = {g.name: g for g in config.groups}
    for name, gd in detector.active.items():
        g = new_groups.get(name)
        if g is None:
            continue
        want = (ModelSpec.from_config(g.model, gd.spec.input_size).shape_key(), g.weights == "shared")
        have = (gd.spec.shape_key(), gd.shared)
        if want != have:
            raise ReloadRefused(
                f"group {name!r}: model shape would change from {_shape_text(*have)} to {_shape_text(*want)}; "
                f"a running model cannot change shape (restart to start this group from scratch: its "
                f"checkpoint is then moved aside)")


def _shape_text(shape, shared) -> str:
    i, h, layers, o, dtype = shape
    return f"(inputs {i}, hidden {h}, layers {layers}, outputs {o}, {dtype}, {'shared' if shared else 'per-sensor'})"
