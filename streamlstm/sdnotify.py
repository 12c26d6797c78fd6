"""Plain-Python sd_notify(3): tell systemd about start-up, reloads, stops and liveness.

No libsystemd binding: the protocol is one datagram of newline-separated ``KEY=VALUE``
lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a filesystem path, or an
abstract-namespace name written ``@name``). Without ``$NOTIFY_SOCKET`` (not started by
systemd, or ``Type=`` is not ``notify``) every call is a no-op, so the daemon can call
these unconditionally.

Sending never raises: a lost notification must not take the daemon down (systemd then
times the service out, which is the right outcome). Failures are logged at DEBUG.

The unit uses ``NotifyAccess=main``: notifications must come from the main process (any
thread of it), not from a child process.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["SdNotifier", "parse_notify_socket"]

SEND_TIMEOUT_S = 2.0  # longest wait for room on the notify socket before a message is dropped


def parse_notify_socket(value: str | None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` -> address for ``socket.sendto``; None when unset/unusable.

    ``@name`` is the Linux abstract namespace: the address starts with a NUL byte.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd also accepts vsock:... addresses (VMs); we do not, so notify is a no-op.
    log.debug("unsupported NOTIFY_SOCKET address %r: notifications disabled", value)
    return None


class SdNotifier:
    """sd_notify sender bound to one environment (``os.environ`` by default).

    The environment is read once, at construction: create the notifier at start-up.
    Thread-safe: the watchdog may be pinged from another thread than the one that
    reports readiness.
    """

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self._address = parse_notify_socket(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (i.e. systemd is listening)."""
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram made of ``lines`` (e.g. ``"READY=1"``). True if it was sent."""
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A datagram to a receiver whose queue is full blocks: a notify socket nobody
                    # drains must cost a dropped message, never a hung worker or shutdown.
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(data, self._address)
                return True
            except OSError as exc:
                log.debug("sd_notify %r to %r failed: %s", lines, self._address, exc)
                # Drop the socket: the next call starts from a fresh one.
                self._close_locked()
                return False

    # --- the messages the daemon uses -------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished (models loaded, MQTT subscribed): systemd marks us active."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """Liveness ping; must arrive at least every ``WatchdogSec`` (send every half of it)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (final checkpoint in progress)."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def reloading(self) -> bool:
        """Reload (SIGHUP) began; send ``ready()`` when it is done.

        ``MONOTONIC_USEC`` is required by systemd >= 253 to match the reload to its request.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout fires (long warm-ups)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval_s(self) -> float | None:
        """``WatchdogSec`` in seconds, or None when no watchdog is expected from this process.

        Like sd_watchdog_enabled(3): None when ``$WATCHDOG_USEC`` is unset/invalid or
        ``$WATCHDOG_PID`` is set and names another process.
        """
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 1_000_000

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __enter__(self) -> "SdNotifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SdNotifier(address={self._address!r})"


def _status_line(text: str) -> str:
    # One datagram is KEY=VALUE per line: a newline inside STATUS would start a new key.
    return "STATUS=" + " ".join(str(text).splitlines())
