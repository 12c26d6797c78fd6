"""A throwaway local MQTT broker for `streamlstm demo` (and tests): mosquitto or amqtt.

``local_broker()`` starts mosquitto when the binary exists (PATH, or Debian's /usr/sbin which
a normal user's PATH lacks), else amqtt (pure Python, the ``demo`` extra) in a subprocess of
this interpreter. Either way it listens on a free 127.0.0.1 port with anonymous access, lives
in its own temporary directory, and is stopped (and the directory removed) on exit::

    with local_broker() as broker:
        client.connect(broker.host, broker.port)

amqtt speaks MQTT 3.1.1 only: ``broker.protocol`` says which protocol clients should use.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional

import yaml

__all__ = [
    "BrokerError", "LocalBroker", "amqtt_available", "find_mosquitto", "free_port",
    "local_broker", "port_accepts",
]

KINDS = ("auto", "mosquitto", "amqtt")
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> Optional[str]:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the kernel picks it; the small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_config(port: int, host: str = HOST, *, max_queued_messages: int = 100000,
                     max_inflight_messages: Optional[int] = None, persistence_dir: Optional[str] = None,
                     autosave_interval: int = 0, log_connections: bool = False, tls_listeners=(),
                     extra=()) -> str:
    """mosquitto.conf of a loopback broker with anonymous access (the demo's; tests/mosquitto.py
    adds persistence, TLS listeners, connection logging and `extra` lines).

    `tls_listeners`: dicts with port, certfile, keyfile, cafile (or None), require_certificate.
    """
    lines = [
        # per_listener_settings false: allow_anonymous etc. apply to every listener.
        "per_listener_settings false",
        f"listener {port} {host}",
        "allow_anonymous true",
        # The default (1000) silently drops QoS 1 messages for a subscriber that lags.
        f"max_queued_messages {max_queued_messages}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if log_connections:
        lines += ["log_type notice", "log_type information", "connection_messages true", "log_timestamp true"]
    if max_inflight_messages is not None:
        lines.append(f"max_inflight_messages {max_inflight_messages}")
    if os.geteuid() == 0:
        # As root mosquitto would switch to user "mosquitto", who may not read our temp dir.
        lines.append(f"user {pwd.getpwuid(0).pw_name}")
    if persistence_dir is not None:
        lines += [
            "persistence true",
            f"persistence_location {persistence_dir}/",
            # 0: save only on exit/SIGUSR1; >0 also every N seconds (so a SIGKILL keeps something).
            f"autosave_interval {autosave_interval}",
        ]
    else:
        lines.append("persistence false")
    for tls in tls_listeners:
        lines += [f"listener {tls['port']} {host}", f"certfile {tls['certfile']}", f"keyfile {tls['keyfile']}"]
        if tls["cafile"]:
            lines.append(f"cafile {tls['cafile']}")
        lines.append(f"require_certificate {'true' if tls['require_certificate'] else 'false'}")
    lines += list(extra)
    return "\n".join(lines) + "\n"


def amqtt_config(port: int, host: str = HOST) -> dict:
    # amqtt >= 0.12 format: plugins keyed by dotted class path. Without the logging and $SYS
    # plugins of its default config: nothing here reads them and they cost time per packet.
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class LocalBroker:
    """One broker process in its own temporary directory. Use ``local_broker()`` or ``with``."""

    def __init__(self, kind: str = "auto", *, host: str = HOST, port: Optional[int] = None):
        if kind not in KINDS:
            raise ValueError(f"broker kind must be one of {KINDS}, got {kind!r}")
        if kind == "auto":
            kind = "mosquitto" if find_mosquitto() else "amqtt"
        self.kind = kind
        self.host = host
        self.port = port or free_port(host)
        self.protocol = "5" if kind == "mosquitto" else "3.1.1"
        self.workdir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Optional[str]:
        return os.path.join(self.workdir, "broker.log") if self.workdir else None

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            binary = find_mosquitto()
            if binary is None:
                raise BrokerError("mosquitto binary not found (apt-get install mosquitto)")
            path = os.path.join(self.workdir, "mosquitto.conf")
            with open(path, "w") as f:
                f.write(mosquitto_config(self.port, self.host))
            return [binary, "-c", path]
        if not amqtt_available():
            raise BrokerError("no MQTT broker: install mosquitto, or amqtt (pip install 'streamlstm[demo]')")
        path = os.path.join(self.workdir, "amqtt.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(amqtt_config(self.port, self.host), f)
        # The module, not the `amqtt` console script: that one may be off PATH (venv not activated).
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", path]

    def start(self, timeout: float = 30.0) -> "LocalBroker":
        if self.proc is not None:
            return self
        self.workdir = tempfile.mkdtemp(prefix=f"streamlstm-{self.kind}-")
        try:
            cmd = self._command()
            with open(self.log_path, "ab") as log:
                # Own session: a terminal's Ctrl-C must not reach the broker before its clients
                # have shut down; stop() ends it.
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.workdir, start_new_session=True)
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self.proc.poll() is not None:
                raise BrokerError(f"{self.kind} exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"{self.kind} did not listen on {self.host}:{self.port} in {timeout:g}s:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except (OSError, TypeError):
            return ""

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Stop the process (always waited for, so no zombie) and remove the directory."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                # amqtt's script shuts down cleanly on KeyboardInterrupt only; mosquitto on SIGTERM.
                self.proc.send_signal(signal.SIGINT if self.kind == "amqtt" else signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalBroker({self.kind}, {self.url}, pid={self.pid})"


@contextlib.contextmanager
def local_broker(kind: str = "auto", *, host: str = HOST, port: Optional[int] = None,
                 timeout: float = 30.0) -> Iterator[LocalBroker]:
    """A running broker (``kind``: auto | mosquitto | amqtt), stopped on exit whatever happens."""
    broker = LocalBroker(kind, host=host, port=port)
    broker.start(timeout)
    try:
        yield broker
    finally:
        broker.stop()
