"""Pure-logic tests of the detector's defences against hostile input (issue 12): the running
scaler's robust updates and implausibility reset (defect 2), the clock-skew limit and clock-jump
re-basing (defect 3), the bounded routing cache (defect 5a)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from streamlstm.detector.clock import ClockGuard
from streamlstm.detector.scaling import RunningScaler


def feed(scaler, values, slot=0):
    """Feed one slot reading by reading; the reading indices at which it reset itself."""
    resets = []
    slots = np.array([slot])
    for i, v in enumerate(values):
        if scaler.update(slots, np.array([[v]]), np.ones(1))[0]:
            resets.append(i)
    return resets


def normal(n, seed=0):
    rng = np.random.default_rng(seed)
    return list(10.0 + rng.normal(0.0, 1.0, n))


@pytest.mark.parametrize("big", [1e20, 3.4e38, 1e300])
@pytest.mark.parametrize("at", [0, 1, 3, 100])
def test_one_huge_reading_cannot_blind_the_scale(big, at):
    s = RunningScaler(1, horizon=5000)
    s.grow(1)
    values = normal(400)
    values[at] = big
    resets = feed(s, values)
    std = float(s.std(np.array([0]))[0, 0])
    mean = float(s.mean[0, 0])
    # Within an order of magnitude of the true scale (std 1, mean 10) 300 readings later, not
    # 10^19 times it; reset at most once.
    assert 0.3 < std < 10.0 and abs(mean - 10.0) < 10.0, (std, mean, resets)
    assert len(resets) <= 1
    if at >= 5:  # past ROBUST_AFTER the clipped update alone keeps the scale: no reset needed
        assert resets == []


def test_healthy_sensors_are_never_reset():
    s = RunningScaler(1, horizon=5000)
    s.grow(4)
    t = np.arange(20_000)
    series = {
        0: 10.0 + np.sin(2 * math.pi * t / 86_400),  # a daily wave at one reading per second
        1: np.full(len(t), 5.0),  # constant
        2: np.round(20 + 3 * np.sin(t / 500.0), 1),  # quantised
        3: np.asarray(normal(len(t), seed=1)) * 1e-6,  # tiny but healthy noise
    }
    table = np.stack([series[k] for k in range(4)], axis=1)
    slots = np.arange(4)
    for row in table:  # all four in one update per step, as a batch round does
        assert not s.update(slots, row[:, None], np.ones(4)).any()


def test_a_level_shift_is_still_followed():
    s = RunningScaler(1, horizon=500)
    s.grow(1)
    feed(s, normal(300) + [v + 1000.0 for v in normal(3000, seed=2)])
    assert abs(float(s.mean[0, 0]) - 1010.0) < 5.0


def clock(now=2e9, skew=3600.0, jump=5):
    return ClockGuard(skew, jump, now=lambda: now)


def run(guard, last, interval, ts_list, slot=0):
    """Feed readings one by one as _round would; the accepted timestamps and the re-bases."""
    last_ts = np.array([last])
    interval = np.array([interval])
    accepted, rebases = [], 0
    for ts in ts_list:
        refused, rebased = guard.check(np.array([slot]), np.array([ts]), last_ts, interval)
        rebases += int(rebased[0])
        if not refused[0] and ts > last_ts[0]:
            accepted.append(ts)
            last_ts[0] = ts
    return accepted, rebases, last_ts[0]


def test_far_future_reading_is_refused():
    g = clock()
    refused, _ = g.check(np.array([0, 1]), np.array([32503680000.0, 2e9 + 10]), np.array([1e9, 1e9]),
                         np.zeros(2))
    assert refused.tolist() == [True, False]
    assert not ClockGuard(0.0, 5).check(np.array([0]), np.array([1e12]), np.array([0.0]), np.zeros(1))[0][0]


def test_a_sensor_whose_last_timestamp_is_in_the_future_is_rebased_at_once():
    # e.g. a checkpoint written before the skew limit existed, holding a reading dated 2999
    accepted, rebases, last = run(clock(), 32503680000.0, 60.0, [2e9, 2e9 + 60])
    assert accepted == [2e9, 2e9 + 60] and rebases == 1 and last == 2e9 + 60


def test_a_clock_that_jumped_back_is_rebased_after_n_in_order_readings():
    start = 2e9 - 10 * 86400  # a device RTC reset: readings ten days behind its last one
    accepted, rebases, _ = run(clock(jump=5), 2e9, 60.0, [start + 60 * k for k in range(8)])
    assert rebases == 1 and accepted == [start + 60 * k for k in range(4, 8)]


def test_redeliveries_and_shuffled_readings_are_no_clock_jump():
    # behind by less than the skew limit: a redelivery after a reconnect, always out_of_order
    accepted, rebases, _ = run(clock(jump=5), 2e9, 60.0, [2e9 - 600 + k for k in range(50)])
    assert accepted == [] and rebases == 0
    # far behind but not in order: never a run
    far = 2e9 - 10 * 86400
    accepted, rebases, _ = run(clock(jump=3), 2e9, 60.0, [far + 5, far + 1, far + 4, far + 2, far + 3, far])
    assert accepted == [] and rebases == 0


def test_routing_cache_stays_bounded_by_the_sensor_cap():
    from streamlstm.detector.detector import ROUTE_CACHE_FACTOR, Detector, GroupConfig

    det = Detector([GroupConfig()], backend_factory=lambda name: None, max_sensors=100)
    for i in range(10_000):  # distinct ids, as a hostile client would send (all over the cap)
        assert det.group_for(f"id{i}").name == "default"
    assert len(det._route) <= ROUTE_CACHE_FACTOR * 100


def test_a_checkpoint_whose_per_sensor_arrays_do_not_fit_its_sensors_is_refused():
    from streamlstm.config import parse_config
    from streamlstm.reading import Reading
    from streamlstm.factory import build_detector

    cfg = parse_config({"backend": {"kind": "numpy"}, "model": {"hidden_size": 2, "window": 2},
                        "detector": {"seasonal_periods": []}})
    det = build_detector(cfg)
    det.process([Reading(f"s{k}", 1e9 + i, (float(i % 7),)) for i in range(5) for k in range(3)])
    arrays, meta = det.state_dict()
    build_detector(cfg).load_state_dict(dict(arrays), meta)  # as saved: fine
    crafted = dict(arrays)
    crafted["default/last_ts"] = arrays["default/last_ts"][:1] + 1e12  # one row for three sensors
    with pytest.raises(ValueError, match="last_ts"):
        build_detector(cfg).load_state_dict(crafted, meta)


def test_a_shut_read_gate_still_reads_one_packet_per_half_keepalive():
    # Without any read for a keepalive after its PINGREQ, paho drops the connection itself.
    from paho.mqtt.enums import CallbackAPIVersion

    from streamlstm.mqtt_io import _GatedClient

    reads = []
    c = _GatedClient(CallbackAPIVersion.VERSION2, client_id="t")
    c._sock = object()  # "connected": loop_read only looks at it
    c._packet_read = lambda: reads.append(1) or 0
    c.read_gate = lambda timeout: False
    c.force_read_after_s = 0.2
    for _ in range(3):
        c.loop_read()
    assert reads == []
    time.sleep(0.25)
    c.loop_read()
    assert reads == [1]
    c.read_gate = lambda timeout: True
    c.loop_read()
    assert reads == [1, 1]
    c._sock = None  # not a socket: paho's __del__ would try to close it
