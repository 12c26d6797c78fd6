"""Numba CUDA kernels: batched forward and training steps, and their launchers.

Kernels only: the `cuda` backend (device mirrors of a bank, scratch, uploads) is
`backend_cuda`. Same semantics as `kernels_cpu` / `reference.step_*`; every per-element
formula (activations, the LSTM cell of one unit and its gradient, loss, clipping scale,
Adam/SGD of one parameter, dropout hash) is the very same `scalar_math` function the CPU
kernels call (generic-target `register_jitable`/`overload`s, which the CUDA typing context
accepts). What is written here is only which thread computes what, in which order.

Thread mapping. Every per-sensor kernel gives each batch element a group of `tps`
consecutive threads ("lanes", a power of two >= H, at most the block size); a block holds
`block // tps` sensors. A lane owns hidden units j = lane, lane + tps, ... (and gate
columns k = lane, lane + tps, ... in the backward pass), so loads of a weight row are
coalesced across lanes. Layers and time steps are separated by `syncthreads`; every
loop around a `syncthreads` has a bound that is uniform over the block (L, T), and idle
threads (padding, untrained elements, t beyond a window) still reach every barrier.

Memory. Kernels use no shared or local arrays: per-sensor scratch (BPTT caches, the
per-sensor gradient) lives in device global memory allocated by the backend and sized
for a *chunk* of the batch (a byte budget), so B = 100000 with large H does not need
B * P gradients at once. Shared weights: each chunk's finite gradients are summed
(scale-weighted, in batch order: deterministic, no atomics) into one accumulator, then
a mean/norm kernel and one clipped Adam/SGD update kernel over the P parameters. Per-sensor
weights: an update kernel per chunk, each sensor reducing its own gradient norm.

Kernels use only scalars, arrays, `math.*`, thread indices and `syncthreads`; no
exceptions, lists or allocations (the real compiler is stricter than the simulator:
tests/test_kernels_cuda.py compiles every kernel to PTX with the real NVVM).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .lstm_math import (
    HP_BETA1,
    HP_BETA2,
    HP_DROPOUT,
    HP_EPS,
    HP_GRAD_CLIP,
    HP_HUBER_DELTA,
    HP_INPUT_CLIP,
    HP_LR,
    HP_WEIGHT_DECAY,
    IP_LOSS,
    IP_OPTIMIZER,
    IP_SEED,
    IP_TARGET_LO,
    STATUS_RESET,
    STATUS_SKIPPED,
)
from .scalar_math import adam_param, adam_step_size, clip_value, dropout_keep, grad_clip_scale, loss_grad, loss_value
from .scalar_math import lstm_cell, lstm_cell_grad, sgd_param

_NAN = float("nan")
# Per-element training flags written by the BPTT kernel (tflag).
_NOT_TRAINED, _TRAINED_OK, _TRAINED_BAD = 0, 1, 2
MAX_NORM_BLOCKS = 64  # partial sums of the shared-gradient norm: each update thread re-adds them
# Block-size caps: a block may not need more than the SM's 64K registers. ptxas (sm_80/90)
# gives the BPTT kernel ~166 registers/thread and forward ~102 (checked by the tests when
# ptxas is installed), so 1024-thread blocks would fail to launch on real hardware.
FORWARD_MAX_BLOCK = 512
TRAIN_MAX_BLOCK = 256


def threads_per_sensor(n: int, block_size: int) -> int:
    """Lanes per sensor: the power of two >= n (warp-aligned groups), capped by the block."""
    p = 1
    while p < n:
        p *= 2
    return max(1, min(p, block_size))


def train_geometry(num_params: int, block_size: int) -> tuple[int, int, int]:
    """(block, update lanes, norm blocks) `train_batch` launches with: the backend sizes the
    scratch's per-lane and per-block partial sums (`part`, `norm_part`, `blockpart`) by it."""
    block = min(block_size, TRAIN_MAX_BLOCK)
    norm_blocks = max(1, min(MAX_NORM_BLOCKS, _blocks(num_params, block)))
    return block, threads_per_sensor(num_params, block), norm_blocks


# --- device helpers ------------------------------------------------------------------


