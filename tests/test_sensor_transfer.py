"""Sensors moving between detectors (detector/transfer.py, Detector.export_sensors / drop_sensors /
adopt_sensors), and the determinism that makes a move invisible: with per-sensor weights a
sensor's state after a sequence of readings does not depend on how the readings were batched,
on which other sensors came first, nor on which detector held it."""
import random

import numpy as np
import pytest

from streamlstm.config import parse_config
from streamlstm.factory import build_detector
from streamlstm.reading import Reading

SENSORS = [f"s{i:02d}" for i in range(24)]
ROUNDS = 60  # at 10 s: the 60 s seasonal period is enabled after 6 readings


def config(weights="per_sensor", hidden=4):
    return parse_config({
        "model": {"hidden_size": hidden, "window": 4, "train_every": 2},
        "detector": {"scaling_warmup": 5, "warmup": 10, "long_window": 50, "seasonal_periods": ["60s"]},
        "groups": [{"name": "g", "match": "*", "weights": weights}],
        "backend": {"kind": "cpu"},
    })


def readings():
    rng = np.random.default_rng(3)
    out = []
    for r in range(ROUNDS):
        for s in SENSORS:
            spike = 40.0 if s == "s03" and 30 <= r < 45 else 0.0  # an incident open at the move
            out.append(Reading(s, 1.7e9 + 10.0 * r, (float(rng.normal() + np.sin(r / 2.0)) + spike,)))
    return out


def feed(detector, rs, seed=None):
    """Process `rs` in batches of random sizes (one batch without a seed)."""
    if seed is None:
        detector.process(rs)
        return detector
    rnd = random.Random(seed)
    i = 0
    while i < len(rs):
        n = rnd.randint(1, 150)
        detector.process(rs[i:i + n])
        i += n
    return detector


def per_sensor(detector, names=SENSORS) -> dict:
    return {s: detector.export_sensors([s]) for s in names}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for s in a:
        (xa, ma), (xb, mb) = a[s], b[s]
        assert ma == mb, s
        assert xa.keys() == xb.keys(), s
        for k in xa:
            assert np.array_equal(xa[k], xb[k], equal_nan=True), (s, k)


@pytest.fixture(scope="module")
def one_batch():
    return per_sensor(feed(build_detector(config()), readings()))


def test_state_does_not_depend_on_batching_or_arrival_order(one_batch):
    rs = readings()
    assert_same(one_batch, per_sensor(feed(build_detector(config()), rs, seed=1)))
    # Other sensors first: every sensor gets another slot (per-sensor weights are seeded by id).
    rnd = random.Random(2)
    shuffled = sorted(rs, key=lambda r: (r.timestamp, rnd.random()))
    assert_same(one_batch, per_sensor(feed(build_detector(config()), shuffled, seed=3)))


def test_moved_sensors_go_on_as_if_they_had_never_moved(one_batch):
    rs = readings()
    half = len(rs) * 40 // ROUNDS
    a, b = build_detector(config()), build_detector(config())
    feed(a, rs[:half], seed=4)
    moving = SENSORS[1::2]
    state = a.export_sensors(moving)
    assert "s03" in moving and state[1]["groups"]["g"]["open"]  # the open incident travels too
    a.drop_sensors(moving)
    assert sorted(b.adopt_sensors([state])) == sorted(moving)
    assert set(a.active["g"].sensors) == set(SENSORS) - set(moving)
    later = rs[half:]
    feed(a, [r for r in later if r.sensor not in moving], seed=5)
    feed(b, [r for r in later if r.sensor in moving], seed=6)
    moved = per_sensor(b, moving)
    stayed = per_sensor(a, [s for s in SENSORS if s not in moving])
    assert_same(one_batch, {**moved, **stayed})
    assert b.active["g"].seasonal.used > 0  # profiles were allocated and moved


def test_adopt_several_states_keeps_known_sensors_and_skips_unknown_groups():
    rs = readings()[: 20 * len(SENSORS)]
    src = feed(build_detector(config()), rs)
    dst = feed(build_detector(config()), [r for r in rs if r.sensor == "s00"])
    own = dst.export_sensors(["s00"])
    first, second = src.export_sensors(SENSORS[:10]), src.export_sensors(SENSORS[5:])  # overlap s05..s09
    taken = dst.adopt_sensors([first, second])
    assert sorted(taken) == SENSORS[1:]  # s00 was known, s05..s09 came with the first state
    assert_same({"s00": own}, per_sensor(dst, ["s00"]))
    assert_same(per_sensor(src), per_sensor(dst))
    other = parse_config({"groups": [{"name": "other", "match": "*"}], "backend": {"kind": "cpu"}})
    assert build_detector(other).adopt_sensors([first]) == []  # group g is not configured there


def test_adopt_refuses_another_model_shape():
    src = feed(build_detector(config()), readings()[: 5 * len(SENSORS)])
    dst = feed(build_detector(config(hidden=6)), readings()[:1])
    with pytest.raises(ValueError, match="model shape"):
        dst.adopt_sensors([src.export_sensors(SENSORS[1:3])])


def test_shared_weights_stay_with_the_group_the_sensors_move_to():
    cfg = config("shared")
    rs = readings()[: 20 * len(SENSORS)]
    a = feed(build_detector(cfg), [r for r in rs if r.sensor in SENSORS[:12]])
    b = feed(build_detector(cfg), [r for r in rs if r.sensor in SENSORS[12:]])
    weights = b.active["g"].bank.theta.copy()
    moving = SENSORS[:4]
    before = a.export_sensors(moving)
    b.adopt_sensors([before])
    assert np.array_equal(b.active["g"].bank.theta, weights)  # the receiver's own model
    after = b.export_sensors(moving)
    for key, value in before[0].items():
        if key.split(".")[-1] not in ("theta", "m", "v", "adam_t"):
            assert np.array_equal(after[0][key], value, equal_nan=True), key  # per-sensor state moved
    fresh = build_detector(cfg)
    fresh.adopt_sensors([before])  # a worker without the group starts from the snapshot's weights
    assert np.array_equal(fresh.active["g"].bank.theta, a.active["g"].bank.theta)


def test_per_sensor_weights_start_from_an_init_keyed_by_the_sensor_id():
    cfg = config()
    d1, d2 = build_detector(cfg), build_detector(cfg)
    d1.process([Reading("x", 1.0, (0.0,)), Reading("y", 1.0, (0.0,))])
    d2.process([Reading("y", 1.0, (0.0,)), Reading("x", 1.0, (0.0,))])
    g1, g2 = d1.active["g"], d2.active["g"]
    assert g1.sensors["x"] != g2.sensors["x"]
    t1, t2 = d1.export_sensors(["x"])[0]["g/bank.theta"], d2.export_sensors(["x"])[0]["g/bank.theta"]
    assert np.array_equal(t1, t2)
    assert not np.array_equal(t1, d1.export_sensors(["y"])[0]["g/bank.theta"])
