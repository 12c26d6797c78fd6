"""Scalar math shared by the CPU and CUDA kernels (and mirrored by the NumPy reference).

The one definition of every per-element formula the kernels run: the activations, the LSTM
cell step of one hidden unit and its gradient, the loss and its derivative, the clipping
scale and the Adam/SGD step of one parameter, the dropout hash. They are registered with
Numba's generic target, so `lstm_math` (the CPU kernels and the compiled detector pass) and
`kernels_cuda` compile the very same math; the CPU and CUDA code around them only decides
which unit or parameter each loop (or GPU thread) handles. `reference` writes the same
formulas as readable NumPy over whole vectors, and the tests hold the two together.

Only scalars go in and out (tuples of scalars included): CUDA device code takes nothing else.
Mixed precision is part of the formula: with float32 state, a Python float constant (1.0,
beta1) makes an expression float64, exactly as the inline code it replaces did; callers store
the results into arrays of the model dtype.

float32 uses a clamped rational tanh (Eigen's, about 1e-7 relative error, below float32
rounding) because it is 1.3-1.6x faster than libm here; float64 keeps libm for tight parity
with the reference.
"""
import math

import numpy as np
from numba import types
from numba.extending import overload, register_jitable

# Eigen's float tanh: odd numerator of degree 13 over even denominator of degree 6.
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_TINY = np.float32(0.0004)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)
_HALF32 = np.float32(0.5)
_ONE32 = np.float32(1.0)

TANH_COEFFS = (_TANH_CLAMP, _TANH_TINY, (_A1, _A3, _A5, _A7, _A9, _A11, _A13), (_B0, _B2, _B4, _B6))


def _tanh_f32(x):
    # max/min rather than if/elif: the same values (NaN passes through both, as through the
    # comparisons), but LLVM turns these into vmaxps/vminps where the branches became two
    # compares and two blends per value (the block forward's activations: ~8% less time)
    x = min(max(x, -_TANH_CLAMP), _TANH_CLAMP)
    if abs(x) < _TANH_TINY:
        return x
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


def _sigmoid_f32(x):
    return _HALF32 + _HALF32 * tanh_act(_HALF32 * x)


def _tanh_f64(x):
    return math.tanh(x)


def _sigmoid_f64(x):
    # Split by sign so exp never overflows.
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _is_f32(x):
    return isinstance(x, np.float32)


def tanh_act(x):
    """tanh used by every backend (Python fallback; jitted code gets the overload)."""
    return _tanh_f32(x) if _is_f32(x) else _tanh_f64(x)


def sigmoid_act(x):
    return _sigmoid_f32(x) if _is_f32(x) else _sigmoid_f64(x)