@cuda.jit(device=True)
def _lane_map(tps):
    """(local element index, lane) of this thread under the sensor-group mapping."""
    tid = cuda.threadIdx.x
    spb = cuda.blockDim.x // tps
    return cuda.blockIdx.x * spb + tid // tps, tid % tps


@cuda.jit(device=True)
def _update_elem(theta, m, v, row, k, gk, gscale, wd, opt, lr, b1, b2, step_size, eps):
    """One parameter of `lstm_math.apply_update` (after the norm clip scale is known)."""
    if opt == 0:
        theta[row, k], m[row, k], v[row, k] = adam_param(
            theta[row, k], m[row, k], v[row, k], gk, gscale, wd, b1, b2, step_size, eps
        )
    else:
        theta[row, k] = sgd_param(theta[row, k], gk, gscale, wd, lr)


@cuda.jit(device=True)
def _unit_preacts(theta, row, wx, wh, bo, j, H, inp, mask, use_mask, h_prev):
    """Gate pre-activations (i, f, g, o) of hidden unit j: bias + inp @ Wx + h_prev @ Wh on
    unit j's four gate columns, summed in `lstm_math.gate_preacts`'s order (bias, inputs,
    recurrence). inp (the layer input) is multiplied by `mask` where use_mask (dropout
    between layers in training)."""
    G = 4 * H
    ai = theta[row, bo + j]
    af = theta[row, bo + H + j]
    ag = theta[row, bo + 2 * H + j]
    ao = theta[row, bo + 3 * H + j]
    for i in range(inp.shape[0]):
        xi = inp[i]
        if use_mask:
            xi = xi * mask[i]
        base = wx + i * G + j
        ai += xi * theta[row, base]
        af += xi * theta[row, base + H]
        ag += xi * theta[row, base + 2 * H]
        ao += xi * theta[row, base + 3 * H]
    for k in range(H):
        hk = h_prev[k]
        base = wh + k * G + j
        ai += hk * theta[row, base]
        af += hk * theta[row, base + H]
        ag += hk * theta[row, base + 2 * H]
        ao += hk * theta[row, base + 3 * H]
    return ai, af, ag, ao


# --- forward -------------------------------------------------------------------------


@cuda.jit
def _forward_kernel(slots, shared, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, out, hnew, bad, tps):
    """`lstm_math.push_and_forward` for every batch element; out[b] = (status, pred[s])."""
    B = slots.shape[0]
    L = h.shape[1]
    H = h.shape[2]
    I = x.shape[1]
    O = pred.shape[1]
    T = ring_x.shape[1]
    b, lane = _lane_map(tps)
    active = b < B
    s = 0
    row = 0
    pos = 0
    if active:
        s = slots[b]
        if not shared:
            row = s
        pos = ring_pos[s]
        # Push (clipped x, state before it) into the BPTT ring.
        for i in range(lane, I, tps):
            ring_x[s, pos, i] = clip_value(x[b, i], clip)
        for layer in range(L):
            for j in range(lane, H, tps):
                ring_h[s, pos, layer, j] = h[s, layer, j]
                ring_c[s, pos, layer, j] = c[s, layer, j]
        if lane == 0:
            bad[b] = 0
    cuda.syncthreads()
    for layer in range(L):
        if active:
            wx = offs[layer, 0]
            wh = offs[layer, 1]
            bo = offs[layer, 2]
            # layer input: the clipped reading (in the model dtype) or the new h below
            inp = ring_x[s, pos] if layer == 0 else h[s, layer - 1]
            for j in range(lane, H, tps):
                ai, af, ag, ao = _unit_preacts(theta, row, wx, wh, bo, j, H, inp, inp, False, h[s, layer])
                _, _, _, _, cn, _, hn = lstm_cell(ai, af, ag, ao, c[s, layer, j])
                c[s, layer, j] = cn  # c[s, layer, j] is only ever read by this lane
                hnew[b, j] = hn
                if not math.isfinite(cn):
                    bad[b] = 1
        # Other lanes still read h[s, layer, :] above: publish the new h after a barrier.
        cuda.syncthreads()
        if active:
            for j in range(lane, H, tps):
                h[s, layer, j] = hnew[b, j]
        cuda.syncthreads()
    if active:
        wy = offs[L, 0]
        by = offs[L, 1]
        for o in range(lane, O, tps):
            y = theta[row, by + o]
            for j in range(H):
                y += h[s, L - 1, j] * theta[row, wy + j * O + o]
            pred[s, o] = y
            if not math.isfinite(y):
                bad[b] = 1
    cuda.syncthreads()
    if active:
        if bad[b] != 0:
            # Non-finite state or prediction: reset the slot (weights stay).
            for layer in range(L):
                for j in range(lane, H, tps):
                    h[s, layer, j] = 0.0
                    c[s, layer, j] = 0.0
            for o in range(lane, O, tps):
                pred[s, o] = 0.0
            if lane == 0:
                ring_len[s] = 0
                ring_pos[s] = 0
                out[b, 0] = STATUS_RESET
        elif lane == 0:
            ring_pos[s] = pos + 1 if pos + 1 < T else 0
            ring_len[s] = ring_len[s] + 1 if ring_len[s] < T else T
            out[b, 0] = 0
        for o in range(lane, O, tps):
            out[b, 1 + o] = pred[s, o]


