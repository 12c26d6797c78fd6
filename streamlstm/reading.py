"""One reading: what the payload parser produces and the detector takes."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Reading"]


class Reading(NamedTuple):
    sensor: str
    timestamp: float  # seconds since the epoch
    values: tuple  # tuple[float, ...], finite
