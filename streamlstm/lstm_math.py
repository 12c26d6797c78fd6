"""Per-sensor LSTM math on flat parameter rows, written once for the CPU kernels.

Every function is `register_jitable`: the serial and the `prange` drivers in
`kernels_cpu` call the same code, so the two cannot drift apart. Weight views are made
once per layer (not per element) and every inner loop is a contiguous axpy or dot over
the 4H gates, which LLVM vectorises.

Hyper-parameters travel as two small arrays instead of a dozen scalars:
  hp (float64): HP_* indices below;  ip (int64): IP_* indices below.
"""
import math

import numpy as np
from numba.extending import register_jitable

from .scalar_math import adam_param, adam_step_size, clip_value, dropout_keep, grad_clip_scale, loss_grad, loss_value
from .scalar_math import lstm_cell, lstm_cell_grad, sgd_param

HP_LR, HP_BETA1, HP_BETA2, HP_EPS, HP_GRAD_CLIP, HP_WEIGHT_DECAY, HP_DROPOUT, HP_HUBER_DELTA, HP_INPUT_CLIP = range(9)
HP_SIZE = 9
IP_OPTIMIZER, IP_LOSS, IP_SEED, IP_TARGET_LO = range(4)
IP_SIZE = 4

from .spec import STATUS_OK, STATUS_RESET, STATUS_SKIPPED  # noqa: E402,F401 (one definition; kernels import them from here)


def hyper_arrays(spec):
    """(hp, ip) arrays the kernels take, from a ModelSpec."""
    hp = np.zeros(HP_SIZE, dtype=np.float64)
    hp[HP_LR] = spec.learning_rate
    hp[HP_BETA1] = spec.beta1
    hp[HP_BETA2] = spec.beta2
    hp[HP_EPS] = spec.eps
    hp[HP_GRAD_CLIP] = spec.grad_clip
    hp[HP_WEIGHT_DECAY] = spec.weight_decay
    hp[HP_DROPOUT] = spec.dropout
    hp[HP_HUBER_DELTA] = spec.huber_delta
    hp[HP_INPUT_CLIP] = spec.input_clip
    ip = np.zeros(IP_SIZE, dtype=np.int64)
    ip[IP_OPTIMIZER] = spec.optimizer_code
    ip[IP_LOSS] = spec.loss_code
    ip[IP_SEED] = spec.seed
    ip[IP_TARGET_LO] = spec.target_index
    return hp, ip


@register_jitable
def add_rows(gates, W, v, n):
    """gates += v[:n] @ W[:n], four rows of W per pass over gates: each sum stays in a register
    for four multiply-adds instead of a load and a store per row (2x at H=32). The adds are
    still made one row after another, so the sums are the row-by-row axpys' bit for bit (and
    lstm_block's)."""
    G = gates.shape[0]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        a = v[i]
        b = v[i + 1]
        c = v[i + 2]
        d = v[i + 3]
        r0 = W[i]
        r1 = W[i + 1]
        r2 = W[i + 2]
        r3 = W[i + 3]
        for k in range(G):
            g = gates[k]
            g += a * r0[k]
            g += b * r1[k]
            g += c * r2[k]
            g += d * r3[k]
            gates[k] = g
    for i in range(n4, n):
        a = v[i]
        r0 = W[i]
        for k in range(G):
            gates[k] += a * r0[k]


@register_jitable
def gate_preacts(Wx, inp, n_in, Wh, h, bias, gates):
    """gates = bias + inp[:n_in] @ Wx + h @ Wh, summed in that order (row by row)."""
    G = gates.shape[0]
    for k in range(G):
        gates[k] = bias[k]
    add_rows(gates, Wx, inp, n_in)
    add_rows(gates, Wh, h, h.shape[0])


@register_jitable
def forward_one(theta_row, offs, x, clip, h, c, pred, gates, buf):
    """Advance one sensor's (h, c) (L, H) in place by reading x; write the next prediction."""
    L = h.shape[0]
    H = h.shape[1]
    G = 4 * H
    n_in = x.shape[0]
    for i in range(n_in):
        buf[i] = clip_value(x[i], clip)
    for layer in range(L):
        wx = offs[layer, 0]
        wh = offs[layer, 1]
        bo = offs[layer, 2]
        Wx = theta_row[wx : wx + n_in * G].reshape((n_in, G))
        Wh = theta_row[wh : wh + H * G].reshape((H, G))
        gate_preacts(Wx, buf, n_in, Wh, h[layer], theta_row[bo : bo + G], gates)
        for j in range(H):
            _, _, _, _, cn, _, hn = lstm_cell(gates[j], gates[H + j], gates[2 * H + j], gates[3 * H + j], c[layer, j])
            c[layer, j] = cn
            h[layer, j] = hn
            buf[j] = hn
        n_in = H
    O = pred.shape[0]
    wy = offs[L, 0]
    by = offs[L, 1]
    Wy = theta_row[wy : wy + H * O].reshape((H, O))
    for o in range(O):
        pred[o] = theta_row[by + o]
    for j in range(H):
        hj = h[L - 1, j]
        for o in range(O):
            pred[o] += hj * Wy[j, o]


