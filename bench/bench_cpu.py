"""CPU kernel benchmark against PyTorch, in one process, same thread count, float32.

Run by hand:  python bench/bench_cpu.py [--only-batched] [--skip-compile] [--json bench/results/cpu-DATE.json]
PyTorch is optional (the `bench` extra); without it only our own timings are printed.

Measures (ratios are torch time / our time, > 1 means we are faster):
  forward, one sensor, H in {32, 64, 128}        vs torch.nn.LSTMCell + Linear
  training step, T=32, Adam, H=64, one sensor    vs torch.nn.LSTM + Linear + backward + Adam
  batched forward, shared weights, B in {64, 1024, 10000}, H=64   vs LSTMCell on the batch,
      with GFLOP/s next to this machine's sgemm peak measured in the same run: the blocked
      (GEMM-shaped, lstm_block) path the bank uses, and the per-sensor path it replaced;
      the four timed in turns, one round each per pass (medians and best rounds). The peak:
      a 2048^3 float32 matmul (numpy/OpenBLAS, 2 * 2048^3 flops) with the kernels' thread
      count, same statistic.
      A forward step's flops: B * (2 * 4H * (I + H) + 2 * H * O) with I = O = 1, i.e. a
      multiply and an add per weight of the gate product and of the head; the activations,
      the cell update and the ring push are work on top that is not counted.
  JIT compile time of the batched forward kernels (serial + prange driver, float32), cold:
      the per-sensor kernels against the shared-weight block kernels, fresh processes
  per-sensor weights, B=10000, H=64              vs torch.baddbmm, with GB/s next to memory bandwidth
  JIT compile time: cold cache and warm cache (fresh subprocesses)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# The sgemm peak is measured with the kernels' thread count: OpenBLAS reads its own at import
# (NUMBA_NUM_THREADS=1 python bench/bench_cpu.py gives one-core numbers throughout).
if "NUMBA_NUM_THREADS" in os.environ:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["NUMBA_NUM_THREADS"])

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streamlstm import kernels_cpu  # noqa: E402
from streamlstm.backend import CpuBackend  # noqa: E402
from streamlstm.bank import ModelBank  # noqa: E402
from streamlstm.lstm_math import hyper_arrays  # noqa: E402
from streamlstm.spec import ModelSpec  # noqa: E402


def _calls_for(fn, min_time):
    """How many calls of fn last about min_time (after one warm-up call)."""
    fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > min_time / 4:
            break
        n *= 4
    return max(1, int(n * min_time / 4 / dt * 4))


def round_robin_times(fns, repeat=9, min_time=0.2, passes=3):
    """{name: per-call times of `repeat` rounds}. The rounds come in `passes` passes over the fns,
    so that the load other jobs put on the shared VM falls on all of them alike; within a pass
    each fn runs its rounds back to back after a pause and a warm-up call (OpenMP and OpenBLAS
    workers spin for a while after a parallel region: Numba's, PyTorch's and OpenBLAS's threads
    would otherwise compete for the two CPUs right after each switch)."""
    calls = {name: _calls_for(fn, min_time) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    per_pass = [repeat // passes + (p < repeat % passes) for p in range(passes)]
    for rounds in per_pass:
        for name, fn in fns.items():
            time.sleep(0.05)
            fn()
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls[name])
    return times


def call_time(fn, repeat=7, min_time=0.2, stat=np.median):
    """Per-call time: `stat` (median by default: the VM is shared and noisy) over `repeat`
    rounds of enough calls to last `min_time`."""
    return float(stat(round_robin_times({"fn": fn}, repeat, min_time, passes=1)["fn"]))


def try_torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def make_bank(H, B, shared, T=32, optimizer="adam"):
    spec = ModelSpec(input_size=1, hidden_size=H, window=T, optimizer=optimizer, learning_rate=1e-3)
    bank = ModelBank(spec, shared, CpuBackend(), capacity=B)
    for _ in range(B):
        bank.add_slot()
    return bank


def forward_args(bank, B, rng):
    slots = np.arange(B, dtype=np.int64)
    x = rng.normal(size=(B, 1)).astype(np.float32)
    status = np.zeros(B, np.int64)
    return (slots, bank.weight_rows(slots), x, bank.theta, bank.offs, 10.0, bank.h, bank.c, bank.ring_x, bank.ring_h,
            bank.ring_c, bank.ring_pos, bank.ring_len, bank.pred, status)


def bench_forward_single(torch, rng, out):
    for H in (32, 64, 128):
        bank = make_bank(H, 1, True)
        args = forward_args(bank, 1, rng)
        ours = call_time(lambda: kernels_cpu.forward_batch_serial(*args))
        x = rng.normal(size=(1, 1)).astype(np.float32)
        step = call_time(lambda: bank.step([0], x, learn=False))
        row = dict(case="forward 1 sensor", H=H, ours_us=ours * 1e6, bank_step_us=step * 1e6)
        if torch:
            cell, head = torch.nn.LSTMCell(1, H), torch.nn.Linear(H, 1)
            xt, h, c = torch.zeros(1, 1), torch.zeros(1, H), torch.zeros(1, H)

            def torch_step():
                with torch.no_grad():
                    h2, c2 = cell(xt, (h, c))
                    head(h2)

            row["torch_us"] = call_time(torch_step) * 1e6
            row["ratio"] = row["torch_us"] / row["ours_us"]
        out.append(row)


def bench_train_single(torch, rng, out, H=64, T=32):
    bank = make_bank(H, 1, False, T=T)
    for _ in range(T + 1):
        bank.step([0], rng.normal(size=(1, 1)), learn=False)
    hp, ip = hyper_arrays(bank.spec)
    slots = np.zeros(1, np.int64)
    x = rng.normal(size=(1, 1)).astype(np.float32)
    scale = np.ones(1)
    loss, status = np.empty(1), np.zeros(1, np.int64)
    args = (False, slots, x, scale, bank.theta, bank.m, bank.v, bank.adam_t, bank.offs, hp, ip, bank.ring_x,
            bank.ring_h, bank.ring_c, bank.ring_pos, bank.ring_len, loss, status,
            np.zeros((1, 0), bank.theta.dtype), np.zeros(1, np.int64))  # per-sensor weights: no pending sum
    ours = call_time(lambda: kernels_cpu.train_batch_serial(*args))
    row = dict(case="train step 1 sensor (T=32, Adam)", H=H, ours_us=ours * 1e6)
    if torch:
        lstm, head = torch.nn.LSTM(1, H, batch_first=True), torch.nn.Linear(H, 1)
        opt = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=1e-3)
        xs, ys = torch.randn(1, T, 1), torch.randn(1, T, 1)
        h0, c0 = torch.zeros(1, 1, H), torch.zeros(1, 1, H)

        def torch_step():
            opt.zero_grad()
            out_, _ = lstm(xs, (h0, c0))
            loss_ = torch.nn.functional.huber_loss(head(out_), ys)
            loss_.backward()
            torch.nn.utils.clip_grad_norm_(list(lstm.parameters()) + list(head.parameters()), 1.0)
            opt.step()

        row["torch_us"] = call_time(torch_step) * 1e6
        row["ratio"] = row["torch_us"] / row["ours_us"]
    out.append(row)


def sgemm_product():
    """One 2048^3 sgemm and its flop count (the peak the batched forward is measured against)."""
    a = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
    return (lambda: a @ a), 2 * 2048**3


def memory_bandwidth():
    a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, far beyond cache
    b = np.empty_like(a)
    t = call_time(lambda: np.copyto(b, a), repeat=5, min_time=0.3)
    return 2 * a.nbytes / t / 1e9  # read + write


def bench_batched(torch, rng, out, threads, H=64):
    """Shared-weight batched forward: the blocked path (what the bank runs), the per-sensor path
    it replaced, PyTorch's LSTMCell + Linear and an sgemm, timed in turns. Reports medians
    over the rounds (ours_us, torch_us, ratio, pct_of_peak) and the best rounds (*_best)."""
    gemm, gemm_flops = sgemm_product()
    for B in (64, 1024, 10000):
        bank = make_bank(H, B, True)
        args = forward_args(bank, B, rng)
        chunks = min(B, threads * 4) if threads > 1 else 0  # as CpuBackend for B >= 64
        flops = B * (2 * 4 * H * (1 + H) + 2 * H)
        fns = {
            "blocked": lambda: kernels_cpu.forward_shared(*args, chunks),
            "per-sensor (before)": (lambda: kernels_cpu.forward_batch_parallel(*args, chunks)) if chunks else (
                lambda: kernels_cpu.forward_batch_serial(*args)),
            "sgemm": gemm,
        }
        if torch:
            cell, head = torch.nn.LSTMCell(1, H), torch.nn.Linear(H, 1)
            xt, h, c = torch.randn(B, 1), torch.zeros(B, H), torch.zeros(B, H)

            def torch_step():
                with torch.no_grad():
                    h2, c2 = cell(xt, (h, c))
                    head(h2)

            fns["torch"] = torch_step
        # one round per pass: the load of other jobs on the shared VM comes and goes within
        # seconds, and the sgemm peak must see the same load as what is compared with it
        times = round_robin_times(fns, repeat=9, passes=9)
        med = {name: float(np.median(t)) for name, t in times.items()}
        best = {name: float(np.min(t)) for name, t in times.items()}
        for path in ("blocked", "per-sensor (before)"):
            row = dict(case=f"batched forward, shared, {path}", H=H, B=B, ours_us=med[path] * 1e6,
                       ours_best_us=best[path] * 1e6, gflops=flops / med[path] / 1e9,
                       sgemm_peak_gflops=gemm_flops / med["sgemm"] / 1e9,
                       sgemm_peak_best_gflops=gemm_flops / best["sgemm"] / 1e9,
                       pct_of_peak=100 * flops / med[path] / (gemm_flops / med["sgemm"]),
                       pct_of_peak_best=100 * flops / best[path] / (gemm_flops / best["sgemm"]))
            if torch:
                row.update(torch_us=med["torch"] * 1e6, torch_best_us=best["torch"] * 1e6,
                           ratio=med["torch"] / med[path], ratio_best=best["torch"] / best[path])
            out.append(row)


def bench_per_sensor(torch, rng, out, threads, H=64, B=10000):
    bw = memory_bandwidth()
    bank = make_bank(H, B, False, T=4)
    args = forward_args(bank, B, rng)
    chunks = min(B, threads * 4)
    fn = (lambda: kernels_cpu.forward_batch_parallel(*args, chunks)) if threads > 1 else (
        lambda: kernels_cpu.forward_batch_serial(*args))
    ours = call_time(fn, repeat=3)
    weight_bytes = bank.theta[:B].nbytes
    row = dict(case="per-sensor weights forward", H=H, B=B, ours_us=ours * 1e6, gbps=weight_bytes / ours / 1e9,
               mem_bandwidth_gbps=bw)
    if torch:
        G = 4 * H
        wx, wh = torch.randn(B, 1, G), torch.randn(B, H, G)
        bias = torch.randn(B, 1, G)
        wy = torch.randn(B, H, 1)
        xt, h, c = torch.randn(B, 1, 1), torch.zeros(B, 1, H), torch.zeros(B, 1, H)

        def torch_step():
            with torch.no_grad():
                g = torch.baddbmm(bias, xt, wx)
                g = torch.baddbmm(g, h, wh)
                i, f, gg, o = g.chunk(4, dim=2)
                c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h2 = torch.sigmoid(o) * torch.tanh(c2)
                torch.bmm(h2, wy)

        row["torch_us"] = call_time(torch_step, repeat=3) * 1e6
        row["ratio"] = row["torch_us"] / row["ours_us"]
    out.append(row)


def bench_compile(out):
    """Cold and warm JIT time of every kernel, in fresh processes with a private cache."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=repo)
        times = []
        for _ in range(2):
            # `streamlstm warmup` with the default config: every kernel the daemon would use
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "streamlstm", "warmup"], env=env, capture_output=True, text=True,
                           check=True)
            times.append(time.perf_counter() - t0)
    out.append(dict(case="streamlstm warmup (default config), process wall time", cold_s=times[0], warm_s=times[1]))