# --- training ------------------------------------------------------------------------


@cuda.jit
def _window_grad_kernel(
    lo, hi, shared, slots, x, scale, theta, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len,
    res, tflag, grad, xs, tg, lv, acts, hs, cs, masks, da, dab, dhn, dcn, bad, tps,
):
    """`lstm_math.window_grad` for batch elements lo..hi-1 (chunk-local scratch index bl).

    res[b] = (loss or NaN, status); tflag[b] = not trained / trained ok / non-finite grad;
    grad[bl] the loss gradient. Scratch as in window_grad: xs (C, T, I), tg (C, T, O)
    targets then d(loss)/dy, lv (C, T, O) loss terms, acts (C, T, L, 5, H), hs/cs
    (C, T+1, L, H), masks (C, T, L, H), da (C, 4H), dab (C, H) gradient from above,
    dhn/dcn (C, L, H) recurrent dh/dc, bad (C,) non-finite flag.
    """
    T = ring_x.shape[1]
    I = ring_x.shape[2]
    L = ring_h.shape[2]
    H = ring_h.shape[3]
    G = 4 * H
    O = tg.shape[2]
    P = grad.shape[1]
    bl, lane = _lane_map(tps)
    b = lo + bl
    clip = hp[HP_INPUT_CLIP]
    tlo = ip[IP_TARGET_LO]
    loss_code = ip[IP_LOSS]
    delta = hp[HP_HUBER_DELTA]
    drop = hp[HP_DROPOUT]
    use_dropout = drop > 0.0 and L > 1
    keep = 1.0 - drop
    inv_keep = 1.0 / keep
    wy = offs[L, 0]
    by = offs[L, 1]
    n = 0
    s = 0
    row = 0
    step = 0
    inv_n = 0.0
    if b < hi:
        s = slots[b]
        if scale[b] > 0.0:
            n = ring_len[s]
        if n == 0 and lane == 0:
            res[b, 0] = _NAN
            res[b, 1] = 0
            tflag[b] = _NOT_TRAINED
    trained = n > 0
    if trained:
        if not shared:
            row = s
        step = adam_t[row] + 1
        inv_n = 1.0 / (n * O)
        start = ring_pos[s] - n
        if start < 0:
            start += T
        for idx in range(lane, n * I, tps):
            k = idx // I
            i = idx - k * I
            xs[bl, k, i] = ring_x[s, (start + k) % T, i]
        for idx in range(lane, n * O, tps):
            k = idx // O
            o = idx - k * O
            if k < n - 1:
                tg[bl, k, o] = ring_x[s, (start + k + 1) % T, tlo + o]
            else:
                tg[bl, k, o] = clip_value(x[b, tlo + o], clip)
        for layer in range(L):
            for j in range(lane, H, tps):
                hs[bl, 0, layer, j] = ring_h[s, start, layer, j]
                cs[bl, 0, layer, j] = ring_c[s, start, layer, j]
                dhn[bl, layer, j] = 0.0
                dcn[bl, layer, j] = 0.0
        for k in range(lane, P, tps):
            grad[bl, k] = 0.0
        if lane == 0:
            bad[bl] = 0
    cuda.syncthreads()

    # Forward with caches; one barrier per (t, layer) so the layer above sees all units.
    for t in range(T):
        for layer in range(L):
            if trained and t < n:
                wx = offs[layer, 0]
                wh = offs[layer, 1]
                bo = offs[layer, 2]
                # layer input: x_t, or the layer below's h_t (dropout-masked in training)
                below = layer - 1 if layer > 0 else 0
                inp = xs[bl, t] if layer == 0 else hs[bl, t + 1, below]
                masked = use_dropout and layer > 0
                for j in range(lane, H, tps):
                    ai, af, ag, ao = _unit_preacts(
                        theta, row, wx, wh, bo, j, H, inp, masks[bl, t, below], masked, hs[bl, t, layer]
                    )
                    ig, fg, gg, og, cn, tc, hn = lstm_cell(ai, af, ag, ao, cs[bl, t, layer, j])
                    acts[bl, t, layer, 0, j] = ig
                    acts[bl, t, layer, 1, j] = fg
                    acts[bl, t, layer, 2, j] = gg
                    acts[bl, t, layer, 3, j] = og
                    acts[bl, t, layer, 4, j] = tc
                    cs[bl, t + 1, layer, j] = cn
                    hs[bl, t + 1, layer, j] = hn
                    if use_dropout and layer < L - 1:
                        if dropout_keep(ip[IP_SEED], step, s, t, layer * H + j, keep):
                            masks[bl, t, layer, j] = inv_keep
                        else:
                            masks[bl, t, layer, j] = 0.0
            cuda.syncthreads()

    # Loss terms and d(loss)/dy, one (t, o) per lane (targets overwritten in place).
    if trained:
        for idx in range(lane, n * O, tps):
            t = idx // O
            o = idx - t * O
            y = theta[row, by + o]
            for j in range(H):
                y += hs[bl, t + 1, L - 1, j] * theta[row, wy + j * O + o]
            r = y - tg[bl, t, o]
            lv[bl, t, o] = loss_value(r, loss_code, delta)
            tg[bl, t, o] = loss_grad(r, loss_code, delta) * inv_n
    cuda.syncthreads()
    if trained:
        if lane == 0:
            total = 0.0
            for t in range(n):
                for o in range(O):
                    total += lv[bl, t, o]
            res[b, 0] = total * inv_n
        # Head gradient: one Wy[j, o] (or by[o]) per lane, summed over the window.
        for idx in range(lane, H * O + O, tps):
            if idx < H * O:
                j = idx // O
                o = idx - j * O
                gacc = grad[bl, wy + idx]
                for t in range(n):
                    gacc += hs[bl, t + 1, L - 1, j] * tg[bl, t, o]
                grad[bl, wy + idx] = gacc
            else:
                o = idx - H * O
                gacc = grad[bl, by + o]
                for t in range(n):
                    gacc += tg[bl, t, o]
                grad[bl, by + o] = gacc

    # Backward through time and layers. Per (t, layer): phase A (lane owns units j) makes
    # da, barrier, then phase B (lane owns gate columns k) accumulates the weight
    # gradients while phase C (units j again) makes dh for t-1 and the layer below.
    for tt in range(T):
        t = T - 1 - tt
        if trained and t < n:
            for j in range(lane, H, tps):
                # Dot products start from their first term, not 0.0: the accumulator keeps
                # the model dtype (float32 stays off the slow fp64 units of most GPUs).
                acc = theta[row, wy + j * O] * tg[bl, t, 0]
                for o in range(1, O):
                    acc += theta[row, wy + j * O + o] * tg[bl, t, o]
                dab[bl, j] = acc
        for ll in range(L):
            layer = L - 1 - ll
            if trained and t < n:
                for j in range(lane, H, tps):
                    d_i, d_f, d_g, d_o, dc_prev = lstm_cell_grad(
                        dab[bl, j] + dhn[bl, layer, j], dcn[bl, layer, j], cs[bl, t, layer, j],
                        acts[bl, t, layer, 0, j], acts[bl, t, layer, 1, j], acts[bl, t, layer, 2, j],
                        acts[bl, t, layer, 3, j], acts[bl, t, layer, 4, j],
                    )
                    da[bl, j] = d_i
                    da[bl, H + j] = d_f
                    da[bl, 2 * H + j] = d_g
                    da[bl, 3 * H + j] = d_o
                    dcn[bl, layer, j] = dc_prev
            cuda.syncthreads()
            if trained and t < n:
                n_in = I if layer == 0 else H
                wx = offs[layer, 0]
                wh = offs[layer, 1]
                bo = offs[layer, 2]
                for k in range(lane, G, tps):
                    dk = da[bl, k]
                    grad[bl, bo + k] += dk
                    for i in range(n_in):
                        if layer == 0:
                            xi = xs[bl, t, i]
                        elif use_dropout:
                            xi = hs[bl, t + 1, layer - 1, i] * masks[bl, t, layer - 1, i]
                        else:
                            xi = hs[bl, t + 1, layer - 1, i]
                        grad[bl, wx + i * G + k] += xi * dk
                    for j in range(H):
                        grad[bl, wh + j * G + k] += hs[bl, t, layer, j] * dk
                for j in range(lane, H, tps):
                    acc = theta[row, wh + j * G] * da[bl, 0]
                    for k in range(1, G):
                        acc += theta[row, wh + j * G + k] * da[bl, k]
                    dhn[bl, layer, j] = acc
                    if layer > 0:
                        acc = theta[row, wx + j * G] * da[bl, 0]
                        for k in range(1, G):
                            acc += theta[row, wx + j * G + k] * da[bl, k]
                        if use_dropout:
                            acc *= masks[bl, t, layer - 1, j]
                        dab[bl, j] = acc
            cuda.syncthreads()

    if trained:
        for k in range(lane, P, tps):
            if not math.isfinite(grad[bl, k]):
                bad[bl] = 1
    cuda.syncthreads()
    if trained and lane == 0:
        if bad[bl] != 0:
            res[b, 1] = STATUS_SKIPPED
            tflag[b] = _TRAINED_BAD
        else:
            res[b, 1] = 0
            tflag[b] = _TRAINED_OK


