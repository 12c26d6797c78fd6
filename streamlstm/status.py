"""``streamlstm status``: sensors, their group, last reading, last score and open incidents.

The running daemon writes ``status.json`` into its checkpoint directory every few seconds
(atomically: temporary file + rename) and removes it when it stops; ``status`` reads that file
while the process that wrote it is alive, and the checkpoint otherwise. Both carry the same rows:

    {"sensor", "group", "last_reading" (epoch s), "readings", "last_score", "incident"}

``incident`` is null or ``{"start", "score", "peak_score"}`` of the sensor's open incident.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

__all__ = ["STATUS_FILE", "detector_rows", "format_status", "read_status", "remove_status", "write_status"]

STATUS_FILE = "status.json"


def _num(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def detector_rows(detector, last_scores: dict) -> list:
    """Rows of every sensor of a live `Detector` (worker thread: it owns the detector)."""
    rows = []
    for name, g in detector.active.items():
        for sensor, slot in g.sensors.items():
            inc = g.open.get(slot)
            rows.append(_row(sensor, name, g.last_ts[slot], g.seen[slot], last_scores.get(sensor),
                             None if inc is None else _incident(inc)))
    return rows


def _incident(inc) -> dict:
    return {"start": _num(inc.start), "score": _num(inc.score), "peak_score": _num(inc.peak_score)}


def _row(sensor, group, last_ts, seen, score, incident) -> dict:
    return {"sensor": sensor, "group": group, "last_reading": _num(last_ts), "readings": int(seen),
            "last_score": _num(score), "incident": incident}


def checkpoint_rows(arrays: dict, meta: dict) -> list:
    """Rows from a daemon checkpoint's (arrays, meta)."""
    det = meta.get("detector", {})
    last_scores = meta.get("last_scores", {})
    rows = []
    for name, gm in det.get("groups", {}).items():
        sensors = gm.get("sensors", [])
        last_ts = arrays.get(f"{name}/last_ts")
        seen = arrays.get(f"{name}/seen")
        open_ = gm.get("open", {})
        for slot, sensor in enumerate(sensors):
            inc = open_.get(str(slot))
            rows.append(_row(sensor, name, None if last_ts is None else last_ts[slot],
                             0 if seen is None else seen[slot], last_scores.get(sensor),
                             None if inc is None else {"start": _num(inc.get("start")), "score": _num(inc.get("score")),
                                                       "peak_score": _num(inc.get("peak_score"))}))
    return rows


def write_status(directory, rows: list, pid: Optional[int] = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"pid": os.getpid() if pid is None else pid, "written_at": time.time(), "sensors": rows}
    tmp = directory / f".{STATUS_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
        os.replace(tmp, directory / STATUS_FILE)
    except BaseException:
        # A full disk must not leave a partial temporary file behind (nor a partial status).
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def remove_status(directory) -> None:
    try:
        (Path(directory) / STATUS_FILE).unlink()
    except FileNotFoundError:
        pass


def _alive(pid) -> bool:
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (e.g. DynamicUser=)
    return True


def read_status(directory) -> tuple[str, list]:
    """(where it came from, rows): the running daemon's status file, else the checkpoint.

    Raises FileNotFoundError when there is neither.
    """
    directory = Path(directory)
    try:
        doc = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, ValueError):
        doc = None
    if isinstance(doc, dict) and _alive(doc.get("pid")):
        age = max(0.0, time.time() - float(doc.get("written_at", 0)))
        return f"running daemon (pid {doc['pid']}, updated {age:.0f} s ago)", list(doc.get("sensors", []))
    from .checkpoint import load_checkpoint

    path = directory / "streamlstm.ckpt"
    arrays, meta = load_checkpoint(path)
    saved = _when(meta.get("saved_at"))
    return f"checkpoint {path} (saved {saved}; the daemon is not running)", checkpoint_rows(arrays, meta)


def _when(ts) -> str:
    ts = _num(ts)
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def format_status(source: str, rows: list) -> str:
    rows = sorted(rows, key=lambda r: (r["group"], r["sensor"]))
    open_count = sum(1 for r in rows if r.get("incident"))
    groups = len({r["group"] for r in rows})
    table = [("SENSOR", "GROUP", "LAST READING (UTC)", "READINGS", "LAST SCORE", "OPEN INCIDENT")]
    for r in rows:
        inc = r.get("incident")
        score = r.get("last_score")
        table.append((
            r["sensor"], r["group"], _when(r.get("last_reading")), str(r.get("readings", 0)),
            "-" if score is None else f"{score:.3f}",
            "-" if not inc else f"since {_when(inc.get('start'))}, peak {inc.get('peak_score') or 0:.3f}",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [f"source: {source}", f"{len(rows)} sensors in {groups} groups, {open_count} open incidents", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
