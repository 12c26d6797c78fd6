"""CUDA backend: parity with the NumPy reference through ModelBank.

Runs under Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1), where
every GPU thread is a Python thread: shapes are tiny and block sizes small so that every
launch still has several blocks, several sensors per block, and lanes owning several
hidden units. `gpu`-marked copies with bigger shapes run on real hardware only
(STREAMLSTM_REAL_CUDA=1 pytest -m gpu). `test_kernels_compile_with_nvvm` compiles every
kernel with the real NVVM compiler (no GPU needed) when a CUDA toolkit is installed,
because the simulator accepts Python the real compiler rejects.
"""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from streamlstm import kernels_cuda
from streamlstm.backend import CpuBackend, NumpyBackend
from streamlstm.bank import STATE_ARRAYS, WEIGHT_ARRAYS, ModelBank
from streamlstm.backend_cuda import CudaBackend
from streamlstm.kernels_cuda import kernel_signatures
from streamlstm.spec import ModelSpec

TOL = {"float64": 1e-9, "float32": 1e-4}


def _close(a, b, tol, what):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, equal_nan=True, err_msg=what)


def assert_same_state(ref, other, tol):
    sr, so = ref.state_dict(), other.state_dict()
    for name in STATE_ARRAYS + WEIGHT_ARRAYS:
        _close(sr[name], so[name], tol, name)


def drive(spec, shared, backends, *, slots_start, slots_end, steps, max_batch, seed=0, capacity=2, apply_every=1):
    """Step one bank per backend with identical random batches; compare every result with
    the first bank's. Slots are added while stepping (device growth: sync + re-attach),
    batch sizes vary from 1 to max_batch, some elements do not learn, some steps only
    run forward. Shared weights update every `apply_every` steps (the gradients of the
    steps between wait in the bank)."""
    tol = TOL[spec.dtype]
    banks = [ModelBank(spec, shared, be, capacity=capacity) for be in backends]
    rng = np.random.default_rng(seed)
    for bank in banks:
        for _ in range(slots_start):
            bank.add_slot()
    n = slots_start
    trained = 0
    for step in range(steps):
        target = slots_start + (slots_end - slots_start) * (step + 1) // steps
        for bank in banks:
            while bank.size < target:
                bank.add_slot()
        n = target
        B = int(rng.integers(1, min(max_batch, n) + 1))
        slots = rng.choice(n, size=B, replace=False)
        x = rng.normal(0.0, 2.0, size=(B, spec.input_size))
        x[rng.random(x.shape) < 0.05] = 50.0  # beyond input_clip
        scale = rng.uniform(0.2, 1.0, size=B)
        scale[rng.random(B) < 0.25] = 0.0
        learn = step % 4 != 3
        apply = (step + 1) % apply_every == 0
        results = [bank.step(slots, x, lr_scale=scale, learn=learn, apply=apply) for bank in banks]
        ref = results[0]
        trained += int(np.isfinite(ref.loss).sum())
        for other in results[1:]:
            _close(ref.prediction, other.prediction, tol, f"prediction step {step}")
            _close(ref.next_prediction, other.next_prediction, tol, f"next_prediction step {step}")
            _close(ref.loss, other.loss, tol, f"loss step {step}")
            np.testing.assert_array_equal(ref.status, other.status, err_msg=f"status step {step}")
    assert trained > 0, "no training window ran: the parity check would be vacuous"
    for other in banks[1:]:
        assert_same_state(banks[0], other, tol)
    return banks


# name, spec kwargs, shared, block_size, train_chunk
CASES = [
    ("f64-shared-L1-I1-H5", dict(dtype="float64", hidden_size=5, window=4, loss="mse", grad_clip=0.05), True, 4, None),
    (
        "f64-sensor-L2-I3-dropout",
        dict(dtype="float64", input_size=3, hidden_size=3, num_layers=2, window=3, dropout=0.3, weight_decay=0.01),
        False, 8, 3,
    ),
    (
        "f64-shared-L2-I3-sgd-target",
        dict(dtype="float64", input_size=3, hidden_size=3, num_layers=2, window=3, dropout=0.25, weight_decay=0.02,
             optimizer="sgd", learning_rate=0.05, target_feature=2, train_every=2),
        True, 8, 2,
    ),
    ("f64-sensor-L1-I1-sgd", dict(dtype="float64", hidden_size=5, window=4, optimizer="sgd", grad_clip=0.0), False, 4, None),
    (
        "f32-shared-L2-I3-dropout",
        dict(dtype="float32", input_size=3, hidden_size=5, num_layers=2, window=3, dropout=0.3, weight_decay=0.01),
        True, 4, 3,
    ),
    ("f32-sensor-L1-I1", dict(dtype="float32", hidden_size=3, window=4, loss="mse", grad_clip=0.1), False, 8, None),
]


