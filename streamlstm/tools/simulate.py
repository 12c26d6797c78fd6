"""A simulated plant for `streamlstm demo`: ~50 sensors, a compressed daily cycle, injected anomalies.

Everything that decides a value is a pure function of (seed, sensor, time), so a run is
reproducible and testable without MQTT:

* ``plant_sensors(n, seed)``: sensor ids (``boiler1_temp``, ``pump2_flow``, ...) with per-sensor
  offset, daily amplitude, phase and noise: temperatures ~20-80, pressures ~1-10, flows ~100-1000.
* ``clean_value(spec, t, day_s)``: the noise-free daily pattern (a "day" lasts ``day_s`` seconds).
* ``noise_draws(seed, tick, n)``: the standard-normal draws of one tick (one per sensor).
* ``apply_anomaly(anomaly, t, value, noise)``: what an injected anomaly does to one reading.
* ``AnomalyInjector(...).schedule(horizon_s)``: when, where and what is injected.

``Simulator`` publishes the readings with paho-mqtt (QoS 1, ``{"value": v, "ts": t}`` on
``plant/{sensor}``), one reading per sensor every ``1/rate`` seconds. Reading timestamps are
``t0 + tick/rate`` (wall clock at the start plus demo time), so an event's ``start`` maps back to
demo time exactly, however late the message travelled.

Run alone against any broker: ``python -m streamlstm.tools.simulate --port 1883 --duration 600``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
import threading
import time
from types import MappingProxyType
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "KINDS", "Anomaly", "AnomalyInjector", "Plant", "SensorSpec", "Simulator", "active_anomalies",
    "apply_anomaly", "clean_value", "noise_draws", "plant_sensors", "reading_value",
]

KINDS = ("spike", "level_shift", "stuck", "drift", "noise_burst")

# Unit types of the plant and the quantities each one measures, cycled to name sensors.
UNITS = ("boiler", "pump", "chiller", "compressor", "heatex", "tank")
QUANTITIES = ("temp", "pressure", "flow")

# Per quantity: offset range, daily amplitude range (the pattern stays inside the brief's
# ranges: temp 20-80, pressure 1-10, flow 100-1000), noise as a fraction of the amplitude.
RANGES = MappingProxyType({
    "temp": MappingProxyType(dict(offset=(35.0, 60.0), amplitude=(4.0, 15.0))),
    "pressure": MappingProxyType(dict(offset=(3.0, 7.0), amplitude=(0.4, 1.8))),
    "flow": MappingProxyType(dict(offset=(350.0, 700.0), amplitude=(50.0, 230.0))),
})
NOISE_FRACTION = (0.02, 0.05)


@dataclasses.dataclass(frozen=True)
class SensorSpec:
    name: str
    quantity: str       # temp | pressure | flow
    offset: float       # daily mean
    amplitude: float    # half the daily swing
    phase: float        # fraction of a day
    harmonic: float     # weight of the twice-a-day component (shape varies per sensor)
    noise: float        # standard deviation of the measurement noise


def plant_sensors(n: int = 50, seed: int = 0) -> list[SensorSpec]:
    """``n`` sensors: units boiler1, pump1, ... each with temp, pressure, flow (in that order)."""
    if n < 1:
        raise ValueError("need at least one sensor")
    rng = np.random.default_rng([seed, 0])
    specs = []
    for i in range(n):
        unit_index, q = divmod(i, len(QUANTITIES))
        unit = f"{UNITS[unit_index % len(UNITS)]}{unit_index // len(UNITS) + 1}"
        quantity = QUANTITIES[q]
        r = RANGES[quantity]
        amplitude = float(rng.uniform(*r["amplitude"]))
        specs.append(SensorSpec(
            name=f"{unit}_{quantity}", quantity=quantity, offset=float(rng.uniform(*r["offset"])),
            amplitude=amplitude, phase=float(rng.uniform(0.0, 1.0)), harmonic=float(rng.uniform(0.0, 0.4)),
            noise=amplitude * float(rng.uniform(*NOISE_FRACTION)),
        ))
    return specs


def clean_value(spec: SensorSpec, t: float, day_s: float) -> float:
    """The noise-free daily pattern at demo time ``t`` (seconds). Stays within offset +- amplitude."""
    x = 2.0 * math.pi * (t / day_s + spec.phase)
    shape = (math.sin(x) + spec.harmonic * math.sin(2.0 * x)) / (1.0 + spec.harmonic)
    return spec.offset + spec.amplitude * shape


def noise_draws(seed: int, tick: int, n: int) -> np.ndarray:
    """Standard-normal draws of one tick, one per sensor: a pure function of (seed, tick)."""
    return np.random.default_rng([seed, 1, tick]).standard_normal(n)


@dataclasses.dataclass(frozen=True)
class Anomaly:
    """One injected anomaly. ``magnitude`` depends on ``kind``:

    spike, level_shift: added to the reading while active; drift: the offset reached at the
    end (linear ramp from 0); stuck: the value the sensor repeats; noise_burst: factor on the
    noise standard deviation.
    """
    kind: str
    sensor: str
    start: float        # demo seconds
    duration: float
    magnitude: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    def active(self, t: float) -> bool:
        return self.start <= t < self.end

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_anomaly(anomaly: Optional[Anomaly], t: float, value: float, noise: float) -> float:
    """The reading ``value`` (which contains ``noise``, in sensor units) as changed by ``anomaly``."""
    if anomaly is None or not anomaly.active(t):
        return value
    kind = anomaly.kind
    if kind in ("spike", "level_shift"):
        return value + anomaly.magnitude
    if kind == "drift":
        return value + anomaly.magnitude * (t - anomaly.start) / anomaly.duration
    if kind == "stuck":
        return anomaly.magnitude
    if kind == "noise_burst":
        return value + (anomaly.magnitude - 1.0) * noise
    raise ValueError(f"unknown anomaly kind {kind!r}")


def reading_value(spec: SensorSpec, t: float, z: float, day_s: float, anomaly: Optional[Anomaly] = None) -> float:
    """One reading: daily pattern + noise (``z`` a standard-normal draw) + the anomaly, if any."""
    noise = spec.noise * z
    return apply_anomaly(anomaly, t, clean_value(spec, t, day_s) + noise, noise)


def active_anomalies(anomalies: Iterable[Anomaly], t: float) -> dict[str, Anomaly]:
    """sensor -> the anomaly active on it at ``t`` (the schedule never overlaps on one sensor)."""
    return {a.sensor: a for a in anomalies if a.active(t)}


class AnomalyInjector:
    """Random, seeded schedule of anomalies after a warm-up.

    Starts follow a Poisson process (mean gap ``mean_interval_s``) from ``warmup_s`` on; kinds
    go round a shuffled cycle so every kind shows up early; the sensor is drawn among those
    free for ``min_gap_s`` after their previous anomaly (so anomalies never overlap on one
    sensor and the detector has time to settle). Durations are at least ``min_readings``
    reading intervals so even a spike is seen at a slow ``rate``.
    """

    # Duration range (seconds) and magnitude range (in units of the sensor's daily amplitude,
    # or noise factor) per kind.
    DURATION = MappingProxyType({"spike": (0.5, 1.5), "level_shift": (12.0, 25.0), "stuck": (12.0, 25.0),
                                 "drift": (20.0, 35.0), "noise_burst": (8.0, 15.0)})
    MAGNITUDE = MappingProxyType({"spike": (0.7, 1.2), "level_shift": (0.5, 0.9), "drift": (0.8, 1.3),
                                  "noise_burst": (6.0, 10.0)})

    def __init__(self, sensors: Sequence[SensorSpec], *, seed: int = 0, warmup_s: float = 30.0,
                 mean_interval_s: float = 6.0, min_gap_s: float = 20.0, rate: float = 5.0,
                 day_s: float = 180.0, kinds: Sequence[str] = KINDS, min_readings: int = 3):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"anomaly kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
        if mean_interval_s <= 0 or rate <= 0 or warmup_s < 0:
            raise ValueError("mean_interval_s and rate must be > 0, warmup_s >= 0")
        self.sensors = list(sensors)
        self.seed = seed
        self.warmup_s = warmup_s
        self.mean_interval_s = mean_interval_s
        self.min_gap_s = min_gap_s
        self.rate = rate
        self.day_s = day_s
        self.kinds = tuple(kinds)
        self.min_readings = min_readings

    def schedule(self, horizon_s: float) -> list[Anomaly]:
        """Anomalies sorted by start, each starting after the warm-up and ending by ``horizon_s``."""
        rng = np.random.default_rng([self.seed, 2])
        busy_until = {s.name: -math.inf for s in self.sensors}
        by_name = {s.name: s for s in self.sensors}
        out: list[Anomaly] = []
        cycle: list[str] = []
        t = self.warmup_s
        while True:
            t += float(rng.exponential(self.mean_interval_s))
            if t >= horizon_s:
                return out
            if not cycle:
                cycle = [str(k) for k in rng.permutation(self.kinds)]
            free = [name for name, until in busy_until.items() if until + self.min_gap_s <= t]
            # The next kind of the cycle, or the next one that can still end by the horizon.
            fits = [k for k in reversed(cycle) if t + self._durations(k)[0] <= horizon_s]
            if not free or not fits:
                continue  # try again at the next draw
            kind = fits[0]
            cycle.remove(kind)
            lo, hi = self._durations(kind)
            duration = float(rng.uniform(lo, min(hi, horizon_s - t)))
            spec = by_name[free[int(rng.integers(len(free)))]]
            out.append(Anomaly(kind, spec.name, t, duration, self._magnitude(kind, spec, t, rng)))
            busy_until[spec.name] = t + duration

    def _durations(self, kind: str) -> tuple[float, float]:
        lo, hi = self.DURATION[kind]
        lo = max(lo, self.min_readings / self.rate)
        return lo, max(hi, lo)

    def _magnitude(self, kind: str, spec: SensorSpec, t: float, rng) -> float:
        if kind == "stuck":
            return round(clean_value(spec, t, self.day_s), 3)  # the sensor freezes near its current value
        lo, hi = self.MAGNITUDE[kind]
        size = float(rng.uniform(lo, hi))
        if kind == "noise_burst":
            return size
        return (1.0 if rng.random() < 0.5 else -1.0) * size * spec.amplitude


class Plant:
    """The plant's readings tick by tick: ``readings(tick, anomalies)``."""

    def __init__(self, n_sensors: int = 50, *, seed: int = 0, rate: float = 5.0, day_s: float = 180.0):
        if rate <= 0 or day_s <= 0:
            raise ValueError("rate and day_s must be > 0")
        self.sensors = plant_sensors(n_sensors, seed)
        self.seed = seed
        self.rate = rate
        self.day_s = day_s

    def time_of(self, tick: int) -> float:
        return tick / self.rate

    def readings(self, tick: int, anomalies: dict[str, Anomaly]) -> list[tuple[str, float]]:
        """(sensor, value) of every sensor at ``tick``; ``anomalies``: sensor -> active anomaly."""
        t = self.time_of(tick)
        z = noise_draws(self.seed, tick, len(self.sensors))
        return [(s.name, reading_value(s, t, float(z[i]), self.day_s, anomalies.get(s.name)))
                for i, s in enumerate(self.sensors)]


