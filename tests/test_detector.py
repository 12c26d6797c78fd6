"""streamlstm.detector: scores, incidents, rejections, protection, routing, checkpoints.

Tests that say "default" build the detector from the default config (as the daemon does);
the others use a small model to stay fast.
"""
import fnmatch

import numpy as np

from streamlstm.backend import make_backend
from streamlstm.config import ModelConfig, parse_config
from streamlstm.detector import Detector, DetectorSettings, GroupConfig
from streamlstm.reading import Chunk, Reading, concat
from streamlstm.factory import build_detector
from streamlstm.tools import replay

SMALL_MODEL = ModelConfig(hidden_size=8, window=8, learning_rate=0.05, train_every=1)  # a window per reading


def default_detector():
    return build_detector(parse_config({}), "cpu")


def small_detector(groups=None, max_sensors=100_000, **settings):
    if groups is None:
        groups = [GroupConfig(model=SMALL_MODEL, detector=DetectorSettings(**settings))]
    return Detector(groups, lambda name: make_backend("cpu"), max_sensors=max_sensors)


def noisy_sine(n, seed=0, period=50.0, noise=0.1):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)


def run(det, values, sensor="s", t0=0.0, dt=60.0, chunk=512):
    values = np.asarray(values, dtype=np.float64)
    values = values.reshape(len(values), -1)
    seconds = t0 + dt * np.arange(len(values))
    return replay.replay_series(det, sensor, seconds, values, chunk=chunk)


def first_anomaly(result, start):
    hits = np.flatnonzero(result["is_anomaly"][start:])
    return int(hits[0]) if len(hits) else None


def anomalies_before(result, stop):
    return int(np.sum(result["is_anomaly"][:stop]))


# --- detection with the default settings ---------------------------------------------


def test_default_spike_in_noisy_sine_is_flagged_within_a_few_readings():
    x = noisy_sine(1500)  # amplitude 1, noise 0.1
    x[1200] += 6.0
    res = run(default_detector(), x)
    assert anomalies_before(res, 1200) == 0
    lag = first_anomaly(res, 1200)
    assert lag is not None and lag <= 3
    assert res["score"][300:1200].max() < 0.5  # normal readings score low


def test_default_level_shift_is_flagged():
    x = noisy_sine(1500)
    x[1200:] += 4.0
    res = run(default_detector(), x)
    assert anomalies_before(res, 1200) == 0
    lag = first_anomaly(res, 1200)
    assert lag is not None and lag <= 10


def test_default_stuck_sensor_is_flagged():
    x = noisy_sine(1500)
    x[1200:] = x[1199]
    res = run(default_detector(), x)
    assert anomalies_before(res, 1200) == 0
    lag = first_anomaly(res, 1200)
    assert lag is not None and lag <= 20


def test_default_no_event_on_stationary_noise():
    x = np.random.default_rng(7).standard_normal(10_000)
    res = run(default_detector(), x)
    assert res["events"] == []
    assert not res["is_anomaly"].any()


def test_default_quantised_and_constant_series_raise_no_event():
    rng = np.random.default_rng(3)
    quantised = np.round(np.sin(np.arange(3000) * 2 * np.pi / 300) * 2 + 0.3 * rng.standard_normal(3000))
    constant = np.full(3000, 5.0)
    for series in (quantised, constant):
        res = run(default_detector(), series)
        assert res["events"] == []


def test_default_one_incident_gives_one_event_pair():
    x = noisy_sine(1500)
    x[1200:1205] += 6.0
    res = run(default_detector(), x)
    kinds = [k for k, _ in res["events"]]
    assert kinds == ["anomaly", "resolved"]
    opened, closed = res["events"][0][1], res["events"][1][1]
    assert opened is closed or opened.start == closed.start
    start = 60.0 * 1200
    assert start <= closed.start <= start + 3 * 60.0
    assert closed.end is not None and closed.end > closed.start
    assert closed.peak_score >= closed.threshold
    assert closed.start <= closed.peak_timestamp <= closed.end
    # alert suppression: the incident's alert rows are few, whatever the threshold
    assert np.count_nonzero(res["alert"][1200:1300] >= closed.threshold) <= 3


def test_default_warmup_is_respected():
    settings = parse_config({}).detector
    x = np.random.default_rng(1).standard_normal(400) * 0.1
    x[[5, 60, 120, settings.warmup - 1]] += 50.0
    res = run(default_detector(), x)
    assert not res["is_anomaly"][: settings.warmup].any()
    assert np.all(res["score"][: settings.warmup] == 0.0)


# --- score range and no look-ahead ---------------------------------------------------