@overload(tanh_act, strict=False)
def _ov_tanh(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _tanh_f32
    return _tanh_f64


@overload(sigmoid_act, strict=False)
def _ov_sigmoid(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _sigmoid_f32
    return _sigmoid_f64


@register_jitable
def loss_grad(residual, loss_code, delta):
    """d(loss)/d(prediction) for one output before the 1/N mean factor (MSE: 2r, Huber: clip)."""
    if loss_code == 0:
        return 2.0 * residual
    if residual > delta:
        return delta
    if residual < -delta:
        return -delta
    return residual


@register_jitable
def loss_value(residual, loss_code, delta):
    if loss_code == 0:
        return residual * residual
    a = abs(residual)
    if a <= delta:
        return 0.5 * a * a
    return delta * (a - 0.5 * delta)


@register_jitable
def clip_value(x, limit):
    if x > limit:
        return limit
    if x < -limit:
        return -limit
    return x


@register_jitable
def _mix32(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFFFFFF


@register_jitable
def dropout_keep(seed, step, sensor, t, unit, keep_prob):
    """Deterministic dropout mask bit from a counter hash: identical on every backend."""
    h = _mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _mix32(h ^ (step & 0xFFFFFFFF))
    h = _mix32(h ^ (sensor & 0xFFFFFFFF))
    h = _mix32(h ^ (t & 0xFFFFFFFF))
    h = _mix32(h ^ (unit & 0xFFFFFFFF))
    return h < keep_prob * 4294967296.0


# --- the LSTM cell, one hidden unit ---------------------------------------------------


def _inlined_on_cpu(fn):
    """register_jitable, but the CPU target inlines fn in Numba's IR (inline="always").

    Left to LLVM, the cell step (five activations) stayed a call per unit in the CPU kernels'
    assembly, a cost the hot loops did not have while the formulas were written inline.
    CUDA gets the plain generic registration: numba-cuda cannot type generic overloads
    inlined this way (NVIDIA/numba-cuda#624), and NVVM inlines device functions itself.
    A target-specific overload takes precedence over the generic one on its target.
    """
    overload(fn, target="cpu", inline="always", strict=False)(lambda *args: fn)
    return register_jitable(fn)


@_inlined_on_cpu
def lstm_cell(a_i, a_f, a_g, a_o, c_prev):
    """One unit's step from its four gate pre-activations and its previous cell state.

    Returns (i, f, g, o, c_new, tanh(c_new), h_new): the gates and tanh(c_new) are what the
    backward pass needs (`lstm_cell_grad`); c_new and h_new are the new state.
    """
    i = sigmoid_act(a_i)
    f = sigmoid_act(a_f)
    g = tanh_act(a_g)
    o = sigmoid_act(a_o)
    c_new = f * c_prev + i * g
    tc = tanh_act(c_new)
    return i, f, g, o, c_new, tc, o * tc


@_inlined_on_cpu
def lstm_cell_grad(dh, dc_next, c_prev, i, f, g, o, tc):
    """Backward of `lstm_cell` for one unit.

    dh: d(loss)/d(h_new) (from above and from the next step), dc_next: d(loss)/d(c_new)
    from the next step, c_prev and the cached (i, f, g, o, tanh(c_new)) of the forward.
    Returns the gate pre-activation gradients (da_i, da_f, da_g, da_o) and d(loss)/d(c_prev).
    """
    dc = dh * o * (1.0 - tc * tc) + dc_next
    return (
        dc * g * i * (1.0 - i),
        dc * c_prev * f * (1.0 - f),
        dc * i * (1.0 - g * g),
        dh * tc * o * (1.0 - o),
        dc * f,
    )


# --- the optimizer, one parameter ------------------------------------------------------


@register_jitable
def grad_clip_scale(norm2, clip):
    """Factor that brings a gradient of squared norm norm2 down to norm `clip` (0: no clip)."""
    scale = 1.0
    norm = math.sqrt(norm2)
    if clip > 0.0 and norm > clip:
        scale = clip / norm
    return scale


@register_jitable
def adam_step_size(step, lr, beta1, beta2, eps):
    """(step size, epsilon) of Adam step t = step >= 1 with the bias corrections folded in:
    lr * sqrt(1 - beta2^t) / (1 - beta1^t) and eps * sqrt(1 - beta2^t)."""
    c1 = 1.0 - beta1**step
    c2 = math.sqrt(1.0 - beta2**step)
    return lr * c2 / c1, eps * c2


@register_jitable
def adam_param(theta, m, v, grad, gscale, wd, beta1, beta2, step_size, eps):
    """Adam on one parameter: the clipped gradient plus L2 decay; returns (theta, m, v) new.

    step_size and eps come from `adam_step_size` (once per update, not per parameter).
    """
    gk = grad * gscale + wd * theta
    m_new = beta1 * m + (1.0 - beta1) * gk
    v_new = beta2 * v + (1.0 - beta2) * gk * gk
    return theta - step_size * m_new / (math.sqrt(v_new) + eps), m_new, v_new


@register_jitable
def sgd_param(theta, grad, gscale, wd, lr):
    """Plain SGD on one parameter with the clipped gradient plus L2 decay; returns theta new."""
    return theta - lr * (grad * gscale + wd * theta)
