"""The simulated plant and its anomaly injector (streamlstm/tools/simulate.py): pure parts, then one MQTT
run."""
import json
import math
import re
import threading

import numpy as np
import pytest

from streamlstm.tools import simulate
from streamlstm.tools.simulate import (KINDS, Anomaly, AnomalyInjector, Plant, apply_anomaly, clean_value,
                                       noise_draws, plant_sensors, reading_value)

DAY = 180.0
RANGES = {"temp": (20.0, 80.0), "pressure": (1.0, 10.0), "flow": (100.0, 1000.0)}


def day_of(spec, n=2000):
    return np.array([clean_value(spec, t, DAY) for t in np.linspace(0.0, DAY, n)])


# --------------------------------------------------------------------------- sensors and signal

def test_sensor_ids_and_quantities():
    specs = plant_sensors(50, seed=0)
    names = [s.name for s in specs]
    assert len(names) == 50 == len(set(names))
    assert names[:4] == ["boiler1_temp", "boiler1_pressure", "boiler1_flow", "pump1_temp"]
    assert all(re.fullmatch(r"[a-z]+\d+_(temp|pressure|flow)", n) for n in names)
    assert all(s.name.endswith(s.quantity) for s in specs)
    assert {s.quantity for s in specs} == set(RANGES)
    with pytest.raises(ValueError):
        plant_sensors(0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_daily_pattern_stays_in_the_quantity_range(seed):
    for spec in plant_sensors(50, seed):
        lo, hi = RANGES[spec.quantity]
        day = day_of(spec)
        assert lo <= day.min() and day.max() <= hi, spec
        # ... with room for the noise too (5 sigma)
        assert lo <= day.min() - 5 * spec.noise and day.max() + 5 * spec.noise <= hi, spec
        # a real daily swing, well above the noise
        assert day.max() - day.min() > 0.5 * spec.amplitude > 5 * spec.noise


def test_daily_pattern_is_periodic_and_per_sensor():
    a, b = plant_sensors(2, seed=3)
    for t in (0.0, 17.3, 99.9):
        assert clean_value(a, t, DAY) == pytest.approx(clean_value(a, t + DAY, DAY))
        assert clean_value(a, t, DAY) == pytest.approx(clean_value(a, t + 5 * DAY, DAY))
    # per-sensor scale, offset and phase: the two curves differ
    assert not np.allclose(day_of(a) - a.offset, day_of(b) - b.offset)
    # a quarter day later the pattern has moved by a lot
    assert abs(clean_value(a, 0.0, DAY) - clean_value(a, DAY / 4, DAY)) > 0.1 * a.amplitude


def test_noise_is_deterministic_standard_normal():
    assert np.array_equal(noise_draws(5, 10, 50), noise_draws(5, 10, 50))
    assert not np.array_equal(noise_draws(5, 10, 50), noise_draws(5, 11, 50))
    assert not np.array_equal(noise_draws(5, 10, 50), noise_draws(6, 10, 50))
    z = np.concatenate([noise_draws(0, k, 50) for k in range(400)])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05


def test_plant_readings_deterministic_with_seed():
    p1, p2, p3 = Plant(20, seed=4, rate=5.0), Plant(20, seed=4, rate=5.0), Plant(20, seed=5, rate=5.0)
    for tick in (0, 1, 250):
        assert p1.readings(tick, {}) == p2.readings(tick, {})
        assert p1.readings(tick, {}) != p3.readings(tick, {})
    assert p1.time_of(10) == 2.0
    # readings = pattern + noise of that tick
    spec = p1.sensors[3]
    z = noise_draws(4, 7, 20)[3]
    assert p1.readings(7, {})[3] == (spec.name, pytest.approx(clean_value(spec, 1.4, DAY) + spec.noise * z))


# --------------------------------------------------------------------------- anomaly kinds

SPEC = plant_sensors(1, seed=2)[0]
TS = np.arange(0.0, 60.0, 0.2)


def series(anomaly):
    """(normal, anomalous) readings over TS with the same noise."""
    zs = np.random.default_rng(0).standard_normal(len(TS))
    normal = np.array([reading_value(SPEC, t, z, DAY) for t, z in zip(TS, zs)])
    changed = np.array([reading_value(SPEC, t, z, DAY, anomaly) for t, z in zip(TS, zs)])
    return normal, changed


def window(a):
    return (TS >= a.start) & (TS < a.end)


def test_outside_its_window_an_anomaly_changes_nothing():
    for kind, magnitude in (("spike", 5.0), ("level_shift", 5.0), ("stuck", 40.0), ("drift", 5.0), ("noise_burst", 8.0)):
        a = Anomaly(kind, SPEC.name, 20.0, 10.0, magnitude)
        normal, changed = series(a)
        assert np.array_equal(normal[~window(a)], changed[~window(a)]), kind
        assert not np.array_equal(normal[window(a)], changed[window(a)]), kind
    assert apply_anomaly(None, 3.0, 1.5, 0.1) == 1.5
    assert apply_anomaly(Anomaly("spike", "x", 1.0, 1.0, 9.0), 2.0, 1.5, 0.1) == 1.5  # end is exclusive
    with pytest.raises(ValueError):
        apply_anomaly(Anomaly("wobble", "x", 0.0, 1.0, 1.0), 0.5, 1.0, 0.1)


@pytest.mark.parametrize("kind", ["spike", "level_shift"])
def test_spike_and_level_shift_add_their_magnitude(kind):
    a = Anomaly(kind, SPEC.name, 20.0, 1.0 if kind == "spike" else 15.0, -3.0 * SPEC.amplitude)
    normal, changed = series(a)
    assert np.allclose(changed[window(a)] - normal[window(a)], a.magnitude)


def test_stuck_repeats_one_value():
    a = Anomaly("stuck", SPEC.name, 20.0, 10.0, 47.125)
    normal, changed = series(a)
    assert np.all(changed[window(a)] == 47.125)
    assert np.unique(normal[window(a)]).size == window(a).sum()  # normally no reading repeats


def test_drift_ramps_linearly_to_its_magnitude():
    a = Anomaly("drift", SPEC.name, 10.0, 40.0, 2.0 * SPEC.amplitude)
    normal, changed = series(a)
    offset = (changed - normal)[window(a)]
    assert offset[0] == pytest.approx(0.0, abs=1e-9)
    assert np.all(np.diff(offset) > 0)
    expected = a.magnitude * (TS[window(a)] - a.start) / a.duration
    assert np.allclose(offset, expected)
    assert offset[-1] == pytest.approx(a.magnitude, rel=0.02)


def test_noise_burst_scales_the_noise_not_the_level():
    a = Anomaly("noise_burst", SPEC.name, 0.0, 60.0, 8.0)
    normal, changed = series(a)
    clean = np.array([clean_value(SPEC, t, DAY) for t in TS])
    assert np.allclose(changed - clean, 8.0 * (normal - clean))
    assert abs((changed - clean).mean()) < 1.5 * SPEC.noise  # same level on average


def test_active_anomalies():
    a = Anomaly("spike", "s1", 1.0, 1.0, 1.0)
    b = Anomaly("stuck", "s2", 1.5, 3.0, 1.0)
    assert simulate.active_anomalies([a, b], 0.5) == {}
    assert simulate.active_anomalies([a, b], 1.7) == {"s1": a, "s2": b}
    assert simulate.active_anomalies([a, b], 2.0) == {"s2": b}


# --------------------------------------------------------------------------- injection schedule

def injector(seed=0, **kw):
    kw.setdefault("warmup_s", 30.0)
    return AnomalyInjector(plant_sensors(kw.pop("n", 50), seed), seed=seed, **kw)


def test_schedule_is_deterministic_with_a_seed():
    assert injector(3).schedule(600) == injector(3).schedule(600)
    assert injector(3).schedule(600) != injector(4).schedule(600)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [3, 10, 50])
