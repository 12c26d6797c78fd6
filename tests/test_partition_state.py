"""Per-partition state (partition_state.py) without a broker: snapshots written on revoke and
periodically (staggered), loaded on assign with a fallback past a damaged one, kept aside on an
eager rebalance, dropped without a write when lost; plus the event ids that let consumers drop
the duplicates a replay makes."""
import json

import numpy as np

from streamlstm.checkpoint import load_checkpoint
from streamlstm.config import parse_config
from streamlstm.factory import build_detector
from streamlstm.messages import event_id, event_message
from streamlstm.detector.incidents import Incident
from streamlstm.partition_state import PartitionStates, SnapshotStore
from streamlstm.reading import Reading

CFG = parse_config({
    "model": {"hidden_size": 4, "window": 4, "train_every": 2},
    "detector": {"scaling_warmup": 5, "warmup": 10, "long_window": 50, "seasonal_periods": []},
    "groups": [{"name": "g", "match": "*", "weights": "per_sensor"}],
    "backend": {"kind": "cpu"},
})


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Worker:
    """A detector and its partition states, fed as KafkaSource feeds them."""

    def __init__(self, store, name, interval_s=10.0):
        self.detector = build_detector(CFG)
        self.clock = Clock()
        self.states = PartitionStates(store, lambda: self.detector, lambda: CFG, interval_s=interval_s,
                                      worker=name, monotonic=self.clock)
        self.offsets = {}

    def feed(self, partition, sensors, rounds, start_round=0):
        """`rounds` readings of each sensor into `partition` (next offsets), processed and acked."""
        readings, tokens = [], []
        for r in range(start_round, start_round + rounds):
            for s in sensors:
                assert self.states.claim(s, partition)
                offset = self.offsets.get(partition, 0)
                self.offsets[partition] = offset + 1
                readings.append(Reading(s, 1.7e9 + 10.0 * r, (float(np.sin(r + len(s))),)))
                tokens.append((partition, offset))
        self.detector.process(readings)
        for p, o in tokens:
            self.states.processed(p, o)


def sensors_of(partition, n=5):
    return [f"p{partition}-s{i}" for i in range(n)]


