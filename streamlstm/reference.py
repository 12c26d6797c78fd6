"""Pure-NumPy LSTM: forward, loss, truncated-BPTT backward and optimizer step.

This is the readable oracle every other backend is tested against, and the `numpy`
backend. It works one sensor at a time; `step_*` functions at the bottom apply it to a
batch with exactly the semantics of the kernels (see `bank.py` for the state arrays).
It is written independently of the kernels, over whole vectors, with the formulas the
kernels take from `scalar_math` one element at a time (`lstm_cell`, `lstm_cell_grad`,
`adam_param` / `sgd_param`); tests/test_scalar_math.py holds the two together.
"""
from __future__ import annotations

import numpy as np

from .scalar_math import TANH_COEFFS, dropout_keep
from .spec import LOSS_MSE, OPT_ADAM, STATUS_RESET, STATUS_SKIPPED, ModelSpec, unpack


def tanh(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32:
        return np.tanh(x)
    clamp, tiny, (a1, a3, a5, a7, a9, a11, a13), (b0, b2, b4, b6) = TANH_COEFFS
    xc = np.clip(x, -clamp, clamp)
    x2 = xc * xc
    p = ((((((x2 * a13 + a11) * x2 + a9) * x2 + a7) * x2 + a5) * x2 + a3) * x2 + a1) * xc
    q = ((x2 * b6 + b4) * x2 + b2) * x2 + b0
    return np.where(np.abs(xc) < tiny, xc, p / q).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        half = np.float32(0.5)
        return half + half * tanh(half * x)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def cell(Wx, Wh, b, inp, h, c):
    """One LSTM cell step; returns new (h, c) and the cache the backward pass needs."""
    H = h.shape[0]
    a = b + inp @ Wx + h @ Wh
    i = sigmoid(a[:H])
    f = sigmoid(a[H : 2 * H])
    g = tanh(a[2 * H : 3 * H])
    o = sigmoid(a[3 * H :])
    c_new = f * c + i * g
    tc = tanh(c_new)
    h_new = o * tc
    # Copies: callers update h and c in place, the backward pass needs the old values.
    return h_new, c_new, (inp.copy(), h.copy(), c.copy(), i, f, g, o, tc)


def forward_step(spec: ModelSpec, theta, x, h, c):
    """Advance one sensor by one reading. x: (I,), h/c: (L, H). Returns (y, h, c)."""
    p = unpack(spec, theta)
    x = np.clip(x.astype(theta.dtype), -spec.input_clip, spec.input_clip)
    h_out, c_out = np.empty_like(h), np.empty_like(c)
    inp = x
    for layer in range(spec.num_layers):
        h_out[layer], c_out[layer], _ = cell(p["Wx"][layer], p["Wh"][layer], p["b"][layer], inp, h[layer], c[layer])
        inp = h_out[layer]
    y = p["by"] + inp @ p["Wy"]
    return y, h_out, c_out


def dropout_scale(spec: ModelSpec, step: int, sensor: int, t: int, layer: int) -> np.ndarray:
    """Mask * 1/keep applied to layer `layer`'s output when it feeds layer + 1."""
    keep = 1.0 - spec.dropout
    H = spec.hidden_size
    bits = [dropout_keep(spec.seed, step, sensor, t, layer * H + j, keep) for j in range(H)]
    return np.asarray(bits, dtype=spec.np_dtype) / spec.np_dtype.type(keep)


def window_loss_grad(spec: ModelSpec, theta, xs, targets, h0, c0, step=0, sensor=0):
    """Loss (mean over steps and outputs) and its gradient over one BPTT window.

    xs: (T, I) inputs, targets: (T, O), h0/c0: (L, H) state before xs[0]. `step` and
    `sensor` key the dropout masks (unused without dropout).
    """
    p = unpack(spec, theta)
    dt = theta.dtype
    L, T = spec.num_layers, xs.shape[0]
    xs = np.clip(xs.astype(dt), -spec.input_clip, spec.input_clip)
    use_dropout = spec.dropout > 0 and L > 1
    caches = [[None] * L for _ in range(T)]
    masks = [[None] * L for _ in range(T)]
    tops = np.empty((T, spec.hidden_size), dtype=dt)
    h, c = h0.astype(dt).copy(), c0.astype(dt).copy()
    for t in range(T):
        inp = xs[t]
        for layer in range(L):
            h[layer], c[layer], caches[t][layer] = cell(
                p["Wx"][layer], p["Wh"][layer], p["b"][layer], inp, h[layer], c[layer]
            )
            inp = h[layer]
            if use_dropout and layer < L - 1:
                masks[t][layer] = dropout_scale(spec, step, sensor, t, layer)
                inp = inp * masks[t][layer]
        tops[t] = inp
    ys = p["by"] + tops @ p["Wy"]
    r = ys - targets.astype(dt)
    n = r.size
    if spec.loss_code == LOSS_MSE:
        loss = float(np.mean(r * r))
        dy = (2.0 * r / n).astype(dt)
    else:
        d = spec.huber_delta
        a = np.abs(r)
        loss = float(np.mean(np.where(a <= d, 0.5 * a * a, d * (a - 0.5 * d))))
        dy = (np.clip(r, -d, d) / n).astype(dt)

    grad = np.zeros_like(theta)
    g = unpack(spec, grad)
    g["Wy"][...] = tops.T @ dy
    g["by"][...] = dy.sum(axis=0)
    H = spec.hidden_size
    dh_next = np.zeros((L, H), dtype=dt)
    dc_next = np.zeros((L, H), dtype=dt)
    for t in range(T - 1, -1, -1):
        d_from_above = dy[t] @ p["Wy"].T
        for layer in range(L - 1, -1, -1):
            inp, h_prev, c_prev, i, f, gg, o, tc = caches[t][layer]
            dh = d_from_above + dh_next[layer]
            dc = dh * o * (1 - tc * tc) + dc_next[layer]
            da = np.concatenate(
                [dc * gg * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - gg * gg), dh * tc * o * (1 - o)]
            )
            g["Wx"][layer] += np.outer(inp, da)
            g["Wh"][layer] += np.outer(h_prev, da)
            g["b"][layer] += da
            dh_next[layer] = p["Wh"][layer] @ da
            dc_next[layer] = dc * f
            d_from_above = p["Wx"][layer] @ da
            if layer > 0 and masks[t][layer - 1] is not None:
                d_from_above = d_from_above * masks[t][layer - 1]
    return loss, grad