@pytest.mark.parametrize("name,kw,shared,block,chunk", CASES, ids=[c[0] for c in CASES])
def test_parity_with_reference(name, kw, shared, block, chunk):
    spec = ModelSpec(**{"train_every": 1, **kw})  # a training window at every step
    drive(
        spec, shared, [NumpyBackend(), CudaBackend(block_size=block, train_chunk=chunk)],
        slots_start=3, slots_end=7, steps=5, max_batch=7,
    )


@pytest.mark.parametrize("chunk", [None, 2], ids=["one_chunk", "chunks"])
def test_shared_update_deferred_over_steps(chunk):
    """Shared weights: the windows of three steps, one update from their mean (the detector's
    segments); the pending sum lives on the host, so a scratch regrown in between loses nothing."""
    spec = ModelSpec(dtype="float64", hidden_size=4, window=3, train_every=1)
    banks = drive(spec, True, [NumpyBackend(), CudaBackend(block_size=8, train_chunk=chunk)],
                  slots_start=2, slots_end=6, steps=7, max_batch=6, apply_every=3)
    assert banks[0].adam_t[0] == 2  # steps 3 and 6 applied; step 7's windows still pending
    for bank in banks[1:]:
        _close(banks[0].grad_sum, bank.grad_sum, TOL["float64"], "grad_sum")
        assert bank.grad_count[0] == banks[0].grad_count[0] > 0
        bank.apply_shared()
    banks[0].apply_shared()
    for bank in banks[1:]:
        assert_same_state(banks[0], bank, TOL["float64"])


# Launch shapes as on a GPU, not only the tiny blocks above: blocks of 32 / 64 threads, several
# sensors per block (H = 5..7 -> 8 lanes each), several blocks per launch, the CPU kernels
# (their prange driver: parallel_min_batch=4) beside the reference. With SGD and a norm clip
# of 1e-2 every update is clipped (the window gradients' norms are 0.1-3 here), and the
# clipped step is what SGD applies (Adam would mostly normalise the clip away).
BLOCK_CASES = [
    (
        "f32-shared-L3-dropout-b32",
        dict(dtype="float32", input_size=2, hidden_size=5, num_layers=3, window=3, dropout=0.2, weight_decay=0.01),
        True, 32, 4,
    ),
    (
        "f64-sensor-sgd-clipped-b64",
        dict(dtype="float64", hidden_size=7, window=3, optimizer="sgd", learning_rate=0.5, grad_clip=1e-2),
        False, 64, None,
    ),
    (
        "f64-shared-L2-sgd-clipped-b32",
        dict(dtype="float64", input_size=3, hidden_size=6, num_layers=2, window=3, optimizer="sgd", learning_rate=0.5,
             grad_clip=1e-2, loss="mse", weight_decay=0.02),
        True, 32, 5,
    ),
]


