"""Detector settings: the `detector:` section of the configuration itself.

`config.DetectorConfig` holds the keys, their defaults, ranges and documentation; a group's
detector runs on that validated object, so a default cannot differ between the file and the
detector. This module only gives it the name the detector code uses.
"""
from __future__ import annotations

from ..config import CHANNELS, DetectorConfig, parse_duration

__all__ = ["CHANNELS", "DetectorSettings", "parse_duration"]

DetectorSettings = DetectorConfig
