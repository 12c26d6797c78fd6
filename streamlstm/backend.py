"""Backend protocol, the host backends (numpy, cpu, auto) and backend selection: the one
place that asks whether CUDA exists (the `cuda` backend itself is `backend_cuda`, imported
only once a device is there).

A backend steps a `ModelBank`: `train(bank, slots, x, scale) -> (loss, status)`,
`forward(bank, slots, x) -> status` and `apply_shared(bank)`. Shared weights: `train` adds the
windows' gradients to the bank's pending sum (`grad_sum`, `grad_count`, host arrays) and
`apply_shared` makes the one update from their mean. Host backends work on the bank's NumPy arrays in
place; a device backend keeps mirrors and implements `attach` (upload after the bank
(re)allocated), `sync` (download everything), `sync_pred` (download predictions) and
`reset_slot` (apply a host-side slot reset on the device).
"""
from __future__ import annotations

import numpy as np

BACKENDS = ("auto", "cpu", "cuda", "numpy")


class BackendUnavailable(RuntimeError):
    pass


class _HostBackend:
    """Arrays live in the bank: nothing to upload or download."""

    def attach(self, bank):
        pass

    def sync(self, bank):
        pass

    def sync_pred(self, bank):
        pass

    def reset_slot(self, bank, slot):
        pass

    def init_weights(self, bank, slot):
        pass


class NumpyBackend(_HostBackend):
    """The pure-NumPy reference: slow, dependency-free, the oracle."""

    name = "numpy"

    def train(self, bank, slots, x, scale):
        from . import reference

        return reference.step_train(bank.spec, bank, slots, x, scale, bank.shared)

    def apply_shared(self, bank):
        from . import reference

        reference.apply_shared(bank.spec, bank)

    def forward(self, bank, slots, x):
        from . import reference

        return reference.step_forward(bank.spec, bank, slots, x, bank.shared)


class CpuBackend(_HostBackend):
    """Numba CPU kernels; serial below `parallel_min_batch` sensors, `prange` from there."""

    name = "cpu"

    def __init__(self, parallel_min_batch: int = 64, chunks_per_thread: int = 4):
        from numba import get_num_threads

        from . import kernels_cpu
        from .lstm_math import hyper_arrays

        self._k = kernels_cpu
        self._hyper_arrays = hyper_arrays
        self._hyper = {}
        self.parallel_min_batch = parallel_min_batch
        # Read here, in Python: calling get_num_threads() inside a cached parallel
        # kernel silently disables its cache.
        self._threads = get_num_threads()
        self._chunks_per_thread = chunks_per_thread

    def _hp(self, spec):
        if spec not in self._hyper:
            self._hyper[spec] = self._hyper_arrays(spec)
        return self._hyper[spec]

    def _chunks(self, batch: int) -> int:
        if batch < self.parallel_min_batch or self._threads <= 1:
            return 0
        return min(batch, self._threads * self._chunks_per_thread)

    def train(self, bank, slots, x, scale):
        hp, ip = self._hp(bank.spec)
        B = len(slots)
        loss = np.empty(B)
        status = np.zeros(B, np.int64)
        args = (
            bank.shared, slots, x, np.ascontiguousarray(scale, dtype=np.float64), bank.theta, bank.m, bank.v,
            bank.adam_t, bank.offs, hp, ip, bank.ring_x, bank.ring_h, bank.ring_c, bank.ring_pos, bank.ring_len,
            loss, status, *self._pending(bank),
        )
        chunks = self._chunks(B)
        if chunks:
            self._k.train_batch_parallel(*args, chunks)
        else:
            self._k.train_batch_serial(*args)
        return loss, status

    @staticmethod
    def _pending(bank):
        """The shared bank's pending gradient sum; per-sensor weights update in place (none)."""
        if bank.shared:
            return bank.grad_sum, bank.grad_count
        return np.zeros((1, 0), bank.theta.dtype), np.zeros(1, np.int64)

    def apply_shared(self, bank):
        hp, ip = self._hp(bank.spec)
        self._k.apply_shared(bank.theta, bank.m, bank.v, bank.adam_t, hp, ip, bank.grad_sum, bank.grad_count)

    def forward(self, bank, slots, x):
        B = len(slots)
        status = np.zeros(B, np.int64)
        args = (
            slots, bank.weight_rows(slots), x, bank.theta, bank.offs, float(bank.spec.input_clip), bank.h, bank.c,
            bank.ring_x, bank.ring_h, bank.ring_c, bank.ring_pos, bank.ring_len, bank.pred, status,
        )
        chunks = self._chunks(B)
        if bank.shared:  # one weight row: blocks of sensors per pass over it (GEMM-shaped, lstm_block)
            self._k.forward_shared(*args, chunks)
        elif chunks:
            self._k.forward_batch_parallel(*args, chunks)
        else:
            self._k.forward_batch_serial(*args)
        return status


