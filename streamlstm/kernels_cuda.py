"""Numba CUDA kernels and the `cuda` backend: batched forward and training steps.

Same math and semantics as `kernels_cpu` / `reference.step_*`; the scalar helpers
(tanh_act, sigmoid_act, loss_grad, loss_value, clip_value, dropout_keep, adam_scale) are
the very same `scalar_math` functions (generic-target overloads, which the CUDA typing
context accepts), and the per-element expressions mirror `lstm_math` line by line.

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
exceptions, lists or allocations (the real compiler is stricter than the simulator).
"""
from __future__ import annotations

import math
import weakref

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
    hyper_arrays,
)
from .scalar_math import adam_scale, clip_value, dropout_keep, loss_grad, loss_value, sigmoid_act, tanh_act

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
        g = gk * gscale + wd * theta[row, k]
        mk = b1 * m[row, k] + (1.0 - b1) * g
        vk = b2 * v[row, k] + (1.0 - b2) * g * g
        m[row, k] = mk
        v[row, k] = vk
        theta[row, k] -= step_size * mk / (math.sqrt(vk) + eps)
    else:
        theta[row, k] -= lr * (gk * gscale + wd * theta[row, k])


@cuda.jit(device=True)
def _clip_scale(norm2, clip):
    scale = 1.0
    norm = math.sqrt(norm2)
    if clip > 0.0 and norm > clip:
        scale = clip / norm
    return scale


# --- forward -------------------------------------------------------------------------


