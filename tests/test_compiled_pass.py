"""The compiled pass (detector/compiled.py) against the NumPy detector path, its oracle.

Both run the same readings with the same settings on the same model kernels; scores, outputs,
reasons, resets, events and the final state must agree (float tolerance: the shared-weight
update sums gradients in another order when a segment is split across threads)."""
import numpy as np
import pytest

from streamlstm.backend import make_backend
from streamlstm.detector.group import GroupDetector
from streamlstm.detector.settings import DetectorSettings
from streamlstm.spec import ModelSpec

NOW = 1_000_000.0


def make(engine, shared, input_size=1, train_every=1, threaded=False, **settings):
    spec = ModelSpec(input_size=input_size, hidden_size=8, window=8, train_every=train_every, learning_rate=0.05)
    base = dict(warmup=20, scaling_warmup=5, long_window=50, short_window=3, peak_memory=100, accept_after=60,
                cooldown=5, seasonal_periods=("60s",), max_clock_skew_s=3600.0, clock_jump_readings=3)
    base.update(settings)
    det = GroupDetector("g", spec, DetectorSettings(**base), shared, make_backend("cpu", parallel_min_batch=4),
                        engine=engine)
    det.clock._now = lambda: NOW
    if engine == "numpy":
        assert det._compiled is None
    else:
        assert det._compiled is not None
        if threaded:  # split even small batches across threads, to test that path
            det._compiled.threads = 2
            det._compiled.min_parallel_readings = 8
    return det


