"""The NumPy reference against finite differences: the root of every parity test."""
import numpy as np
import pytest

from streamlstm import reference
from streamlstm.spec import ModelSpec, init_params, unpack


def _problem(spec, T=5, seed=0):
    rng = np.random.default_rng(seed)
    theta = init_params(spec) + rng.normal(0, 0.1, spec.num_params)  # break init symmetry (zero biases)
    xs = rng.normal(size=(T, spec.input_size))
    targets = rng.normal(size=(T, spec.output_size))
    h0 = rng.normal(0, 0.5, (spec.num_layers, spec.hidden_size))
    c0 = rng.normal(0, 0.5, (spec.num_layers, spec.hidden_size))
    return theta, xs, targets, h0, c0


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("inputs", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_backward_matches_finite_differences(layers, inputs, weight_decay, loss):
    spec = ModelSpec(input_size=inputs, hidden_size=4, num_layers=layers, dtype="float64",
                     weight_decay=weight_decay, loss=loss, huber_delta=0.7, seed=3)
    theta, xs, targets, h0, c0 = _problem(spec)
    _, grad = reference.objective_grad(spec, theta, xs, targets, h0, c0)
    eps = 1e-6
    numeric = np.empty_like(theta)
    for k in range(theta.size):
        plus, minus = theta.copy(), theta.copy()
        plus[k] += eps
        minus[k] -= eps
        numeric[k] = (reference.objective_grad(spec, plus, xs, targets, h0, c0)[0]
                      - reference.objective_grad(spec, minus, xs, targets, h0, c0)[0]) / (2 * eps)
    rel = np.linalg.norm(grad - numeric) / max(np.linalg.norm(numeric), 1e-12)
    assert rel < 1e-4, rel
    # every parameter block takes part (a dropped term would show as a zero block)
    parts = unpack(spec, numeric)
    for name in ("Wx", "Wh", "b"):
        for block in parts[name]:
            assert np.abs(block).max() > 0


def test_backward_with_dropout_matches_finite_differences():
    spec = ModelSpec(input_size=2, hidden_size=4, num_layers=3, dtype="float64", dropout=0.3, loss="mse")
    theta, xs, targets, h0, c0 = _problem(spec, T=4, seed=5)
    f = lambda th: reference.objective_grad(spec, th, xs, targets, h0, c0, step=7, sensor=2)  # noqa: E731
    _, grad = f(theta)
    eps = 1e-6
    numeric = np.array([(f(theta + eps * e)[0] - f(theta - eps * e)[0]) / (2 * eps) for e in np.eye(theta.size)])
    assert np.linalg.norm(grad - numeric) / np.linalg.norm(numeric) < 1e-4
    # the masks really drop units: another step key gives another loss
    assert f(theta)[0] != reference.objective_grad(spec, theta, xs, targets, h0, c0, step=8, sensor=2)[0]


def test_float32_activations_track_float64():
    x = np.linspace(-12, 12, 20001)
    t32 = reference.tanh(x.astype(np.float32))
    s32 = reference.sigmoid(x.astype(np.float32))
    assert t32.dtype == np.float32 and s32.dtype == np.float32
    assert np.max(np.abs(t32 - np.tanh(x))) < 3e-7
    assert np.max(np.abs(s32 - 1 / (1 + np.exp(-x)))) < 3e-7


def test_forward_step_matches_window_forward():
    """The streaming step and the BPTT forward are the same recurrence."""
    spec = ModelSpec(input_size=2, hidden_size=5, num_layers=2, dtype="float64", loss="mse")
    theta, xs, _, h0, c0 = _problem(spec, T=6)
    h, c = h0.copy(), c0.copy()
    preds = []
    for t in range(6):
        y, h, c = reference.forward_step(spec, theta, xs[t], h, c)
        preds.append(y)
    preds = np.array(preds)
    # with targets = preds the MSE window loss is exactly zero
    loss, _ = reference.window_loss_grad(spec, theta, xs, preds, h0, c0)
    assert loss < 1e-20


def test_adam_step_reduces_loss_and_clip_bounds_the_step():
    spec = ModelSpec(input_size=1, hidden_size=8, dtype="float64", loss="mse", learning_rate=0.01, grad_clip=0.5)
    theta, xs, targets, h0, c0 = _problem(spec, T=8)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    before, grad = reference.window_loss_grad(spec, theta, xs, targets, h0, c0)
    old = theta.copy()
    assert reference.apply_update(spec, theta, m, v, grad, 1, spec.learning_rate)
    after, _ = reference.window_loss_grad(spec, theta, xs, targets, h0, c0)
    assert after < before
    # Adam's first step moves each weight by at most lr
    assert np.max(np.abs(theta - old)) <= spec.learning_rate * (1 + 1e-9)
    bad = grad.copy()
    bad[0] = np.nan
    snapshot = theta.copy()
    assert not reference.apply_update(spec, theta, m, v, bad, 2, spec.learning_rate)
    np.testing.assert_array_equal(theta, snapshot)
