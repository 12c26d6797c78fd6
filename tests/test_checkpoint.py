"""Checkpoint files: round trips, damage detection, atomicity under write failures, quarantine."""
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from streamlstm import checkpoint as ck
from streamlstm.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncompatible,
    CheckpointStore,
    load_checkpoint,
    quarantine,
    save_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "w_f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w_f64": rng.standard_normal(7),
        "steps": np.arange(-4, 5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5),
        "scalar_i": np.array(7, dtype=np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "empty_1d": np.array([], dtype=np.int64),
    }


SAMPLE_META = {
    "version": "0.1",
    "groups": {"temp": {"sensors": ["a/b", "c"], "hidden": 16, "lr": 1e-3}},
    "list": [1, 2.5, "x", None, True, [3, {"deep": []}]],
    "unicode": "héllo ✓",
}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        assert b[k].shape == a[k].shape, k
        np.testing.assert_array_equal(b[k], a[k])


def write_sample(path):
    save_checkpoint(path, sample_arrays(), SAMPLE_META)
    return path.read_bytes()


def resign(data: bytes) -> bytes:
    """Recompute the trailing SHA-256 so that only the deliberate change remains."""
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


def craft(header: dict, data: bytes = b"", version: int = ck.FORMAT_VERSION) -> bytes:
    hb = json.dumps(header).encode()
    body = struct.pack("<8sIQ", ck.MAGIC, version, len(hb)) + hb + data
    return body + hashlib.sha256(body).digest()


def temp_files(directory):
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


# ------------------------------------------------------------------------------ round trips

def test_round_trip_dtypes_shapes_and_nested_meta(tmp_path):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, sample_arrays(), SAMPLE_META)
    arrays, meta = load_checkpoint(path)
    assert_same(sample_arrays(), arrays)
    assert meta == SAMPLE_META
    assert list(arrays) == list(sample_arrays())  # order kept
    assert temp_files(tmp_path) == []


