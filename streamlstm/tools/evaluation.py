"""Evaluation that cannot be tuned into: NAB in-sample and leave-one-category-out, SKAB's
two official measures, cold and warm-started, and replay speed, in one report.

Every file is replayed through the same detector path as the daemon (`replay.replay_series`),
scalar series (NAB) and vector series (SKAB: 8 inputs per reading) alike.

- NAB: one corpus threshold picked by NAB's optimiser over the anomaly scores (in-sample), and
  leave-one-category-out (LOCO): for each category the threshold is picked on the *other*
  categories and the held-out category is scored with it; the folds' raw scores are summed
  and normalised once (a category without windows, e.g. artificialNoAnomaly, still counts
  its false positives).
- SKAB (outlier detection): point-wise F1, FAR = FP/(FP+TN), MAR = FN/(FN+TP) of the rows
  where the detector says the sensor is anomalous (an open incident), pooled over files, at
  the configured threshold: no threshold is fitted to the labels.
- SKAB (change-point detection): NAB standard score of the incident boundaries (the rows
  where an incident opens or closes: the detector's change points) with a 60-second window
  starting at each labelled change point, again at the configured threshold.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from . import nab
from .replay import Progress, read_series, replay_series

CHANGEPOINT_WINDOW_S = 60.0  # SKAB's change-point leaderboard: 60 s right of each change point


@dataclasses.dataclass(frozen=True)
class Job:
    key: str  # "category/file.csv", the key of the labels
    path: str


@dataclasses.dataclass
class FileRun:
    key: str
    stamps: np.ndarray  # datetime64[us]
    alert: np.ndarray  # alert-suppressed score (what NAB thresholds)
    is_anomaly: np.ndarray  # bool, an incident is open at the row
    boundary: np.ndarray  # bool, an incident opened or closed at the row
    rows: int
    seconds: float
    kernel_seconds: float
    incidents: int

    @property
    def category(self) -> str:
        return self.key.split("/", 1)[0] if "/" in self.key else ""


# ------------------------------------------------------------------------------------ replaying

def learn_history(detector, sensor: str, seconds, values):
    """Warm start: recorded normal data replayed through the daemon's path (models, scales and
    baselines learn it), then any incident it left open is closed so a live start begins calm."""
    replay_series(detector, sensor, seconds, values)
    for det in detector.active.values():
        det.close_all()
    return detector


def fit_history(config, path, sensor: str):
    """A fresh detector warm-started from the history in `path`."""
    from ..factory import build_detector

    seconds, _, values = read_series(path)
    return learn_history(build_detector(config), sensor, seconds, values)


def _run_one(args) -> FileRun:
    config, job, warm = args
    from ..factory import build_detector

    seconds, _, values = read_series(job.path)
    detector = build_detector(config)
    sensor = pathlib.Path(job.path).stem
    if warm is not None:  # (arrays, meta, sensor): continue from the fitted state
        arrays, meta, sensor = warm
        detector.load_state_dict(arrays, meta)
    t0 = time.perf_counter()
    result = replay_series(detector, sensor, seconds, values)
    wall = time.perf_counter() - t0
    boundary = np.zeros(len(seconds), bool)
    incidents = set()
    for kind, inc in result["events"]:
        incidents.add(inc.start)
        at = inc.start if kind == "anomaly" else inc.end
        boundary[min(int(np.searchsorted(seconds, at)), len(seconds) - 1)] = True
    return FileRun(
        key=job.key, stamps=(seconds * 1e6).astype("datetime64[us]"), alert=np.asarray(result["alert"]),
        is_anomaly=np.asarray(result["is_anomaly"], bool), boundary=boundary, rows=len(seconds), seconds=wall,
        kernel_seconds=sum(d.kernel_seconds for d in detector.active.values()), incidents=len(incidents),
    )


def run_jobs(config, jobs: list[Job], processes: int = 0, warm=None) -> list[FileRun]:
    """Replay each job with a fresh detector (or a copy of the warm-start state)."""
    work = [(config, job, warm) for job in jobs]
    workers = processes or min(len(work), os.cpu_count() or 1)
    progress = Progress(len(work), "evaluate: files replayed")
    runs = []
    with concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for run in (pool.map if pool is not None else map)(_run_one, work):
            runs.append(run)
            progress.update(len(runs))
    return runs


def labelled_jobs(root, labels: dict) -> list[Job]:
    """The CSV files under `root` that `labels` names, keyed as in the labels."""
    root = pathlib.Path(root)
    jobs = []
    for path in sorted(p for p in root.rglob("*.csv") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key = rel if rel in labels else next((k for k in labels if rel.endswith(k) or k.endswith(rel)), None)
        jobs.append(Job(key or rel, str(path)))
    return jobs


# ------------------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class NabReport:
    files: int
    threshold: float
    standard: float
    low_fp: float
    low_fn: float
    loco: float  # standard profile, leave-one-category-out thresholds
    loco_thresholds: dict
    precision: float
    recall: float
    per_file: dict  # key -> nab.FileScore at the in-sample threshold


def score_nab(runs: list[FileRun], windows: dict) -> NabReport:
    corpus = {r.key: (r.stamps, r.alert) for r in runs}
    labelled = {k: windows.get(k, []) for k in corpus}
    sweeps = {p: nab.sweep(corpus, labelled, p) for p in nab.PROFILES}
    best = sweeps["standard"]
    events = nab.event_metrics(corpus, labelled, best.threshold)
    return NabReport(
        files=len(corpus), threshold=best.threshold, standard=best.normalised,
        low_fp=sweeps["reward_low_FP_rate"].normalised, low_fn=sweeps["reward_low_FN_rate"].normalised,
        **dict(zip(("loco", "loco_thresholds"), leave_one_category_out(runs, labelled))),
        precision=events.precision, recall=events.recall, per_file=dict(best.files),
    )


def leave_one_category_out(runs: list[FileRun], windows: dict, profile: str = "standard"):
    """(normalised score, {category: threshold}) with each category scored at the threshold
    NAB's optimiser picks on all the other categories."""
    categories = sorted({r.category for r in runs})
    if len(categories) < 2:
        return float("nan"), {}
    raw = null = perfect = 0.0
    thresholds = {}
    for held_out in categories:
        train = {r.key: (r.stamps, r.alert) for r in runs if r.category != held_out}
        test = {r.key: (r.stamps, r.alert) for r in runs if r.category == held_out}
        threshold = nab.sweep(train, {k: windows[k] for k in train}, profile).threshold
        thresholds[held_out] = threshold
        fold = nab.sweep(test, {k: windows[k] for k in test}, profile)  # for null and perfect
        raw += sum(nab.score_file(*test[k], windows[k], threshold, profile).raw for k in test)
        null += fold.null
        perfect += fold.perfect
    score = 100.0 * (raw - null) / (perfect - null) if perfect != null else float("nan")
    return score, thresholds