@register_jitable
def transpose_into(dst, W):
    """dst (G, H) = W (H, G) transposed."""
    for j in range(W.shape[0]):
        for k in range(W.shape[1]):
            dst[k, j] = W[j, k]


@register_jitable
def times_transposed(WT, v, out):
    """out[:H] = W @ v for W (H, G) given as WT (G, H): axpys over H, four rows of WT per pass
    (`add_rows`). With one row per pass each pass waited for the previous one's stores to out
    (H floats are a few vector registers), and that wait is on the backward pass's critical path
    through time: four rows per pass cut the round trips four-fold (H=32: 590 -> 230 ns)."""
    o = out[: WT.shape[1]]  # out may be a longer scratch row
    for j in range(o.shape[0]):
        o[j] = 0.0
    add_rows(o, WT, v, WT.shape[0])


@register_jitable
def add_outer_products(gW, src, src_off, src_layer, masks, use_mask, das, layer, n):
    """gW[i, :] += sum over t < n of a_t[i] * das[t, layer, :], where a_t[i] is
    src[t + src_off, src_layer, i] (times masks[t, src_layer, i] with use_mask).

    A weight gradient is a sum of one outer product per step: summed here after the backward pass,
    four steps per pass over a row of gW, so that the row is loaded and stored a quarter as often
    as with one product per step inside the pass."""
    n4 = n - n % 4
    for i in range(gW.shape[0]):
        row = gW[i]
        for t in range(0, n4, 4):
            a0 = src[t + src_off, src_layer, i]
            a1 = src[t + 1 + src_off, src_layer, i]
            a2 = src[t + 2 + src_off, src_layer, i]
            a3 = src[t + 3 + src_off, src_layer, i]
            if use_mask:
                a0 *= masks[t, src_layer, i]
                a1 *= masks[t + 1, src_layer, i]
                a2 *= masks[t + 2, src_layer, i]
                a3 *= masks[t + 3, src_layer, i]
            d0 = das[t, layer]
            d1 = das[t + 1, layer]
            d2 = das[t + 2, layer]
            d3 = das[t + 3, layer]
            for k in range(row.shape[0]):
                row[k] += (a0 * d0[k] + a1 * d1[k]) + (a2 * d2[k] + a3 * d3[k])
        for t in range(n4, n):
            a0 = src[t + src_off, src_layer, i]
            if use_mask:
                a0 *= masks[t, src_layer, i]
            d0 = das[t, layer]
            for k in range(row.shape[0]):
                row[k] += a0 * d0[k]


@register_jitable
def copy_state(dst, src):
    """dst[:, :] = src for (L, H) state: a loop, because array assignment may copy through a
    temporary, which needs Numba's allocator (the detector pass runs without it)."""
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] = src[i, j]


@register_jitable
def all_finite(a):
    """No early exit: a branch-free AND over every element vectorises (measured on a 4,353-float
    gradient: 0.4 us against 3.5 us for the loop that returns at the first non-finite value,
    which is the case that almost never happens)."""
    ok = True
    for v in a.flat:  # not ravel(): a new array object needs Numba's allocator
        ok &= math.isfinite(v)
    return ok


@register_jitable
def push_and_forward(s, x, theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, gates, buf):
    """One reading of slot s: remember (x, state) in the BPTT ring, then step. Returns status."""
    T = ring_x.shape[1]
    pos = ring_pos[s]
    for i in range(x.shape[0]):
        ring_x[s, pos, i] = clip_value(x[i], clip)
    copy_state(ring_h[s, pos], h[s])
    copy_state(ring_c[s, pos], c[s])
    ring_pos[s] = (pos + 1) % T
    if ring_len[s] < T:
        ring_len[s] += 1
    forward_one(theta_row, offs, x, clip, h[s], c[s], pred[s], gates, buf)
    if all_finite(pred[s]) and all_finite(c[s]):
        return STATUS_OK
    reset_slot(s, h, c, ring_len, ring_pos, pred)
    return STATUS_RESET


