"""Command line: ``streamlstm run | bridge | check-config | status | warmup | replay | evaluate | fit | demo``.

Exit statuses and configuration errors: errors.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

from .config import ConfigError, load_config, parse_config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, config_error


def _parser() -> argparse.ArgumentParser:
    from .version import package_version

    p = argparse.ArgumentParser(prog="streamlstm", description="Online LSTM anomaly detection for MQTT sensor streams.")
    p.add_argument("--version", action="version", version=f"streamlstm {package_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run the daemon (the systemd service's main process)")
    r.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML configuration")

    b = sub.add_parser("bridge", help="forward the inputs' MQTT topics into the Kafka topic keyed by sensor id "
                                      "(for source: kafka workers)")
    b.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML configuration (mqtt, inputs, kafka)")

    c = sub.add_parser("check-config", help="validate a configuration file (prints OK or the problems)")
    c.add_argument("file", nargs="?", metavar="FILE")
    c.add_argument("-c", "--config", metavar="FILE", help="same as FILE")

    st = sub.add_parser("status", help="sensors, groups, last readings and scores, open incidents "
                                       "(from the running daemon, else its checkpoint)")
    st.add_argument("-c", "--config", required=True, metavar="FILE", help="the daemon's YAML configuration")
    st.add_argument("--json", action="store_true", help="print the rows as JSON")

    w = sub.add_parser("warmup", help="compile every kernel the configured models need into Numba's cache")
    w.add_argument("-c", "--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")

    rp = sub.add_parser("replay", help="run a CSV series (timestamp,value[,...]) through the detector")
    rp.add_argument("file", metavar="FILE.csv")
    rp.add_argument("--labels", metavar="WINDOWS.json", help="NAB windows file: also print the NAB score")
    rp.add_argument("--out", default="out", metavar="DIR", help="output directory (default: out)")
    rp.add_argument("--sensor", help="sensor id to replay as (default: the file name without .csv)")
    rp.add_argument("--no-plot", action="store_true", help="do not write a PNG even if matplotlib is installed")
    rp.add_argument("-c", "--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")

    e = sub.add_parser("evaluate", help="score the detector on labelled corpora: NAB in-sample and leave-one-"
                                        "category-out, SKAB point-wise and change points, cold and warm-started")
    e.add_argument("dir", nargs="?", metavar="NAB_DIR",
                   help="NAB series: a dataset root (data/ and labels/combined_windows.json) or a data directory")
    e.add_argument("--labels", metavar="WINDOWS.json", help="NAB combined_windows.json (default: NAB_DIR/labels/...)")
    e.add_argument("--skab", metavar="SKAB_DIR", help="SKAB dataset root (data/, labels/, anomaly-free/)")
    e.add_argument("--no-warm", action="store_true", help="SKAB: skip the run warm-started from anomaly-free/")
    e.add_argument("--ablation", action="store_true", help="also evaluate with each evidence channel switched off")
    e.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    e.add_argument("--processes", type=int, default=0, help="worker processes (default: one per CPU, at most one per file)")
    e.add_argument("-c", "--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")

    f = sub.add_parser("fit", help="train the configured models on recorded normal data (warm start): the "
                                   "checkpoint it writes is where `run` starts from")
    f.add_argument("history", metavar="HISTORY.csv", help="timestamp,value[,...] rows of normal operation")
    f.add_argument("--sensor", help="sensor id the history belongs to (default: the file name without .csv)")
    f.add_argument("-c", "--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")

    d = sub.add_parser("demo", help="local broker, simulated sensors and the daemon, printing events")
    d.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the demo")
    return p


def _load(path):
    return parse_config(None) if path is None else load_config(path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])  # every demo option (--help included) belongs to the demo
    args = _parser().parse_args(argv)
    cmd = args.command
    try:
        if cmd == "run":
            from .daemon import run
            return run(args.config)
        if cmd == "bridge":
            from .bridge import run as bridge
            return bridge(args.config)
        if cmd == "check-config":
            return _check_config(args)
        if cmd == "status":
            return _status(args)
        if cmd == "warmup":
            return _warmup(args)
        if cmd == "replay":
            return _replay(args)
        if cmd == "evaluate":
            return _evaluate(args)
        if cmd == "fit":
            return _fit(args)
        if cmd == "demo":
            return _demo(args.args)
    except ConfigError as exc:
        return config_error(getattr(args, "config", None) or "(defaults)", exc)
    except KeyboardInterrupt:
        return 130
    raise AssertionError(cmd)  # pragma: no cover - argparse only lets known commands through


def _check_config(args) -> int:
    path = args.file or args.config
    if path is None:
        print("streamlstm check-config: give FILE (or -c FILE)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(path)
        from .payload import PayloadParser
        from .preflight import preflight
        from .runtime_config import input_specs
        PayloadParser(input_specs(config))
        notes: list = []
        preflight(config, notes=notes)  # the files and directories `run` needs, as `run` checks them
    except ConfigError as exc:
        return config_error(path, exc)
    except ValueError as exc:
        return config_error(path, ConfigError("inputs", str(exc)))
    groups = ", ".join(f"{g.name} ({g.match})" for g in config.groups)
    for note in notes:
        print(f"note: {note}")
    print(f"OK: {path}: groups {groups}")
    return EXIT_OK


def _status(args) -> int:
    import json

    from .runtime_config import expand_paths
    from .status import format_status, read_status

    config = expand_paths(load_config(args.config))
    try:
        source, rows = read_status(config.checkpoint.directory)
    except FileNotFoundError:
        print(f"streamlstm status: no running daemon and no checkpoint in {config.checkpoint.directory} "
              "(has the daemon run with this configuration?)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - unreadable checkpoint: say so, no traceback
        print(f"streamlstm status: cannot read {config.checkpoint.directory}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"source": source, "sensors": rows}, indent=1))
    else:
        print(format_status(source, rows))
    return EXIT_OK


def _warmup(args) -> int:
    from .backend import BackendUnavailable
    from .logfmt import configure_logging
    from .warmup import warm_kernels

    configure_logging("WARNING")
    config = _load(args.config)
    t0 = time.perf_counter()
    try:
        timings = warm_kernels(config)
    except BackendUnavailable as exc:
        return config_error(args.config or "(defaults)", ConfigError("backend.kind", str(exc)))
    for group, seconds in timings.items():
        print(f"group {group}: kernels ready in {seconds:.1f} s")
    print(f"warmup done in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def _group_threshold(detector, sensor: str) -> float:
    g = detector.group_for(sensor)
    det = detector.active.get(g.name)
    return float(det.threshold) if det is not None else float(g.detector.threshold)


def _read_series(command: str, path: pathlib.Path):
    """(seconds, stamps, values) of a CSV series, or None after saying why it cannot be read."""
    from .tools import replay

    try:
        return replay.read_series(path)
    except (OSError, ValueError) as exc:
        print(f"streamlstm {command}: cannot read {path}: {exc}", file=sys.stderr)
        return None


def _replay(args) -> int:
    import numpy as np

    from .tools import nab, replay
    from .factory import build_detector

    config = _load(args.config)
    path = pathlib.Path(args.file)
    series = _read_series("replay", path)
    if series is None:
        return EXIT_FAILURE
    seconds, stamps, values = series
    windows = None
    if args.labels:
        all_windows = nab.load_windows(args.labels)
        key = replay.labels_key(path, all_windows)
        if key is None:
            print(f"streamlstm replay: {args.labels} has no windows for {path}", file=sys.stderr)
            return EXIT_FAILURE
        windows = (key, all_windows[key])
    sensor = args.sensor or path.stem
    detector = build_detector(config)
    t0 = time.perf_counter()
    result = replay.replay_series(detector, sensor, seconds, values,
                                  progress=replay.Progress(len(seconds), f"replay {path.name}"))
    wall = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / f"{path.stem}.replay.csv"
    events_path = out / f"{path.stem}.events.jsonl"
    replay.write_rows(rows_path, stamps, values, result)
    result["incidents"] = replay.write_events(events_path, result)
    result["threshold"] = _group_threshold(detector, sensor)
    print(f"{path}: {len(seconds)} rows in {wall:.1f} s, {len(result['incidents'])} incidents")
    print(f"rows: {rows_path}\nevents: {events_path}")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is not None:
        png = out / f"{path.stem}.png"
        replay.plot(png, seconds, values, result, windows[1] if windows else ())
        print(f"plot: {png}")
    if windows is not None:
        key, wins = windows
        corpus = {key: ((seconds * 1e6).astype("datetime64[us]"), np.asarray(result["alert"]))}
        labelled = {key: wins}
        best = nab.sweep(corpus, labelled, "standard")
        em = nab.event_metrics(corpus, labelled, best.threshold)
        print(f"NAB standard score {best.normalised:.1f} (threshold {best.threshold:.4f}); "
              f"precision {em.precision:.2f} recall {em.recall:.2f} (TP {em.tp}, FN {em.fn}, FP {em.fp})")
    return EXIT_OK


def _evaluate(args) -> int:
    import json

    from .tools import evaluation, nab

    config = _load(args.config)
    if args.dir is None and args.skab is None:
        print("streamlstm evaluate: give NAB_DIR, --skab SKAB_DIR or both", file=sys.stderr)
        return EXIT_FAILURE
    jobs, windows = [], None
    if args.dir is not None:
        root = pathlib.Path(args.dir)
        labels = args.labels or root / "labels" / "combined_windows.json"
        if not pathlib.Path(labels).exists():
            print(f"streamlstm evaluate: no NAB labels at {labels} (give --labels)", file=sys.stderr)
            return EXIT_FAILURE
        windows = nab.load_windows(labels)
        jobs = evaluation.labelled_jobs(root / "data" if (root / "data").is_dir() else root, windows)
        if not jobs:
            print(f"streamlstm evaluate: no .csv files under {root}", file=sys.stderr)
            return EXIT_FAILURE
    variants = [("default", config)]
    if args.ablation:
        variants += [(f"no {c}", evaluation.without_channel(config, c)) for c in config.groups[0].detector.channels]
    table = []
    for name, cfg in variants:
        table += evaluation.evaluate_all(cfg, jobs, windows, args.skab, warm=not args.no_warm, processes=args.processes,
                                         variant=name, details=name == "default",
                                         report=lambda line: print(line, flush=True))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(table, indent=1, default=float) + "\n")
    return EXIT_OK


def _fit(args) -> int:
    from .tools import evaluation
    from .checkpoint import CheckpointStore
    from .factory import build_detector
    from .restore import checkpoint_meta, restore_detector

    config = _load(args.config)
    path = pathlib.Path(args.history)
    series = _read_series("fit", path)
    if series is None:
        return EXIT_FAILURE
    seconds, _, values = series
    store = CheckpointStore(config.checkpoint.directory)
    # Continue from the checkpoint `run` would load: several sensors can be fitted in turn.
    detector, _ = restore_detector(config, store, build_detector)
    sensor = args.sensor or path.stem
    t0 = time.perf_counter()
    evaluation.learn_history(detector, sensor, seconds, values)
    arrays, meta = detector.state_dict()
    store.save(arrays, checkpoint_meta(config, meta))
    print(f"{path}: {len(seconds)} readings of {sensor} learnt in {time.perf_counter() - t0:.1f} s; "
          f"checkpoint {store.path}")
    return EXIT_OK


def _demo(argv) -> int:
    try:
        from .tools import demo
    except ImportError as exc:
        print(f"streamlstm demo is not available: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return demo.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