def test_scores_stay_in_unit_interval_on_extreme_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1200)
    x[[300, 301, 700]] = 1e9
    x[[500, 900]] = -1e9
    x[1000:1100] = 1e-300
    for det in (small_detector(warmup=50), default_detector()):
        res = run(det, x)
        assert np.all(np.isfinite(res["score"]))
        assert np.all((res["score"] >= 0.0) & (res["score"] <= 1.0))
        assert np.all((res["alert"] >= 0.0) & (res["alert"] <= 1.0))
        assert res["is_anomaly"][300:303].any()


def test_no_look_ahead():
    rng = np.random.default_rng(4)
    base = noisy_sine(1000, seed=4)
    other = base.copy()
    other[700:] = rng.standard_normal(300) * 5 + 10
    a = run(small_detector(warmup=50), base)
    b = run(small_detector(warmup=50), other)
    np.testing.assert_array_equal(a["score"][:700], b["score"][:700])
    np.testing.assert_array_equal(a["alert"][:700], b["alert"][:700])
    np.testing.assert_array_equal(a["prediction"][:700], b["prediction"][:700])
    assert not np.array_equal(a["score"][700:], b["score"][700:])


# --- rejections and resets ---------------------------------------------------------


def test_duplicate_and_out_of_order_timestamps_are_dropped():
    det = small_detector()
    readings = [Reading("s", 10.0, (1.0,)), Reading("s", 20.0, (2.0,)), Reading("s", 20.0, (3.0,)),
                Reading("s", 15.0, (4.0,)), Reading("s", 30.0, (5.0,))]
    batch = det.process(readings)
    assert batch.reason == ["", "", "duplicate_timestamp", "out_of_order", ""]
    batch = det.process([Reading("s", 30.0, (1.0,)), Reading("s", 25.0, (1.0,)), Reading("s", 31.0, (1.0,))])
    assert batch.reason == ["duplicate_timestamp", "out_of_order", ""]
    assert det.active["default"].seen[0] == 4


def test_non_finite_values_are_rejected():
    det = small_detector()
    batch = det.process([Reading("s", 1.0, (1.0,)), Reading("s", 2.0, (float("nan"),)),
                         Reading("s", 3.0, (float("inf"),)), Reading("s", 4.0, (-float("inf"),)),
                         Reading("s", 5.0, (2.0,))])
    assert batch.reason == ["", "non_finite", "non_finite", "non_finite", ""]
    assert np.all(batch.score == 0.0)
    assert det.active["default"].seen[0] == 2


def test_gap_reset_after_a_long_gap():
    det = small_detector(gap_reset_intervals=10.0)
    run(det, noisy_sine(100))
    batch = det.process([Reading("s", 60.0 * 99 + 60.0 * 50, (0.0,))])
    assert batch.resets == [("default", "s", "gap")]
    assert batch.reason == [""]
    # a short gap does not reset
    batch = det.process([Reading("s", 60.0 * 99 + 60.0 * 53, (0.0,))])
    assert batch.resets == []


# --- learning protection ---------------------------------------------------------------


def test_learning_protection_skip_leaves_weights_untouched_on_flagged_readings():
    det = small_detector(learning_protection="skip", warmup=50)
    x = noisy_sine(600)
    run(det, x)
    group = det.active["default"]
    before = group.bank.theta.copy()
    batch = det.process([Reading("s", 60.0 * 600, (50.0,))])
    assert batch.is_anomaly[0]
    np.testing.assert_array_equal(group.bank.theta, before)


def test_learning_protection_off_trains_on_flagged_readings():
    det = small_detector(learning_protection="off", warmup=50)
    run(det, noisy_sine(600))
    group = det.active["default"]
    before = group.bank.theta.copy()
    batch = det.process([Reading("s", 60.0 * 600, (50.0,))])
    assert batch.is_anomaly[0]
    assert not np.array_equal(group.bank.theta, before)


# --- routing, cap, checkpoints, vectors, replay ----------------------------------------


def test_per_group_routing_and_sensor_cap():
    groups = [
        GroupConfig(name="temps", match="temp/*", model=SMALL_MODEL),
        GroupConfig(name="default", match="*", model=SMALL_MODEL),
    ]
    det = small_detector(groups=groups, max_sensors=3)
    batch = det.process([Reading("temp/a", 1.0, (1.0,)), Reading("hum/b", 1.0, (1.0,)),
                         Reading("temp/c", 1.0, (1.0,)), Reading("temp/d", 1.0, (1.0,)),
                         Reading("temp/a", 2.0, (1.0,))])
    assert batch.groups[:3] == ["temps", "default", "temps"]
    assert batch.reason == ["", "", "", "sensor_cap", ""]
    assert batch.groups[3] is None
    assert set(det.active) == {"temps", "default"}
    assert det.active["temps"].names == ["temp/a", "temp/c"]
    assert det.active["default"].names == ["hum/b"]
    assert det.sensor_count() == 3
    # a known sensor keeps being accepted at the cap, a new one is not
    batch = det.process([Reading("hum/b", 2.0, (1.0,)), Reading("new", 2.0, (1.0,))])
    assert batch.reason == ["", "sensor_cap"]


