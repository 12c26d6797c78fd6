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


def test_auto_uses_cuda_only_for_big_batches_with_a_device(monkeypatch):
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.make_backend("auto", expected_batch=10**6).name == "cpu"
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    assert backend.make_backend("auto", cuda_min_batch=4096, expected_batch=100).name == "cpu"
    assert backend.make_backend("auto", cuda_min_batch=4096, expected_batch=4096).name == "cuda"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.make_backend("tpu")