def test_revoke_snapshots_and_drops_then_another_worker_resumes(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    a, b = Worker(store, "a"), Worker(store, "b")
    assert a.states.assign([0, 1]) == {0: None, 1: None}
    a.feed(0, sensors_of(0), 12)
    a.feed(1, sensors_of(1), 12)
    want = a.detector.export_sensors(sensors_of(0))
    a.states.revoke([0], park=False)
    assert set(a.detector.active["g"].sensors) == set(sensors_of(1))  # dropped
    [path] = store.snapshots(0)
    assert path.name == f"{60:020d}.ckpt"
    arrays, meta = load_checkpoint(path)
    assert meta["next_offset"] == 60 and meta["history"] == [{"from": 0, "to": 60, "worker": "a"}]

    assert b.states.assign([0]) == {0: 60}
    got = b.detector.export_sensors(sensors_of(0))
    assert got[1] == want[1]
    assert all(np.array_equal(got[0][k], want[0][k], equal_nan=True) for k in want[0])
    b.offsets[0] = 60
    b.feed(0, sensors_of(0), 2, start_round=12)
    b.states.revoke([0], park=False)
    _, meta = load_checkpoint(store.snapshots(0)[0])
    assert meta["history"] == [{"from": 0, "to": 60, "worker": "a"}, {"from": 60, "to": 70, "worker": "b"}]


def test_a_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    a = Worker(store, "a")
    a.states.assign([3])
    for r in range(3):
        a.feed(3, sensors_of(3), 4, start_round=4 * r)
        a.states.revoke([3], park=True)
        a.states.assign([3])  # kept: nobody else wrote
    files = store.snapshots(3)
    assert [f.name for f in files] == [f"{60:020d}.ckpt", f"{40:020d}.ckpt"]  # two kept
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    b = Worker(store, "b")
    assert b.states.assign([3]) == {3: 40}
    assert [p.name for p in files[0].parent.iterdir() if ".corrupt-" in p.name]  # moved aside
    assert set(b.detector.active["g"].sensors) == set(sensors_of(3))


def test_eager_rebalance_keeps_state_unless_someone_wrote_a_newer_snapshot(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    a, b = Worker(store, "a"), Worker(store, "b")
    a.states.assign([0, 1])
    a.feed(0, sensors_of(0), 6)
    a.feed(1, sensors_of(1), 6)
    group = a.detector.active["g"]
    a.states.revoke([0, 1], park=True)  # eager: everything revoked, snapshotted, kept aside
    assert a.detector.active["g"] is group and len(store.snapshots(0)) == 1
    a.states.assign([0])  # partition 1 went elsewhere: its sensors are dropped now
    assert set(a.detector.active["g"].sensors) == set(sensors_of(0))
    # Partition 0 leaves and comes back after b processed and snapshotted it: reloaded.
    a.states.revoke([0], park=True)
    b.states.assign([0])
    b.offsets[0] = 30
    b.feed(0, sensors_of(0), 2, start_round=6)
    b.states.revoke([0], park=False)
    a.states.assign([0])
    assert a.states.position(0) == 40
    assert a.detector.export_sensors(sensors_of(0))[0]["g/seen"].tolist() == [8] * 5


def test_lost_partitions_write_nothing(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    a = Worker(store, "a")
    a.states.assign([2])
    a.feed(2, sensors_of(2), 6)
    a.states.lose([2])
    assert store.snapshots(2) == []
    assert a.detector.active["g"].sensors == {} and a.states.owner == {}


def test_periodic_snapshots_are_staggered_and_written_off_the_worker(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    a = Worker(store, "a", interval_s=8.0)
    a.states.assign([0, 1, 2, 3])  # due at 2, 4, 6 and 8 s
    for p in range(4):
        a.feed(p, sensors_of(p), 3)
    counts = []
    for t in (1.0, 2.5, 4.5, 6.5, 8.5, 9.0):
        a.clock.t = t
        a.states.snapshot_due()
        a.states.wait_written()
        counts.append(sum(1 for p in range(4) if store.snapshots(p)))
    assert counts == [0, 1, 2, 3, 4, 4]
    a.clock.t = 20.0
    a.states.snapshot_due()  # due again, but nothing new was processed: no write
    a.states.wait_written()
    assert all(len(store.snapshots(p)) == 1 for p in range(4))
    assert a.states.age() is not None


def test_a_sensor_of_another_partition_is_refused(tmp_path):
    a = Worker(SnapshotStore(tmp_path, "t"), "a")
    a.states.assign([0, 1])
    assert a.states.claim("x", 0)
    assert a.states.claim("x", 0)
    assert not a.states.claim("x", 1)


def test_event_ids_are_deterministic():
    inc = Incident(sensor="s", group="g", start=100.0, timestamp=100.0, value=[1.0], prediction=[0.0],
                   residual=[1.0], score=0.9, threshold=0.6)
    first = json.loads(event_message("anomaly", inc))["event_id"]
    assert first == event_id("s", 100.0, "anomaly") == json.loads(event_message("anomaly", inc))["event_id"]
    inc.end = 130.0
    resolved = json.loads(event_message("resolved", inc))["event_id"]
    assert resolved == event_id("s", 130.0, "resolved")
    assert len({first, resolved, event_id("s", 100.0, "resolved"), event_id("t", 100.0, "anomaly")}) == 4


def test_only_the_two_newest_snapshots_are_kept(tmp_path):
    store = SnapshotStore(tmp_path, "t")
    for offset in (5, 9, 7, 12):
        store.save(0, offset, {"x": np.zeros(1)}, {})
    assert [p.name for p in store.snapshots(0)] == [f"{12:020d}.ckpt", f"{9:020d}.ckpt"]
