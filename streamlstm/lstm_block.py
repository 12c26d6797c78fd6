"""Shared-weight LSTM forward for a block of sensors at once: the GEMM shape.

With shared weights every sensor multiplies its [input, h] by the same (I + H, 4H) matrix.
`lstm_math.forward_one` does that one sensor at a time (a matrix-vector product: each weight
comes from L2 for one multiply-add). Here a block of n sensors (`block_rows`: 16 at H=64
float32) fills an (n, 4H) gate tile: `gate_tile` sums 4 sensors x 16 gates at a time over all
weight rows in registers (each weight vector loaded once serves four sensors), so the product
runs near the multiply and add ports' rate; `loop_gates` covers what the tile leaves (rows or
columns past its multiples). While a block computes, the rows the next block will touch (its
BPTT ring rows, cold, and its state) are prefetched (`prefetch`).

The same numbers as `forward_one`, bit for bit: each pre-activation is summed in the same
order (bias, input rows, hidden rows; no fused multiply-add), the activations are the same
`scalar_math` functions, the head sums h in the same order. The per-sensor path and this one
can alternate (tests assert equality), and the per-sensor path stays the oracle.

Every function is `register_jitable` and allocation-free (scratch comes in), so kernels compiled
with `_nrt=False` can call it. Speed needs the calling kernel compiled with
`error_model="numpy"`: under Numba's default ("python") the float32 tanh's division carries a
divide-by-zero check whose exception exit keeps the activation loops scalar (measured 9 ns per
activation against 0.8-1.8 ns vectorised). Nothing here can divide by zero (tanh's denominator
is >= 0.0049 or NaN, the float64 sigmoid's >= 1, the ring length >= 1), so the results are the
same under either model.

Scratch (dtype of the state):
  gates (n, 4H)             the block's gate tile
  z     (n, max(I, H) + H)  per sensor [layer input, h of the layer]: the tile's left operand
"""
import math

from numba.extending import register_jitable

from .gate_tile import COLS as TILE_COLS
from .gate_tile import ROWS as TILE_ROWS
from .gate_tile import lanes, tile_gates
from .lstm_math import STATUS_OK, STATUS_RESET, add_rows, copy_state, reset_slot
from .prefetch import prefetch_array
from .scalar_math import clip_value, sigmoid_act, tanh_act

TILE_BYTES = 16384  # the gate tile's share of a 32 KiB L1: the weight rows and z need the rest