def objective_grad(spec: ModelSpec, theta, xs, targets, h0, c0, step=0, sensor=0):
    """Window loss plus the L2 term 0.5 * weight_decay * |theta|^2, and its gradient.

    The optimizer adds `weight_decay * theta` to the (clipped) loss gradient, i.e. it
    descends this objective; the finite-difference tests check it.
    """
    loss, grad = window_loss_grad(spec, theta, xs, targets, h0, c0, step, sensor)
    wd = spec.weight_decay
    return loss + 0.5 * wd * float(np.sum(theta.astype(np.float64) ** 2)), grad + theta.dtype.type(wd) * theta


def apply_update(spec: ModelSpec, theta, m, v, grad, step, lr):
    """Clip the loss gradient's norm, add L2, then Adam (bias-corrected) or SGD, in place.

    `step` is the step number after this update (>= 1). Returns False (nothing changed)
    when the gradient is not finite.
    """
    norm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2)))
    if not np.isfinite(norm):
        return False
    if spec.grad_clip > 0 and norm > spec.grad_clip:
        grad = grad * theta.dtype.type(spec.grad_clip / norm)
    if spec.weight_decay > 0:
        grad = grad + theta.dtype.type(spec.weight_decay) * theta
    if spec.optimizer_code == OPT_ADAM:
        b1, b2 = spec.beta1, spec.beta2
        m *= theta.dtype.type(b1)
        m += theta.dtype.type(1 - b1) * grad
        v *= theta.dtype.type(b2)
        v += theta.dtype.type(1 - b2) * grad * grad
        c1 = 1.0 - b1**step
        c2 = np.sqrt(1.0 - b2**step)
        theta -= (lr * c2 / c1) * m / (np.sqrt(v) + spec.eps * c2)
    else:
        theta -= theta.dtype.type(lr) * grad
    return True


