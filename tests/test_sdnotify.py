"""sd_notify against real AF_UNIX datagram sockets (a path in tmp and an abstract name)."""
import os
import socket
import tempfile
import time
import uuid

import pytest

from streamlstm.sdnotify import SdNotifier, parse_notify_socket


def _recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def path_socket(tmp_path):
    # sun_path holds at most 107 bytes; a deep tmp_path could exceed it.
    directory = tmp_path if len(str(tmp_path)) < 90 else tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(directory, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket():
    name = f"streamlstm-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


def test_parse_notify_socket():
    assert parse_notify_socket(None) is None
    assert parse_notify_socket("") is None
    assert parse_notify_socket("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_notify_socket("@abc") == "\0abc"
    assert parse_notify_socket("vsock:2:1234") is None


def test_path_socket_messages(path_socket):
    path, sock = path_socket
    with SdNotifier({"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.ready()
        assert _recv(sock) == {"READY": "1"}
        assert n.status("loaded 3 groups\nsecond line")
        assert _recv(sock) == {"STATUS": "loaded 3 groups second line"}
        assert n.watchdog()
        assert _recv(sock) == {"WATCHDOG": "1"}
        assert n.stopping()
        assert _recv(sock) == {"STOPPING": "1"}
        assert n.ready(status="running")
        assert _recv(sock) == {"READY": "1", "STATUS": "running"}
        assert n.notify("FOO=bar", "BAZ=1")
        assert _recv(sock) == {"FOO": "bar", "BAZ": "1"}
        assert n.extend_timeout(2.5)
        assert _recv(sock) == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_reloading_carries_monotonic_usec(path_socket):
    path, sock = path_socket
    n = SdNotifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = _recv(sock)
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    n.close()


def test_abstract_socket(abstract_socket):
    name, sock = abstract_socket
    n = SdNotifier({"NOTIFY_SOCKET": name})
    assert n.ready()
    assert _recv(sock) == {"READY": "1"}
    assert n.watchdog()
    assert _recv(sock) == {"WATCHDOG": "1"}
    n.close()


def test_sender_is_this_process(path_socket):
    # NotifyAccess=main: systemd checks the sender's pid, so we must send from our own.
    path, sock = path_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    SdNotifier({"NOTIFY_SOCKET": path}).ready()
    _, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds and int.from_bytes(creds[0][:4], "little") == os.getpid()


def test_noop_without_notify_socket():
    n = SdNotifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.reloading() is False
    assert n.watchdog_interval_s() is None


def test_default_env_is_os_environ(monkeypatch, abstract_socket):
    name, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert SdNotifier().ready()
    assert _recv(sock) == {"READY": "1"}
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not SdNotifier().enabled


def test_send_errors_never_raise(tmp_path, caplog):
    n = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    with caplog.at_level("DEBUG", logger="streamlstm.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
    assert "failed" in caplog.text
    # Abstract name nobody bound: ECONNREFUSED, still no exception.
    assert SdNotifier({"NOTIFY_SOCKET": "@" + uuid.uuid4().hex}).ready() is False


def test_a_listener_that_never_reads_costs_dropped_messages_not_a_hang(path_socket, monkeypatch):
    # A datagram socket's queue is small (net.unix.max_dgram_qlen): once it is full a blocking
    # send waits for ever. That froze the daemon's shutdown when a test harness stopped reading.
    import streamlstm.sdnotify as sdnotify

    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_S", 0.05)
    path, _sock = path_socket  # bound, never read
    n = SdNotifier({"NOTIFY_SOCKET": path})
    results = [n.watchdog() for _ in range(60)]
    assert results[0] is True
    assert False in results  # the queue filled up: later messages were dropped, not waited on


def test_recovers_after_listener_appears(tmp_path):
    path = str(tmp_path / "late.sock")
    n = SdNotifier({"NOTIFY_SOCKET": path})
    assert n.ready() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        assert n.ready() is True
        assert _recv(sock) == {"READY": "1"}
    finally:
        sock.close()
        n.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1500"}, 0.0015),
    ],
)
def test_watchdog_interval(env, expected):
    assert SdNotifier(env).watchdog_interval_s() == expected
