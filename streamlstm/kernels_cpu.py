"""Numba CPU kernels: batched forward and training steps over many sensors.

Each kernel exists as a serial and a `prange` driver around the same per-sensor code
(`lstm_math`). The batch is cut into `n_chunks` contiguous chunks so scratch memory is
allocated once per chunk, not per sensor; the serial driver is one chunk. A slot must
appear at most once per call (the bank guarantees it), so chunks never race.

With shared weights the forward goes through `lstm_block` instead: blocks of sensors per
pass over the one weight row (GEMM-shaped), with the per-sensor path's numbers bit for bit.

The per-chunk workers are jitted functions of their own, so the `prange` drivers only
compile a thin loop around them (a parallel compile of the whole body cost seconds more).

All kernels: cache=True (fill the cache with `streamlstm warmup`), nogil=True so the
MQTT and HTTP threads keep running, no fastmath (inputs may be extreme; NaN checks matter),
error_model="numpy": no divide-by-zero exception checks, which keep the activation loops scalar
(measured: a training window 85 us without it, 66 us with); their divisions are guarded or by counts >= 1.
"""
import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from .lstm_block import block_rows, block_scratch_width, prefetch_block, push_and_forward_block
from .lstm_math import (
    HP_LR,
    IP_OPTIMIZER,
    STATUS_SKIPPED,
    all_finite,
    apply_update,
    push_and_forward,
    window_grad,
)

_JIT = dict(cache=True, nogil=True, error_model="numpy")


# --- forward -------------------------------------------------------------------------


@njit(**_JIT)
def _forward_range(lo, hi, slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status):
    H = h.shape[2]
    gates = np.empty(4 * H, dtype=h.dtype)
    buf = np.empty(max(H, x.shape[1]), dtype=h.dtype)
    for b in range(lo, hi):
        s = slots[b]
        status[b] = push_and_forward(
            s, x[b], theta[wrows[b]], offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, gates, buf
        )


@njit(**_JIT)
def forward_batch_serial(slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status):
    B = slots.shape[0]
    _forward_range(B - B, B, slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status)


@register_jitable
def chunk_range(ch, B, n_chunks):
    """Elements lo..hi of chunk ch: int64 like the serial drivers' bounds (prange indices are
    unsigned), so the drivers share one compiled worker."""
    chunk = np.int64(ch)
    return chunk * B // n_chunks, (chunk + 1) * B // n_chunks


@njit(parallel=True, **_JIT)
def forward_batch_parallel(
    slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status, n_chunks
):
    B = slots.shape[0]
    for ch in prange(n_chunks):
        lo, hi = chunk_range(ch, B, n_chunks)
        _forward_range(lo, hi, slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status)


# Shared weights: blocks of sensors per pass over the one weight row (lstm_block). The range
# worker is the serial driver itself (one compile less). It compiles without Numba's allocator
# (_nrt=False; scratch comes from Python), which keeps lstm_block usable from the detector
# pass's kernels, and with error_model="numpy", which lets the activations vectorise.
@njit(cache=True, nogil=True, error_model="numpy", _nrt=False)
def forward_shared_serial(
    lo, hi, slots, x, theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status, gates, z
):
    """Elements lo..hi in blocks of gates.shape[0] sensors (gates, z: lstm_block's scratch); each
    block prefetches the next one's rows (the first block's are asked for here)."""
    block = gates.shape[0]
    prefetch_block(slots[lo : min(lo + block, hi)], h, c, ring_x, ring_h, ring_c, ring_pos, pred)
    for b0 in range(lo, hi, block):
        b1 = min(b0 + block, hi)
        push_and_forward_block(
            slots[b0:b1], x[b0:b1], theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred,
            status[b0:b1], gates, z, slots[b1 : min(b1 + block, hi)],
        )


@njit(parallel=True, **_JIT)
def forward_shared_parallel(
    slots, x, theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status, gates, z
):
    """One chunk per scratch (gates, z: (n_chunks, ...))."""
    n_chunks = gates.shape[0]
    for ch in prange(n_chunks):
        lo, hi = chunk_range(ch, slots.shape[0], n_chunks)
        forward_shared_serial(
            lo, hi, slots, x, theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status,
            gates[ch], z[ch],
        )


def forward_shared(
    slots, wrows, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status, n_chunks=0,
    block=None,
):
    """Shared weights with the per-sensor drivers' arguments (wrows: all row 0, unused): the
    serial driver for n_chunks == 0, else `prange` over n_chunks; `block` sensors per tile
    (default `lstm_block.block_rows`)."""
    H = h.shape[2]
    block = block or block_rows(H, h.itemsize)
    scratches = max(n_chunks, 1)
    gates = np.empty((scratches, block, 4 * H), h.dtype)
    z = np.empty((scratches, block, block_scratch_width(x.shape[1], H)), h.dtype)
    args = (slots, x, theta[0], offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status)
    if n_chunks:
        forward_shared_parallel(*args, gates, z)
    else:
        forward_shared_serial(0, len(slots), *args, gates[0], z[0])