def test_round_trip_more_dtypes_and_layouts(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    arrays = {
        "transposed": base.T,  # non C-contiguous input
        "strided": base[::2, ::3],
        "fortran": np.asfortranarray(base),
        "big_endian": np.arange(5, dtype=">i4"),
        "complex": np.array([1 + 2j, -3j], dtype=np.complex64),
        "datetime": np.array(["2024-01-01T00:00", "2024-06-01T12:30"], dtype="datetime64[ns]"),
        "unicode": np.array(["ab", "çé"]),
        "bytes": np.array([b"x", b"yz"]),
        "structured": np.array([(1.5, [1, 2, 3]), (2.5, [4, 5, 6])],
                               dtype=[("a", "<f4"), ("b", "<i2", (3,))]),
        "f16": np.array([0.5, np.inf, np.nan], dtype=np.float16),
        "u8_3d": np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
        "zero_size_3d": np.empty((2, 0, 3)),
        "scalar_bool": np.array(False),
    }
    save_checkpoint(tmp_path / "x", arrays, {})
    out, meta = load_checkpoint(tmp_path / "x")
    assert meta == {}
    assert_same(arrays, out)


def test_empty_checkpoint_and_default_meta(tmp_path):
    save_checkpoint(tmp_path / "x", {})
    assert load_checkpoint(tmp_path / "x") == ({}, {})


def test_loaded_arrays_are_writable_independent_copies(tmp_path):
    src = sample_arrays()
    save_checkpoint(tmp_path / "x", src, {})
    a1, _ = load_checkpoint(tmp_path / "x")
    a2, _ = load_checkpoint(tmp_path / "x")
    for name, arr in a1.items():
        assert arr.flags.writeable and arr.flags.owndata and arr.flags.c_contiguous, name
        assert not np.shares_memory(arr, a2[name])
    a1["w_f32"][0, 0] = 123.0
    a1["scalar"][()] = -1.0
    assert a2["w_f32"][0, 0] == src["w_f32"][0, 0]


def test_meta_json_conversions(tmp_path):
    meta = {"np_float": np.float32(0.25), "np_int": np.int64(3), "tuple": (1, 2), "nan": float("nan"),
            "inf": float("inf")}
    save_checkpoint(tmp_path / "x", {}, meta)
    _, out = load_checkpoint(tmp_path / "x")
    assert out["np_float"] == 0.25 and out["np_int"] == 3 and out["tuple"] == [1, 2]
    assert np.isnan(out["nan"]) and out["inf"] == float("inf")


def test_refuses_object_arrays_and_bad_input_before_touching_disk(tmp_path):
    path = tmp_path / "x"
    write_sample(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(path, {"o": np.array([1, "a"], dtype=object)}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, {}, {"f": object()})
    with pytest.raises(TypeError, match="names"):
        save_checkpoint(path, {1: np.zeros(1)}, {})
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_large_array_round_trip(tmp_path):
    # ~100 MB: must not go through Python-level per-element work (no time assertion on purpose).
    big = np.arange(25_000_000, dtype=np.float32)
    big[::1000] *= -1.5
    save_checkpoint(tmp_path / "big", {"big": big, "small": np.ones(3)}, {"n": big.size})
    assert os.path.getsize(tmp_path / "big") > big.nbytes
    out, meta = load_checkpoint(tmp_path / "big")
    assert meta == {"n": big.size}
    assert np.array_equal(out["big"], big)


def test_format_layout(tmp_path):
    data = write_sample(tmp_path / "x")
    magic, version, hlen = struct.unpack_from("<8sIQ", data)
    assert magic == b"SLSTMCKP" and version == 1
    assert (20 + hlen) % 64 == 0  # data section is 64-byte aligned
    header = json.loads(data[20:20 + hlen])
    assert header["meta"] == SAMPLE_META
    assert len(data) == 20 + hlen + header["data_length"] + 32
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    start = 20 + hlen
    for entry in header["arrays"]:
        assert entry["offset"] % 64 == 0
        src = sample_arrays()[entry["name"]]
        raw = data[start + entry["offset"]: start + entry["offset"] + entry["nbytes"]]
        assert raw == np.ascontiguousarray(src).tobytes()


# ------------------------------------------------------------------------------ damage detection

def test_every_truncation_is_corrupt(tmp_path):
    data = write_sample(tmp_path / "good")
    bad = tmp_path / "bad"
    for n in range(len(data)):  # small file: every length, including 0
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointCorrupt):
            load_checkpoint(bad)


def test_truncated_large_file_is_corrupt(tmp_path):
    path = tmp_path / "x"
    save_checkpoint(path, {"a": np.arange(200_000, dtype=np.float64)}, {"k": 1})
    data = path.read_bytes()
    for n in (0, 7, 19, 20, 100, len(data) // 2, len(data) - 33, len(data) - 32, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointCorrupt):
            load_checkpoint(path)


def test_trailing_garbage_is_corrupt(tmp_path):
    data = write_sample(tmp_path / "x")
    (tmp_path / "x").write_bytes(data + b"\0")
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(tmp_path / "x")


def test_every_single_bit_flip_is_corrupt(tmp_path):
    # Small file, so every bit of prefix, header, padding, data and checksum is tried.
    path = tmp_path / "x"
    save_checkpoint(path, {"w": np.arange(6, dtype=np.float32), "s": np.array(1.0)},
                    {"group": "g", "step": 3})
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad"
    for pos in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(flipped)
            with pytest.raises(CheckpointCorrupt):
                load_checkpoint(bad)


def test_bit_flips_sampled_in_a_larger_file(tmp_path):
    path = tmp_path / "x"
    save_checkpoint(path, sample_arrays() | {"big": np.linspace(0, 1, 50_000)}, SAMPLE_META)
    data = path.read_bytes()
    hlen = struct.unpack_from("<Q", data, 12)[0]
    rng = np.random.default_rng(1)
    positions = set(range(20)) | set(range(len(data) - 32, len(data)))  # prefix, checksum
    positions |= set(rng.integers(20, 20 + hlen, 150).tolist())  # header
    positions |= set(rng.integers(20 + hlen, len(data) - 32, 300).tolist())  # data
    bad = tmp_path / "bad"
    for pos in sorted(positions):
        bit = int(rng.integers(8))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        bad.write_bytes(flipped)
        with pytest.raises(CheckpointCorrupt):
            load_checkpoint(bad)


def test_bad_magic_is_corrupt(tmp_path):
    data = write_sample(tmp_path / "x")
    (tmp_path / "x").write_bytes(resign(b"NOTACKPT" + data[8:]))
    with pytest.raises(CheckpointCorrupt, match="magic"):
        load_checkpoint(tmp_path / "x")


def test_unknown_version_is_incompatible(tmp_path):
    data = write_sample(tmp_path / "x")
    for version in (0, 2, 2**32 - 1):
        (tmp_path / "x").write_bytes(resign(data[:8] + struct.pack("<I", version) + data[12:]))
        with pytest.raises(CheckpointIncompatible, match=f"version {version}"):
            load_checkpoint(tmp_path / "x")
    assert issubclass(CheckpointIncompatible, CheckpointError)
    assert issubclass(CheckpointCorrupt, CheckpointError)
    assert not issubclass(CheckpointIncompatible, CheckpointCorrupt)


def test_future_version_with_unparseable_body_is_still_incompatible(tmp_path):
    # A newer format may change everything between the prefix and the checksum.
    body = struct.pack("<8sIQ", ck.MAGIC, 2, 5) + b"\x00\xff new layout \x01"
    (tmp_path / "x").write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointIncompatible):
        load_checkpoint(tmp_path / "x")


@pytest.mark.parametrize("header, data", [
    ({"meta": {}, "data_length": 8,
      "arrays": [{"name": "o", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8}]}, bytes(8)),
    ({"meta": {}, "data_length": 8,  # huge shape must not be allocated
      "arrays": [{"name": "h", "dtype": "<f8", "shape": [10**12, 10**6], "offset": 0,
                  "nbytes": 8}]}, bytes(8)),
    ({"meta": {}, "data_length": 8,
      "arrays": [{"name": "n", "dtype": "<f8", "shape": [-1], "offset": 0, "nbytes": 8}]}, bytes(8)),
    ({"meta": {}, "data_length": 8,
      "arrays": [{"name": "a", "dtype": "<f8", "shape": [1], "offset": 0, "nbytes": 8},
                 {"name": "a", "dtype": "<f8", "shape": [0], "offset": 8, "nbytes": 0}]}, bytes(8)),
    ({"meta": {}, "data_length": 8,
      "arrays": [{"name": "a", "dtype": "<f8", "shape": [2], "offset": 0, "nbytes": 16}]}, bytes(8)),
    ({"meta": {}, "data_length": 16,  # overlapping arrays
      "arrays": [{"name": "a", "dtype": "<f8", "shape": [2], "offset": 0, "nbytes": 16},
                 {"name": "b", "dtype": "<f8", "shape": [1], "offset": 8, "nbytes": 8}]}, bytes(16)),
    ({"meta": {}, "data_length": 0,
      "arrays": [{"name": "d", "dtype": "<nonsense", "shape": [0], "offset": 0, "nbytes": 0}]}, b""),
    ({"meta": [], "data_length": 0, "arrays": []}, b""),
    ({"meta": {}, "arrays": []}, b""),
    (["not", "an", "object"], b""),
])
def test_validly_signed_but_bad_header_is_corrupt(tmp_path, header, data):
    (tmp_path / "x").write_bytes(craft(header, data))
    with pytest.raises(CheckpointCorrupt, match="header"):
        load_checkpoint(tmp_path / "x")


def test_header_length_past_end_is_corrupt(tmp_path):
    data = write_sample(tmp_path / "x")
    (tmp_path / "x").write_bytes(resign(data[:12] + struct.pack("<Q", 2**63) + data[20:]))
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(tmp_path / "x")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent")


def test_unreadable_file_is_checkpoint_error_not_corrupt(tmp_path, monkeypatch):
    write_sample(tmp_path / "x")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ck, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match="Permission denied") as info:
        load_checkpoint(tmp_path / "x")
    assert not isinstance(info.value, (CheckpointCorrupt, CheckpointIncompatible))


