"""Replay CSV files through the daemon's detector path, and evaluate against NAB labels."""
from __future__ import annotations

import csv
import json
import pathlib
import sys
import time

import numpy as np

from ..reading import Columns

# anomaly_score is the alert-suppressed score (what NAB thresholds); raw_score the per-reading one.
ROW_FIELDS = ("timestamp", "value", "prediction", "residual", "anomaly_score", "is_anomaly", "raw_score")


def read_series(path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(epoch seconds, original timestamp strings, values (N, I)) from `timestamp,value[,...]`."""
    stamps, rows = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        if _is_number(header[0]) or _parse_time(header[0]) is not None:  # no header row
            stamps.append(header[0])
            rows.append(header[1:])
        for line in reader:
            if not line:
                continue
            stamps.append(line[0])
            rows.append(line[1:])
    values = np.array(rows, dtype=np.float64)  # NumPy parses the value strings in one call
    return _stamps_to_seconds(stamps), stamps, values.reshape(len(rows), -1)


def _stamps_to_seconds(stamps: list[str]) -> np.ndarray:
    """Epoch seconds of every stamp: one NumPy parse of the whole ISO column when it is one
    (row by row it cost 14 us a row, more than replaying the row), else stamp by stamp
    (epoch numbers, or a mix), which names the stamp it cannot read."""
    texts = [s.strip() for s in stamps]
    if all(len(t) >= 10 and t[4] == "-" for t in texts):  # YYYY-MM-DD...; NumPy reads "12" as a year
        try:
            iso = np.array([t.replace(" ", "T") for t in texts], dtype="datetime64[us]")
            return iso.astype(np.int64) / 1e6
        except ValueError:
            pass
    return np.array([_to_seconds(s) for s in stamps], dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_time(text: str):
    try:
        return np.datetime64(text.strip().replace(" ", "T"), "us")
    except ValueError:
        return None


def _to_seconds(text: str) -> float:
    if _is_number(text):
        return float(text)
    when = _parse_time(text)
    if when is None:
        raise ValueError(f"cannot read timestamp {text!r}")
    return when.astype("datetime64[us]").astype(np.int64) / 1e6


class Progress:
    """Progress on stderr: a line redrawn in place on a terminal; otherwise (systemd, CI, a pipe
    to a file) a plain line every `every_s` seconds and one at the end, so a long replay or
    evaluate run still shows that it moves."""

    def __init__(self, total: int, label: str, stream=None, *, every_s: float = 10.0,
                 clock=time.monotonic):
        self.total, self.label = total, label
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):  # closed or exotic streams
            self.tty = False
        self.every_s = 0.2 if self.tty else every_s
        self.clock = clock
        self.last = clock()
        self.t0 = self.last

    def update(self, done: int):
        now = self.clock()
        finished = done >= self.total
        if not finished and now - self.last < self.every_s:
            return
        self.last = now
        pct = 100 * done / max(self.total, 1)
        text = f"{self.label}: {done}/{self.total} ({pct:.0f}%), {now - self.t0:.0f} s"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def replay_series(detector, sensor: str, seconds, values, chunk: int = 512, progress: Progress | None = None):
    """Stream one series through `detector`; returns per-row arrays and the events."""
    n = len(seconds)
    out = {k: [] for k in ("prediction", "residual", "score", "alert", "is_anomaly", "band", "reason")}
    events = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = np.asarray(values[start:stop], dtype=np.float64).reshape(stop - start, -1)
        batch = detector.process(Columns([sensor] * (stop - start), np.asarray(seconds[start:stop], dtype=np.float64),
                                         block, np.full(stop - start, block.shape[1], np.int64)))
        out["prediction"].append(batch.prediction)
        out["residual"].append(batch.residual)
        out["band"].append(batch.band)
        out["score"].append(batch.score)
        out["alert"].append(batch.alert)
        out["is_anomaly"].append(batch.is_anomaly)
        out["reason"].extend(batch.reason)
        events.extend(batch.events)
        if progress:
            progress.update(stop)
    result = {k: (np.concatenate(v) if k != "reason" else v) for k, v in out.items()}
    result["events"] = events
    return result


def write_rows(path, stamps, values, result):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROW_FIELDS)
        for i, stamp in enumerate(stamps):
            pred, res = result["prediction"][i], result["residual"][i]
            w.writerow([
                stamp, _fmt(values[i]), _fmt(pred[~np.isnan(pred)] if not np.all(np.isnan(pred)) else pred[:1]),
                _fmt(res[~np.isnan(res)] if not np.all(np.isnan(res)) else res[:1]),
                f"{result['alert'][i]:.6f}", int(result["is_anomaly"][i]), f"{result['score'][i]:.6f}",
            ])


def _fmt(v) -> str:
    v = np.atleast_1d(v)
    return ";".join("" if np.isnan(x) else f"{x:.6g}" for x in v)


def write_events(path, result):
    incidents = {}
    for kind, inc in result["events"]:
        incidents[(inc.sensor, inc.start)] = inc  # "resolved" replaces "anomaly": one per incident
    with open(path, "w") as f:
        for inc in incidents.values():
            f.write(json.dumps(inc.as_dict()) + "\n")
    return list(incidents.values())


def plot(path, seconds, values, result, windows=()):
    """PNG of value, prediction, threshold band and events (needs the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = seconds.astype("datetime64[s]")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(14, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    pred = result["prediction"][:, 0]
    band = result["band"][:, 0]
    ax.plot(t, values[:, 0], lw=0.7, label="value")
    ax.plot(t, pred, lw=0.7, label="prediction")
    ax.fill_between(t, pred - band, pred + band, alpha=0.2, label="threshold band")
    for start, end in windows:
        ax.axvspan(start, end, color="orange", alpha=0.2)
        ax2.axvspan(start, end, color="orange", alpha=0.2)
    for inc in result.get("incidents", []):
        ax.axvline(np.datetime64(int(inc.start), "s"), color="red", lw=0.8)
    lo, hi = np.nanpercentile(values[:, 0], [0.5, 99.5])
    pad = 0.2 * (hi - lo + 1e-9)
    ax.set_ylim(lo - pad, hi + pad)  # a wide early band must not flatten the series
    ax.legend(loc="upper left")
    ax2.plot(t, result["score"], lw=0.7, color="purple")
    ax2.axhline(result["threshold"], color="red", lw=0.6, ls="--")
    ax2.set_ylabel("score")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def labels_key(path: pathlib.Path, windows: dict) -> str | None:
    """The key of `path` in a NAB windows file ("category/file.csv"), if any."""
    parts = path.resolve().parts
    for key in windows:
        if tuple(pathlib.PurePosixPath(key).parts) == parts[-len(pathlib.PurePosixPath(key).parts):]:
            return key
    return None
