"""Detector settings: the `detector:` section of the YAML config, with its defaults."""
from __future__ import annotations

import dataclasses
import re

SCALINGS = ("running", "fixed")
SCORES = ("likelihood", "ksigma", "dynamic")
PROTECTIONS = ("off", "skip", "damp")
CHANNELS = ("model", "seasonal", "range", "stuck")  # evidence an event names as what fired
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "1d", "7d", "12h", "90m", "3600s"."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as '1d', '12h', '30m' or '3600s', got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    scaling: str = "running"
    scale_min: float | None = None
    scale_max: float | None = None
    scaling_warmup: int = 50
    scaling_horizon: int = 5000
    warmup: int = 200
    score: str = "likelihood"
    threshold: float = 0.6
    short_window: int = 10
    long_window: int = 1000
    ksigma: float = 4.0
    min_residual_scale: float = 0.05
    channels: tuple = CHANNELS
    min_duration: int = 1
    hysteresis: float = 0.9
    cooldown: int = 50
    learning_protection: str = "damp"
    damp_factor: float = 0.1
    gap_reset_intervals: float = 10.0
    seasonal_periods: tuple = ("1d", "7d")
    seasonal_alpha: float = 0.2
    seasonal_max_bins: int = 2016
    peak_memory: int = 2000
    accept_after: int = 1000
    max_clock_skew_s: float = 86400.0
    clock_jump_readings: int = 20

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        if self.learning_protection not in PROTECTIONS:
            raise ValueError(f"learning_protection must be one of {PROTECTIONS}")
        if self.scaling == "fixed" and not (
            self.scale_min is not None and self.scale_max is not None and self.scale_min < self.scale_max
        ):
            raise ValueError("scaling: fixed needs scale_min < scale_max")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("threshold must be in (0, 1)")
        object.__setattr__(self, "seasonal_periods", tuple(self.seasonal_periods or ()))
        object.__setattr__(self, "channels", tuple(self.channels or ()))
        unknown = set(self.channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"channels: unknown {sorted(unknown)}, expected some of {CHANNELS}")
        for p in self.seasonal_periods:
            parse_duration(p)
        if not 0.0 < self.seasonal_alpha <= 1.0:
            raise ValueError("seasonal_alpha must be in (0, 1]")

    @property
    def period_seconds(self) -> tuple:
        return tuple(parse_duration(p) for p in self.seasonal_periods)

    @classmethod
    def from_mapping(cls, mapping) -> "DetectorSettings":
        """From a config section (a dataclass or a dict); keys that are not settings are ignored."""
        if dataclasses.is_dataclass(mapping):
            mapping = dataclasses.asdict(mapping)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in mapping.items() if k in names})