# ------------------------------------------------------------------------------ atomic writes

@pytest.fixture
def good(tmp_path):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, sample_arrays(), SAMPLE_META)
    return path


def assert_old_intact(path):
    arrays, meta = load_checkpoint(path)
    assert_same(sample_arrays(), arrays)
    assert meta == SAMPLE_META
    assert temp_files(path.parent) == []


NEW = {"w": np.full(100_000, 9.0)}


def test_disk_full_during_write(good, monkeypatch):
    real_write = os.write
    written = []

    def write_then_enospc(fd, data):
        # Like a filling disk: a partial write first, then ENOSPC.
        if sum(written) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, memoryview(data)[:3000])
        written.append(n)
        return n

    monkeypatch.setattr(os, "write", write_then_enospc)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_checkpoint(good, NEW, {"new": True})
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert "ENOSPC" in str(info.value)
    assert_old_intact(good)


def test_disk_full_at_fsync(good, monkeypatch):
    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(good, NEW, {})
    monkeypatch.undo()
    assert_old_intact(good)


def test_directory_not_writable_simulated(good, monkeypatch):
    real_open = os.open

    def deny_create(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", deny_create)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(good, NEW, {})
    monkeypatch.undo()
    assert_old_intact(good)


def test_rename_refused(good, monkeypatch):
    def deny(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", deny)
    with pytest.raises(CheckpointError, match="previous one kept"):
        save_checkpoint(good, NEW, {})
    monkeypatch.undo()
    assert_old_intact(good)


def test_interrupted_before_rename_keeps_old_and_removes_temp(good, monkeypatch):
    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):  # not swallowed nor wrapped
        save_checkpoint(good, NEW, {})
    monkeypatch.undo()
    assert_old_intact(good)


def test_missing_directory_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="No such file"):
        save_checkpoint(tmp_path / "nope" / "x.ckpt", NEW, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_directory_really_read_only(good):
    os.chmod(good.parent, 0o500)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            save_checkpoint(good, NEW, {})
    finally:
        os.chmod(good.parent, 0o700)
    assert_old_intact(good)


def test_process_killed_between_write_and_rename(tmp_path):
    # A real crash: the child dies inside os.replace, so nothing can clean up.
    store = CheckpointStore(tmp_path)
    store.save(sample_arrays(), SAMPLE_META)
    child = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from streamlstm import checkpoint
        os.replace = lambda src, dst: os._exit(3)
        checkpoint.save_checkpoint({str(store.path)!r}, {{"w": np.zeros(1000)}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, env=os.environ | {"PYTHONPATH": REPO})
    assert proc.returncode == 3
    assert len(temp_files(tmp_path)) == 1  # the orphan
    loaded = store.load()  # startup: orphan from a dead pid is removed, old data intact
    assert loaded is not None
    assert_same(sample_arrays(), loaded[0])
    assert temp_files(tmp_path) == []


def test_overwrite_replaces_content(good):
    save_checkpoint(good, NEW, {"new": True})
    arrays, meta = load_checkpoint(good)
    assert_same(NEW, arrays)
    assert meta == {"new": True}
    assert temp_files(good.parent) == []


# ------------------------------------------------------------------------------ quarantine

def test_quarantine_moves_aside_and_never_overwrites(tmp_path):
    now = dt.datetime(2024, 3, 1, 12, 30, 45, tzinfo=dt.timezone.utc)
    path = tmp_path / "m.ckpt"
    moved = []
    for i in range(3):
        path.write_bytes(b"bad %d" % i)
        moved.append(quarantine(path, now=now))
        assert not path.exists()
    assert [p.name for p in moved] == ["m.ckpt.corrupt-20240301T123045Z",
                                       "m.ckpt.corrupt-20240301T123045Z-1",
                                       "m.ckpt.corrupt-20240301T123045Z-2"]
    assert [p.read_bytes() for p in moved] == [b"bad 0", b"bad 1", b"bad 2"]


def test_quarantine_default_timestamp_is_utc(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"x")
    new = quarantine(path)
    assert new.parent == tmp_path
    stamp = new.name.split(".corrupt-")[1]
    when = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 60


def test_quarantine_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"a")
    first = quarantine(path, now=now)
    path.write_bytes(b"b")
    second = quarantine(path, now=now)
    assert first != second and first.read_bytes() == b"a" and second.read_bytes() == b"b"


def test_quarantine_missing_file(tmp_path):
    with pytest.raises(CheckpointError):
        quarantine(tmp_path / "absent")


# ------------------------------------------------------------------------------ CheckpointStore

def test_store_absent_then_round_trip(tmp_path):
    store = CheckpointStore(tmp_path / "state" / "sub")  # created on first save
    assert store.load() is None
    assert store.age_seconds() is None
    store.save(sample_arrays(), SAMPLE_META)
    arrays, meta = store.load()
    assert_same(sample_arrays(), arrays)
    assert meta == SAMPLE_META
    assert store.path == tmp_path / "state" / "sub" / "streamlstm.ckpt"


def test_store_age_seconds(tmp_path):
    store = CheckpointStore(tmp_path, name="g.ckpt")
    store.save({}, {})
    assert 0.0 <= store.age_seconds() < 60
    old = time.time() - 500
    os.utime(store.path, (old, old))
    assert 499 <= store.age_seconds() < 560


@pytest.mark.parametrize("damage", ["truncate", "flip", "version"])
def test_store_moves_bad_file_aside_and_cold_starts(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path)
    store.save(sample_arrays(), SAMPLE_META)
    data = store.path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = data[:100] + bytes([data[100] ^ 0x10]) + data[101:]
    else:
        data = resign(data[:8] + struct.pack("<I", 99) + data[12:])
    store.path.write_bytes(data)
    with caplog.at_level(logging.ERROR, logger="streamlstm.checkpoint"):
        assert store.load() is None
    assert not store.path.exists()
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == data
    assert any(r.levelno == logging.ERROR and aside[0].name in r.getMessage() for r in caplog.records)
    # The daemon cold-starts and its next save works normally.
    store.save(NEW, {})
    assert_same(NEW, store.load()[0])


def test_store_does_not_cold_start_on_unreadable_file(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(sample_arrays(), SAMPLE_META)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ck, "open", denied, raising=False)
    with pytest.raises(CheckpointError):
        store.load()  # a good file we merely cannot read must not be overwritten later
    monkeypatch.undo()
    assert store.path.exists()


def test_store_keeps_fresh_temp_of_live_process(tmp_path):
    store = CheckpointStore(tmp_path)
    live = tmp_path / f".streamlstm.ckpt.{os.getpid()}.abcd.tmp"
    live.write_bytes(b"in progress")
    stale = tmp_path / f".streamlstm.ckpt.{os.getpid()}.ef01.tmp"
    stale.write_bytes(b"old")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    other = tmp_path / ".other.ckpt.1.abcd.tmp"
    other.write_bytes(b"not ours")
    assert store.remove_stale_temp_files() == [stale]
    assert live.exists() and other.exists()


def test_store_save_error_is_checkpoint_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    store = CheckpointStore(tmp_path / "file" / "dir")
    with pytest.raises(CheckpointError):
        store.save({}, {})


def test_store_rejects_path_like_names(tmp_path):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, name="a/b")


def test_a_fifo_at_the_checkpoint_path_is_moved_aside_not_waited_on(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: start-up used to hang there.
    store = CheckpointStore(tmp_path)
    os.mkfifo(store.path)
    assert store.load() is None
    assert not store.path.exists() and len(list(tmp_path.glob("*.corrupt-*"))) == 1


def test_a_symlinked_checkpoint_is_not_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET-0123456789")
    (tmp_path / "state").mkdir()
    store = CheckpointStore(tmp_path / "state")
    store.path.symlink_to(secret)
    with pytest.raises(CheckpointCorrupt) as err:
        load_checkpoint(store.path)
    assert "TOPSECRET" not in str(err.value)
    assert store.load() is None
    moved = list((tmp_path / "state").glob("*.corrupt-*"))
    assert len(moved) == 1 and moved[0].is_symlink() and secret.read_bytes() == b"TOPSECRET-0123456789"