def cuda_available(allow_simulator: bool = True) -> bool:
    try:
        from numba import config, cuda

        if config.ENABLE_CUDASIM and not allow_simulator:
            return False
        return bool(cuda.is_available())
    except Exception:  # a broken driver or toolkit is "no CUDA", not a crash
        return False


class AutoBackend:
    """CPU kernels until a step's batch reaches `cuda_min_batch` on a machine with a GPU;
    then the bank moves to the device for good (one transfer) and stays there.

    Below the crossover, launch and transfer overheads make the CPU faster; the simulator
    never counts as a device here (it would be slower than the numpy reference).
    """

    def __init__(self, cpu: CpuBackend, cuda_min_batch: int, has_cuda):
        self.active = cpu
        self.cuda_min_batch = cuda_min_batch
        self._has_cuda = has_cuda
        self._checked = False

    @property
    def name(self):
        return self.active.name

    def place(self, bank, slots):
        """Move the bank to the GPU if a batch over these slots (a slot may repeat) has enough
        distinct sensors (the compiled detector pass asks before each batch; train/forward ask
        themselves). Counting them costs a sort: only for batches that could qualify."""
        if self.active.name != "cuda" and len(slots) >= self.cuda_min_batch:
            self._maybe_move(bank, len(np.unique(slots)))

    def _maybe_move(self, bank, batch: int):
        if self.active.name == "cuda" or batch < self.cuda_min_batch:
            return
        if not self._checked:
            self._checked = True
            self._device = self._has_cuda()
        if self._device:
            from .backend_cuda import CudaBackend

            self.active.sync(bank)
            self.active = CudaBackend()
            self.active.attach(bank)

    def attach(self, bank):
        self.active.attach(bank)

    def sync(self, bank):
        self.active.sync(bank)

    def sync_pred(self, bank):
        self.active.sync_pred(bank)

    def reset_slot(self, bank, slot):
        self.active.reset_slot(bank, slot)

    def init_weights(self, bank, slot):
        self.active.init_weights(bank, slot)

    def train(self, bank, slots, x, scale):
        self._maybe_move(bank, len(slots))
        return self.active.train(bank, slots, x, scale)

    def apply_shared(self, bank):
        self.active.apply_shared(bank)

    def forward(self, bank, slots, x):
        self._maybe_move(bank, len(slots))
        return self.active.forward(bank, slots, x)


def make_backend(kind: str = "auto", parallel_min_batch: int = 64, cuda_min_batch: int = 4096):
    """Build the backend named by config `backend.kind` (one per model group).

    `auto`: CPU, moving to CUDA once a step's batch reaches `cuda_min_batch` on a machine
    with a GPU. Asking for `cuda` without a device fails here, at start.
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}")
    if kind == "numpy":
        return NumpyBackend()
    if kind == "cuda":
        if not cuda_available():
            raise BackendUnavailable(
                "backend.kind is 'cuda' but no CUDA device is usable (install the 'cuda' extra and a driver, "
                "or set backend.kind to auto or cpu)"
            )
        from .backend_cuda import CudaBackend

        return CudaBackend()
    cpu = CpuBackend(parallel_min_batch=parallel_min_batch)
    if kind == "cpu":
        return cpu
    return AutoBackend(cpu, cuda_min_batch, lambda: cuda_available(allow_simulator=False))