@dataclasses.dataclass
class SkabReport:
    files: int
    f1: float
    far: float
    mar: float
    changepoint_nab: float
    window_nab: float  # NAB over whole anomalous intervals, threshold swept (easier; reference only)


def _in_windows(stamps, wins) -> np.ndarray:
    inside = np.zeros(len(stamps), bool)
    for start, end in wins:
        inside |= (stamps >= start) & (stamps <= end)
    return inside


def score_skab(runs: list[FileRun], windows: dict, changepoints: dict) -> SkabReport:
    tp = fp = fn = tn = 0
    for r in runs:
        truth = _in_windows(r.stamps, windows.get(r.key, []))
        flag = r.is_anomaly
        tp += int(np.sum(flag & truth))
        fp += int(np.sum(flag & ~truth))
        fn += int(np.sum(~flag & truth))
        tn += int(np.sum(~flag & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    cp_windows = {r.key: changepoint_windows(changepoints.get(r.key, [])) for r in runs}
    # Binary change points: a boundary row scores 1, so NAB's threshold is "any boundary".
    cp_corpus = {r.key: (r.stamps, r.boundary.astype(float)) for r in runs}
    cp = _score_at(cp_corpus, cp_windows, 0.5)
    win_corpus = {r.key: (r.stamps, r.alert) for r in runs}
    window_nab = nab.sweep(win_corpus, {r.key: windows.get(r.key, []) for r in runs}, "standard").normalised
    return SkabReport(files=len(runs), f1=f1, far=fp / (fp + tn) if fp + tn else 0.0,
                      mar=fn / (fn + tp) if fn + tp else 0.0, changepoint_nab=cp, window_nab=window_nab)


def changepoint_windows(points) -> list:
    """A window of CHANGEPOINT_WINDOW_S from each change point, cut short where the next one
    starts (NAB windows must not overlap)."""
    width = np.timedelta64(int(CHANGEPOINT_WINDOW_S * 1e6), "us")
    tick = np.timedelta64(1, "us")
    points = sorted(points)
    ends = [min(c + width, nxt) - tick for c, nxt in zip(points, points[1:] + [points[-1] + 2 * width])] if points else []
    return list(zip(points, ends))


def _score_at(corpus, windows, threshold: float) -> float:
    sweep = nab.sweep(corpus, windows, "standard")  # null and perfect of the corpus
    raw = sum(nab.score_file(ts, sc, windows[k], threshold, "standard").raw for k, (ts, sc) in corpus.items())
    return 100.0 * (raw - sweep.null) / (sweep.perfect - sweep.null) if sweep.perfect != sweep.null else float("nan")


def _time(text: str) -> np.datetime64:
    return np.datetime64(text.strip().replace(" ", "T"), "us")


def load_skab_labels(root) -> tuple[dict, dict]:
    """({key: [(start, end)]}, {key: [change point]}) as datetime64 from SKAB's labels/."""
    labels = pathlib.Path(root) / "labels"
    windows = json.loads((labels / "anomaly_windows.json").read_text())
    changepoints = json.loads((labels / "changepoints.json").read_text())
    return ({k: [(_time(a), _time(b)) for a, b in v] for k, v in windows.items()},
            {k: [_time(c) for c in v] for k, v in changepoints.items()})


def speed(runs: list[FileRun]) -> tuple[float, float]:
    """(readings per second per process, share of that time in the model kernels)."""
    rows = sum(r.rows for r in runs)
    busy = sum(r.seconds for r in runs)
    kernel = sum(r.kernel_seconds for r in runs)
    return (rows / busy if busy else float("nan")), (kernel / busy if busy else 0.0)


# ------------------------------------------------------------------------------------- the table

def without_channel(config, channel: str):
    """A copy of `config` whose every group has evidence `channel` switched off (ablation)."""
    groups = [dataclasses.replace(g, detector=dataclasses.replace(
        g.detector, channels=tuple(c for c in g.detector.channels if c != channel))) for g in config.groups]
    return dataclasses.replace(config, groups=tuple(groups) if isinstance(config.groups, tuple) else groups)


def evaluate_all(config, nab_jobs=(), nab_windows=None, skab_root=None, warm: bool = True,
                 processes: int = 0, variant: str = "default", details: bool = True, report=print) -> list[dict]:
    """Every measure the detector is judged by, one table row per corpus and mode (printed
    through `report` as they come; `details`: NAB's per-file lines too)."""
    rows = []

    def add(row):
        row["variant"] = variant
        rows.append(row)
        report(format_row(row))

    if nab_jobs:
        runs = run_jobs(config, list(nab_jobs), processes)
        r = score_nab(runs, nab_windows)
        rate, kernel = speed(runs)
        if details:
            report(f"{'file':60s} {'rows':>6s} {'TP':>3s} {'FN':>3s} {'FP':>4s} {'raw':>7s} {'events':>6s}")
            for run in runs:
                fs = r.per_file[run.key]
                report(f"{run.key:60s} {run.rows:6d} {fs.tp:3d} {fs.fn:3d} {fs.fp:4d} {fs.raw:7.2f} {run.incidents:6d}")
        add(dict(corpus="NAB", mode="in-sample", files=r.files, standard=r.standard, low_fp=r.low_fp,
                         low_fn=r.low_fn, threshold=r.threshold, precision=r.precision, recall=r.recall,
                         readings_per_s=rate, kernel_share=kernel))
        add(dict(corpus="NAB", mode="leave-one-category-out", files=r.files, standard=r.loco,
                         thresholds=r.loco_thresholds))
    if skab_root is not None:
        windows, changepoints = load_skab_labels(skab_root)
        jobs = labelled_jobs(pathlib.Path(skab_root) / "data", windows)
        history = pathlib.Path(skab_root) / "anomaly-free" / "anomaly-free.csv"
        modes = [("cold", None)]
        if warm and history.exists():
            fitted = fit_history(config, history, "pump")
            modes.append(("warm", (*fitted.state_dict(), "pump")))
        for mode, state in modes:
            runs = run_jobs(config, jobs, processes, warm=state)
            s = score_skab(runs, windows, changepoints)
            rate, kernel = speed(runs)
            add(dict(corpus="SKAB", mode=mode, files=s.files, f1=s.f1, far=s.far, mar=s.mar,
                             changepoint_nab=s.changepoint_nab, window_nab=s.window_nab, readings_per_s=rate))
    return rows


def format_row(row: dict) -> str:
    head = f"{row.get('variant', 'default'):16s} {row['corpus']:5s} {row['mode']:23s} {row['files']:3d} files  "
    if row["corpus"] == "NAB" and row["mode"] == "in-sample":
        return head + (f"NAB standard {row['standard']:5.1f}  low-FP {row['low_fp']:5.1f}  low-FN {row['low_fn']:5.1f}  "
                       f"threshold {row['threshold']:.3f}  event precision {row['precision']:.2f} recall {row['recall']:.2f}  "
                       f"{row['readings_per_s']:.0f} readings/s")
    if row["corpus"] == "NAB":
        thresholds = ", ".join(f"{k} {v:.3f}" for k, v in row["thresholds"].items())
        return head + f"NAB standard {row['standard']:5.1f}  (thresholds: {thresholds})"
    return head + (f"point F1 {row['f1']:.3f}  FAR {100 * row['far']:4.1f}%  MAR {100 * row['mar']:4.1f}%  "
                   f"change-point NAB {row['changepoint_nab']:5.1f}  (window NAB {row['window_nab']:5.1f})")