@register_jitable
def copy_row(dst, src):
    """dst[:] = src as a loop (array assignment may go through a temporary: the allocator)."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@register_jitable
def block_gates(W, bias, z, n, gates):
    """gates[r] = bias + z[r, :K] @ W for r < n; W (K, 4H) is [Wx; Wh] (contiguous in the
    layout). The register tile (`gate_tile`) takes the rows and columns it covers (all of them
    at H=64, n=16), `loop_gates` the rest; both sum bias, then rows 0..K-1 in order."""
    G = W.shape[1]
    n_rows = n - n % TILE_ROWS
    n_cols = G - G % (TILE_COLS * lanes(gates.itemsize))
    if n_rows > 0 and n_cols > 0:
        tile_gates(W, bias, z, gates, n_rows, n_cols)
    else:
        n_rows = 0
    loop_gates(W, bias, z, n_rows, n, 0, G, gates)
    loop_gates(W, bias, z, 0, n_rows, n_cols, G, gates)


@register_jitable
def loop_gates(W, bias, z, r_lo, r_hi, g_lo, g_hi, gates):
    """block_gates for rows r_lo..r_hi and columns g_lo..g_hi (the tile's leftovers): each row
    as `lstm_math.add_rows` sums a single sensor, bias then weight rows in order."""
    if r_lo >= r_hi or g_lo >= g_hi:
        return
    b = bias[g_lo:g_hi]
    Wc = W[:, g_lo:g_hi]
    for r in range(r_lo, r_hi):
        row = gates[r, g_lo:g_hi]
        for g in range(row.shape[0]):
            row[g] = b[g]
        add_rows(row, Wc, z[r], W.shape[0])


@register_jitable
def cell_row(g, cs, hs, zr):
    """Activations and cell update of one sensor's layer from its gate pre-activations g (4H):
    cs, hs (H) advance in place, the new h also goes to zr[:H] (the next layer's input, or the
    head's). Returns whether every new c is finite: an and-reduction inside the vectorised loop
    instead of a pass of its own over the state afterwards.

    The loop runs over views that start at index 0: with an index like `H + j`, which LLVM
    cannot prove non-negative, Numba's wraparound for negative indices keeps the loop scalar."""
    H = cs.shape[0]
    ig = g[:H]
    fg = g[H : 2 * H]
    gg = g[2 * H : 3 * H]
    og = g[3 * H : 4 * H]
    finite = True
    for j in range(H):
        cn = sigmoid_act(fg[j]) * cs[j] + sigmoid_act(ig[j]) * tanh_act(gg[j])
        cs[j] = cn
        hn = sigmoid_act(og[j]) * tanh_act(cn)
        hs[j] = hn
        zr[j] = hn
        finite = finite & (abs(cn) < math.inf)
    return finite


@register_jitable
def block_head(theta_row, offs, slots, n, H, z, pred):
    """pred[slots[r]] = by + h_top @ Wy with h_top in z[r, :H], summed in forward_one's order;
    four sensors side by side, so that four independent sums share each weight."""
    L = offs.shape[0] - 1
    O = pred.shape[1]
    wy = offs[L, 0]
    by = offs[L, 1]
    Wy = theta_row[wy : wy + H * O].reshape((H, O))
    for o in range(O):
        r = 0
        while r + 4 <= n:
            a0 = a1 = a2 = a3 = theta_row[by + o]
            for j in range(H):
                w = Wy[j, o]
                a0 += z[r, j] * w
                a1 += z[r + 1, j] * w
                a2 += z[r + 2, j] * w
                a3 += z[r + 3, j] * w
            pred[slots[r], o] = a0
            pred[slots[r + 1], o] = a1
            pred[slots[r + 2], o] = a2
            pred[slots[r + 3], o] = a3
            r += 4
        while r < n:
            a = theta_row[by + o]
            for j in range(H):
                a += z[r, j] * Wy[j, o]
            pred[slots[r], o] = a
            r += 1


@register_jitable
def push_block(slots, x, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len):
    """The BPTT ring push of `lstm_math.push_and_forward` for each sensor of the block."""
    T = ring_x.shape[1]
    for r in range(slots.shape[0]):
        s = slots[r]
        pos = ring_pos[s]
        for i in range(x.shape[1]):
            ring_x[s, pos, i] = clip_value(x[r, i], clip)
        copy_state(ring_h[s, pos], h[s])
        copy_state(ring_c[s, pos], c[s])
        ring_pos[s] = (pos + 1) % T
        if ring_len[s] < T:
            ring_len[s] += 1


@register_jitable
def finite_rows(a):
    """Whether every value of the 2-D array a is finite: `lstm_math.all_finite` without its early
    exit, so that the loop vectorises (an and-reduction; ~5 ns for a sensor's 64 cells instead
    of ~40 ns one value at a time)."""
    ok = True
    for i in range(a.shape[0]):
        row = a[i]
        for j in range(row.shape[0]):
            ok = ok & (abs(row[j]) < math.inf)
    return ok


@register_jitable
def prefetch_sensor(s, h, c, ring_x, ring_h, ring_c, ring_pos, pred):
    """Prefetch (for writing) every row `push_and_forward_block` will touch for sensor s: its
    BPTT ring rows at its ring position (cold: last written a window of readings ago), its
    state and prediction."""
    pos = ring_pos[s]
    prefetch_array(ring_h[s, pos])
    prefetch_array(ring_c[s, pos])
    prefetch_array(ring_x[s, pos : pos + 1])
    prefetch_array(h[s])
    prefetch_array(c[s])
    prefetch_array(pred[s : s + 1])


@register_jitable
def prefetch_block(slots, h, c, ring_x, ring_h, ring_c, ring_pos, pred):
    """`prefetch_sensor` for each of slots (the first block of a run; the others are prefetched
    by the block before them)."""
    for r in range(slots.shape[0]):
        prefetch_sensor(slots[r], h, c, ring_x, ring_h, ring_c, ring_pos, pred)


@register_jitable
def check_block(slots, h, c, ring_len, ring_pos, pred, status):
    """status[r] per sensor: a sensor whose new state (flagged STATUS_RESET by the cell step) or
    prediction is not finite is reset (as `lstm_math.push_and_forward`)."""
    for r in range(slots.shape[0]):
        s = slots[r]
        if status[r] != STATUS_OK or not finite_rows(pred[s : s + 1]):
            reset_slot(s, h, c, ring_len, ring_pos, pred)
            status[r] = STATUS_RESET


@register_jitable
def push_and_forward_block(
    slots, x, theta_row, offs, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len, pred, status, gates, z,
    next_slots,
):
    """`lstm_math.push_and_forward` for a block of n sensors sharing theta_row: slots (n,)
    distinct, n <= gates.shape[0]; x (n, I) their readings; status (n,) out. Each sensor's
    reading and state go to its BPTT ring, (h, c) advance in place, the next prediction goes
    to pred; a non-finite state or prediction resets the sensor (STATUS_RESET).

    next_slots: the sensors of the block the caller runs next (may be empty), whose rows are
    prefetched during the last layer's activations, one sensor after each of this block's:
    early enough to arrive (the activations take ~0.3 us per sensor), late enough not to be
    evicted by the weight rows streaming through L1 during the gate products, and spread out
    so that the prefetches do not queue up behind each other."""
    n = slots.shape[0]
    L = h.shape[1]
    H = h.shape[2]
    G = 4 * H
    push_block(slots, x, clip, h, c, ring_x, ring_h, ring_c, ring_pos, ring_len)
    n_in = x.shape[1]
    for r in range(n):
        status[r] = STATUS_OK
        for i in range(n_in):
            z[r, i] = clip_value(x[r, i], clip)
    for layer in range(L):
        wx = offs[layer, 0]
        bo = offs[layer, 2]
        K = n_in + H
        for r in range(n):
            copy_row(z[r, n_in : n_in + H], h[slots[r], layer])
        block_gates(theta_row[wx : wx + K * G].reshape((K, G)), theta_row[bo : bo + G], z, n, gates)
        for r in range(n):
            s = slots[r]
            if not cell_row(gates[r], c[s, layer], h[s, layer], z[r]):
                status[r] = STATUS_RESET  # check_block resets the sensor
            if layer == L - 1 and r < next_slots.shape[0]:
                prefetch_sensor(next_slots[r], h, c, ring_x, ring_h, ring_c, ring_pos, pred)
        n_in = H
    block_head(theta_row, offs, slots, n, H, z, pred)
    check_block(slots, h, c, ring_len, ring_pos, pred, status)


def block_rows(H, itemsize):
    """Sensors per block: a (n, 4H) gate tile of about TILE_BYTES (16 at H=64 float32), 4..32."""
    return max(4, min(32, TILE_BYTES // (4 * H * itemsize)))


@register_jitable
def block_scratch_width(I, H):
    """Columns of the z scratch: [layer input (I, or H above layer 0), h]."""
    return max(I, H) + H