_COMPILE_FORWARD = """
import time, numpy as np
from streamlstm import kernels_cpu
from streamlstm.backend import CpuBackend
from streamlstm.bank import ModelBank
from streamlstm.spec import ModelSpec
bank = ModelBank(ModelSpec(hidden_size=64, dtype="float32"), True, CpuBackend(), capacity=4)
for _ in range(4):
    bank.add_slot()
s = np.arange(4)
args = (s, bank.weight_rows(s), np.zeros((4, 1), np.float32), bank.theta, bank.offs, 10.0, bank.h, bank.c,
        bank.ring_x, bank.ring_h, bank.ring_c, bank.ring_pos, bank.ring_len, bank.pred, np.zeros(4, np.int64))
t0 = time.perf_counter()
if {blocked}:
    kernels_cpu.forward_shared(*args)
    kernels_cpu.forward_shared(*args, 2)
else:
    kernels_cpu.forward_batch_serial(*args)
    kernels_cpu.forward_batch_parallel(*args, 2)
print(time.perf_counter() - t0)
"""


def bench_compile_forward(out, repeat=3):
    """Cold JIT time of the batched forward kernels, serial + prange driver, float32: each in a
    fresh process with an empty cache (median of `repeat`)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    row = dict(case="batched forward kernels (serial + prange, float32), cold compile")
    for name, blocked in (("per_sensor_s", False), ("blocked_shared_s", True)):
        times = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=repo)
                run = subprocess.run([sys.executable, "-c", _COMPILE_FORWARD.format(blocked=blocked)], env=env,
                                     capture_output=True, text=True, check=True)
                times.append(float(run.stdout.split()[-1]))
        row[name] = float(np.median(times))
    out.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only-batched", action="store_true", help="the shared batched forward rows only")
    args = ap.parse_args()
    import numba

    threads = numba.get_num_threads()
    load_start = os.getloadavg()  # other jobs on the (shared) machine: recorded beside the figures
    torch = try_torch(threads)
    rng = np.random.default_rng(0)
    out = []
    if not args.only_batched:
        bench_forward_single(torch, rng, out)
        bench_train_single(torch, rng, out)
    bench_batched(torch, rng, out, threads)
    if not args.only_batched:
        bench_per_sensor(torch, rng, out, threads)
    if not args.skip_compile:
        bench_compile_forward(out)
        bench_compile(out)
    info = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                cpu=_cpu_name(), threads=threads, numba=numba.__version__, torch=torch.__version__ if torch else None,
                loadavg_1min_start=load_start[0], loadavg_1min_end=os.getloadavg()[0])
    print(json.dumps(info))
    for row in out:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=out), f, indent=1)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