@cuda.jit
def _forward_kernel(slots, shared, x, theta, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, out, hnew, bad, tps):
    """`lstm_math.push_and_forward` for every batch element; out[b] = (status, pred[s])."""
    B = slots.shape[0]
    L = h.shape[1]
    H = h.shape[2]
    G = 4 * H
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
            n_in = I if layer == 0 else H
            wx = offs[layer, 0]
            wh = offs[layer, 1]
            bo = offs[layer, 2]
            for j in range(lane, H, tps):
                # Same summation order as lstm_math.gate_preacts: bias, inputs, recurrence.
                ai = theta[row, bo + j]
                af = theta[row, bo + H + j]
                ag = theta[row, bo + 2 * H + j]
                ao = theta[row, bo + 3 * H + j]
                for i in range(n_in):
                    if layer == 0:
                        xi = ring_x[s, pos, i]  # the clipped reading, in the model dtype
                    else:
                        xi = h[s, layer - 1, i]
                    base = wx + i * G + j
                    ai += xi * theta[row, base]
                    af += xi * theta[row, base + H]
                    ag += xi * theta[row, base + 2 * H]
                    ao += xi * theta[row, base + 3 * H]
                for k in range(H):
                    hk = h[s, layer, k]
                    base = wh + k * G + j
                    ai += hk * theta[row, base]
                    af += hk * theta[row, base + H]
                    ag += hk * theta[row, base + 2 * H]
                    ao += hk * theta[row, base + 3 * H]
                ig = sigmoid_act(ai)
                fg = sigmoid_act(af)
                gg = tanh_act(ag)
                og = sigmoid_act(ao)
                cn = fg * c[s, layer, j] + ig * gg
                c[s, layer, j] = cn  # c[s, layer, j] is only ever read by this lane
                hnew[b, j] = og * tanh_act(cn)
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
                n_in = I if layer == 0 else H
                wx = offs[layer, 0]
                wh = offs[layer, 1]
                bo = offs[layer, 2]
                for j in range(lane, H, tps):
                    ai = theta[row, bo + j]
                    af = theta[row, bo + H + j]
                    ag = theta[row, bo + 2 * H + j]
                    ao = theta[row, bo + 3 * H + j]
                    for i in range(n_in):
                        if layer == 0:
                            xi = xs[bl, t, i]
                        elif use_dropout:
                            xi = hs[bl, t + 1, layer - 1, i] * masks[bl, t, layer - 1, i]
                        else:
                            xi = hs[bl, t + 1, layer - 1, i]
                        base = wx + i * G + j
                        ai += xi * theta[row, base]
                        af += xi * theta[row, base + H]
                        ag += xi * theta[row, base + 2 * H]
                        ao += xi * theta[row, base + 3 * H]
                    for k in range(H):
                        hk = hs[bl, t, layer, k]
                        base = wh + k * G + j
                        ai += hk * theta[row, base]
                        af += hk * theta[row, base + H]
                        ag += hk * theta[row, base + 2 * H]
                        ao += hk * theta[row, base + 3 * H]
                    ig = sigmoid_act(ai)
                    fg = sigmoid_act(af)
                    gg = tanh_act(ag)
                    og = sigmoid_act(ao)
                    cn = fg * cs[bl, t, layer, j] + ig * gg
                    tc = tanh_act(cn)
                    acts[bl, t, layer, 0, j] = ig
                    acts[bl, t, layer, 1, j] = fg
                    acts[bl, t, layer, 2, j] = gg
                    acts[bl, t, layer, 3, j] = og
                    acts[bl, t, layer, 4, j] = tc
                    cs[bl, t + 1, layer, j] = cn
                    hs[bl, t + 1, layer, j] = og * tc
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
                    ig = acts[bl, t, layer, 0, j]
                    fg = acts[bl, t, layer, 1, j]
                    gg = acts[bl, t, layer, 2, j]
                    og = acts[bl, t, layer, 3, j]
                    tc = acts[bl, t, layer, 4, j]
                    dh = dab[bl, j] + dhn[bl, layer, j]
                    dc = dh * og * (1.0 - tc * tc) + dcn[bl, layer, j]
                    da[bl, j] = dc * gg * ig * (1.0 - ig)
                    da[bl, H + j] = dc * cs[bl, t, layer, j] * fg * (1.0 - fg)
                    da[bl, 2 * H + j] = dc * ig * (1.0 - gg * gg)
                    da[bl, 3 * H + j] = dh * tc * og * (1.0 - og)
                    dcn[bl, layer, j] = dc * fg
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
            gscale = _clip_scale(norm2, hp[HP_GRAD_CLIP])
            lr = hp[HP_LR] * scale[b]
            b1 = hp[HP_BETA1]
            b2 = hp[HP_BETA2]
            c1, c2 = adam_scale(step, b1, b2)
            step_size = lr * c2 / c1
            eps = hp[HP_EPS] * c2
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
    gscale = _clip_scale(norm2, hp[HP_GRAD_CLIP])
    lr = hp[HP_LR]
    b1 = hp[HP_BETA1]
    b2 = hp[HP_BETA2]
    c1, c2 = adam_scale(step, b1, b2)
    step_size = lr * c2 / c1
    eps = hp[HP_EPS] * c2
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
    """Training step over device arrays: BPTT per chunk, then the update(s).

    `scratch` is a `TrainScratch` sized for `chunk` elements (the caller's memory budget).
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
    if shared:
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


# --- backend ---------------------------------------------------------------------------

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
        block = min(self.block_size, TRAIN_MAX_BLOCK)
        utps = threads_per_sensor(spec.num_params, block)
        limit = max(1, self.scratch_bytes // scratch_bytes_per_sensor(spec, utps))
        if self.train_chunk:
            limit = min(limit, self.train_chunk)
        chunk = min(B, limit)
        sc = dev.scratch
        if sc is None or sc.chunk < chunk or sc.batch < B:
            # Grow geometrically (within the budget): micro-batch sizes wander, and
            # reallocating at every new maximum would thrash device allocations.
            old_chunk, old_batch = (sc.chunk, sc.batch) if sc is not None else (0, 0)
            norm_blocks = max(1, min(MAX_NORM_BLOCKS, _blocks(spec.num_params, block)))
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
        train_batch(
            bool(bank.shared), d_slots, d_x, d_scale, a["theta"], a["m"], a["v"], a["adam_t"], dev.offs, dev.hp, dev.ip,
            a["ring_x"], a["ring_h"], a["ring_c"], a["ring_pos"], a["ring_len"], res, sc, chunk, self.block_size,
        )
        host = res.copy_to_host()
        return host[:, 0].copy(), host[:, 1].astype(np.int64)

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
        forward_batch(
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