@cuda.jit
def _update_rows_kernel(lo, hi, slots, scale, theta, m, v, adam_t, hp, ip, grad, tflag, res, part, tps):
    """Per-sensor weights: clipped Adam/SGD of row slots[b] with lr * scale[b] (chunk lo..hi)."""
    bl, lane = _lane_map(tps)
    b = lo + bl
    P = grad.shape[1]
    ok = False
    s = 0
    step = 0
    if b < hi:
        ok = tflag[b] == _TRAINED_OK
    if ok:
        s = slots[b]
        step = adam_t[s] + 1  # read by every lane before lane 0 writes it back (barrier)
        sq = 0.0
        for k in range(lane, P, tps):
            g = float(grad[bl, k])
            sq += g * g
        part[bl, lane] = sq
    cuda.syncthreads()
    if ok:
        norm2 = 0.0
        for i in range(tps):
            norm2 += part[bl, i]
        if not math.isfinite(norm2):
            if lane == 0:
                res[b, 1] = STATUS_SKIPPED
        else:
            gscale = grad_clip_scale(norm2, hp[HP_GRAD_CLIP])
            lr = hp[HP_LR] * scale[b]
            b1 = hp[HP_BETA1]
            b2 = hp[HP_BETA2]
            step_size, eps = adam_step_size(step, lr, b1, b2, hp[HP_EPS])
            wd = hp[HP_WEIGHT_DECAY]
            opt = ip[IP_OPTIMIZER]
            for k in range(lane, P, tps):
                _update_elem(theta, m, v, s, k, grad[bl, k], gscale, wd, opt, lr, b1, b2, step_size, eps)
            if lane == 0:
                adam_t[s] = step


