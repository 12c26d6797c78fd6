"""The model learns online and never produces NaN."""
import numpy as np

from streamlstm.backend import CpuBackend
from streamlstm.bank import ModelBank
from streamlstm.spec import ModelSpec


def test_learns_a_noisy_sine_online():
    spec = ModelSpec(hidden_size=16, window=16, learning_rate=0.01, dtype="float32", train_every=1)
    bank = ModelBank(spec, True, CpuBackend())
    bank.add_slot()
    rng = np.random.default_rng(0)
    n = 4000
    t = np.arange(n)
    signal = np.sin(2 * np.pi * t / 50) + rng.normal(0, 0.1, n)
    errors = np.empty(n)
    for i in range(n):
        result = bank.step([0], signal[i : i + 1].reshape(1, 1))
        errors[i] = (result.prediction[0, 0] - signal[i]) ** 2
    variance = signal.var()
    early, late = errors[:200].mean(), errors[-500:].mean()
    assert late < 0.1 * variance, (late, variance)
    assert late < 0.2 * early


def test_random_walk_with_huge_outliers_stays_finite():
    spec = ModelSpec(hidden_size=8, window=8, num_layers=2, dtype="float32")
    bank = ModelBank(spec, False, CpuBackend())
    for _ in range(4):
        bank.add_slot()
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(size=(25_000, 4)), axis=0)
    walk[rng.random(walk.shape) < 0.001] = 1e9
    walk[rng.random(walk.shape) < 0.001] = -1e9
    slots = np.arange(4)
    for row in walk:  # 10^5 readings in all
        result = bank.step(slots, row.reshape(4, 1))
        assert np.all(np.isfinite(result.next_prediction))
    for name in ("theta", "m", "v", "h", "c", "pred"):
        assert np.all(np.isfinite(getattr(bank, name))), name
