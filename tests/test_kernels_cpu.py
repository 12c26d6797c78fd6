"""Numba CPU kernels against the NumPy reference, stepped through ModelBank."""
import numpy as np
import pytest

from streamlstm.backend import CpuBackend, NumpyBackend
from streamlstm.bank import ModelBank
from streamlstm.spec import STATUS_RESET, ModelSpec

SERIAL = dict(parallel_min_batch=10**9)
PARALLEL = dict(parallel_min_batch=1)
STATE = ("theta", "m", "v", "adam_t", "h", "c", "ring_x", "ring_h", "ring_c", "ring_pos", "ring_len", "pred")


def _drive(banks, n_slots, steps, seed=1, batch=5, apply_every=1):
    rng = np.random.default_rng(seed)
    I = banks[0].spec.input_size
    for bank in banks:
        for _ in range(n_slots):
            bank.add_slot()
    results = []
    for step in range(steps):
        slots = rng.choice(n_slots, size=min(batch, n_slots), replace=False)
        x = rng.normal(size=(len(slots), I)) * 2
        scale = rng.choice([0.0, 0.3, 1.0], size=len(slots))
        apply = (step + 1) % apply_every == 0
        results.append([bank.step(slots, x, scale, apply=apply) for bank in banks])
    return results


def _assert_same(a, b, rtol, atol):
    for name in STATE:
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", [dict(input_size=1, num_layers=1), dict(input_size=3, num_layers=2)])
@pytest.mark.parametrize("extras", [dict(), dict(dropout=0.25, weight_decay=0.01, loss="mse", optimizer="sgd")])
def test_cpu_matches_reference_float64(shared, shape, extras):
    spec = ModelSpec(hidden_size=5, window=4, dtype="float64", **shape, **extras)
    banks = [ModelBank(spec, shared, NumpyBackend()), ModelBank(spec, shared, CpuBackend(**SERIAL)),
             ModelBank(spec, shared, CpuBackend(**PARALLEL))]
    results = _drive(banks, n_slots=7, steps=12)
    for ref, serial, parallel in results:
        np.testing.assert_allclose(serial.prediction, ref.prediction, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(serial.loss, ref.loss, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(serial.status, ref.status)
    _assert_same(banks[0], banks[1], rtol=1e-9, atol=1e-12)
    _assert_same(banks[0], banks[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
def test_cpu_matches_reference_float32(shared):
    spec = ModelSpec(input_size=2, hidden_size=6, num_layers=2, window=5, dtype="float32")
    banks = [ModelBank(spec, shared, NumpyBackend()), ModelBank(spec, shared, CpuBackend(**SERIAL)),
             ModelBank(spec, shared, CpuBackend(**PARALLEL))]
    _drive(banks, n_slots=6, steps=8)
    assert banks[1].theta.dtype == np.float32
    _assert_same(banks[0], banks[1], rtol=2e-3, atol=2e-4)
    # Serial and parallel run the very same per-sensor code: bitwise equal with per-sensor
    # weights; shared weights sum the gradients in another order (chunks), so last-bit noise.
    for name in STATE:
        if shared:
            np.testing.assert_allclose(getattr(banks[2], name), getattr(banks[1], name), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(getattr(banks[1], name), getattr(banks[2], name), err_msg=name)


def test_target_feature_predicts_one_output():
    spec = ModelSpec(input_size=3, hidden_size=4, target_feature=2, dtype="float64", window=3)
    banks = [ModelBank(spec, False, NumpyBackend()), ModelBank(spec, False, CpuBackend(**SERIAL))]
    results = _drive(banks, n_slots=3, steps=6, batch=3)
    assert results[-1][1].prediction.shape == (3, 1)
    _assert_same(banks[0], banks[1], rtol=1e-9, atol=1e-12)


def test_growing_capacity_keeps_state_and_predictions():
    spec = ModelSpec(input_size=1, hidden_size=8, window=6, dtype="float32")
    grown = ModelBank(spec, False, CpuBackend(**SERIAL), capacity=2)
    roomy = ModelBank(spec, False, CpuBackend(**SERIAL), capacity=64)
    rng = np.random.default_rng(0)
    for bank in (grown, roomy):
        bank.add_slot()
        bank.add_slot()
    for _ in range(20):
        x = rng.normal(size=(2, 1))
        for bank in (grown, roomy):
            bank.step([0, 1], x)
    before = grown.predict([0, 1])
    for _ in range(40):  # several doublings
        grown.add_slot()
        roomy.add_slot()
    assert grown.capacity >= 42
    np.testing.assert_array_equal(grown.predict([0, 1]), before)
    for _ in range(10):
        x = rng.normal(size=(3, 1))
        a = grown.step([0, 1, 41], x)
        b = roomy.step([0, 1, 41], x)
        np.testing.assert_array_equal(a.prediction, b.prediction)
    for name in STATE:
        np.testing.assert_array_equal(getattr(grown, name)[:42], getattr(roomy, name)[:42], err_msg=name)


def test_shared_weights_are_one_row_and_per_sensor_rows_differ():
    spec = ModelSpec(input_size=1, hidden_size=4, dtype="float64")
    shared = ModelBank(spec, True, CpuBackend(**SERIAL))
    alone = ModelBank(spec, False, CpuBackend(**SERIAL))
    for bank in (shared, alone):
        for _ in range(3):
            bank.add_slot()
    assert shared.theta.shape[0] == 1
    assert not np.array_equal(alone.theta[0], alone.theta[1])  # per-sensor seeds differ


def test_duplicate_slots_in_one_step_are_refused():
    spec = ModelSpec(hidden_size=4)
    bank = ModelBank(spec, True, CpuBackend())
    bank.add_slot()
    with pytest.raises(ValueError):
        bank.step([0, 0], np.zeros((2, 1)))
    with pytest.raises(IndexError):
        bank.step([1], np.zeros((1, 1)))


def test_state_dict_round_trip_continues_identically():
    spec = ModelSpec(input_size=2, hidden_size=5, window=4, dtype="float32")
    a = ModelBank(spec, False, CpuBackend(**SERIAL))
    rng = np.random.default_rng(3)
    for _ in range(3):
        a.add_slot()
    for _ in range(10):
        a.step([0, 1, 2], rng.normal(size=(3, 2)))
    b = ModelBank(spec, False, NumpyBackend())
    b.load_state_dict(a.state_dict(), a.size)
    c = ModelBank(spec, False, CpuBackend(**SERIAL))
    c.load_state_dict(b.state_dict(), b.size)
    x = rng.normal(size=(3, 2))
    ra, rc = a.step([0, 1, 2], x), c.step([0, 1, 2], x)
    np.testing.assert_array_equal(ra.prediction, rc.prediction)
    np.testing.assert_array_equal(ra.next_prediction, rc.next_prediction)


def test_shared_update_deferred_over_steps():
    """Shared weights: the windows of several steps make one update from their mean (the
    detector's segments); serial and prange kernels add into the bank's pending sum."""
    spec = ModelSpec(hidden_size=5, window=4, dtype="float64", train_every=1)
    banks = [ModelBank(spec, True, NumpyBackend()), ModelBank(spec, True, CpuBackend(**SERIAL)),
             ModelBank(spec, True, CpuBackend(**PARALLEL))]
    _drive(banks, n_slots=7, steps=10, apply_every=4)
    assert banks[0].adam_t[0] == 2  # steps 4 and 8; the windows of steps 9 and 10 are pending
    for bank in banks[1:]:
        assert bank.grad_count[0] == banks[0].grad_count[0] > 0
        np.testing.assert_allclose(bank.grad_sum, banks[0].grad_sum, rtol=1e-9, atol=1e-12)
    for bank in banks:
        bank.apply_shared()
        assert bank.grad_count[0] == 0 and not bank.grad_sum.any()
    for bank in banks[1:]:
        _assert_same(banks[0], bank, rtol=1e-9, atol=1e-12)
    assert banks[0].adam_t[0] == 3


# --- shared weights: the GEMM-shaped forward (lstm_block) ------------------------------


def _random_state(bank, rng):
    """Carried state and half-filled history rings, as after some readings."""
    for name in ("h", "c", "pred", "ring_x", "ring_h", "ring_c"):
        arr = getattr(bank, name)
        arr[...] = rng.normal(size=arr.shape) * 0.7
    bank.ring_pos[:] = rng.integers(0, bank.spec.window, size=bank.capacity)
    bank.ring_len[:] = rng.integers(0, bank.spec.window + 1, size=bank.capacity)


def _forward_args(bank, slots, x, status):
    return (slots, bank.weight_rows(slots), x, bank.theta, bank.offs, float(bank.spec.input_clip), bank.h, bank.c,
            bank.ring_x, bank.ring_h, bank.ring_c, bank.ring_pos, bank.ring_len, bank.pred, status)


def _same_state(a, b):
    for name in STATE:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [dict(input_size=1, num_layers=1), dict(input_size=3, num_layers=2)])
def test_shared_block_forward_equals_per_sensor_forward_bit_for_bit(dtype, shape):
    """Same sums in the same order, same activations: the block path gives the per-sensor path's
    numbers exactly, for any blocking (B not a multiple of the block, one sensor, the prange
    driver's chunks), and resets the same sensors (NaN reading, NaN carried state)."""
    from streamlstm import kernels_cpu

    # H=6: layer 0 has 1 + 6 (or 3 + 6) weight rows, layer 1 has 12: the 4-row passes and their
    # remainders both run
    spec = ModelSpec(hidden_size=6, window=4, dtype=dtype, **shape)
    rng = np.random.default_rng(7)
    n_slots = 45
    per_sensor, blocked = (ModelBank(spec, True, CpuBackend(**SERIAL), capacity=n_slots) for _ in range(2))
    _random_state(per_sensor, rng)
    for name in STATE:
        getattr(blocked, name)[...] = getattr(per_sensor, name)
    for B, block, chunks in [(37, 16, 0), (37, 5, 0), (1, 16, 0), (45, 8, 3), (37, 4, 37)]:
        slots = rng.permutation(n_slots)[:B]
        x = (rng.normal(size=(B, spec.input_size)) * 3).astype(dtype)
        if B > 3:
            x[1, 0] = np.nan
            x[2, -1] = np.inf  # clipped: stays finite, as 1e30
            x[3, 0] = 1e30
            for bank in (per_sensor, blocked):
                bank.h[slots[4], -1, 0] = np.nan  # a non-finite carried state resets too
        status_a, status_b = np.zeros(B, np.int64), np.zeros(B, np.int64)
        kernels_cpu.forward_batch_serial(*_forward_args(per_sensor, slots, x, status_a))
        kernels_cpu.forward_shared(*_forward_args(blocked, slots, x, status_b), chunks, block=block)
        np.testing.assert_array_equal(status_b, status_a)
        _same_state(per_sensor, blocked)
        if B > 3:
            assert status_b[1] == STATUS_RESET and status_b[4] == STATUS_RESET
            assert not np.any(np.delete(status_b, [1, 4]))
            assert not blocked.h[slots[1]].any() and blocked.ring_len[slots[1]] == 0


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_shared_forward_matches_reference_over_several_blocks(dtype, tol):
    """Against the NumPy oracle through the bank: 37 sensors (blocks of 16 with a remainder),
    two layers, readings with NaN (the sensor resets, status 1) and out-of-range values."""
    spec = ModelSpec(input_size=2, hidden_size=6, num_layers=2, window=3, dtype=dtype)
    banks = [ModelBank(spec, True, NumpyBackend()), ModelBank(spec, True, CpuBackend(**SERIAL)),
             ModelBank(spec, True, CpuBackend(**PARALLEL))]
    rng = np.random.default_rng(5)
    n_slots = 37
    for bank in banks:
        for _ in range(n_slots):
            bank.add_slot()
    for step in range(4):
        x = rng.normal(size=(n_slots, 2)) * 2
        x[rng.integers(n_slots), step % 2] = np.nan
        x[rng.integers(n_slots), 0] = -1e9
        results = [bank.step(np.arange(n_slots), x, learn=False) for bank in banks]
        for r in results[1:]:
            np.testing.assert_array_equal(r.status, results[0].status)
            np.testing.assert_allclose(r.next_prediction, results[0].next_prediction, rtol=tol, atol=tol)
        assert np.sum(results[0].status == STATUS_RESET) >= 1
    for bank in banks[1:]:
        _assert_same(banks[0], bank, rtol=tol, atol=tol)
    _same_state(banks[1], banks[2])  # serial and prange drivers: the same numbers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gate_tile_sums_like_the_per_sensor_product(dtype):
    """The register tile (an LLVM IR kernel) and the loops around it give `lstm_math`'s
    per-sensor gate sums bit for bit: at H=64 (the tile covers the whole block), with rows and
    columns left over for the loops, and with non-finite inputs."""
    from numba import njit

    from streamlstm.lstm_block import block_gates
    from streamlstm.lstm_math import gate_preacts

    @njit
    def both(W, bias, z, n, n_in, tiled, looped):
        block_gates(W, bias, z, n, tiled)
        for r in range(n):
            gate_preacts(W[:n_in], z[r, :n_in], n_in, W[n_in:], z[r, n_in : W.shape[0]], bias, looped[r])

    rng = np.random.default_rng(3)
    for H, n_in, n in [(64, 1, 16), (64, 3, 7), (6, 2, 5), (10, 1, 13)]:
        K, G = n_in + H, 4 * H
        W = rng.normal(size=(K, G)).astype(dtype)
        bias = rng.normal(size=G).astype(dtype)
        z = rng.normal(size=(n, K + 2)).astype(dtype) * 3
        z[0, 0], z[n - 1, K - 1] = np.nan, np.inf
        tiled, looped = np.full((n, G), 7.0, dtype), np.empty((n, G), dtype)
        both(W, bias, z, n, n_in, tiled, looped)
        np.testing.assert_array_equal(tiled.view(f"u{tiled.itemsize}"), looped.view(f"u{looped.itemsize}"))
