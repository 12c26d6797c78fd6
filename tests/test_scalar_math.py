"""scalar_math, the one definition of the per-unit formulas the CPU and CUDA kernels run.

Checked against the NumPy reference (the oracle writes the same formulas over whole vectors)
and finite differences, both as compiled by Numba (what the CPU kernels run) and called as
plain Python (what the CUDA simulator runs).
"""
import numpy as np
import pytest
from numba import njit

from streamlstm import reference
from streamlstm import scalar_math as sm
from streamlstm.spec import ModelSpec


# Each driver runs twice: compiled (njit, as the CPU kernels) and as plain Python (as the
# CUDA simulator runs the helpers).


def _cells(a, c_prev, out):
    for j in range(c_prev.shape[0]):
        i, f, g, o, c_new, tc, h_new = sm.lstm_cell(a[j, 0], a[j, 1], a[j, 2], a[j, 3], c_prev[j])
        out[j, 0] = i
        out[j, 1] = f
        out[j, 2] = g
        out[j, 3] = o
        out[j, 4] = c_new
        out[j, 5] = tc
        out[j, 6] = h_new


def _cell_grads(dh, dc_next, c_prev, acts, out):
    for j in range(dh.shape[0]):
        d_i, d_f, d_g, d_o, dc = sm.lstm_cell_grad(
            dh[j], dc_next[j], c_prev[j], acts[j, 0], acts[j, 1], acts[j, 2], acts[j, 3], acts[j, 5]
        )
        out[j, 0] = d_i
        out[j, 1] = d_f
        out[j, 2] = d_g
        out[j, 3] = d_o
        out[j, 4] = dc


def _units(dtype, n=64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 3.0, (n, 4))
    a[:4] = [[9.0, -9.0, 12.0, -12.0], [0.0, 1e-5, -1e-5, 40.0], [-40.0, 7.9, -7.9, 0.3], [1e-3, 2e-4, 5.0, -5.0]]
    return a.astype(dtype), rng.normal(0.0, 1.5, n).astype(dtype)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_cell_step_matches_the_reference_cell(dtype, tol):
    """One unit's gates, c and h equal `reference.cell` with the pre-activations as its bias."""
    a, c_prev = _units(dtype)
    H = len(c_prev)
    b = np.concatenate([a[:, 0], a[:, 1], a[:, 2], a[:, 3]])
    zeros = np.zeros
    h_new, c_new, (_, _, _, i, f, g, o, tc) = reference.cell(
        zeros((1, 4 * H), dtype), zeros((H, 4 * H), dtype), b, zeros(1, dtype), zeros(H, dtype), c_prev
    )
    expect = np.stack([i, f, g, o, c_new, tc, h_new], axis=1)
    for run in (njit(_cells), _cells):
        got = np.empty((H, 7), dtype)
        run(a, c_prev, got)
        np.testing.assert_allclose(got.astype(np.float64), expect, rtol=tol, atol=tol, err_msg=str(run))


def test_cell_gradient_matches_finite_differences():
    """lstm_cell_grad is the derivative of lstm_cell: for the objective dh * h_new + dc * c_new,
    d/d(pre-activations) and d/d(c_prev) against central differences."""
    a, c_prev = _units(np.float64, n=16, seed=1)
    a = np.clip(a, -4.0, 4.0)  # where the activations are not flat: a meaningful difference quotient
    rng = np.random.default_rng(2)
    dh, dc_next = rng.normal(size=16), rng.normal(size=16)

    def objective(aj, cj, j):
        out = sm.lstm_cell(aj[0], aj[1], aj[2], aj[3], cj)
        return dh[j] * out[6] + dc_next[j] * out[4]

    acts = np.empty((16, 7))
    _cells(a, c_prev, acts)
    eps = 1e-6
    numeric = np.empty((16, 5))
    for j in range(16):
        for k in range(4):
            e = np.zeros(4)
            e[k] = eps
            numeric[j, k] = (objective(a[j] + e, c_prev[j], j) - objective(a[j] - e, c_prev[j], j)) / (2 * eps)
        numeric[j, 4] = (objective(a[j], c_prev[j] + eps, j) - objective(a[j], c_prev[j] - eps, j)) / (2 * eps)
    for run in (njit(_cell_grads), _cell_grads):
        got = np.empty((16, 5))
        run(dh, dc_next, c_prev, acts, got)
        np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8, err_msg=str(run))


def _update(theta, m, v, grad, step, lr, clip, wd, b1, b2, eps, adam):
    norm2 = 0.0
    for k in range(grad.shape[0]):
        norm2 += float(grad[k]) * float(grad[k])
    gscale = sm.grad_clip_scale(norm2, clip)
    step_size, eps_hat = sm.adam_step_size(step, lr, b1, b2, eps)
    for k in range(theta.shape[0]):
        if adam:
            theta[k], m[k], v[k] = sm.adam_param(theta[k], m[k], v[k], grad[k], gscale, wd, b1, b2, step_size, eps_hat)
        else:
            theta[k] = sm.sgd_param(theta[k], grad[k], gscale, wd, lr)


_update_jit = njit(_update)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("grad_clip", [1e-3, 1e3], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_optimizer_step_matches_the_reference(optimizer, grad_clip, weight_decay, dtype, tol):
    """Three updates of a parameter vector, element by element through scalar_math, equal
    `reference.apply_update` (clip the norm, add L2, Adam with bias correction or SGD)."""
    spec = ModelSpec(dtype=dtype, optimizer=optimizer, grad_clip=grad_clip, weight_decay=weight_decay,
                     learning_rate=0.01)
    rng = np.random.default_rng(3)
    dt = spec.np_dtype
    theta0 = rng.normal(size=40).astype(dt)
    states = {name: [theta0.copy(), np.zeros(40, dt), np.zeros(40, dt)] for name in ("ref", "jit", "py")}
    for step in (1, 2, 3):
        grad = rng.normal(0.0, 0.5, 40).astype(dt)
        assert reference.apply_update(spec, *states["ref"], grad, step, spec.learning_rate)
        args = (step, spec.learning_rate, spec.grad_clip, spec.weight_decay, spec.beta1, spec.beta2, spec.eps,
                optimizer == "adam")
        _update_jit(*states["jit"], grad, *args)
        _update(*states["py"], grad, *args)
        for name in ("jit", "py"):
            for got, want in zip(states[name], states["ref"]):
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{name} step {step}")
    assert not np.allclose(states["ref"][0], theta0)
