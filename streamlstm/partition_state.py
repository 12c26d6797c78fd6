"""Per-partition state for `source: kafka`: which sensors each owned partition brought, and their
snapshots in a directory every worker shares.

A Kafka topic keyed by sensor id puts each sensor in one partition; the consumer group gives each
partition to one worker. A worker keeps, per owned partition, the set of sensors its records
named and the offset of the next record to process. A snapshot holds those sensors' detector
state (`Detector.export_sensors`) and that offset, written with checkpoint.py's atomic, checksummed
format to ``<snapshot_directory>/<topic>/<partition>/<next offset, 20 digits>.ckpt``; the two
newest are kept. The snapshot's offset is the truth about where the partition's state stands
(offsets committed to Kafka are for lag monitoring only), so a partition's state and position
always move together:

* every ``checkpoint.interval_s``, staggered over the owned partitions (one at a time, written
  off the worker thread);
* revoke (a rebalance, a graceful leave): the batch in hand is finished, every revoked partition
  is snapshotted before the callback returns, then its sensors are dropped. With an eager
  assignor every partition is revoked at every rebalance: the state is kept aside ("parked")
  until the new assignment is known, and a partition that comes back is not reloaded as long as
  the newest snapshot on disk is the one this worker wrote;
* assign: the newest snapshot that loads (a damaged one is moved aside, the previous one is
  tried) gives the sensors' state and the offset to resume at;
* lost (the session expired: another worker may own it already): the state is dropped and
  nothing is written.

Each snapshot also carries the partition's history: the offset ranges each owner processed into
the state it holds ([from, to) per owner, the newest last), so a handover can be audited.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import CheckpointError, CheckpointStore, save_checkpoint
from .restore import checkpoint_meta

__all__ = ["PARTITION_FORMAT", "PartitionStates", "SnapshotStore", "worker_id"]

log = logging.getLogger("streamlstm")

PARTITION_FORMAT = "streamlstm-partition"
PARTITION_FORMAT_VERSION = 1
KEEP_SNAPSHOTS = 2      # the newest and the one before it (the fallback)
HISTORY_LIMIT = 200     # owner ranges a snapshot remembers
_NAME = re.compile(r"(\d{20})\.ckpt\Z")


def worker_id() -> str:
    """Who wrote a snapshot (host and process), for the history and the logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _identity(path: Path) -> Optional[tuple]:
    """What tells this very file from a newer one of the same name (another writer)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (path.name, st.st_ino, st.st_size, st.st_mtime_ns)


class SnapshotStore:
    """The snapshots of one topic's partitions under one directory."""

    def __init__(self, directory, topic: str):
        self.root = Path(directory) / topic

    def directory(self, partition: int) -> Path:
        return self.root / f"{partition:05d}"

    def snapshots(self, partition: int) -> list[Path]:
        """The partition's snapshot files, newest (highest offset) first."""
        try:
            names = [p.name for p in self.directory(partition).iterdir() if _NAME.match(p.name)]
        except FileNotFoundError:
            return []
        return [self.directory(partition) / n for n in sorted(names, reverse=True)]

    def newest_identity(self, partition: int) -> Optional[tuple]:
        files = self.snapshots(partition)
        return _identity(files[0]) if files else None

    def load(self, partition: int, metrics=None) -> Optional[tuple]:
        """(arrays, meta, identity) of the newest snapshot that loads, or None when there is none.
        A damaged or foreign file is moved aside (``.corrupt-<time>``) and the previous one tried;
        an unreadable one (permissions) raises CheckpointError: starting fresh would lose it."""
        for path in self.snapshots(partition):
            store = CheckpointStore(path.parent, path.name)
            store.remove_stale_temp_files(any_name=True)
            identity = _identity(path)
            loaded = store.load()  # None: absent, or damaged and moved aside (logged)
            if loaded is not None:
                arrays, meta = loaded
                if meta.get("format") == PARTITION_FORMAT and meta.get("partition") == partition:
                    return arrays, meta, identity
                log.error("snapshot %s is not a %s snapshot of partition %d: skipped", path, PARTITION_FORMAT, partition)
            if metrics is not None:
                metrics.checkpoint_errors.inc()
        return None

    def save(self, partition: int, next_offset: int, arrays: dict, meta: dict) -> tuple:
        """Write atomically, drop all but the newest KEEP_SNAPSHOTS; the file's identity."""
        directory = self.directory(partition)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create snapshot directory {directory}: {exc}") from exc
        path = directory / f"{next_offset:020d}.ckpt"
        save_checkpoint(path, arrays, meta)
        for old in self.snapshots(partition)[KEEP_SNAPSHOTS:]:
            try:
                old.unlink()
            except OSError as exc:
                log.warning("cannot remove old snapshot %s: %s", old, exc)
        return _identity(path)