@cuda.jit
def _accumulate_shared_kernel(lo, hi, scale, tflag, grad, acc, count):
    """acc[k] += sum of scale[b] * grad[b, k] over the chunk's finite gradients, in batch order.

    The first chunk (lo == 0) starts the sums; count[0] counts the contributing elements.
    """
    k = cuda.grid(1)
    P = acc.shape[0]
    if k < P:
        if lo == 0:
            acc[k] = 0.0
        a = acc[k]
        for bl in range(hi - lo):
            if tflag[lo + bl] == _TRAINED_OK:
                a += scale[lo + bl] * grad[bl, k]
        acc[k] = a
    if k == 0:
        n = 0
        if lo > 0:
            n = count[0]
        for bl in range(hi - lo):
            if tflag[lo + bl] == _TRAINED_OK:
                n += 1
        count[0] = n


@cuda.jit
def _shared_mean_norm_kernel(acc, count, adam_t, part, blockpart):
    """acc <- acc / count (the mean gradient); per-block partial sums of its squared norm.

    Also stores the step this update will have in count[1], so the update kernel never
    reads adam_t[0] while one of its threads writes it.
    """
    tid = cuda.threadIdx.x
    bs = cuda.blockDim.x
    g = cuda.blockIdx.x * bs + tid
    stride = cuda.gridDim.x * bs
    P = acc.shape[0]
    n = count[0]
    sq = 0.0
    if n > 0:
        inv = 1.0 / n
        for k in range(g, P, stride):
            acc[k] = acc[k] * inv
            gk = float(acc[k])
            sq += gk * gk
    part[g] = sq
    if g == 0:
        count[1] = adam_t[0] + 1
    cuda.syncthreads()
    if tid == 0:
        total = 0.0
        for i in range(bs):
            total += part[cuda.blockIdx.x * bs + i]
        blockpart[cuda.blockIdx.x] = total


