"""The `cuda` backend: a ModelBank's device mirror, training scratch, uploads and downloads.

`backend.make_backend` (the only place asking whether CUDA exists) builds it; the kernels
and their launchers are `kernels_cuda`. The bank's NumPy arrays stay the host copy and the
checkpoint format: `attach` uploads them, `sync` downloads them.
"""
from __future__ import annotations

import weakref

import numpy as np
from numba import cuda

from . import kernels_cuda
from .lstm_math import STATUS_RESET, hyper_arrays

# Bank arrays mirrored on the device. since_train stays on the host: the bank's step()
# reads and writes it in Python.
DEVICE_ARRAYS = ("theta", "m", "v", "adam_t", "h", "c", "ring_x", "ring_h", "ring_c", "ring_pos", "ring_len", "pred")


def scratch_bytes_per_sensor(spec, update_tps: int) -> int:
    T, I, L, H, O, P = spec.window, spec.input_size, spec.num_layers, spec.hidden_size, spec.output_size, spec.num_params
    item = spec.np_dtype.itemsize
    n_dt = P + T * I + T * O + T * L * 5 * H + 2 * (T + 1) * L * H + T * L * H + 4 * H + H + 2 * L * H
    return n_dt * item + 8 * (T * O + update_tps) + 4 * 2


class TrainScratch:
    """Device scratch for training `chunk` elements at a time (plus the batch-sized flags)."""

    def __init__(self, spec, chunk: int, batch: int, update_tps: int, norm_blocks: int, block_size: int):
        dt = spec.np_dtype
        T, I, L, H, O, P = spec.window, spec.input_size, spec.num_layers, spec.hidden_size, spec.output_size, spec.num_params
        C = chunk
        self.chunk, self.batch = C, batch
        e = cuda.device_array
        self.grad = e((C, P), dt)
        self.xs = e((C, T, I), dt)
        self.tg = e((C, T, O), dt)
        self.lv = e((C, T, O), np.float64)
        self.acts = e((C, T, L, 5, H), dt)
        self.hs = e((C, T + 1, L, H), dt)
        self.cs = e((C, T + 1, L, H), dt)
        self.masks = e((C, T, L, H), dt)
        self.da = e((C, 4 * H), dt)
        self.dab = e((C, H), dt)
        self.dhn = e((C, L, H), dt)
        self.dcn = e((C, L, H), dt)
        self.bad = e(C, np.int32)
        self.part = e((C, update_tps), np.float64)
        self.tflag = e(batch, np.int32)
        self.acc = e(P, dt)
        self.count = e(2, np.int64)
        self.norm_part = e(norm_blocks * block_size, np.float64)
        self.blockpart = e(norm_blocks, np.float64)


class _DeviceBank:
    """Device mirrors and per-bank buffers of one ModelBank."""

    def __init__(self, bank):
        self.arrays = {name: cuda.to_device(np.ascontiguousarray(getattr(bank, name))) for name in DEVICE_ARRAYS}
        hp, ip = hyper_arrays(bank.spec)
        self.hp = cuda.to_device(hp)
        self.ip = cuda.to_device(ip)
        self.offs = cuda.to_device(np.ascontiguousarray(bank.offs, dtype=np.int64))
        self.bufs = {}
        self.scratch = None
        self.batch_key = None  # (slots, x) host arrays last uploaded, reused by forward()

    def buf(self, name, n, tail, dtype):
        """A device buffer of at least n rows (grown by doubling), viewed as [:n]."""
        d = self.bufs.get(name)
        if d is None or d.shape[0] < n:
            cap = max(n, 2 * d.shape[0]) if d is not None else n
            d = cuda.device_array((cap,) + tuple(tail), dtype)
            self.bufs[name] = d
        return d[:n]