@dataclasses.dataclass
class _Partition:
    sensors: set
    next_offset: Optional[int]      # the next record to process; None: none seen, no snapshot
    started: Optional[int]          # where this ownership began (the loaded snapshot's offset)
    history: list                   # [{"from", "to", "worker"}] of earlier owners, oldest first
    written: Optional[tuple] = None  # identity of the newest snapshot this state matches
    dirty: bool = False             # records processed since `written`
    due: float = 0.0                # monotonic time of the next periodic snapshot
    saved_unix: Optional[float] = None

    def ranges(self, worker: str) -> list:
        mine = [] if self.started is None or self.next_offset is None or self.next_offset <= self.started \
            else [{"from": self.started, "to": self.next_offset, "worker": worker}]
        return (self.history + mine)[-HISTORY_LIMIT:]


class PartitionStates:
    """The worker's owned partitions (called on the worker thread only: the consumer's poll,
    where the rebalance callbacks run, is the worker's)."""

    def __init__(self, store: SnapshotStore, detector: Callable[[], object], config: Callable[[], object], *,
                 interval_s: float, metrics=None, worker: Optional[str] = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self._detector = detector
        self._config = config
        self.interval_s = float(interval_s)
        self.metrics = metrics
        self.worker = worker or worker_id()
        self._monotonic = monotonic
        self.owned: dict[int, _Partition] = {}
        self.parked: dict[int, _Partition] = {}
        self.owner: dict[str, int] = {}  # sensor -> its partition (owned or parked)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._pending: Optional[tuple] = None  # (partition, _Partition, next_offset, future) being written

    # --- records ------------------------------------------------------------------------

    def owns(self, partition: int) -> bool:
        return partition in self.owned

    def position(self, partition: int) -> Optional[int]:
        return self.owned[partition].next_offset

    def claim(self, sensor: str, partition: int) -> bool:
        """Record that `sensor` belongs to `partition`; False when another partition of this
        worker holds it (a topic not keyed by sensor id: the reading is refused, its state would
        otherwise live in two partitions' snapshots)."""
        p = self.owner.get(sensor)
        if p is None:
            self.owner[sensor] = partition
            self.owned[partition].sensors.add(sensor)
            return True
        return p == partition

    def processed(self, partition: int, offset: int) -> None:
        """The record at `offset` went through the detector."""
        part = self.owned.get(partition)
        if part is not None:
            if part.started is None:
                part.started = offset
            part.next_offset = offset + 1
            part.dirty = True

    # --- rebalance callbacks --------------------------------------------------------------

    def assign(self, partitions) -> dict:
        """Take over `partitions`: {partition: offset to resume at, None where no snapshot says}."""
        self._collect(wait=True)
        partitions = sorted(partitions)
        kept = {}
        for p in partitions:  # eager: a partition coming back keeps its state if nobody wrote since
            part = self.parked.get(p)
            if part is not None and self.store.newest_identity(p) == part.written:
                kept[p] = self.parked.pop(p)
        self._forget(self.parked)
        self.parked = {}
        loaded, offsets = [], {}
        now = self._monotonic()
        for p in partitions:
            part = kept.get(p)
            if part is None:
                part, state = self._load(p)
                if state is not None:
                    loaded.append((p, state))
            self.owned[p] = part
        # A sensor in two partitions' state (a topic not keyed by sensor id) stays with the one
        # whose state the detector holds: a kept partition's, else the first loaded.
        for p in sorted(partitions, key=lambda p: p not in kept):
            for s in self.owned[p].sensors:
                self.owner.setdefault(s, p)
        if loaded:
            try:
                self._detector().adopt_sensors([state for _, state in loaded])
            except ValueError as exc:  # the configured models changed shape: those sensors start afresh
                log.error("partitions %s: snapshots do not fit the configured models (%s): their sensors "
                          "start fresh", [p for p, _ in loaded], exc)
                if self.metrics is not None:
                    self.metrics.checkpoint_errors.inc()
        for i, p in enumerate(partitions):
            part = self.owned[p]
            part.sensors = {s for s in part.sensors if self.owner.get(s) == p}
            part.due = now + self.interval_s * (i + 1) / len(partitions)  # staggered
            offsets[p] = part.next_offset
        for p in partitions:
            part = self.owned[p]
            how = "kept" if p in kept else ("snapshot" if part.written else "no snapshot")
            log.info("partition %d assigned: %d sensors, resuming at offset %s (%s)", p, len(part.sensors),
                     "start" if part.next_offset is None else part.next_offset, how)
        return offsets

    def revoke(self, partitions, *, park: bool) -> None:
        """Snapshot `partitions` (the batch in hand is done), then drop their state, or keep it
        aside until the next assignment (`park`: eager rebalancing)."""
        self._collect(wait=True)
        dropped = {}
        for p in sorted(partitions):
            part = self.owned.pop(p, None)
            if part is None:
                continue
            if part.dirty:
                self._write(p, part, self._export(p, part))
            log.info("partition %d revoked at offset %s", p, part.next_offset)
            if park:
                self.parked[p] = part
            else:
                dropped[p] = part
        self._forget(dropped)  # one rebuild of the detector's groups for all of them

    def lose(self, partitions) -> None:
        """The session expired: another worker may own `partitions` already. Write nothing."""
        self._collect(wait=True)
        gone = {p: self.owned.pop(p) for p in partitions if p in self.owned}
        gone.update({p: self.parked.pop(p) for p in partitions if p in self.parked})
        self._forget(gone)
        for p in sorted(gone):
            log.warning("partition %d lost (session expired): its state since the last snapshot is dropped", p)

    # --- periodic snapshots ---------------------------------------------------------------

    def snapshot_due(self) -> None:
        """At most one periodic snapshot per call, the partition whose turn it is (staggered),
        written off the worker thread; none while the previous one is being written."""
        self._collect(wait=False)
        if self._pending is not None:
            return
        now = self._monotonic()
        due = [(part.due, p) for p, part in self.owned.items() if part.due <= now]
        if not due:
            return
        _, p = min(due)
        part = self.owned[p]
        part.due = now + self.interval_s
        if part.dirty:
            state = self._export(p, part)
            self._pending = (p, part, part.next_offset,
                             self._writer.submit(self.store.save, p, part.next_offset, *state))
            part.dirty = False  # a record processed while it is written sets it again

    def age(self) -> Optional[float]:
        """Seconds since the oldest owned partition's last snapshot (None: none written yet)."""
        times = [part.saved_unix for part in self.owned.values() if part.saved_unix is not None]
        return max(0.0, time.time() - min(times)) if times else None

    def wait_written(self) -> None:
        """Until the periodic snapshot being written (if any) is on disk."""
        self._collect(wait=True)

    def close(self) -> None:
        """Wait for the snapshot being written; the worker is done."""
        self._collect(wait=True)
        self._writer.shutdown(wait=True)

    # --- internals ------------------------------------------------------------------------

    def _export(self, p: int, part: _Partition) -> tuple:
        arrays, detector_meta = self._detector().export_sensors(sorted(part.sensors))
        meta = checkpoint_meta(self._config(), detector_meta)
        meta.update(format=PARTITION_FORMAT, format_version=PARTITION_FORMAT_VERSION,
                    topic=self.store.root.name, partition=p, next_offset=part.next_offset,
                    started=part.started, history=part.ranges(self.worker), worker=self.worker)
        return arrays, meta

    def _write(self, p: int, part: _Partition, state: tuple) -> bool:
        try:
            part.written = self.store.save(p, part.next_offset, *state)
        except (CheckpointError, OSError, ValueError, TypeError) as exc:
            self._failed(p, exc)
            return False
        part.dirty = False
        part.saved_unix = time.time()
        return True

    def _collect(self, wait: bool) -> None:
        """Take in the periodic snapshot written off the worker thread (when done, or `wait`)."""
        if self._pending is None:
            return
        p, part, offset, future = self._pending
        if not wait and not future.done():
            return
        self._pending = None
        try:
            identity = future.result()
        except (CheckpointError, OSError, ValueError, TypeError) as exc:
            part.dirty = True
            self._failed(p, exc)
            return
        if part.next_offset == offset:  # nothing processed since: the file is this state
            part.written = identity
        part.saved_unix = time.time()

    def _failed(self, p: int, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.checkpoint_errors.inc()
        log.error("snapshot of partition %d failed (the worker keeps running): %s", p, exc)

    def _load(self, p: int) -> tuple:
        """(_Partition, (arrays, detector meta) or None) from the newest loadable snapshot."""
        got = self.store.load(p, self.metrics)
        if got is None:
            return _Partition(set(), None, None, []), None
        arrays, meta, identity = got
        offset = int(meta["next_offset"])
        sensors = {s for g in meta["detector"]["groups"].values() for s in g["sensors"]}
        part = _Partition(sensors, offset, offset, list(meta.get("history", [])), written=identity,
                          saved_unix=float(meta.get("saved_at", time.time())))
        return part, (arrays, meta["detector"])

    def _forget(self, parts: dict) -> None:
        """Drop the sensors of `parts` from the detector and the ownership map."""
        names = [s for part in parts.values() for s in part.sensors]
        if names:
            self._detector().drop_sensors(names)
        for p, part in parts.items():
            for s in part.sensors:
                if self.owner.get(s) == p:
                    del self.owner[s]