@cuda.jit
def _shared_update_kernel(theta, m, v, adam_t, hp, ip, acc, count, blockpart):
    """One clipped Adam/SGD update of the shared row from the mean gradient in acc."""
    if count[0] == 0:
        return
    norm2 = 0.0
    for i in range(blockpart.shape[0]):  # same order in every thread: same norm everywhere
        norm2 += blockpart[i]
    if not math.isfinite(norm2):
        return
    g = cuda.grid(1)
    stride = cuda.gridDim.x * cuda.blockDim.x
    step = count[1]
    gscale = grad_clip_scale(norm2, hp[HP_GRAD_CLIP])
    lr = hp[HP_LR]
    b1 = hp[HP_BETA1]
    b2 = hp[HP_BETA2]
    step_size, eps = adam_step_size(step, lr, b1, b2, hp[HP_EPS])
    wd = hp[HP_WEIGHT_DECAY]
    opt = ip[IP_OPTIMIZER]
    for k in range(g, acc.shape[0], stride):
        _update_elem(theta, m, v, 0, k, acc[k], gscale, wd, opt, lr, b1, b2, step_size, eps)
    if g == 0:
        adam_t[0] = step


# --- host drivers (names mirror kernels_cpu) -------------------------------------------


def _blocks(n, per_block):
    return (n + per_block - 1) // per_block


