"""Detection as an operator reads it: incidents follow the sensor, large surprises are never
hidden by a sensor's earlier peaks, and events name the evidence that fired.

All with the default configuration (what the daemon runs) unless a test sets a key.
"""
import numpy as np
import pytest

from streamlstm.config import parse_config
from streamlstm.factory import build_detector
from streamlstm.tools import replay

DT = 60.0


def detector(**detector_keys):
    return build_detector(parse_config({"detector": detector_keys} if detector_keys else {}), "cpu")


def run(det, x):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return replay.replay_series(det, "s", DT * np.arange(len(x)), x)


def incidents(result):
    """Closed incidents (the "resolved" events) and the ones still open, in order."""
    closed = [inc for kind, inc in result["events"] if kind == "resolved"]
    opened = [inc for kind, inc in result["events"] if kind == "anomaly"]
    return opened, closed


def row(t):
    return int(round(t / DT))


def test_large_spike_shortly_after_an_earlier_incident_is_flagged():
    x = np.random.default_rng(11).standard_normal(2200)
    x[1000:1010] += 10.0  # a short level shift: an incident the sensor returns from
    x[1500] += 50.0  # 500 readings later, a 50-sigma spike
    res = run(detector(), x)
    opened, _ = incidents(res)
    assert [row(i.start) for i in opened][:1] and 1000 <= row(opened[0].start) <= 1003
    assert res["is_anomaly"][1500], "a surprise far above the sensor's earlier peaks must not be discounted away"
    assert res["score"][1500] > 0.9


def test_persistent_shift_keeps_its_incident_open_until_the_sensor_returns():
    x = np.random.default_rng(12).standard_normal(3000)
    x[1500:1800] += 6.0  # the valve stays shut for 300 readings, then the sensor returns
    res = run(detector(), x)
    opened, closed = incidents(res)
    assert len(opened) == 1 and len(closed) == 1, [(row(i.start), i.end and row(i.end)) for i in closed]
    assert 1500 <= row(opened[0].start) <= 1505
    # Open for the whole excursion, not only while the model is surprised by its start.
    assert res["is_anomaly"][1505:1800].mean() > 0.98
    assert 1800 <= row(closed[0].end) <= 1830
    assert closed[0].reason == "returned"
    assert not res["is_anomaly"][1850:].any()


def test_a_new_level_is_accepted_after_accept_after_readings_with_that_reason():
    x = np.random.default_rng(13).standard_normal(3500)
    x[1500:] += 6.0  # never comes back
    res = run(detector(accept_after=300), x)
    opened, closed = incidents(res)
    assert len(opened) == 1 and len(closed) == 1
    assert closed[0].reason == "accepted"
    assert row(closed[0].end) == pytest.approx(row(opened[0].start) + 300, abs=2)
    # The new level is the new normal: nothing more to report about it.
    assert not res["is_anomaly"][row(closed[0].end) + 1:].any()


def test_without_accept_after_the_incident_stays_open_while_the_sensor_is_away():
    x = np.random.default_rng(14).standard_normal(3500)
    x[1500:] += 6.0
    res = run(detector(accept_after=0), x)
    opened, closed = incidents(res)
    assert len(opened) == 1 and closed == []
    assert res["is_anomaly"][1505:].all()


def test_events_name_the_evidence_that_fired():
    rng = np.random.default_rng(15)
    stuck = rng.standard_normal(1500)
    stuck[1200:] = stuck[1199]
    spike = rng.standard_normal(1500)
    spike[1200] += 30.0
    evidence = {}
    for name, x in (("stuck", stuck), ("spike", spike)):
        opened, _ = incidents(run(detector(), x))
        assert len(opened) == 1
        evidence[name] = opened[0].evidence
    assert evidence["stuck"] == "stuck"
    assert evidence["spike"] in ("model", "range")
    # With only the range channel on, a spike can only be the range channel's.
    opened, _ = incidents(run(detector(channels=["range"]), spike))
    assert [i.evidence for i in opened] == ["range"]


def test_spiky_sensor_routine_spikes_rarely_alert_once_learnt_but_a_big_one_does():
    rng = np.random.default_rng(16)
    n = 8000
    x = rng.normal(0.0, 1.0, n)
    routine = np.sort(rng.choice(np.arange(300, 7000), 60, replace=False))
    x[routine] += rng.uniform(8.0, 12.0, len(routine))  # 8-12 sigma spikes, 1 in 110 readings
    x[7500] += 200.0  # one far beyond anything routine
    late = routine[routine > 3000]
    flagged = {}
    for memory in (2000, 0):
        res = run(detector(peak_memory=memory), x)
        flagged[memory] = int(res["is_anomaly"][late].sum())
        assert res["is_anomaly"][7500], "a surprise far above the sensor's routine peaks must alert"
    # Measured: 6 of 25 with the peak reference (spikes that vary by +-20% in size still beat
    # the sensor's recent peak now and then), 17 of 25 without.
    assert flagged[0] >= len(late) // 2
    assert flagged[2000] <= min(len(late) // 3, flagged[0] // 2)


def test_channels_are_validated_with_the_key_path():
    from streamlstm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config({"detector": {"channels": ["model", "vibes"]}})
    assert e.value.path == "detector.channels[1]"
    with pytest.raises(ConfigError) as e:
        parse_config({"detector": {"accept_after": -1}})
    assert e.value.path == "detector.accept_after"
