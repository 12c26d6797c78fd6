"""Backend selection: the only place that asks whether CUDA exists."""
import pytest

from streamlstm import backend


def test_cpu_and_numpy_backends_are_built_by_name():
    assert backend.make_backend("cpu").name == "cpu"
    assert backend.make_backend("numpy").name == "numpy"
    assert backend.make_backend("cpu", parallel_min_batch=7).parallel_min_batch == 7


def test_cuda_without_a_device_fails_at_start_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    with pytest.raises(backend.BackendUnavailable, match="no CUDA device"):
        backend.make_backend("cuda")


def test_auto_moves_to_cuda_only_for_big_batches_with_a_device(monkeypatch):
    """CPU below the crossover; the first batch at cuda_min_batch moves the bank for good."""
    import numpy as np

    from streamlstm.bank import ModelBank
    from streamlstm.spec import ModelSpec

    spec = ModelSpec(input_size=1, hidden_size=3, window=2, dtype="float64")
    for has_device, expect in ((False, "cpu"), (True, "cuda")):
        auto = backend.make_backend("auto", cuda_min_batch=4)
        auto._has_cuda = lambda: has_device
        bank = ModelBank(spec, True, auto)
        for _ in range(4):
            bank.add_slot()
        bank.step([0, 1, 2], np.ones((3, 1)))
        assert auto.name == "cpu"
        before = bank.predict([0, 1, 2])
        bank.step([0, 1, 2, 3], np.ones((4, 1)))
        assert auto.name == expect
        bank.backend.sync(bank)
        assert np.all(np.isfinite(bank.pred[:4])) and not np.array_equal(before, bank.pred[:3])


def test_auto_never_takes_the_simulator_for_a_device():
    # tests run with NUMBA_ENABLE_CUDASIM=1: auto must still see "no GPU"
    assert not backend.cuda_available(allow_simulator=False)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.make_backend("tpu")