def test_state_dict_round_trip_continues_identically():
    x = noisy_sine(900, seed=5)
    x[800] += 5
    a = small_detector(warmup=50)
    run(a, x[:500])
    arrays, meta = a.state_dict()
    b = small_detector(warmup=50)
    b.load_state_dict({k: v.copy() for k, v in arrays.items()}, meta)
    ra = run(a, x[500:], t0=60.0 * 500)
    rb = run(b, x[500:], t0=60.0 * 500)
    for key in ("score", "alert", "is_anomaly", "prediction", "residual"):
        np.testing.assert_array_equal(ra[key], rb[key])
    assert [(k, i.start) for k, i in ra["events"]] == [(k, i.start) for k, i in rb["events"]]


def test_vector_readings():
    rng = np.random.default_rng(6)
    n = 800
    t = np.arange(n)
    x = np.stack([np.sin(t / 8), np.cos(t / 8), 0.5 * np.sin(t / 16)], axis=1) + 0.05 * rng.standard_normal((n, 3))
    x[700, 1] += 5.0
    det = small_detector(warmup=50)
    res = run(det, x)
    assert res["prediction"].shape == (n, 3)
    assert np.all(np.isfinite(res["prediction"][10:]))
    assert np.all((res["score"] >= 0) & (res["score"] <= 1))
    assert res["is_anomaly"][700:703].any()
    batch = det.process([Reading("s", 60.0 * n, (1.0, 2.0))])
    assert batch.reason == ["wrong_arity"]


def test_replay_and_direct_process_give_identical_scores():
    x = noisy_sine(700, seed=8)
    x[600] += 4
    seconds = 60.0 * np.arange(len(x))
    a = replay.replay_series(small_detector(warmup=50), "s", seconds, x[:, None], chunk=128)
    det = small_detector(warmup=50)
    scores, alerts = [], []
    for i in range(len(x)):
        batch = det.process([Reading("s", float(seconds[i]), (float(x[i]),))])
        scores.append(batch.score[0])
        alerts.append(batch.alert[0])
    np.testing.assert_array_equal(a["score"], np.array(scores))
    np.testing.assert_array_equal(a["alert"], np.array(alerts))


def test_mixed_sensor_batch_matches_single_sensor_runs():
    xa, xb = noisy_sine(400, seed=1), noisy_sine(400, seed=2) * 3 + 10
    groups = [GroupConfig(model=SMALL_MODEL, weights="per_sensor", detector=DetectorSettings(warmup=50))]
    mixed = small_detector(groups=groups)
    readings = []
    for i in range(400):
        readings += [Reading("a", 60.0 * i, (xa[i],)), Reading("b", 60.0 * i, (xb[i],))]
    batch = mixed.process(readings)
    solo = run(small_detector(groups=groups), xa, sensor="a")
    np.testing.assert_allclose(batch.score[0::2], solo["score"], atol=1e-6)


def test_score_one_is_the_score_process_gives_and_changes_nothing():
    x = noisy_sine(400, seed=9)
    for warm in (30, 300):  # in warm-up, and past it (seasonal, peak and stuck stages run)
        det = small_detector(warmup=50)
        run(det, x[:warm])
        t = 60.0 * warm
        arrays, meta = det.state_dict()
        for value in (float(x[warm]), float(x[warm]) + 6.0):
            score = det.score_one("s", t, value)
            after, after_meta = det.state_dict()
            assert after_meta == meta and after.keys() == arrays.keys()
            for key in arrays:
                np.testing.assert_array_equal(after[key], arrays[key], err_msg=key)
        batch = det.process([Reading("s", t, (float(x[warm]) + 6.0,))])
        assert batch.reason == [""]
        assert score == float(batch.score[0])
    assert det.score_one("unknown", t, 1.0) is None
    assert det.score_one("s", t, 1.0) is None  # the same timestamp again: process would reject it


def test_batch_carries_width_step_seconds_and_backend():
    det = small_detector(warmup=50)
    batch = det.process([Reading("s", 1.0, (1.0,)), Reading("s", 2.0, (1.0, 2.0))])
    assert batch.reason == ["", "wrong_arity"]
    assert batch.width.tolist() == [1, 2]  # the group's model output; the unrouted reading's own
    assert set(batch.step_seconds) == {"default"} and batch.step_seconds["default"] >= 0
    assert batch.backends == {"default": "cpu"}