class CudaBackend:
    """Numba CUDA kernels; the bank's NumPy arrays are the host copy (checkpoint format).

    `block_size` threads per block (tests force small blocks so launches have several);
    `scratch_bytes` bounds the training scratch (per-sensor gradients and BPTT caches):
    larger batches are trained in chunks. `train_chunk` caps the chunk (tests).
    """

    name = "cuda"

    def __init__(self, block_size: int = 128, scratch_bytes: int = 256 << 20, train_chunk: int | None = None):
        if not 1 <= block_size <= 1024:
            raise ValueError("block_size must be in [1, 1024]")  # capped per kernel at launch
        self.block_size = int(block_size)
        self.scratch_bytes = int(scratch_bytes)
        self.train_chunk = train_chunk
        self._dev = weakref.WeakKeyDictionary()

    # --- host <-> device -----------------------------------------------------------

    def attach(self, bank):
        """Upload everything (after the bank (re)allocated or loaded a checkpoint)."""
        self._dev[bank] = _DeviceBank(bank)

    def sync(self, bank):
        """Download everything into the bank's arrays (checkpoints, growth)."""
        dev = self._dev.get(bank)
        if dev is None:
            return
        for name, d in dev.arrays.items():
            host = getattr(bank, name)
            if host.shape != d.shape or not host.flags.c_contiguous:
                raise RuntimeError(f"bank.{name} changed shape without attach(): {host.shape} vs {d.shape}")
            d.copy_to_host(host)

    def reset_slot(self, bank, slot):
        """Apply a host-side slot reset (bank.reset_slot) to the device mirrors."""
        dev = self._dev.get(bank)
        if dev is None:
            return
        for name in ("h", "c", "ring_len", "ring_pos", "pred"):
            if name in dev.arrays:
                dev.arrays[name][slot : slot + 1].copy_to_device(np.ascontiguousarray(getattr(bank, name)[slot : slot + 1]))

    def init_weights(self, bank, slot):
        """Upload a new slot's initial weights (bank.add_slot wrote them on the host)."""
        dev = self._dev.get(bank)
        if dev is not None:
            dev.arrays["theta"][slot : slot + 1].copy_to_device(np.ascontiguousarray(bank.theta[slot : slot + 1]))

    def sync_pred(self, bank):
        """Nothing to do: forward() already copied the batch's predictions into bank.pred
        (only those B rows, together with the status: one transfer per step)."""

    def _state(self, bank) -> _DeviceBank:
        dev = self._dev.get(bank)
        if dev is None:
            raise RuntimeError("CudaBackend: bank was not attached")
        return dev

    def _upload_batch(self, dev, slots, x, dt, reuse: bool):
        """Device copies of slots and x. bank.step() passes the same arrays to train() and
        then forward(): forward reuses train's upload (and consumes it), nothing else does."""
        key = dev.batch_key
        dev.batch_key = None
        if reuse and key is not None and key[0] is slots and key[1] is x:
            return key[2], key[3]
        B = len(slots)
        d_slots = dev.buf("slots", B, (), np.int64)
        d_slots.copy_to_device(np.ascontiguousarray(slots, dtype=np.int64))
        xh = np.ascontiguousarray(x, dtype=dt).reshape(B, -1)
        d_x = dev.buf("x", B, xh.shape[1:], dt)
        d_x.copy_to_device(xh)
        if not reuse:
            # train(): remember for the forward() of the same step. Holding the arrays
            # keeps their identity unique while cached.
            dev.batch_key = (slots, x, d_slots, d_x)
        return d_slots, d_x

    def _scratch(self, dev, spec, B):
        """Training scratch for B elements and the chunk size to train them with."""
        block, utps, norm_blocks = kernels_cuda.train_geometry(spec.num_params, self.block_size)
        limit = max(1, self.scratch_bytes // scratch_bytes_per_sensor(spec, utps))
        if self.train_chunk:
            limit = min(limit, self.train_chunk)
        chunk = min(B, limit)
        sc = dev.scratch
        if sc is None or sc.chunk < chunk or sc.batch < B:
            # Grow geometrically (within the budget): micro-batch sizes wander, and
            # reallocating at every new maximum would thrash device allocations.
            old_chunk, old_batch = (sc.chunk, sc.batch) if sc is not None else (0, 0)
            sc = TrainScratch(
                spec, min(limit, max(chunk, 2 * old_chunk)), max(B, 2 * old_batch), utps, norm_blocks, block
            )
            dev.scratch = sc
        return sc, chunk

    # --- steps -------------------------------------------------------------------------

    def train(self, bank, slots, x, scale):
        B = len(slots)
        if B == 0:
            return np.full(0, np.nan), np.zeros(0, np.int64)
        dev = self._state(bank)
        spec = bank.spec
        d_slots, d_x = self._upload_batch(dev, slots, x, spec.np_dtype, reuse=False)
        d_scale = dev.buf("scale", B, (), np.float64)
        d_scale.copy_to_device(np.ascontiguousarray(scale, dtype=np.float64))
        res = dev.buf("train_res", B, (2,), np.float64)
        sc, chunk = self._scratch(dev, spec, B)
        a = dev.arrays
        kernels_cuda.train_batch(
            bool(bank.shared), d_slots, d_x, d_scale, a["theta"], a["m"], a["v"], a["adam_t"], dev.offs, dev.hp, dev.ip,
            a["ring_x"], a["ring_h"], a["ring_c"], a["ring_pos"], a["ring_len"], res, sc, chunk, self.block_size,
        )
        if bank.shared:
            # The host holds the pending sum (P numbers) between steps: the device scratch is
            # per batch size and may be replaced before the update is due.
            bank.grad_sum[0] += sc.acc.copy_to_host()
            bank.grad_count[0] += int(sc.count.copy_to_host()[0])
        host = res.copy_to_host()
        return host[:, 0].copy(), host[:, 1].astype(np.int64)

    def apply_shared(self, bank):
        dev = self._state(bank)
        sc, _ = self._scratch(dev, bank.spec, 1)
        sc.acc.copy_to_device(np.ascontiguousarray(bank.grad_sum[0]))
        sc.count.copy_to_device(np.array([bank.grad_count[0], 0], np.int64))
        a = dev.arrays
        kernels_cuda.apply_shared_batch(a["theta"], a["m"], a["v"], a["adam_t"], dev.hp, dev.ip, sc, self.block_size)
        bank.grad_sum[0] = 0
        bank.grad_count[0] = 0

    def forward(self, bank, slots, x):
        B = len(slots)
        if B == 0:
            return np.zeros(0, np.int64)
        dev = self._state(bank)
        spec = bank.spec
        dt = spec.np_dtype
        d_slots, d_x = self._upload_batch(dev, slots, x, dt, reuse=True)
        out = dev.buf("fwd_out", B, (1 + spec.output_size,), dt)
        hnew = dev.buf("hnew", B, (spec.hidden_size,), dt)
        bad = dev.buf("bad", B, (), np.int32)
        a = dev.arrays
        kernels_cuda.forward_batch(
            d_slots, bool(bank.shared), d_x, a["theta"], dev.offs, float(spec.input_clip), a["h"], a["c"],
            a["ring_x"], a["ring_h"], a["ring_c"], a["ring_pos"], a["ring_len"], a["pred"], out, hnew, bad,
            self.block_size,
        )
        host = out.copy_to_host()
        status = host[:, 0].astype(np.int64)
        idx = np.asarray(slots, dtype=np.int64)
        bank.pred[idx] = host[:, 1:]
        reset = idx[status == STATUS_RESET]
        if len(reset):
            # As reference.step_forward (bank.reset_slot): a reset slot restarts its cadence.
            bank.since_train[reset] = 0
        return status
