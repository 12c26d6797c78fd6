"""Tests for streamlstm.tools.nab (NAB v1.1 scoring)."""
import math
import types

import numpy as np
import pytest

from streamlstm.tools import nab

STD = nab.PROFILES["standard"]
T0 = np.datetime64("2014-04-01T00:00", "us")
STEP = np.timedelta64(5, "m")


def make_ts(n):
    return T0 + STEP * np.arange(n)


def win(ts, lo, hi):
    return (ts[lo], ts[hi])


def tanh_score(y):
    # 2*sigmoid(-5y) - 1 == tanh(-5y/2): an independent way to write NAB's curve
    return math.tanh(-2.5 * y)


def nab_reference(ts, scores, windows, threshold, weights):
    """Row-by-row transcription of NAB's Sweeper rules (calcSweepScore + one threshold)."""
    a_tp, a_fp, a_fn = weights
    ts = list(ts)
    n = len(ts)
    probation = min(math.floor(0.15 * n), 0.15 * 5000)

    def curve(y):
        return -1.0 if y > 3.0 else 2 * (1 / (1 + math.exp(5 * y))) - 1

    pending = sorted(windows)
    cur = prev = None
    parts = {}
    fp_total = 0.0
    for i, (t, s) in enumerate(zip(ts, scores)):
        if pending and t == pending[0][0]:
            start, end = pending.pop(0)
            right = ts.index(end)
            cur = (start, end, right, float(right - ts.index(start) + 1))
        if cur is not None:
            w = curve(-(cur[2] - i + 1) / cur[3]) * a_tp / curve(-1.0)
        elif prev is None:
            w = -1.0 * a_fp
        else:
            w = curve(abs(prev[0] - i) / float(prev[1] - 1)) * a_fp
        if i >= probation:
            if cur is not None:
                parts.setdefault(cur[0], -a_fn)
                if s >= threshold:
                    parts[cur[0]] = max(parts[cur[0]], w)
            elif s >= threshold:
                fp_total += w
        if cur is not None and t == cur[1]:
            prev = (cur[2], cur[3])
            cur = None
    return fp_total + sum(parts.values())


# ------------------------------------------------------------------- basic pieces

def test_scaled_sigmoid_values():
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab.scaled_sigmoid(0.0) == 0.0
    assert nab.scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(3.0) == pytest.approx(-1.0, abs=1e-6)
    assert nab.scaled_sigmoid(3.0001) == -1.0
    assert nab.scaled_sigmoid(1e6) == -1.0
    got = nab.scaled_sigmoid(np.array([-0.3, 0.2, 2.0]))
    np.testing.assert_allclose(got, [tanh_score(y) for y in (-0.3, 0.2, 2.0)], rtol=1e-12)


@pytest.mark.parametrize("n, expected", [(20, 3), (100, 15), (1882, 282), (4032, 604),
                                         (5000, 750), (5001, 750), (22695, 750)])
def test_probation_rows(n, expected):
    assert nab.probation_rows(n) == expected


def test_profiles_match_nab_and_are_immutable():
    assert nab.PROFILES["standard"] == (1.0, 0.11, 1.0)
    assert nab.PROFILES["reward_low_FP_rate"] == (1.0, 0.22, 1.0)
    assert nab.PROFILES["reward_low_FN_rate"] == (1.0, 0.11, 2.0)
    assert isinstance(nab.PROFILES, types.MappingProxyType)
    with pytest.raises(TypeError):
        nab.PROFILES["standard"] = (9.0, 9.0, 9.0)
    with pytest.raises(ValueError):
        nab.score_file(make_ts(10), np.zeros(10), [], 0.5, profile="nope")


# --------------------------------------------------------- hand-computed single file
# 200 rows -> probation 30; one window on rows 100..119 (W = 20).

N, LO, HI, W = 200, 100, 119, 20


def one_window(detect_rows, profile="standard", threshold=0.5):
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[list(detect_rows)] = 1.0
    return nab.score_file(ts, scores, [win(ts, LO, HI)], threshold, profile)