@register_jitable
def reset_slot(s, h, c, ring_len, ring_pos, pred):
    h[s] = 0.0
    c[s] = 0.0
    ring_len[s] = 0
    ring_pos[s] = 0
    pred[s] = 0.0


@register_jitable
def window_grad(
    theta_row, offs, hp, ip, step, s, ring_x, ring_h, ring_c, pos, n, x_new, grad, xs, tg, acts, das, hs, cs, masks, rec,
    bufs, wt,
):
    """Loss and gradient (into grad) of slot s's last n readings plus x_new as final target.

    Scratch: xs (T, I), tg (T, O), acts (T, L, 5, H) = i, f, g, o, tanh(c), das (T, L, 4H) the
    gate pre-activation gradients (kept for the weight gradients, summed after the pass),
    hs/cs (T+1, L, H), masks (T, L, H), rec (2, L, H) recurrent dh/dc, bufs (5, max(4H, I))
    rows: gates, layer input, gradient from above, dh and dc of the current step;
    wt (L, 2, 4H, H): Wh and (above layer 0) Wx transposed, so that the backward products
    W @ da are axpys over H that vectorise (as dot products they are chains of dependent adds:
    measured 60% of the window's time).
    """
    T = ring_x.shape[1]
    I = ring_x.shape[2]
    L = hs.shape[1]
    H = hs.shape[2]
    G = 4 * H
    O = tg.shape[1]
    clip = hp[HP_INPUT_CLIP]
    tlo = ip[IP_TARGET_LO]
    loss_code = ip[IP_LOSS]
    delta = hp[HP_HUBER_DELTA]
    drop = hp[HP_DROPOUT]
    use_dropout = drop > 0.0 and L > 1
    keep = 1.0 - drop
    inv_keep = 1.0 / keep
    gates = bufs[0]
    inp = bufs[1]
    d_above = bufs[2]
    start = (pos - n) % T
    for k in range(n):
        idx = (start + k) % T
        for i in range(I):
            xs[k, i] = ring_x[s, idx, i]
    for k in range(n - 1):
        for o in range(O):
            tg[k, o] = xs[k + 1, tlo + o]
    for o in range(O):
        tg[n - 1, o] = clip_value(x_new[tlo + o], clip)
    copy_state(hs[0], ring_h[s, start])
    copy_state(cs[0], ring_c[s, start])

    # Forward with caches.
    for t in range(n):
        n_in = I
        for i in range(I):
            inp[i] = xs[t, i]
        for layer in range(L):
            wx = offs[layer, 0]
            wh = offs[layer, 1]
            bo = offs[layer, 2]
            Wx = theta_row[wx : wx + n_in * G].reshape((n_in, G))
            Wh = theta_row[wh : wh + H * G].reshape((H, G))
            gate_preacts(Wx, inp, n_in, Wh, hs[t, layer], theta_row[bo : bo + G], gates)
            for j in range(H):
                ig, fg, gg, og, cn, tc, hn = lstm_cell(
                    gates[j], gates[H + j], gates[2 * H + j], gates[3 * H + j], cs[t, layer, j]
                )
                acts[t, layer, 0, j] = ig
                acts[t, layer, 1, j] = fg
                acts[t, layer, 2, j] = gg
                acts[t, layer, 3, j] = og
                acts[t, layer, 4, j] = tc
                cs[t + 1, layer, j] = cn
                hs[t + 1, layer, j] = hn
                inp[j] = hn
            if use_dropout and layer < L - 1:
                for j in range(H):
                    if dropout_keep(ip[IP_SEED], step, s, t, layer * H + j, keep):
                        masks[t, layer, j] = inv_keep
                    else:
                        masks[t, layer, j] = 0.0
                    inp[j] *= masks[t, layer, j]
            n_in = H

    # Loss and head gradient.
    wy = offs[L, 0]
    by = offs[L, 1]
    Wy = theta_row[wy : wy + H * O].reshape((H, O))
    gWy = grad[wy : wy + H * O].reshape((H, O))
    grad[:] = 0.0
    total = 0.0
    inv_n = 1.0 / (n * O)
    dys = tg  # targets are read once, below, then overwritten by d(loss)/dy
    for t in range(n):
        for o in range(O):
            y = theta_row[by + o]
            for j in range(H):
                y += hs[t + 1, L - 1, j] * Wy[j, o]
            r = y - tg[t, o]
            total += loss_value(r, loss_code, delta)
            dys[t, o] = loss_grad(r, loss_code, delta) * inv_n
        for o in range(O):
            grad[by + o] += dys[t, o]
        for j in range(H):
            hj = hs[t + 1, L - 1, j]
            for o in range(O):
                gWy[j, o] += hj * dys[t, o]

    # Backward through time and layers.
    for layer in range(L):
        wh = offs[layer, 1]
        Wh = theta_row[wh : wh + H * G].reshape((H, G))
        transpose_into(wt[layer, 0], Wh)
        if layer > 0:
            wx = offs[layer, 0]
            transpose_into(wt[layer, 1], theta_row[wx : wx + H * G].reshape((H, G)))
    dh_rec = bufs[3]
    dc_rec = bufs[4]
    dh_next = rec[0]
    dc_next = rec[1]
    dh_next[:] = 0.0
    dc_next[:] = 0.0
    for t in range(n - 1, -1, -1):
        for j in range(H):
            acc = 0.0
            for o in range(O):
                acc += Wy[j, o] * dys[t, o]
            d_above[j] = acc
        for layer in range(L - 1, -1, -1):
            da = das[t, layer]
            for j in range(H):
                da[j], da[H + j], da[2 * H + j], da[3 * H + j], dc_rec[j] = lstm_cell_grad(
                    d_above[j] + dh_next[layer, j], dc_next[layer, j], cs[t, layer, j],
                    acts[t, layer, 0, j], acts[t, layer, 1, j], acts[t, layer, 2, j], acts[t, layer, 3, j],
                    acts[t, layer, 4, j],
                )
            times_transposed(wt[layer, 0], da, dh_rec)
            if layer > 0:
                times_transposed(wt[layer, 1], da, d_above)
                if use_dropout:
                    for i in range(H):
                        d_above[i] *= masks[t, layer - 1, i]
            for j in range(H):
                dh_next[layer, j] = dh_rec[j]
                dc_next[layer, j] = dc_rec[j]

    # Weight gradients: per layer, one outer product per step with the layer's input (x_t for
    # layer 0, else the lower layer's masked h) and with h of the step before.
    for layer in range(L):
        n_in = I if layer == 0 else H
        wx = offs[layer, 0]
        wh = offs[layer, 1]
        bo = offs[layer, 2]
        for t in range(n):
            for k in range(G):
                grad[bo + k] += das[t, layer, k]
        gWx = grad[wx : wx + n_in * G].reshape((n_in, G))
        gWh = grad[wh : wh + H * G].reshape((H, G))
        if layer == 0:
            add_outer_products(gWx, xs.reshape((T, 1, I)), 0, 0, masks, False, das, layer, n)
        else:
            add_outer_products(gWx, hs, 1, layer - 1, masks, use_dropout, das, layer, n)
        add_outer_products(gWh, hs, 0, layer, masks, False, das, layer, n)
    return total * inv_n