# --- training ------------------------------------------------------------------------


@register_jitable
def _scratch(T, I, O, L, H, P, dtype_like):
    dt = dtype_like.dtype
    return (
        np.empty((T, I), dtype=dt),
        np.empty((T, O), dtype=dt),
        np.empty((T, L, 5, H), dtype=dt),
        np.empty((T, L, 4 * H), dtype=dt),
        np.empty((T + 1, L, H), dtype=dt),
        np.empty((T + 1, L, H), dtype=dt),
        np.ones((T, L, H), dtype=dt),
        np.empty((2, L, H), dtype=dt),
        np.empty((5, max(4 * H, I)), dtype=dt),
        np.empty(P, dtype=dt),
        np.empty((L, 2, 4 * H, H), dtype=dt),
    )


@njit(**_JIT)
def _train_range(
    lo, hi, shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len,
    losses, status, acc, count, ch,
):
    """Per-sensor training for elements lo..hi. Shared weights: accumulate into acc[ch]."""
    T = ring_x.shape[1]
    I = ring_x.shape[2]
    L = ring_h.shape[2]
    H = ring_h.shape[3]
    P = theta.shape[1]
    O = offs[L, 2] - offs[L, 1]
    xs, tg, acts, das, hs, cs, masks, rec, bufs, grad, wt = _scratch(T, I, O, L, H, P, theta)
    for b in range(lo, hi):
        s = slots[b]
        n = ring_len[s]
        if scale[b] <= 0.0 or n == 0:
            losses[b] = np.nan
            continue
        row = 0 if shared else s
        step = adam_t[row] + 1
        losses[b] = window_grad(
            theta[row], offs, hp, ip, step, s, ring_x, ring_h, ring_c, ring_pos[s], n, x[b], grad,
            xs, tg, acts, das, hs, cs, masks, rec, bufs, wt,
        )
        if shared:
            if not all_finite(grad):
                status[b] = STATUS_SKIPPED
                continue
            w = scale[b]
            for k in range(P):
                acc[ch, k] += w * grad[k]
            count[ch] += 1
        elif apply_update(theta[s], m[s], v[s], grad, step, hp[HP_LR] * scale[b], hp, ip[IP_OPTIMIZER]):
            adam_t[s] = step
        else:
            status[b] = STATUS_SKIPPED


@register_jitable
def shared_update(theta, m, v, adam_t, hp, ip, acc, count, mean):
    """Mean of the accumulated per-sensor gradients -> one shared update (mean: scratch (P,));
    clears the sums it consumed (acc rows, counts)."""
    total = 0
    for ch in range(count.shape[0]):
        total += count[ch]
    if total == 0:
        return
    P = theta.shape[1]
    for k in range(P):
        mean[k] = 0.0
    for ch in range(acc.shape[0]):
        for k in range(P):
            mean[k] += acc[ch, k]
    inv = 1.0 / total
    for k in range(P):
        mean[k] *= inv
    step = adam_t[0] + 1
    if apply_update(theta[0], m[0], v[0], mean, step, hp[HP_LR], hp, ip[IP_OPTIMIZER]):
        adam_t[0] = step
    for ch in range(acc.shape[0]):
        count[ch] = 0
        for k in range(P):
            acc[ch, k] = 0.0


@njit(**_JIT)
def apply_shared(theta, m, v, adam_t, hp, ip, acc, count):
    """The pending shared update: mean of acc (1, P) over count[0] gradients; clears both."""
    shared_update(theta, m, v, adam_t, hp, ip, acc, count, np.empty(theta.shape[1], dtype=theta.dtype))


@njit(**_JIT)
def train_batch_serial(
    shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len, losses, status,
    acc, count,
):
    """Shared weights: the gradients join acc[0] / count[0] (the bank's pending sum)."""
    B = slots.shape[0]
    zero = B - B  # a plain int64, not a literal: the same worker signature as the prange driver
    _train_range(
        zero, B, shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip,
        ring_x, ring_h, ring_c, ring_pos, ring_len, losses, status, acc, count, zero,
    )


@njit(parallel=True, **_JIT)
def train_batch_parallel(
    shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len, losses, status,
    acc, count, n_chunks,
):
    B = slots.shape[0]
    # one sum per chunk (no two threads add into the same row), folded into the pending sum after
    part = np.zeros((n_chunks, theta.shape[1] if shared else 0), dtype=theta.dtype)
    part_count = np.zeros(n_chunks, dtype=np.int64)
    for ch in prange(n_chunks):
        lo, hi = chunk_range(ch, B, n_chunks)
        _train_range(
            lo, hi, shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip,
            ring_x, ring_h, ring_c, ring_pos, ring_len, losses, status, part, part_count, np.int64(ch),
        )
    if shared:
        for ch in range(n_chunks):
            for k in range(part.shape[1]):
                acc[0, k] += part[ch, k]
            count[0] += part_count[ch]
