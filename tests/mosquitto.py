"""A real mosquitto broker for tests: free loopback port, generated config, stop/kill/restart.

Used through the ``mosquitto`` / ``mosquitto_factory`` fixtures in conftest.py::

    def test_x(mosquitto):                      # default broker, already running
        client.connect(mosquitto.host, mosquitto.port)

    @pytest.mark.mosquitto(persistence=True, max_queued_messages=10)
    def test_y(mosquitto): ...

    def test_z(mosquitto_factory):
        broker = mosquitto_factory(persistence=True)

The broker keeps its port across ``restart()`` so clients can reconnect to the same address.
Its log (connections, errors) is in ``broker.log_path``; ``broker.log_text()`` reads it.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

from streamlstm.tools.broker import find_mosquitto, free_port, mosquitto_config, port_accepts

__all__ = ["Mosquitto", "MosquittoError", "find_mosquitto", "free_port"]


class MosquittoError(RuntimeError):
    pass


class Mosquitto:
    """One mosquitto process with its own directory, config, log and (optional) persistence."""

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: os.PathLike | str,
        *,
        port: int | None = None,
        persistence: bool = False,
        # mosquitto's default is 1000: a slow QoS 1 subscriber silently loses the rest.
        max_queued_messages: int = 100000,
        max_inflight_messages: int | None = None,
        autosave_interval: int = 0,
        extra_config: list[str] | tuple[str, ...] = (),
        binary: str | None = None,
    ):
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise MosquittoError("mosquitto binary not found (apt-get install mosquitto)")
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(self.host)
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.autosave_interval = autosave_interval
        self.extra_config = list(extra_config)
        self.tls_listeners: list[dict] = []
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.data_dir = self.workdir / "data"
        self.proc: subprocess.Popen | None = None

    # --- addresses ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- configuration --------------------------------------------------------------

    def add_tls_listener(
        self,
        certfile: os.PathLike | str,
        keyfile: os.PathLike | str,
        cafile: os.PathLike | str | None = None,
        *,
        require_certificate: bool = False,
        port: int | None = None,
    ) -> int:
        """Add a TLS listener (takes effect at the next start/restart). Returns its port."""
        tls_port = port or free_port(self.host)
        self.tls_listeners.append(
            dict(port=tls_port, certfile=str(certfile), keyfile=str(keyfile),
                 cafile=str(cafile) if cafile else None, require_certificate=require_certificate)
        )
        return tls_port

    def render_config(self) -> str:
        persistence_dir = None
        if self.persistence:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            persistence_dir = str(self.data_dir)
        return mosquitto_config(self.port, self.host, max_queued_messages=self.max_queued_messages,
                                max_inflight_messages=self.max_inflight_messages, persistence_dir=persistence_dir,
                                autosave_interval=self.autosave_interval, log_connections=True,
                                tls_listeners=self.tls_listeners, extra=self.extra_config)

    # --- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        if self.running:
            return self
        self.config_path.write_text(self.render_config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = [self.port] + [t["port"] for t in self.tls_listeners]
        while True:
            if self.proc.poll() is not None:
                raise MosquittoError(
                    f"mosquitto exited with {self.proc.returncode} during start-up:\n{self.log_text()}")
            if all(port_accepts(self.host, p) for p in ports):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise MosquittoError(f"mosquitto did not listen on {ports} in {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (SIGTERM: clean shutdown, persistence saved) and wait. Returns exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash; nothing is saved beyond the last autosave."""
        return self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 10.0, down_s: float = 0.0) -> "Mosquitto":
        """Stop with ``sig``, stay down ``down_s`` seconds, start again on the same port."""
        self.stop(sig)
        if down_s:
            time.sleep(down_s)
        # The listening socket is SO_REUSEADDR; a just-closed port may still need a moment.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except MosquittoError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def reload(self) -> None:
        """SIGHUP: re-read the config file (after changing e.g. max_queued_messages)."""
        self.config_path.write_text(self.render_config())
        if self.running:
            self.proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mosquitto({self.url}, running={self.running})"