def forward_batch(slots, shared, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, out, hnew, bad, block_size=128):
    """Launch the forward kernel over device arrays (see `_forward_kernel`)."""
    block_size = min(block_size, FORWARD_MAX_BLOCK)
    B = slots.shape[0]
    tps = threads_per_sensor(h.shape[2], block_size)
    spb = max(1, block_size // tps)
    _forward_kernel[_blocks(B, spb), spb * tps](
        slots, shared, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, out, hnew, bad, tps
    )


def train_batch(shared, slots, x, scale, theta, m, v, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len, res, scratch, chunk, block_size=128):
    """Training step over device arrays: BPTT per chunk, then the per-sensor updates.

    Shared weights: the batch's gradient sum and count are left in scratch.acc / count[0]
    (the caller adds them to the bank's pending sum; `apply_shared_batch` makes the update).
    `scratch` is a `backend_cuda.TrainScratch` sized for `chunk` elements (the caller's memory
    budget) with the `train_geometry` of this block size.
    """
    block_size = min(block_size, TRAIN_MAX_BLOCK)
    B = slots.shape[0]
    H = ring_h.shape[3]
    P = theta.shape[1]
    tps = threads_per_sensor(H, block_size)
    spb = max(1, block_size // tps)
    sc = scratch
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        nb = _blocks(hi - lo, spb)
        _window_grad_kernel[nb, spb * tps](
            lo, hi, shared, slots, x, scale, theta, adam_t, offs, hp, ip, ring_x, ring_h, ring_c, ring_pos, ring_len,
            res, sc.tflag, sc.grad, sc.xs, sc.tg, sc.lv, sc.acts, sc.hs, sc.cs, sc.masks, sc.da, sc.dab, sc.dhn, sc.dcn,
            sc.bad, tps,
        )
        if shared:
            _accumulate_shared_kernel[_blocks(P, block_size), block_size](lo, hi, scale, sc.tflag, sc.grad, sc.acc, sc.count)
        else:
            utps = sc.part.shape[1]
            uspb = max(1, block_size // utps)
            _update_rows_kernel[_blocks(hi - lo, uspb), uspb * utps](
                lo, hi, slots, scale, theta, m, v, adam_t, hp, ip, sc.grad, sc.tflag, res, sc.part, utps
            )


def apply_shared_batch(theta, m, v, adam_t, hp, ip, scratch, block_size=128):
    """One shared update from the gradient sum in scratch.acc over scratch.count[0] windows."""
    block_size = min(block_size, TRAIN_MAX_BLOCK)
    sc = scratch
    nblk = sc.blockpart.shape[0]
    _shared_mean_norm_kernel[nblk, block_size](sc.acc, sc.count, adam_t, sc.norm_part, sc.blockpart)
    _shared_update_kernel[nblk, block_size](theta, m, v, adam_t, hp, ip, sc.acc, sc.count, sc.blockpart)


def kernel_signatures(dtype) -> dict:
    """Argument types of every kernel as the backend launches them, for one model dtype.

    Used by the tests, which check them against the launches and compile them to PTX with the
    real NVVM (no GPU needed).
    """
    from numba import types as nt

    f = nt.float32 if np.dtype(dtype) == np.float32 else nt.float64
    i64, f64, i32, flag = nt.int64, nt.float64, nt.int32, nt.boolean

    def a(t, nd):
        return nt.Array(t, nd, "C")

    return {
        "_forward_kernel": (
            a(i64, 1), flag, a(f, 2), a(f, 2), a(i64, 2), f64, a(f, 3), a(f, 3), a(f, 3), a(f, 4), a(f, 4),
            a(i64, 1), a(i64, 1), a(f, 2), a(f, 2), a(f, 2), a(i32, 1), i64,
        ),
        "_window_grad_kernel": (
            i64, i64, flag, a(i64, 1), a(f, 2), a(f64, 1), a(f, 2), a(i64, 1), a(i64, 2), a(f64, 1), a(i64, 1),
            a(f, 3), a(f, 4), a(f, 4), a(i64, 1), a(i64, 1), a(f64, 2), a(i32, 1), a(f, 2), a(f, 3), a(f, 3),
            a(f64, 3), a(f, 5), a(f, 4), a(f, 4), a(f, 4), a(f, 2), a(f, 2), a(f, 3), a(f, 3), a(i32, 1), i64,
        ),
        "_update_rows_kernel": (
            i64, i64, a(i64, 1), a(f64, 1), a(f, 2), a(f, 2), a(f, 2), a(i64, 1), a(f64, 1), a(i64, 1), a(f, 2),
            a(i32, 1), a(f64, 2), a(f64, 2), i64,
        ),
        "_accumulate_shared_kernel": (i64, i64, a(f64, 1), a(i32, 1), a(f, 2), a(f, 1), a(i64, 1)),
        "_shared_mean_norm_kernel": (a(f, 1), a(i64, 1), a(i64, 1), a(f64, 1), a(f64, 1)),
        "_shared_update_kernel": (
            a(f, 2), a(f, 2), a(f, 2), a(i64, 1), a(f64, 1), a(i64, 1), a(f, 1), a(i64, 1), a(f64, 1),
        ),
    }