def _routing_oracle(groups, max_sensors, batches):
    """The routing rules reading by reading (as Detector.process applied them before it took
    columns): first matching group; a group's width is its first reading's; new sensors count
    against the cap in order of appearance. -> per batch [(reason, group)] and groups' sensors."""
    width_of, members, out = {}, {}, []
    for readings in batches:
        known = sum(len(m) for m in members.values())
        new, rows = [], []
        for r in readings:
            g = next(g for g in groups if fnmatch.fnmatchcase(r.sensor, g.match))
            width_of.setdefault(g.name, len(r.values))
            members.setdefault(g.name, [])
            if len(r.values) != width_of[g.name]:
                rows.append(("wrong_arity", None))
                continue
            if r.sensor not in members[g.name] and r.sensor not in new:
                if known + len(new) >= max_sensors:
                    rows.append(("sensor_cap", None))
                    continue
                new.append(r.sensor)
            rows.append(("", g.name))
        for r, (reason, group) in zip(readings, rows):
            if group is not None and r.sensor not in members[group] and np.isfinite(r.values).all():
                members[group].append(r.sensor)
        out.append(rows)
    return out, members


def test_columns_route_once_per_sensor_as_reading_by_reading():
    """Random batches of chunks (several widths, groups, new and known sensors, the cap, NaN):
    reasons, groups and slot order are those of the reading-by-reading rules, each group's
    results those of the same group fed its own readings, and Reading lists give the same."""
    groups = [GroupConfig(name="temps", match="t*", model=SMALL_MODEL),
              GroupConfig(name="vec", match="v*", model=SMALL_MODEL),
              GroupConfig(name="default", match="*", model=SMALL_MODEL)]
    rng = np.random.default_rng(11)
    det, twin = small_detector(groups=groups, max_sensors=9), small_detector(groups=groups, max_sensors=9)
    solo = {g.name: small_detector(groups=groups) for g in groups}
    ids = ["t1", "t2", "t3", "v1", "v2", "h1", "h2", "h3", "t4", "h4", "v3", "t5"]
    batches, t = [], 0.0
    for b in range(6):
        chunks = []
        for _ in range(rng.integers(1, 8)):
            n, w = int(rng.integers(1, 6)), int(rng.choice([1, 1, 2]))
            sensors = [str(rng.choice(ids[:4 + 2 * b])) for _ in range(n)]
            values = rng.normal(size=(n, w))
            if rng.random() < 0.2:
                values[rng.integers(n)] = np.nan
            chunks.append(Chunk(sensors, t + np.arange(n, dtype=np.float64), values))
            t += n
        batches.append(chunks)
    expected, members = _routing_oracle(groups, 9, [[r for c in chunks for r in c.readings()] for chunks in batches])
    for chunks, rows in zip(batches, expected):
        readings = [r for c in chunks for r in c.readings()]
        batch = det.process(concat(chunks))
        same = twin.process(readings)
        assert [(r if r in ("wrong_arity", "sensor_cap") else "", g) for r, g in zip(batch.reason, batch.groups)] == \
            [(r, g if r == "" else None) for r, g in rows]
        assert same.reason == batch.reason and same.groups == batch.groups
        np.testing.assert_array_equal(same.score, batch.score)
        for name, solo_det in solo.items():
            mine = [i for i, g in enumerate(batch.groups) if g == name]
            if not mine:
                continue
            alone = solo_det.process([readings[i] for i in mine])
            assert alone.reason == [batch.reason[i] for i in mine]
            np.testing.assert_array_equal(alone.score, batch.score[mine])
            np.testing.assert_array_equal(alone.prediction, batch.prediction[mine, :alone.prediction.shape[1]])
    assert {name: d.names for name, d in det.active.items()} == {k: v for k, v in members.items() if k in det.active}
    assert list(det.active) == list(twin.active)


def test_band_tail_inversion_matches_bisection_of_erfc():
    """z_for_tail (Newton on ln Q) against the definition: the z where 0.5 erfc(z / sqrt 2)
    crosses p, found by bisection in plain Python; and tail_log10 inverts it."""
    import math
    from streamlstm.detector.scores import _z_for_tail, neg_log10_upper_tail

    def bisect(p):
        lo, hi = -10.0, 40.0
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2.0)) > p else (lo, mid)
        return 0.5 * (lo + hi)

    ps = np.concatenate([10.0 ** -np.linspace(0.01, 299.0, 400), np.linspace(0.02, 0.98, 49)])
    z = _z_for_tail(ps)
    np.testing.assert_allclose(z, [bisect(p) for p in ps], rtol=1e-12, atol=1e-12)
    L = -np.log10(ps[ps < 0.5])  # tail_log10 uses a 3-term series past z = 8: 1e-6 apart
    np.testing.assert_allclose(neg_log10_upper_tail(_z_for_tail(10.0 ** -L)), L, rtol=1e-5)