def test_schedule_respects_warmup_horizon_and_never_overlaps_on_a_sensor(seed, n):
    inj = injector(seed, n=n, warmup_s=25.0, min_gap_s=20.0)
    sched = inj.schedule(900.0)
    assert sched, "a 15-minute run gets anomalies"
    assert [a.start for a in sched] == sorted(a.start for a in sched)
    assert all(a.start >= 25.0 and a.end <= 900.0 for a in sched)
    assert all(a.kind in KINDS and a.duration > 0 for a in sched)
    by_sensor = {}
    for a in sched:
        by_sensor.setdefault(a.sensor, []).append(a)
    for runs in by_sensor.values():
        for prev, nxt in zip(runs, runs[1:]):
            assert nxt.start >= prev.end + 20.0, (prev, nxt)


def test_schedule_kinds_and_magnitudes():
    inj = injector(1, rate=5.0)
    sched = inj.schedule(3600.0)
    amp = {s.name: s.amplitude for s in inj.sensors}
    assert {a.kind for a in sched} == set(KINDS)
    assert {a.kind for a in sched[:5]} == set(KINDS)  # kinds go round a cycle
    for a in sched:
        lo, hi = AnomalyInjector.DURATION[a.kind]
        assert max(lo, 3 / 5.0) <= a.duration <= hi
        if a.kind == "stuck":
            spec = next(s for s in inj.sensors if s.name == a.sensor)
            assert abs(a.magnitude - clean_value(spec, a.start, DAY)) < 0.01
        elif a.kind == "noise_burst":
            assert 6.0 <= a.magnitude <= 10.0
        else:
            lo, hi = AnomalyInjector.MAGNITUDE[a.kind]
            assert lo * amp[a.sensor] <= abs(a.magnitude) <= hi * amp[a.sensor]
    signs = {math.copysign(1, a.magnitude) for a in sched if a.kind in ("spike", "level_shift", "drift")}
    assert signs == {-1.0, 1.0}