def test_detection_at_window_start_is_worth_a_tp():
    fs = one_window([LO])
    assert fs.raw == pytest.approx(1.0, abs=1e-12)
    assert (fs.tp, fs.fp, fs.fn) == (1, 0, 0)
    assert fs.detections.tolist() == [LO]
    assert fs.null == -1.0 and fs.perfect == 1.0


def test_detection_at_window_end_is_worth_about_zero():
    fs = one_window([HI])
    # position -1/W: tanh(5/(2W)) / tanh(5/2) = 0.12604 for W = 20
    assert fs.raw == pytest.approx(math.tanh(2.5 / W) / math.tanh(2.5), rel=1e-12)
    assert fs.raw == pytest.approx(0.12604, abs=1e-5)
    assert fs.tp == 1


def test_mid_window_detection_weight():
    fs = one_window([LO + 10])
    assert fs.raw == pytest.approx(tanh_score(-(HI - (LO + 10) + 1) / W) / tanh_score(-1.0))
    assert one_window([LO]).raw > fs.raw > one_window([HI]).raw


def test_false_positive_far_from_any_window_costs_a_fp():
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[50] = 1.0
    fs = nab.score_file(ts, scores, [], 0.5)
    assert fs.raw == pytest.approx(-0.11, abs=1e-12)
    assert (fs.tp, fs.fp, fs.fn) == (0, 1, 0)
    # before the first window: full cost too (plus the missed window)
    assert one_window([50]).raw == pytest.approx(-0.11 - 1.0, abs=1e-12)
    # more than 3 widths after the window: full cost
    assert one_window([HI + 60]).raw == pytest.approx(-0.11 - 1.0, abs=1e-12)
    assert nab.score_file(ts, scores, [], 0.5, profile="reward_low_FP_rate").raw == \
        pytest.approx(-0.22, abs=1e-12)


def test_false_positive_right_after_window_is_discounted():
    fs = one_window([HI + 1])
    cost = 0.11 * tanh_score(1 / (W - 1))  # distance 1 over (W - 1)
    assert fs.raw == pytest.approx(cost - 1.0, rel=1e-12)
    assert -0.02 < cost < 0  # ~-0.0144, far below A_FP
    half = one_window([HI + 10]).raw + 1.0
    assert half == pytest.approx(0.11 * tanh_score(10 / (W - 1)), rel=1e-12)
    assert cost > half > -0.11


def test_missed_window_costs_a_fn():
    fs = one_window([])
    assert fs.raw == -1.0
    assert (fs.tp, fs.fp, fs.fn) == (0, 0, 1)
    assert one_window([], profile="reward_low_FN_rate").raw == -2.0


def test_only_first_detection_in_window_counts():
    first_only = one_window([LO + 2]).raw
    assert one_window([LO + 2, LO + 5, LO + 9, HI]).raw == pytest.approx(first_only, abs=1e-15)
    fs = one_window([LO + 5, LO + 2])
    assert fs.raw == pytest.approx(first_only, abs=1e-15)
    assert fs.tp == 1 and len(fs.detections) == 2


def test_probation_rows_are_ignored():
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[:30] = 1.0  # rows 0..29 are probation
    fs = nab.score_file(ts, scores, [], 0.5)
    assert fs.raw == 0.0 and fs.fp == 0 and fs.detections.size == 0
    scores[30] = 1.0  # first scored row
    assert nab.score_file(ts, scores, [], 0.5).raw == pytest.approx(-0.11)
    # a window wholly inside probation is neither a TP nor a FN (NAB), but counts in perfect
    fs = nab.score_file(ts, np.zeros(N), [win(ts, 5, 12)], 0.5)
    assert (fs.raw, fs.tp, fs.fn, fs.null, fs.perfect) == (0.0, 0, 0, 0.0, 1.0)


