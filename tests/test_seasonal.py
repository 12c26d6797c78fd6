"""Seasonal profiles and peak references: the detector's context beyond the LSTM window."""
import numpy as np
import pytest

from streamlstm.config import ConfigError, parse_config
from streamlstm.detector.scores import PeakReference
from streamlstm.detector.seasonal import SeasonalProfiles
from streamlstm.config import parse_duration
from streamlstm.detector.settings import DetectorSettings

from test_detector import run, small_detector

DAY = 86400.0


def feed(profiles, slot, ts, values, interval, weight=1.0):
    """Step one reading at a time, as GroupDetector does; returns the expected values seen."""
    seen = []
    for t, v in zip(ts, values):
        slots = np.array([slot])
        seen.append(profiles.expected(slots, np.array([t]))[0, :, 0].copy())
        profiles.update(slots, np.array([t]), np.array([[v]]), np.array([interval]), np.array([weight]))
    return np.array(seen)


def test_profile_enables_after_one_period_and_predicts_the_phase():
    p = SeasonalProfiles([10.0], features=1, alpha=0.5, max_bins=100)
    p.grow(1)
    ts = np.arange(40.0)
    values = (ts % 10) * 3.0  # a saw tooth with period 10
    seen = feed(p, 0, ts, values, 1.0)
    # Nothing before the period has been observed once and its bins filled once.
    assert np.isnan(seen[:20]).all()
    np.testing.assert_allclose(seen[20:, 0], values[20:])
    assert p.bins[0, 0] == 10 and p.used == 10


def test_profile_moves_by_alpha_per_period_and_weight_damps_it():
    p = SeasonalProfiles([4.0], features=1, alpha=0.25, max_bins=100)
    p.grow(2)
    feed(p, 0, np.arange(8.0), np.zeros(8), 1.0)
    seen = feed(p, 0, [8.0], [8.0], 1.0)
    assert seen[0, 0] == 0.0
    assert p.expected(np.array([0]), np.array([12.0]))[0, 0, 0] == pytest.approx(2.0)  # 0 + 0.25 * 8
    feed(p, 1, np.arange(8.0), np.zeros(8), 1.0)
    feed(p, 1, [8.0], [8.0], 1.0, weight=0.0)  # an anomalous reading is not learnt
    assert p.expected(np.array([1]), np.array([12.0]))[0, 0, 0] == 0.0


def test_wide_bins_share_one_step_per_visit():
    # 100 readings per period but at most 10 bins: each bin sees 10 readings per visit.
    p = SeasonalProfiles([100.0], features=1, alpha=0.5, max_bins=10)
    p.grow(1)
    feed(p, 0, np.arange(200.0), np.zeros(200), 1.0)
    feed(p, 0, np.arange(200.0, 210.0), np.ones(10), 1.0)  # one visit of bin 0, value 1
    assert p.bins[0, 0] == 10
    assert p.expected(np.array([0]), np.array([300.0]))[0, 0, 0] == pytest.approx(0.5)


def test_period_needs_enough_readings_and_costs_nothing_before():
    p = SeasonalProfiles([DAY, 7 * DAY], features=1, alpha=0.2, max_bins=2016)
    p.grow(3)
    feed(p, 0, np.arange(0.0, 2 * DAY, 8 * 3600.0), np.zeros(6), 8 * 3600.0)  # 3 readings a day
    assert (p.offset[0] == -1).all()
    feed(p, 1, np.arange(0.0, 0.5 * DAY, 60.0), np.zeros(720), 60.0)  # half a day of a fast sensor
    assert (p.offset[1] == -1).all() and p.used == 0
    feed(p, 2, np.arange(0.0, 1.5 * DAY, 60.0), np.zeros(2160), 60.0)
    assert p.offset[2, 0] >= 0 and p.bins[2, 0] == 1440 and p.offset[2, 1] == -1


def test_profile_state_round_trip_and_other_periods_start_afresh():
    p = SeasonalProfiles([10.0], features=1, alpha=0.5, max_bins=100)
    p.grow(1)
    feed(p, 0, np.arange(30.0), np.arange(30.0) % 10, 1.0)
    state = p.state_dict(1)
    q = SeasonalProfiles([10.0], features=1, alpha=0.5, max_bins=100)
    q.load_state_dict(state, 1)
    ts = np.array([35.0])
    np.testing.assert_array_equal(q.expected(np.array([0]), ts), p.expected(np.array([0]), ts))
    other = SeasonalProfiles([20.0], features=1, alpha=0.5, max_bins=100)
    other.load_state_dict(state, 1)
    assert other.used == 0 and (other.offset == -1).all()