def readings(seed, n_sensors, n, width=1):
    """Sensors with a daily-like wave, a spike, a stuck stretch, a level shift, a gap, in a random
    interleaving (each sensor in time order), plus duplicates, late and non-finite readings and
    one reading stamped in the future."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sensors):
        t = NOW - 5000.0 + np.arange(n) * 1.0 + s * 0.1
        t[int(n * 0.8):] += 100.0  # a gap of 100 intervals
        v = np.sin(t / 9.5)[:, None] + 0.1 * rng.standard_normal((n, width)) + s
        v[n // 2: n // 2 + 5] += 8
        v[int(n * 0.3): int(n * 0.3) + 30] = v[int(n * 0.3)]
        v[int(n * 0.6): int(n * 0.6) + 80] += 3
        rows += [(f"s{s}", t[i], v[i]) for i in range(n)]
    rows.sort(key=lambda r: r[1] + rng.uniform(0, 3))
    for i in rng.choice(len(rows), 12):
        rows.insert(int(rng.integers(len(rows))), rows[i])
    rows[5] = (rows[5][0], rows[5][1], np.full(width, np.nan))
    rows.insert(40, ("s0", NOW + 10 * 3600.0, np.zeros(width)))  # clock_skew
    return rows


def run(det, rows, batch):
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        res = det.process([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk])
        events = [(kind, e.sensor, e.start, e.end, e.reason, e.evidence, e.readings, round(e.peak_score, 5),
                   e.peak_timestamp) for kind, e in res.events]
        out.append((res, events))
    return out


def assert_same(a, b, tol=1e-6):
    for (ra, ea), (rb, eb) in zip(a, b):
        assert ra.reason == rb.reason
        for field in ("score", "alert", "prediction", "residual", "band", "loss", "threshold"):
            np.testing.assert_allclose(getattr(rb, field), getattr(ra, field), rtol=tol, atol=tol, err_msg=field)
        np.testing.assert_array_equal(rb.is_anomaly, ra.is_anomaly)
        by_sensor = lambda events: sorted(events, key=lambda e: e[1])  # noqa: E731  (order within a sensor kept)
        assert by_sensor(eb) == by_sensor(ea)
        assert sorted(rb.resets) == sorted(ra.resets)


def assert_same_state(da, db, tol=1e-6):
    arrays_a, meta_a = da.state_dict()
    arrays_b, meta_b = db.state_dict()
    assert meta_a == meta_b
    for key, value in arrays_a.items():
        if key.startswith("seasonal."):
            continue  # storage offsets depend on allocation order; contents compared below
        np.testing.assert_allclose(arrays_b[key], value, rtol=tol, atol=tol, err_msg=key)
    if da.seasonal is not None:
        slots = np.arange(len(da.names))
        for t in np.linspace(0, 60, 61):
            ts = np.full(len(slots), NOW + t)
            np.testing.assert_allclose(db.seasonal.expected(slots, ts), da.seasonal.expected(slots, ts),
                                       rtol=tol, atol=tol)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sensor"])
@pytest.mark.parametrize("threaded", [False, True], ids=["one_thread", "threads"])
@pytest.mark.parametrize("train_every", [1, 5])
def test_compiled_pass_matches_numpy_path(shared, threaded, train_every):
    rows = readings(0, 7, 300)
    oracle = make("numpy", shared, train_every=train_every)
    fast = make("auto", shared, train_every=train_every, threaded=threaded)
    a, b = run(oracle, rows, 97), run(fast, rows, 97)
    assert_same(a, b)
    assert_same_state(oracle, fast)
    kinds = {kind for _, events in a for kind, *_ in events}
    reasons = {r for res, _ in a for r in res.reason}
    resets = {why for res, _ in a for _, why in res.resets}
    # the interleaving exercised what it is meant to
    assert kinds == {"anomaly", "resolved"}
    assert {"duplicate_timestamp", "out_of_order", "non_finite", "clock_skew"} <= reasons
    assert "gap" in resets
    assert fast.seasonal.used > 0  # profiles were allocated mid-batch


def test_one_sensor_hundreds_of_times_in_a_batch_vector_readings():
    rows = readings(1, 2, 700, width=3)
    for shared in (True, False):
        oracle, fast = make("numpy", shared, input_size=3, train_every=3), make("auto", shared, input_size=3, train_every=3)
        assert_same(run(oracle, rows, 1024), run(fast, rows, 1024))
        assert_same_state(oracle, fast)


@pytest.mark.parametrize("settings", [
    dict(score="ksigma", learning_protection="skip"),
    dict(scaling="fixed", scale_min=-2.0, scale_max=12.0, seasonal_periods=(), peak_memory=0),
    dict(channels=("model", "stuck"), learning_protection="off", accept_after=0, max_clock_skew_s=0),
], ids=["ksigma_skip", "fixed_scale", "model_and_stuck"])
def test_compiled_pass_matches_numpy_path_in_other_configurations(settings):
    rows = readings(2, 4, 250)
    oracle, fast = make("numpy", True, **settings), make("auto", True, **settings)
    assert_same(run(oracle, rows, 64), run(fast, rows, 64))
    assert_same_state(oracle, fast)


def test_engines_take_turns_on_one_state():
    """A group may switch between the paths at any batch (e.g. the bank moves to a GPU)."""
    rows = readings(3, 3, 200)
    oracle, mixed = make("numpy", True), make("auto", True)
    compiled = mixed._compiled
    a = run(oracle, rows, 50)
    b = []
    for i, start in enumerate(range(0, len(rows), 50)):
        mixed._compiled = compiled if i % 2 else None
        b += run(mixed, rows[start:start + 50], 50)
    assert_same(a, b)


def test_dynamic_scorer_stays_on_the_numpy_path():
    spec = ModelSpec(hidden_size=8, window=8)
    det = GroupDetector("g", spec, DetectorSettings(score="dynamic"), True, make_backend("cpu"))
    assert det._compiled is None
    res = det.process(["a"] * 5, np.arange(5.0), np.zeros((5, 1)))
    assert res.reason == [""] * 5


def test_numpy_backend_keeps_the_numpy_path():
    det = GroupDetector("g", ModelSpec(hidden_size=8, window=8), DetectorSettings(), True, make_backend("numpy"))
    assert not det._use_compiled(1)


@pytest.mark.parametrize("engine", ["numpy", "auto"])
def test_shared_weights_update_once_per_segment(engine):
    """train_every=4: a batch of 12 readings per sensor is 3 segments; every sensor trains once
    in each, and each segment makes exactly one update of the shared weights, whatever the
    number of sensors."""
    det = make(engine, True, train_every=4, threaded=True)
    t = NOW - 1000.0 + np.arange(52.0)
    names = ["a", "b", "c"]

    def batch(lo, hi):
        rows = [(n, t[i], [np.sin(t[i] / 7.0) + k]) for i in range(lo, hi) for k, n in enumerate(names)]
        return det.process(*zip(*rows))

    batch(0, 40)
    before = int(det.bank.adam_t[0])
    res = batch(40, 52)
    assert np.isfinite(res.loss).sum() == 9  # 3 sensors x 3 windows
    assert int(det.bank.adam_t[0]) - before == 3
    assert det.bank.grad_count[0] == 0  # nothing left pending after a batch


@pytest.mark.parametrize("engine", ["numpy", "auto"])
def test_one_sensor_does_not_depend_on_batching(engine):
    """Segments follow the rounds a group has stepped, not batch boundaries (the sums of a
    segment left unfinished wait in the bank and its checkpoint), so one sensor's scores and
    state are the same whatever the batches its readings came in."""
    rng = np.random.default_rng(4)
    t = NOW - 5000.0 + np.arange(160.0)
    rows = [("s0", t[i], [np.sin(t[i] / 9.5) + 0.1 * rng.standard_normal()]) for i in range(160)]
    runs = []
    for batch in (len(rows), 7, 13):
        det = make(engine, True, train_every=5, threaded=True)
        scores = np.concatenate([res.score for res, _ in run(det, rows, batch)])
        runs.append((det, scores))
    (first, scores), rest = runs[0], runs[1:]
    assert first.bank.adam_t[0] > 10
    for det, other in rest:
        np.testing.assert_array_equal(other, scores)
        a, _ = first.state_dict()
        b, _ = det.state_dict()
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