@register_jitable
def squared_norm(a):
    """sum(a**2) in float64 as four interleaved sums: one running sum is a chain of dependent
    adds, 4 cycles each (a 4,353-parameter model: 17,000 cycles per update)."""
    n = a.shape[0]
    n4 = n - n % 4
    s0 = s1 = s2 = s3 = 0.0
    for k in range(0, n4, 4):
        g0 = float(a[k])
        g1 = float(a[k + 1])
        g2 = float(a[k + 2])
        g3 = float(a[k + 3])
        s0 += g0 * g0
        s1 += g1 * g1
        s2 += g2 * g2
        s3 += g3 * g3
    for k in range(n4, n):
        g0 = float(a[k])
        s0 += g0 * g0
    return (s0 + s1) + (s2 + s3)


@register_jitable
def apply_update(theta_row, m_row, v_row, grad, step, lr, hp, opt_code):
    """Clip the gradient norm, add L2, then Adam or SGD in place. False if grad not finite."""
    norm2 = squared_norm(grad)
    if not math.isfinite(norm2):
        return False
    scale = grad_clip_scale(norm2, hp[HP_GRAD_CLIP])
    wd = hp[HP_WEIGHT_DECAY]
    if opt_code == 0:
        b1 = hp[HP_BETA1]
        b2 = hp[HP_BETA2]
        step_size, eps = adam_step_size(step, lr, b1, b2, hp[HP_EPS])
        for k in range(grad.shape[0]):
            theta_row[k], m_row[k], v_row[k] = adam_param(
                theta_row[k], m_row[k], v_row[k], grad[k], scale, wd, b1, b2, step_size, eps
            )
    else:
        for k in range(grad.shape[0]):
            theta_row[k] = sgd_param(theta_row[k], grad[k], scale, wd, lr)
    return True
