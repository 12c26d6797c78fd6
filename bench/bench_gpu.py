#!/usr/bin/env python3
"""streamlstm CUDA kernels vs PyTorch (cuDNN nn.LSTM and nn.LSTMCell) on the same GPU.

The unit is the stream step: one reading of one sensor. A batched step over B sensors
counts B stream steps; we report stream-steps/s = B / seconds per batched step.

  forward  one reading per sensor: streamlstm's forward kernel (ring push, one LSTM
           step from the carried state, prediction) vs torch one step with carried
           (h, c): nn.LSTM on a length-1 sequence (cuDNN) and nn.LSTMCell, + Linear head.
  train    one truncated-BPTT window of `--window` readings per sensor and one clipped
           Adam update of the shared weights: streamlstm's training kernels (window read
           from the device ring) vs torch forward + Huber loss + backward +
           clip_grad_norm_ + Adam over a device-resident (T, B, I) window.

Both sides pay the per-step host traffic a live stream pays: readings go host -> device,
predictions (forward) or per-sensor losses (train) come back. Shared weights throughout
(that is what torch's modules are); float32. cuDNN may use TF32 unless --no-tf32.

    python bench/bench_gpu.py                      # full grid: B {1,1000,100000} x H {32,64,128}
    python bench/bench_gpu.py --B 1000 --H 64      # one cell
    python bench/bench_gpu.py --dry-run            # simulator, tiny shapes, no torch: checks the harness

Exits 0 with a message when torch, CUDA or a GPU is missing. Results: a table on stdout
and JSON under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", default="1,1000,100000", help="batch sizes (sensors per step), comma separated")
    p.add_argument("--H", default="32,64,128", help="hidden sizes, comma separated")
    p.add_argument("--window", type=int, default=32, help="BPTT window T (training)")
    p.add_argument("--input-size", type=int, default=1)
    p.add_argument("--phases", default="forward,train")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed repetitions per cell (after warm-up)")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--block-size", type=int, default=128, help="CudaBackend block size")
    p.add_argument("--scratch-mb", type=int, default=2048, help="CudaBackend training scratch budget")
    p.add_argument("--no-tf32", action="store_true", help="forbid TF32 in cuDNN/cuBLAS (strict fp32 on both sides)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<host>-<time>.json)")
    p.add_argument("--dry-run", action="store_true", help="CUDA simulator, tiny shapes, streamlstm only (no torch)")
    return p.parse_args(argv)


def skip(message: str):
    print(f"bench_gpu: skipped: {message}")
    sys.exit(0)


def timed(fn, sync, min_time, max_reps):
    """Seconds per call: one warm-up call (JIT, allocations), then repeat for min_time."""
    fn()
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or reps >= max_reps:
            return elapsed / reps


# --- streamlstm -------------------------------------------------------------------------


def ours_cells(args, B, H, phases, sync):
    import numpy as np

    from streamlstm.bank import ModelBank
    from streamlstm.backend_cuda import CudaBackend
    from streamlstm.spec import ModelSpec

    spec = ModelSpec(input_size=args.input_size, hidden_size=H, window=args.window, dtype="float32")
    backend = CudaBackend(block_size=args.block_size, scratch_bytes=args.scratch_mb << 20)
    bank = ModelBank(spec, True, backend, capacity=B)
    for _ in range(B):
        bank.add_slot()
    rng = np.random.default_rng(0)
    # A full window of history per sensor, as after `window` readings.
    bank.ring_x[:] = rng.normal(size=bank.ring_x.shape).astype(np.float32)
    bank.ring_len[:] = spec.window
    backend.attach(bank)
    slots = np.arange(B, dtype=np.int64)
    out = {}
    for phase in phases:
        x = rng.normal(size=(B, spec.input_size)).astype(np.float32)
        if phase == "forward":
            fn = lambda: backend.forward(bank, slots, x)  # noqa: E731
        else:
            scale = np.ones(B)
            fn = lambda: backend.train(bank, slots, x, scale)  # noqa: E731
        out[phase] = timed(fn, sync, args.min_time, args.max_reps)
    return out


# --- torch ------------------------------------------------------------------------------


def torch_cells(args, B, H, phases, torch):
    import torch.nn.functional as F
    from torch import nn

    dev = torch.device("cuda")
    I, T = args.input_size, args.window
    g = torch.Generator().manual_seed(0)
    x_host = torch.randn(B, I, generator=g).pin_memory()
    sync = torch.cuda.synchronize
    out = {}
    for kind in ("lstm", "cell"):
        core = (nn.LSTM(I, H) if kind == "lstm" else nn.LSTMCell(I, H)).to(dev)
        head = nn.Linear(H, I).to(dev)
        params = list(core.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=0.005)
        h = torch.zeros(B, H, device=dev)
        c = torch.zeros(B, H, device=dev)
        window = torch.randn(T, B, I, device=dev)
        for phase in phases:
            if phase == "forward":

                def fn():
                    nonlocal h, c
                    with torch.no_grad():
                        x = x_host.to(dev, non_blocking=True)
                        if kind == "lstm":
                            y, (h1, c1) = core(x[None], (h[None], c[None]))
                            h, c = h1[0], c1[0]
                        else:
                            h, c = core(x, (h, c))
                        pred = head(h)
                        return pred.cpu()

            else:

                def fn():
                    x = x_host.to(dev, non_blocking=True)
                    targets = torch.cat([window[1:], x[None]])
                    if kind == "lstm":
                        ys, _ = core(window, (h[None], c[None]))
                    else:
                        hh, cc, steps = h, c, []
                        for t in range(T):
                            hh, cc = core(window[t], (hh, cc))
                            steps.append(hh)
                        ys = torch.stack(steps)
                    per_sensor = F.huber_loss(head(ys), targets, reduction="none").mean(dim=(0, 2))
                    opt.zero_grad(set_to_none=True)
                    per_sensor.mean().backward()
                    nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    return per_sensor.detach().cpu()

            out[(kind, phase)] = timed(fn, sync, args.min_time, args.max_reps)
        del core, head, opt, window
        torch.cuda.empty_cache()
    return out


# --- driver -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    Bs = [int(v) for v in args.B.split(",")]
    Hs = [int(v) for v in args.H.split(",")]
    phases = [p for p in args.phases.split(",") if p]
    if set(phases) - {"forward", "train"}:
        raise SystemExit("--phases: forward and/or train")
    torch = None
    if args.dry_run:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        if args.B == "1,1000,100000":
            Bs = [1, 3]
        if args.H == "32,64,128":
            Hs = [3]
        args.window = min(args.window, 3)
        args.min_time, args.max_reps = 0.0, 1
    else:
        try:
            import torch  # noqa: F811
        except ImportError:
            skip("PyTorch is not installed (pip install torch)")
        if not torch.cuda.is_available():
            skip("PyTorch sees no CUDA GPU")
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    sys.path.insert(0, str(REPO))
    try:
        from numba import cuda
    except ImportError:
        skip("numba-cuda is not installed")
    if not args.dry_run and not cuda.is_available():
        skip("numba-cuda sees no usable GPU")

    device = "CUDA simulator" if args.dry_run else torch.cuda.get_device_name(0)
    import numba

    meta = {
        "device": device,
        "host": platform.node(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
        "cudnn": torch.backends.cudnn.version() if torch else None,
        "tf32": (torch.backends.cudnn.allow_tf32 if torch else None),
        "window": args.window,
        "input_size": args.input_size,
        "dtype": "float32",
        "block_size": args.block_size,
        "unit": "stream-steps/s = sensors x batched steps / s",
    }
    print(f"device: {device}; window {args.window}; input_size {args.input_size}; float32; tf32 {meta['tf32']}")
    header = f"{'phase':8} {'B':>7} {'H':>4} {'streamlstm':>12} {'nn.LSTM':>12} {'LSTMCell':>12} {'vs LSTM':>8} {'vs Cell':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    sync = cuda.synchronize
    for B in Bs:
        for H in Hs:
            cell = {"B": B, "H": H}
            try:
                ours = ours_cells(args, B, H, phases, sync)
            except Exception as exc:  # e.g. out of device memory: report, keep going
                ours, cell["streamlstm_error"] = {}, f"{type(exc).__name__}: {exc}"[:300]
            theirs = {}
            if torch is not None:
                try:
                    theirs = torch_cells(args, B, H, phases, torch)
                except Exception as exc:
                    cell["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    torch.cuda.empty_cache()
            for phase in phases:
                rate = lambda sec: B / sec if sec else None  # noqa: E731
                r_ours = rate(ours.get(phase))
                r_lstm = rate(theirs.get(("lstm", phase)))
                r_cell = rate(theirs.get(("cell", phase)))
                row = dict(cell, phase=phase, streamlstm=r_ours, lstm=r_lstm, lstmcell=r_cell)
                row["ratio_vs_lstm"] = r_ours / r_lstm if r_ours and r_lstm else None
                row["ratio_vs_lstmcell"] = r_ours / r_cell if r_ours and r_cell else None
                rows.append(row)
                f = lambda v: f"{v:12.4g}" if v else f"{'-':>12}"  # noqa: E731
                g = lambda v: f"{v:8.3g}" if v else f"{'-':>8}"  # noqa: E731
                print(f"{phase:8} {B:7d} {H:4d} {f(r_ours)} {f(r_lstm)} {f(r_cell)} {g(row['ratio_vs_lstm'])} {g(row['ratio_vs_lstmcell'])}")
                for key in ("streamlstm_error", "torch_error"):
                    if key in cell:
                        print(f"    {key}: {cell[key]}")
    print("ratios > 1: streamlstm faster")
    if args.dry_run and args.out is None:
        return 0
    out = pathlib.Path(args.out) if args.out else RESULTS / f"gpu-{platform.node() or 'host'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