def test_threshold_is_inclusive_and_custom_profile():
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[LO] = 0.7
    w = [win(ts, LO, HI)]
    assert nab.score_file(ts, scores, w, 0.7).tp == 1
    assert nab.score_file(ts, scores, w, np.nextafter(0.7, 1)).fn == 1
    assert nab.score_file(ts, scores, w, 0.7, profile=(2.0, 0.5, 3.0)).raw == pytest.approx(2.0)


def test_window_edges_use_first_matching_timestamp():
    # NAB files repeat timestamps; NAB takes timestamps.index(edge), the first match
    ts = np.array([0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])
    scores = np.zeros(len(ts))
    scores[5] = 1.0
    fs = nab.score_file(ts, scores, [(5, 9)], 0.5)
    assert fs.raw == pytest.approx(1.0)  # row 5 is the window's first row
    ref = nab_reference(ts, scores, [(5, 9)], 0.5, STD)
    assert fs.raw == pytest.approx(ref, abs=1e-12)


def test_window_edges_between_rows_and_overlaps():
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[LO] = 1.0
    # edges off the 5-minute grid snap to the rows inside [start, end]
    off = [(ts[LO] - np.timedelta64(2, "m"), ts[HI] + np.timedelta64(2, "m"))]
    assert nab.score_file(ts, scores, off, 0.5).raw == pytest.approx(1.0)
    with pytest.raises(ValueError):
        nab.score_file(ts, scores, [win(ts, 100, 120), win(ts, 110, 130)], 0.5)