def test_peak_reference_calibrates_a_sensor_by_its_own_recent_peaks():
    ref = PeakReference(window=100)  # calibrated maximum over 100 readings: log10(100) = 2
    assert ref.floor == pytest.approx(2.0)
    ref.grow(2)
    slots = np.array([0, 1])
    on = np.array([True, True])
    np.testing.assert_allclose(ref.adjust(slots, np.array([1.5, 20.0]), on), [1.5, 20.0])
    # One excursion may at most double the reference it began from: 2 -> 4, not 20.
    assert ref.peak[1] == pytest.approx(4.0)
    np.testing.assert_allclose(ref.offset(slots), [0.0, 2.0])
    # Within the same excursion the cap stays at twice its starting reference.
    ref.adjust(slots, np.array([1.0, 30.0]), on)
    assert ref.peak[1] == pytest.approx(4.0)
    # A new excursion (after a quiet reading) may double again.
    ref.adjust(slots, np.array([1.0, 1.0]), on)
    ref.adjust(slots, np.array([1.0, 30.0]), on)
    assert 7.5 < ref.peak[1] <= 8.0
    # New evidence keeps what exceeds the peak's excess over the floor.
    peak = ref.peak[1]
    out = ref.adjust(slots, np.array([1.0, 400.0]), on)
    assert out[1] == pytest.approx(400.0 - (peak - 2.0))
    # The peak is forgotten over ~window readings.
    for _ in range(1000):
        ref.adjust(slots, np.zeros(2), on)
    np.testing.assert_allclose(ref.offset(slots), [0.0, 0.0])


def test_peak_reference_learns_nothing_before_warmup():
    ref = PeakReference(window=100)
    ref.grow(1)
    ref.adjust(np.array([0]), np.array([50.0]), np.array([False]))
    assert ref.offset(np.array([0]))[0] == 0.0


def test_durations_and_config_keys():
    assert parse_duration("1d") == DAY and parse_duration("7d") == 7 * DAY and parse_duration("90m") == 5400.0
    assert DetectorSettings().period_seconds == (DAY, 7 * DAY)
    assert parse_config({"detector": {"seasonal_periods": None}}).detector.seasonal_periods == ()
    with pytest.raises(ConfigError) as e:
        parse_config({"detector": {"seasonal_periods": ["1d", "weekly"]}})
    assert e.value.path == "detector.seasonal_periods[1]" and "unit" in e.value.reason
    with pytest.raises(ConfigError) as e:
        parse_config({"detector": {"peak_memory": -1}})
    assert e.value.path == "detector.peak_memory"


def daily_square(days, dt=300.0, seed=0, low=20.0, high=80.0):
    rng = np.random.default_rng(seed)
    ts = np.arange(0.0, days * DAY, dt)
    hour = (ts % DAY) / 3600.0
    x = np.where((hour >= 8) & (hour < 18), high, low) + rng.normal(0.0, 1.0, len(ts))
    return ts, x


def run_ts(det, ts, x):
    from streamlstm.tools import replay

    return replay.replay_series(det, "s", ts, x.reshape(-1, 1))


@pytest.mark.parametrize("periods", [["1d"], []])
def test_a_missing_daily_rise_is_flagged_only_with_a_daily_profile(periods):
    ts, x = daily_square(8)
    day = (ts // DAY).astype(int)
    hour = (ts % DAY) / 3600.0
    skipped = (day == 6) & (hour >= 8) & (hour < 18)
    x[skipped] = 20.0 + np.random.default_rng(1).normal(0.0, 1.0, skipped.sum())
    det = small_detector(seasonal_periods=periods, warmup=200)
    res = run_ts(det, ts, x)
    normal_days = (day >= 3) & (day < 6)
    in_skip = skipped | ((day == 6) & (hour >= 8) & (hour < 19))
    if periods:
        # The routine daily transitions raise nothing once the profile knows them...
        assert not res["is_anomaly"][normal_days].any()
        # ...and the day the rise does not come is flagged within the hour.
        first = np.flatnonzero(res["is_anomaly"] & in_skip)
        assert len(first) and hour[first[0]] <= 9.0
    else:
        # Without one, a flat stretch at the usual low level is nothing the LSTM can see.
        assert not (res["is_anomaly"] & skipped).any()


def test_spiky_sensor_stops_alerting_on_its_routine_spikes_but_not_on_a_shift():
    rng = np.random.default_rng(4)
    n = 6000
    x = rng.normal(0.0, 0.1, n)
    routine = rng.choice(np.arange(300, 5400), 40, replace=False)
    x[routine] += 1.0  # ten-sigma spikes, ~1 in 130 readings: routine for this sensor
    x[5500:] += 1.0
    flagged = {}
    for memory in (2000, 0):
        res = run(small_detector(warmup=200, peak_memory=memory), x)
        flagged[memory] = np.count_nonzero(res["is_anomaly"][3000:5400])
        assert res["is_anomaly"][5500:5503].any()  # the shift is flagged either way
    # Without a peak reference every routine spike alerts; with one, few do.
    assert flagged[0] >= 10
    assert flagged[2000] <= flagged[0] / 5


def test_state_round_trip_with_seasonal_and_peak_state():
    ts, x = daily_square(3, dt=600.0)
    x[400] += 40.0
    a = small_detector(warmup=50)
    half = 300
    run_ts(a, ts[:half], x[:half])
    arrays, meta = a.state_dict()
    assert any(k.endswith("seasonal.pool") for k in arrays) and any("peak.model" in k for k in arrays)
    b = small_detector(warmup=50)
    b.load_state_dict({k: v.copy() for k, v in arrays.items()}, meta)
    ra, rb = run_ts(a, ts[half:], x[half:]), run_ts(b, ts[half:], x[half:])
    for key in ("score", "alert", "is_anomaly", "prediction"):
        np.testing.assert_array_equal(ra[key], rb[key])