def test_schedule_edge_cases():
    assert injector(0, warmup_s=100.0).schedule(100.0) == []
    # slow rate: a spike still spans at least min_readings readings
    spikes = [a for a in injector(2, rate=0.5, kinds=("spike",)).schedule(3600) if a.kind == "spike"]
    assert spikes and all(a.duration >= 3 / 0.5 for a in spikes)
    # short run: what is scheduled still ends by the horizon
    assert all(a.end <= 40.0 for a in injector(0, warmup_s=10.0).schedule(40.0))
    with pytest.raises(ValueError):
        injector(0, kinds=("wobble",))
    with pytest.raises(ValueError):
        injector(0, rate=0.0)


# --------------------------------------------------------------------------- publishing

def test_payload_format():
    assert json.loads(simulate.payload(21.1234567, 1700000000.25)) == {"value": 21.123457, "ts": 1700000000.25}


def test_simulator_publishes_json_qos1_on_plant_topics():
    from streamlstm.tools.broker import amqtt_available, find_mosquitto, local_broker

    if find_mosquitto() is None and not amqtt_available():
        pytest.skip("no MQTT broker: neither mosquitto nor amqtt is installed")
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    plant = Plant(4, seed=0, rate=20.0)
    spike = Anomaly("spike", "boiler1_pressure", 0.0, 1.0, 1000.0)
    got, done = [], threading.Event()
    with local_broker() as broker:
        proto = mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t-sub", protocol=proto)
        subscribed = threading.Event()
        sub.on_connect = lambda c, *a: c.subscribe("plant/+", qos=1)
        sub.on_subscribe = lambda *a: subscribed.set()

        def on_message(c, u, msg):
            got.append((msg.topic, msg.qos, json.loads(msg.payload)))
            if len(got) >= 40:
                done.set()

        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.loop_start()
        try:
            assert subscribed.wait(10)
            with simulate.Simulator(plant, [spike], host=broker.host, port=broker.port, protocol=broker.protocol) as sim:
                assert done.wait(10)
        finally:
            sub.loop_stop()
            sub.disconnect()
    topics = {t for t, _, _ in got}
    assert topics == {f"plant/{s.name}" for s in plant.sensors}
    assert {q for _, q, _ in got} == {1}
    first = {}
    for topic, _, doc in got:
        assert set(doc) == {"value", "ts"}
        first.setdefault(topic, doc)
    # tick 0 at t0: the deterministic value, the spike on its sensor
    for name, value in plant.readings(0, {"boiler1_pressure": spike}):
        assert first[f"plant/{name}"]["value"] == pytest.approx(value, abs=1e-5)
        assert first[f"plant/{name}"]["ts"] == pytest.approx(sim.t0, abs=1e-5)
    assert first["plant/boiler1_pressure"]["value"] > 900
    assert sim.sent >= 40