def test_windows_are_sorted_and_string_timestamps_accepted(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"a/x.csv": [["2014-04-01 10:00:00.000000", "2014-04-01 11:00:00.000000"],'
                    ' ["2014-04-01 05:00:00.000000", "2014-04-01 06:00:00.000000"]],'
                    ' "b/y.csv": []}')
    windows = nab.load_windows(path)
    assert set(windows) == {"a/x.csv", "b/y.csv"}
    assert windows["b/y.csv"] == []
    assert windows["a/x.csv"][0] == (np.datetime64("2014-04-01T10:00"),
                                     np.datetime64("2014-04-01T11:00"))
    ts = make_ts(N)  # 00:00 .. 16:35
    scores = np.zeros(N)
    scores[60] = 1.0  # 05:00, start of the earlier window
    fs = nab.score_file(ts.astype(str), scores, windows["a/x.csv"], 0.5)
    assert (fs.tp, fs.fn) == (1, 1)
    assert fs.raw == pytest.approx(0.0)


def test_score_file_matches_nab_reference_on_random_files():
    rng = np.random.default_rng(7)
    for trial in range(40):
        ts, scores, windows = random_file(rng)
        threshold = float(rng.choice(scores))
        for name, weights in nab.PROFILES.items():
            got = nab.score_file(ts, scores, windows, threshold, name).raw
            assert got == pytest.approx(nab_reference(ts, scores, windows, threshold, weights),
                                        abs=1e-9), (trial, name)


# ------------------------------------------------------------------------------ sweep

def random_file(rng):
    n = int(rng.integers(40, 160))
    ts = make_ts(n)
    scores = rng.random(n)
    if rng.random() < 0.5:
        scores = np.round(scores, 1)  # plenty of tied scores
    windows, row = [], int(rng.integers(0, n // 3))
    while row < n - 2 and rng.random() < 0.7:
        width = int(rng.integers(2, 15))  # NAB divides by width - 1: no 1-row windows
        hi = min(row + width - 1, n - 1)
        windows.append(win(ts, row, hi))
        row = hi + 1 + int(rng.integers(0, 40))
    return ts, scores, windows


def random_corpus(rng, files=5):
    corpus, windows = {}, {}
    for i in range(files):
        ts, scores, w = random_file(rng)
        corpus[f"set/file{i}.csv"] = (ts, scores)
        windows[f"set/file{i}.csv"] = w
    return corpus, windows


def brute_force(corpus, windows, weights):
    """Score every candidate threshold from scratch with the reference scorer."""
    cands = {math.inf}
    for ts, scores in corpus.values():
        cands.update(scores[nab.probation_rows(len(scores)):].tolist())
    results = {}
    for t in cands:
        results[t] = sum(nab_reference(ts, sc, windows[name], t, weights)
                         for name, (ts, sc) in corpus.items())
    return results


@pytest.mark.parametrize("seed", range(8))
def test_sweep_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    corpus, windows = random_corpus(rng)
    for name, weights in nab.PROFILES.items():
        res = nab.sweep(corpus, windows, name)
        by_t = brute_force(corpus, windows, weights)
        best = max(by_t.values())
        assert res.raw == pytest.approx(best, abs=1e-9), name
        # NAB keeps the highest threshold among equal scores
        top_t = max(t for t, s in by_t.items() if s >= best - 1e-9)
        if math.isinf(top_t):
            assert res.threshold == 1.1
        else:
            assert res.threshold == top_t
        assert res.raw == pytest.approx(sum(f.raw for f in res.files.values()))
        assert res.null == pytest.approx(by_t[math.inf])
        expected = 100 * (res.raw - res.null) / (res.perfect - res.null)
        assert res.normalised == pytest.approx(expected)


def test_sweep_null_and_perfect_detectors():
    rng = np.random.default_rng(3)
    corpus, windows = random_corpus(rng, files=6)
    assert sum(map(len, windows.values())) > 0
    never = {k: (ts, np.zeros(len(ts))) for k, (ts, _) in corpus.items()}
    oracle = {}
    for k, (ts, _) in corpus.items():
        sc = np.zeros(len(ts))
        for start, _end in windows[k]:
            sc[np.flatnonzero(ts == start)[0]] = 1.0
        oracle[k] = (ts, sc)
    for name in nab.PROFILES:
        res_null = nab.sweep(never, windows, name)
        assert res_null.normalised == pytest.approx(0.0, abs=1e-12)
        assert res_null.threshold == 1.1 and res_null.raw == res_null.null
        res = nab.sweep(oracle, windows, name)
        # windows inside probation can't be reached, so only check when none are
        if all(nab.score_file(*oracle[k], windows[k], 1.0).fn == 0 for k in corpus):
            assert res.normalised == pytest.approx(100.0, abs=1e-9)
            assert res.threshold == 1.0


def test_sweep_single_hand_corpus():
    ts = make_ts(N)
    good = np.zeros(N)
    good[LO] = 0.9
    good[LO + 5] = 0.8  # same window, later: 0.8 scores exactly as well as 0.9
    good[150] = 0.4  # a false alarm below the true detection
    corpus = {"a.csv": (ts, good), "b.csv": (ts, np.full(N, 0.1))}
    windows = {"a.csv": [win(ts, LO, HI)], "b.csv": []}
    res = nab.sweep(corpus, windows)
    assert res.threshold == 0.9  # NAB keeps the higher of two equal-scoring thresholds
    assert res.raw == pytest.approx(1.0)
    assert res.null == -1.0 and res.perfect == 1.0
    assert res.normalised == pytest.approx(100.0)
    assert res.files["a.csv"].tp == 1 and res.files["b.csv"].fp == 0
    with pytest.raises(KeyError):
        nab.sweep({"c.csv": (ts, good)}, windows)


# ---------------------------------------------------------------------- event metrics

def test_event_metrics_hand_example():
    ts = make_ts(N)
    scores = np.zeros(N)
    scores[[50, 51, 52]] = 1.0  # one false-alarm run
    scores[180] = 1.0  # another
    scores[[LO + 1, LO + 3, HI]] = 1.0  # first window detected (3 rows, one event)
    scores[10] = 1.0  # probation: ignored
    windows = {"f.csv": [win(ts, LO, HI), win(ts, 140, 160)]}
    em = nab.event_metrics({"f.csv": (ts, scores)}, windows, 0.5)
    assert (em.tp, em.fn, em.fp) == (1, 1, 2)
    assert em.precision == pytest.approx(1 / 3)
    assert em.recall == pytest.approx(1 / 2)
    assert em.f1 == pytest.approx(0.4)
    # a run touching a window edge is split by it
    scores[HI + 1] = 1.0
    assert nab.event_metrics({"f.csv": (ts, scores)}, windows, 0.5).fp == 3
    assert nab.event_metrics({"f.csv": (ts, scores)}, windows, 1.0).fp == 3  # inclusive
    assert nab.event_metrics({"f.csv": (ts, scores)}, windows, 1.0 + 1e-9).fp == 0
    none = nab.event_metrics({"f.csv": (ts, np.zeros(N))}, windows, 0.5)
    assert (none.tp, none.fn, none.fp, none.precision, none.f1) == (0, 2, 0, 0.0, 0.0)


# ------------------------------------------------------------------ real NAB subset

def load_dev(nab_dir):
    windows = nab.load_windows(nab_dir / "labels" / "combined_windows.json")
    corpus = {name: nab.load_series(nab_dir / "data" / name) for name in windows}
    return corpus, windows


def test_nab_dev_loads(nab_dir):
    corpus, windows = load_dev(nab_dir)
    assert len(corpus) == 18
    assert sum(len(w) for w in windows.values()) == 25
    ts, values = corpus["realKnownCause/nyc_taxi.csv"]
    assert len(ts) == len(values) == 10320
    assert ts.dtype == np.dtype("datetime64[us]") and ts[0] == np.datetime64("2014-07-01T00:00")
    assert values[0] == 10844.0
    for name, wins in windows.items():
        tsf = corpus[name][0]
        for start, end in wins:  # every edge is a row timestamp, after probation
            first = np.flatnonzero(tsf == start)
            assert first.size and np.flatnonzero(tsf == end).size, name
            assert first[0] >= nab.probation_rows(len(tsf)), name


def test_nab_dev_oracle_scores_100_and_null_0(nab_dir):
    corpus, windows = load_dev(nab_dir)
    oracle, never = {}, {}
    for name, (ts, _) in corpus.items():
        sc = np.zeros(len(ts))
        for start, _end in windows[name]:
            sc[np.flatnonzero(ts == start)[0]] = 1.0
        oracle[name] = (ts, sc)
        never[name] = (ts, np.full(len(ts), 0.5))  # NAB's null detector
    for pname, (a_tp, _, a_fn) in nab.PROFILES.items():
        res = nab.sweep(oracle, windows, pname)
        assert res.perfect == 25 * a_tp and res.null == -25 * a_fn
        assert res.raw == pytest.approx(25 * a_tp, abs=1e-9)
        assert res.normalised == pytest.approx(100.0, abs=1e-9)
        assert sum(f.tp for f in res.files.values()) == 25
        assert sum(f.fp for f in res.files.values()) == 0
        res = nab.sweep(never, windows, pname)
        assert res.threshold == 1.1 and res.normalised == 0.0


def test_nab_dev_sweep_beats_sampled_thresholds(nab_dir):
    corpus, windows = load_dev(nab_dir)
    rng = np.random.default_rng(0)
    scored = {}
    for name, (ts, values) in corpus.items():
        # a crude online-ish score with many distinct values: jump size, squashed
        jump = np.abs(np.diff(values, prepend=values[0]))
        squashed = 1 - np.exp(-jump / (np.std(values) + 1e-9)) * 0.9
        scored[name] = (ts, squashed + rng.random(len(ts)) * 1e-3)
    res = nab.sweep(scored, windows)
    def total(t):
        return sum(nab.score_file(ts, s, windows[k], t).raw for k, (ts, s) in scored.items())

    all_scores = np.concatenate([s for _, s in scored.values()])
    for t in np.quantile(all_scores, np.linspace(0.5, 1, 40)):
        assert res.raw >= total(t) - 1e-9
    assert res.raw == pytest.approx(total(res.threshold))
    assert res.normalised <= 100.0