@pytest.mark.parametrize("name,kw,shared,block,chunk", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_parity_with_reference_and_cpu_kernels_in_gpu_sized_blocks(name, kw, shared, block, chunk):
    spec = ModelSpec(**{"train_every": 1, **kw})
    backends = [NumpyBackend(), CpuBackend(parallel_min_batch=4), CudaBackend(block_size=block, train_chunk=chunk)]
    drive(spec, shared, backends, slots_start=4, slots_end=12, steps=6, max_batch=12, seed=0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
def test_batch_of_one(shared):
    spec = ModelSpec(dtype="float64", hidden_size=3, window=3, train_every=1)
    banks = drive(spec, shared, [NumpyBackend(), CudaBackend(block_size=4)], slots_start=1, slots_end=1, steps=6, max_batch=1)
    assert banks[1].adam_t[0] > 0  # it trained


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
# Simulated GPU threads compute with NumPy scalars and do not inherit np.errstate.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_resets_state_and_skips_update(shared):
    """h = inf: the forward pass resets the slot (status 1). An infinite state at the start
    of a training window: the gradient is not finite, the update is skipped (status 2)."""
    spec = ModelSpec(dtype="float64", hidden_size=3, window=3, train_every=3)
    banks = drive(spec, shared, [NumpyBackend(), CudaBackend(block_size=4)], slots_start=4, slots_end=4, steps=4, max_batch=4, seed=3)
    for bank in banks:
        state = bank.state_dict()
        state["h"][1] = np.inf
        state["ring_c"][2] = np.inf
        state["since_train"][:] = [2, 0, 2, 2]  # slots 0, 2, 3 train this step, slot 1 does not
        bank.load_state_dict(state, bank.size)
    slots = np.arange(4)
    x = np.full((4, 1), 0.5)
    with np.errstate(all="ignore"):
        ref, cu = (bank.step(slots, x) for bank in banks)
    np.testing.assert_array_equal(ref.status, [0, 1, 2, 0])
    np.testing.assert_array_equal(cu.status, ref.status)
    _close(ref.loss, cu.loss, 1e-9, "loss")
    _close(ref.next_prediction, cu.next_prediction, 1e-9, "next_prediction")
    cuda_bank = banks[1]
    assert cuda_bank.since_train[1] == 0  # reset, as the reference's bank.reset_slot does
    assert_same_state(banks[0], cuda_bank, 1e-9)
    st = cuda_bank.state_dict()
    assert st["ring_len"][1] == 0 and not st["h"][1].any() and not st["pred"][1].any()
    if not shared:  # the skipped row kept its weights and step count
        assert st["adam_t"][2] == banks[0].state_dict()["adam_t"][2]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
def test_checkpoint_portable_between_cuda_and_cpu(shared):
    """The bank's host arrays are the checkpoint format: save on cuda, load on cpu, continue
    in lockstep; and back from cpu to a fresh cuda bank."""
    spec = ModelSpec(hidden_size=3, window=3, train_every=1)  # float32, the default
    cuda_bank = drive(spec, shared, [CudaBackend(block_size=4)], slots_start=5, slots_end=5, steps=3, max_batch=5)[0]
    saved = cuda_bank.state_dict()
    cpu_bank = ModelBank(spec, shared, CpuBackend(parallel_min_batch=1 << 30))
    cpu_bank.load_state_dict(saved, cuda_bank.size)
    for name, value in cpu_bank.state_dict().items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)

    rng = np.random.default_rng(7)
    for _ in range(2):
        slots = rng.choice(5, size=4, replace=False)
        x = rng.normal(size=(4, 1))
        a, b = cuda_bank.step(slots, x), cpu_bank.step(slots, x)
        _close(a.next_prediction, b.next_prediction, 1e-4, "next_prediction")
        _close(a.loss, b.loss, 1e-4, "loss")
    assert_same_state(cpu_bank, cuda_bank, 1e-4)

    back = ModelBank(spec, shared, CudaBackend(block_size=8))
    back.load_state_dict(cpu_bank.state_dict(), cpu_bank.size)
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(value, cpu_bank.state_dict()[name], err_msg=name)
    slots, x = np.array([4, 0, 2]), rng.normal(size=(3, 1))
    _close(back.step(slots, x).next_prediction, cpu_bank.step(slots, x).next_prediction, 1e-4, "after reload")


class _Recorder:
    """Wraps a kernel: records the numba types of every launch, then launches it."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, config):
        def launch(*args):
            self.seen.setdefault(self.name, set()).add(tuple(numba.typeof(a) for a in args))
            return self.kernel[config](*args)

        return launch


def test_launch_signatures_match_kernel_signatures(monkeypatch):
    """`kernel_signatures` (eager compilation, the NVVM check below) is what the backend launches."""
    seen = {}
    for name in kernel_signatures("float32"):
        monkeypatch.setattr(kernels_cuda, name, _Recorder(getattr(kernels_cuda, name), name, seen))
    for dtype in ("float32", "float64"):
        for shared in (True, False):
            bank = ModelBank(ModelSpec(dtype=dtype, hidden_size=2, window=2, train_every=1), shared, CudaBackend(block_size=2))
            bank.add_slot()
            bank.step([0], [[0.1]])
            bank.step([0], [[0.2]])
    expected = {name: {kernel_signatures("float32")[name], kernel_signatures("float64")[name]} for name in seen}
    assert set(seen) == set(kernel_signatures("float32"))
    assert seen == expected


_NVVM_CHECK = textwrap.dedent(
    """
    import sys, types
    try:
        import numba.cuda.cuda_paths as cuda_paths
        import numba.cuda.dispatcher as dispatcher
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as exc:  # no toolkit here: nothing to check
        print("SKIP: no usable libnvvm:", repr(exc)[:200]); sys.exit(0)
    # Compile without a GPU: device functions ask the current device for its compute
    # capability, and the libdevice lookup wants an NVRTC path it does not need.
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(8, 0))
    _nvrtc = cuda_paths._get_nvrtc_path
    def _nvrtc_or_none():
        try:
            return _nvrtc()
        except Exception:
            return cuda_paths._env_path_tuple("none", None)
    cuda_paths._get_nvrtc_path = _nvrtc_or_none
    import os, re, shutil, subprocess, tempfile
    from numba import cuda
    from streamlstm import kernels_cuda
    ptxas = os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "ptxas")
    ptxas = ptxas if os.path.exists(ptxas) else shutil.which("ptxas")
    for dtype in sys.argv[1:]:
        for name, sig in kernels_cuda.kernel_signatures(dtype).items():
            ptx, _ = cuda.compile_ptx(getattr(kernels_cuda, name).py_func, sig, cc=(8, 0))
            assert ".entry" in ptx, name
            print("compiled", dtype, name, len(ptx))
            if ptxas and name in ("_forward_kernel", "_window_grad_kernel"):
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(ptx)
                    f.flush()
                    # sm_80 PTX also assembles for Hopper (sm_90: H100 / H200), the GPUs we target
                    for arch in ("sm_80", "sm_90"):
                        info = subprocess.run([ptxas, "-arch=" + arch, "-v", f.name, "-o", os.devnull],
                                              capture_output=True, text=True, check=True).stderr
                        regs = max(int(r) for r in re.findall(r"Used (\\d+) registers", info))
                        spills = sum(int(b) for b in re.findall(r"(\\d+) bytes spill stores", info))
                        print("regs", arch, dtype, name, regs, spills)
    print("OK")
    """
)


def test_kernels_compile_with_nvvm():
    """The simulator runs any Python; the real compiler does not. Compile every kernel to PTX
    with NVVM (typing, the generic-target scalar_math overloads, lowering)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_FORCE_CUDA_CC"] = "8.0"
    if "CUDA_HOME" not in env:
        for root in ("/usr/local/cuda", *sorted(__import__("glob").glob("/usr/local/cuda-*"), reverse=True)):
            if os.path.isdir(os.path.join(root, "nvvm")):
                env["CUDA_HOME"] = root
                break
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _NVVM_CHECK, "float32", "float64"], env=env, capture_output=True, text=True, timeout=240
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
    # With ptxas at hand: a block of the capped size must fit the SM's 64K registers
    # (allocated per thread in multiples of 8), else real launches fail for lack of resources.
    caps = {"_forward_kernel": kernels_cuda.FORWARD_MAX_BLOCK, "_window_grad_kernel": kernels_cuda.TRAIN_MAX_BLOCK}
    for line in proc.stdout.splitlines():
        if line.startswith("regs "):
            _, arch, dtype, name, regs, spills = line.split()
            assert -(-int(regs) // 8) * 8 * caps[name] <= 65536, line


# --- real hardware (STREAMLSTM_REAL_CUDA=1 pytest -m gpu) -----------------------------

GPU_CASES = [
    ("f64-shared-H37", dict(dtype="float64", input_size=3, hidden_size=37, num_layers=2, window=8, dropout=0.2, weight_decay=0.01), True, 128, None),
    ("f64-sensor-H64", dict(dtype="float64", input_size=1, hidden_size=64, num_layers=1, window=8, loss="mse"), False, 64, 50),
    ("f32-shared-H32", dict(dtype="float32", input_size=3, hidden_size=32, num_layers=2, window=8, dropout=0.3, target_feature=1), True, 128, 70),
    ("f32-sensor-H50", dict(dtype="float32", input_size=3, hidden_size=50, num_layers=2, window=6, optimizer="sgd", learning_rate=0.05), False, 256, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw,shared,block,chunk", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_parity_with_reference(name, kw, shared, block, chunk):
    spec = ModelSpec(**{"train_every": 1, **kw})  # a training window at every step
    drive(
        spec, shared, [NumpyBackend(), CudaBackend(block_size=block, train_chunk=chunk)],
        slots_start=150, slots_end=301, steps=6, max_batch=300,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
def test_gpu_checkpoint_portable_between_cuda_and_cpu(shared):
    test_checkpoint_portable_between_cuda_and_cpu(shared)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
def test_gpu_non_finite_resets_state_and_skips_update(shared):
    test_non_finite_resets_state_and_skips_update(shared)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "sensor"])
def test_host_side_reset_reaches_the_device(shared):
    """A gap reset in the detector calls bank.reset_slot on the host: the device must follow."""
    spec = ModelSpec(input_size=1, hidden_size=3, window=3, dtype="float64", train_every=1)
    banks = [ModelBank(spec, shared, NumpyBackend()), ModelBank(spec, shared, CudaBackend(block_size=4))]
    rng = np.random.default_rng(0)
    for bank in banks:
        bank.add_slot()
        bank.add_slot()
    for step in range(5):
        x = rng.normal(size=(2, 1))
        for bank in banks:
            bank.step([0, 1], x)
            if step == 2:
                bank.reset_slot(1)
    for bank in banks:
        bank.backend.sync(bank)
    for name in ("h", "c", "ring_len", "ring_pos", "pred", "theta", "adam_t"):
        np.testing.assert_allclose(getattr(banks[1], name), getattr(banks[0], name), rtol=1e-9, atol=1e-12, err_msg=name)


# Simulated GPU threads compute with NumPy scalars and do not inherit np.errstate.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_weights_of_one_sensor_skip_its_update_and_reset_its_state():
    """Per-sensor weights, a NaN in one sensor's head: its window loss is NaN and its update
    skipped (weights and step count kept), its prediction is not finite so its state resets;
    status 2 (the larger code) for it, the other sensors train and predict as usual. Same on
    the reference, the CPU kernels and CUDA."""
    spec = ModelSpec(dtype="float64", hidden_size=3, window=3, train_every=1)
    backends = [NumpyBackend(), CpuBackend(parallel_min_batch=1 << 30), CudaBackend(block_size=32)]
    banks = drive(spec, False, backends, slots_start=3, slots_end=3, steps=3, max_batch=3, seed=4)
    wy = int(banks[0].offs[spec.num_layers, 0])
    for bank in banks:
        state = bank.state_dict()
        state["theta"][1, wy] = np.nan
        bank.load_state_dict(state, bank.size)
    before = [bank.state_dict() for bank in banks]
    x = np.array([[0.3], [0.1], [-0.2]])
    with np.errstate(all="ignore"):
        results = [bank.step([0, 1, 2], x) for bank in banks]
    for r in results:
        np.testing.assert_array_equal(r.status, [0, 2, 0])
        assert np.isfinite(r.loss[[0, 2]]).all() and np.isnan(r.loss[1])
        _close(results[0].next_prediction, r.next_prediction, 1e-9, "next_prediction")
    for bank, old in zip(banks, before):
        st = bank.state_dict()
        assert st["adam_t"][1] == old["adam_t"][1] and st["adam_t"][0] == old["adam_t"][0] + 1
        np.testing.assert_array_equal(st["theta"][1], old["theta"][1])
        np.testing.assert_array_equal(st["m"][1], old["m"][1])
        assert st["ring_len"][1] == 0 and not st["h"][1].any() and not st["pred"][1].any()
        assert bank.since_train[1] == 0
    for bank in banks[1:]:
        assert_same_state(banks[0], bank, 1e-9)