def payload(value: float, ts: float) -> bytes:
    return json.dumps({"value": round(value, 6), "ts": round(ts, 6)}).encode()


class Simulator:
    """Publishes a ``Plant`` with its anomaly schedule to MQTT in a background thread."""

    def __init__(self, plant: Plant, anomalies: Sequence[Anomaly], *, host: str = "127.0.0.1", port: int = 1883,
                 protocol: str = "5", topic: str = "plant/{sensor}", qos: int = 1,
                 client_id: str = "streamlstm-simulator",
                 on_error: Optional[Callable[[BaseException], None]] = None):
        self.plant = plant
        self.anomalies = sorted(anomalies, key=lambda a: a.start)
        self.host, self.port, self.protocol = host, port, protocol
        self.topic, self.qos, self.client_id = topic, qos, client_id
        self.on_error = on_error
        self.t0: Optional[float] = None   # wall clock of tick 0
        self.tick = 0                     # next tick to publish
        self.sent = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client = None

    def demo_time(self) -> float:
        """Demo time of the last published tick (0 before the first)."""
        return max(self.tick - 1, 0) / self.plant.rate

    def _connect(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        proto = mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto)
        # Default is 20 in flight: at a few hundred QoS 1 messages/s that window, not the
        # broker, would set the pace.
        client.max_inflight_messages_set(1000)
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        return client

    def start(self) -> "Simulator":
        self._client = self._connect()
        self._thread = threading.Thread(target=self._run_guarded, name="simulator", daemon=True)
        self._thread.start()
        return self

    def _run_guarded(self):
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported to the owner, not lost in a thread
            if self.on_error:
                self.on_error(e)
            else:
                raise

    def _run(self):
        rate = self.plant.rate
        start_mono = time.monotonic()
        self.t0 = time.time()
        upcoming = collections.deque(self.anomalies)  # sorted by start
        running: list[Anomaly] = []
        while not self._stop.is_set():
            due = start_mono + self.tick / rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            t = self.plant.time_of(self.tick)
            while upcoming and upcoming[0].start <= t:
                running.append(upcoming.popleft())
            running = [a for a in running if a.end > t]
            active = active_anomalies(running, t)
            ts = self.t0 + t
            for sensor, value in self.plant.readings(self.tick, active):
                self._client.publish(self.topic.replace("{sensor}", sensor), payload(value, ts), qos=self.qos)
                self.sent += 1
            self.tick += 1

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamlstm.tools.simulate",
                                description="Publish a simulated plant with injected anomalies to MQTT.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--topic", default="plant/{sensor}")
    p.add_argument("--sensors", type=int, default=50)
    p.add_argument("--rate", type=float, default=5.0, help="readings per second per sensor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--day", type=float, default=180.0, help="seconds per simulated day")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before the first anomaly")
    p.add_argument("--duration", type=float, default=600.0)
    a = p.parse_args(argv)
    plant = Plant(a.sensors, seed=a.seed, rate=a.rate, day_s=a.day)
    anomalies = AnomalyInjector(plant.sensors, seed=a.seed, warmup_s=a.warmup, rate=a.rate,
                                day_s=a.day).schedule(a.duration)
    for anomaly in anomalies:  # the answer key, for whoever checks a detector against it
        print(json.dumps(anomaly.as_dict()), flush=True)
    sim = Simulator(plant, anomalies, host=a.host, port=a.port, protocol=a.protocol, topic=a.topic)
    with sim:
        try:
            time.sleep(a.duration)
        except KeyboardInterrupt:
            pass
    print(f"published {sim.sent} readings", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
