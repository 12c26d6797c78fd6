"""The daemon's checkpoint and status-file writes: snapshots are taken on the worker (the
detector is the worker's), written on a thread of their own so a slow disk does not stall it;
the final checkpoint at shutdown is written by the caller itself."""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Callable, Optional

from .checkpoint import CheckpointError
from .status import remove_status, write_status

__all__ = ["Checkpointer"]

log = logging.getLogger("streamlstm")


class Checkpointer:
    """`snapshot() -> (arrays, meta)` copies the state to write (called on the worker)."""

    def __init__(self, store, snapshot: Callable[[], tuple], metrics, rlog):
        self.store = store
        self.metrics = metrics
        self.rlog = rlog
        self._snapshot = snapshot
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._future: Optional[concurrent.futures.Future] = None
        self.last_unix: Optional[float] = None  # when the last checkpoint was written (or the restored one)

    def age(self) -> Optional[float]:
        last = self.last_unix
        return None if last is None else max(0.0, time.time() - last)

    def save_async(self) -> None:
        if self._future is not None and not self._future.done():
            log.warning("previous checkpoint still being written: skipping this one")
            return
        try:
            arrays, meta = self._snapshot()
        except Exception as exc:  # noqa: BLE001
            self.metrics.checkpoint_errors.inc()
            log.error("checkpoint snapshot failed: %s", exc)
            return
        self._future = self._pool.submit(self._save, arrays, meta)

    def save_final(self) -> bool:
        if self._future is not None:
            self._future.result()
        try:
            arrays, meta = self._snapshot()
        except Exception as exc:  # noqa: BLE001
            self.metrics.checkpoint_errors.inc()
            log.error("final checkpoint snapshot failed: %s", exc)
            return False
        return self._save(arrays, meta)

    def status_async(self, rows: Callable[[], list]) -> None:
        """Rows for `streamlstm status`, taken now and written by the checkpoint thread."""
        try:
            taken = rows()
        except Exception as exc:  # noqa: BLE001 - status is a convenience, never fatal
            log.debug("status rows failed: %s", exc)
            return
        self._pool.submit(self._write_status, taken)

    def close(self) -> None:
        """Wait for pending writes; `status` reads the checkpoint from now on."""
        self._pool.shutdown(wait=True)
        try:
            remove_status(self.store.directory)
        except OSError as exc:
            log.warning("cannot remove the status file: %s", exc)

    def _write_status(self, rows) -> None:
        try:
            write_status(self.store.directory, rows)
        except (OSError, ValueError) as exc:
            self.rlog.log("status-file", logging.WARNING, "cannot write %s/status.json: %s", self.store.directory, exc)

    def _save(self, arrays, meta) -> bool:
        t0 = time.perf_counter()
        try:
            self.store.save(arrays, meta)
        except (CheckpointError, OSError, ValueError, TypeError) as exc:
            self.metrics.checkpoint_errors.inc()
            log.error("checkpoint failed (the daemon keeps running): %s", exc)
            return False
        self.last_unix = time.time()
        log.debug("checkpoint written in %.2f s", time.perf_counter() - t0)
        return True