# --- batched semantics shared with the kernels -------------------------------------


def _window(spec: ModelSpec, state, s: int, x_new):
    """Inputs, targets and initial state of sensor slot s's current BPTT window."""
    n = int(state.ring_len[s])
    T = spec.window
    idx = [(int(state.ring_pos[s]) - n + k) % T for k in range(n)]
    xs = state.ring_x[s, idx]
    lo, hi = spec.target_index, spec.target_index + spec.output_size
    nxt = np.concatenate([xs[1:], np.clip(x_new, -spec.input_clip, spec.input_clip)[None].astype(xs.dtype)])
    return xs, nxt[:, lo:hi], state.ring_h[s, idx[0]], state.ring_c[s, idx[0]]


def step_train(spec: ModelSpec, state, slots, x_new, lr_scale, shared: bool):
    """Training half of a batched step: one window per slot with lr_scale > 0.

    Shared weights: the scale-weighted gradients join state.grad_sum / grad_count (the update
    is `apply_shared`'s, once per segment of rounds). Per-sensor weights: each slot's own
    update with lr * scale. Returns (loss, status) per element (loss NaN where nothing was
    trained).
    """
    B = len(slots)
    losses = np.full(B, np.nan)
    status = np.zeros(B, dtype=np.int64)
    for b in range(B):
        s = int(slots[b])
        if lr_scale[b] <= 0 or state.ring_len[s] == 0:
            continue
        row = 0 if shared else s
        step = int(state.adam_t[row]) + 1
        xs, tg, h0, c0 = _window(spec, state, s, x_new[b])
        loss, grad = window_loss_grad(spec, state.theta[row], xs, tg, h0, c0, step=step, sensor=s)
        losses[b] = loss
        if shared:
            if not np.all(np.isfinite(grad)):
                status[b] = STATUS_SKIPPED
                continue
            state.grad_sum[0] += grad * grad.dtype.type(lr_scale[b])
            state.grad_count[0] += 1
        elif apply_update(spec, state.theta[s], state.m[s], state.v[s], grad, step, spec.learning_rate * lr_scale[b]):
            state.adam_t[s] = step
        else:
            status[b] = STATUS_SKIPPED
    return losses, status


def apply_shared(spec: ModelSpec, state):
    """Shared weights: one update from the mean of the pending gradients, which it clears."""
    n = int(state.grad_count[0])
    if n == 0:
        return
    step = int(state.adam_t[0]) + 1
    mean = state.grad_sum[0] / state.grad_sum.dtype.type(n)
    if apply_update(spec, state.theta[0], state.m[0], state.v[0], mean, step, spec.learning_rate):
        state.adam_t[0] = step
    state.grad_sum[0] = 0
    state.grad_count[0] = 0


def step_forward(spec: ModelSpec, state, slots, x_new, shared: bool):
    """Forward half: push each reading into its slot's history, advance h/c, predict the next.

    Returns the status per element (STATUS_RESET where the state had to be reset).
    """
    T = spec.window
    status = np.zeros(len(slots), dtype=np.int64)
    for b in range(len(slots)):
        s = int(slots[b])
        row = 0 if shared else s
        x = np.clip(x_new[b].astype(state.theta.dtype), -spec.input_clip, spec.input_clip)
        pos = int(state.ring_pos[s])
        state.ring_x[s, pos] = x
        state.ring_h[s, pos] = state.h[s]
        state.ring_c[s, pos] = state.c[s]
        state.ring_pos[s] = (pos + 1) % T
        state.ring_len[s] = min(int(state.ring_len[s]) + 1, T)
        y, h, c = forward_step(spec, state.theta[row], x, state.h[s], state.c[s])
        if np.all(np.isfinite(y)) and np.all(np.isfinite(c)):
            state.h[s], state.c[s], state.pred[s] = h, c, y
        else:
            state.reset_slot(s)
            status[b] = STATUS_RESET
    return status
