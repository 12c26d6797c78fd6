"""paho-mqtt 2.x client wrapper: connect, subscribe in on_connect, manual ack, publish.

What the daemon relies on:

* Persistent session: MQTT 5 connects with ``clean_start=False`` and a Session Expiry Interval,
  MQTT 3.1.1 with ``clean_session=False``; ``mqtt.client_id`` names the session. Together with
  QoS 1 subscriptions and manual acks, readings published while the daemon is down or slow are
  queued by the broker and delivered later.
* Manual ack: `on_message` hands ``(topic, payload, token)`` to the daemon; the daemon calls
  `ack(token)` once the message's readings are processed. A token is only valid on the
  connection that delivered it: after a reconnect the broker redelivers unacknowledged
  messages, so acks of older connections are dropped (a message id may be reused on the new
  connection, and acking it would acknowledge a message nobody processed).
* Subscriptions are (re)made in `on_connect`, so every reconnect resubscribes;
  `set_subscriptions` changes them at runtime (SIGHUP).
* Status: last will = retained ``offline`` on the status topic; retained ``online`` after each
  connect; `stop()` publishes ``offline`` before a clean disconnect (which skips the will).
* Nothing escapes a paho callback: an exception there would end paho's network thread.
  Errors are counted (`callback_errors`) and logged rate-limited.

The password is read with `read_secret` at construction and handed to paho; it is never logged.
"""
from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
from typing import Callable, Iterable, Optional

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import ConfigError, read_secret
from .ratelimit import RateLimitedLogger
from .topics import publish_topic_problem

__all__ = ["MqttIO", "AckToken", "read_password"]

log = logging.getLogger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
# Outgoing QoS >= 1 messages paho keeps while disconnected; beyond this publish() fails (counted)
# instead of growing without bound.
MAX_OUT_QUEUE = 10_000
MAX_INFLIGHT_OUT = 100
MAX_PACKET_SIZE = 268435455  # MQTT's largest (variable byte integer)
PACKET_OVERHEAD = 65535 + 4096  # topic name and properties next to the payload


def _escaped(topic, limit: int = 200) -> str:
    """A topic for a log line: repr (control characters escaped, one line), bounded."""
    text = repr(topic)
    return text if len(text) <= limit else text[:limit] + "..."


READ_GATE_WAIT_S = 0.1  # longest pause of the network loop while the gate is shut (acks, pings go on)


class _GatedClient(paho.Client):
    """paho client whose network thread reads one packet at a time, and none while the
    `read_gate` is shut, instead of blocking in a callback.

    paho's loop_read reads up to (outgoing + incoming in-flight messages) packets per call,
    thousands with many retained state messages in flight, and a callback that waits for room
    stops the whole loop: no ack, no PINGREQ, and the broker drops the session after 1.5 x
    keepalive. Here the loop keeps turning (select, write, keepalive) while reads pause;
    `read_gate(timeout)` waits at most `timeout` for room so a shut gate does not spin.
    Overrides loop_read, paho's documented hook of its own network loop; it uses paho 2.x's
    _sock / _packet_read / _loop_rc_handle as paho's own loop_read does.
    """

    read_gate: Optional[Callable[[float], bool]] = None
    # paho closes the connection when no packet was *read* for a keepalive after its PINGREQ:
    # a gate shut that long still lets one packet through (at worst one message over the bound
    # per interval, while the worker is stalled; the watchdog ends a long stall).
    force_read_after_s: float = 5.0
    _shut_since: Optional[float] = None

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        gate = self.read_gate
        if gate is not None and not gate(READ_GATE_WAIT_S):
            now = time.monotonic()
            if self._shut_since is None:
                self._shut_since = now
            if now - self._shut_since < self.force_read_after_s:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._shut_since = None
        rc = self._packet_read()
        if rc > 0:
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class AckToken(tuple):
    """(connection generation, message id, qos) of a delivered QoS >= 1 message."""

    __slots__ = ()


def read_password(path: Optional[str], key: str) -> Optional[str]:
    """The password in `path`; None when unset or when the file is empty.

    An empty file is how an anonymous set-up satisfies the unit's LoadCredential= (install.md).
    """
    if path is None:
        return None
    try:
        if os.path.getsize(path) == 0:
            return None
    except OSError:
        pass  # read_secret reports the problem with the key path
    try:
        return read_secret(path, key)
    except ConfigError as exc:
        if exc.reason.endswith("is empty"):  # a lone newline
            return None
        raise


def _check_readable(path: Optional[str], key: str) -> None:
    if path is not None and not os.access(path, os.R_OK):
        reason = "does not exist" if not os.path.exists(path) else "is not readable"
        raise ConfigError(key, f"file {path!r} {reason}")


class MqttIO:
    """One paho client with a network thread (`start`/`stop`)."""

    def __init__(self, cfg, status_topic: str, subscriptions: Iterable[str],
                 on_message: Callable[[str, bytes, Optional[AckToken]], None], *, metrics=None,
                 receive_maximum: int = 65535, log_interval_s: float = 10.0,
                 on_connected: Optional[Callable[[], None]] = None,
                 read_gate: Optional[Callable[[float], bool]] = None):
        """`cfg`: the config's `MqttConfig` (file paths already expanded). `on_message(topic,
        payload, token)` runs in paho's network thread; token is None for QoS 0 messages and
        topic None for a topic that is not UTF-8. `on_connected()` runs in the network thread after
        every successful (re)connect, once the status is published. `read_gate(timeout)`: False
        while no message may be read (queue full; see _GatedClient); on_message must then never
        block."""
        self.cfg = cfg
        self.status_topic = status_topic
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.metrics = metrics
        self.v5 = cfg.protocol == "5"
        self._rlog = RateLimitedLogger(log, log_interval_s)
        self._lock = threading.Lock()
        self._filters: tuple = tuple(dict.fromkeys(subscriptions))
        self._generation = 0
        self._pending_subs: dict = {}  # SUBSCRIBE mid -> filters
        self._subscribed = threading.Event()
        self._intake = True
        self._stopping = False
        self._ever_connected = False
        self.callback_errors = 0
        self.publish_failures = 0

        if self.v5:
            client = _GatedClient(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=paho.MQTTv5,
                                  manual_ack=True)
        else:
            client = _GatedClient(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=paho.MQTTv311,
                                  clean_session=False, manual_ack=True)
        client.read_gate = read_gate
        if cfg.keepalive_s > 0:
            # paho gives up when no byte was read for a keepalive after its PINGREQ, and the
            # PINGRESP waits behind the backlog: only these forced reads show it the connection
            # lives. A quarter keepalive leaves three quarters for the loop's turns being held up
            # (GIL hand-offs, long writes of queued publishes); at half, a 2 s keepalive dropped
            # once in a quiet CI run (tests/test_hostile.py, burst beyond the queue).
            client.force_read_after_s = cfg.keepalive_s / 4.0
        client.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)
        client.max_queued_messages_set(MAX_OUT_QUEUE)
        client.max_inflight_messages_set(MAX_INFLIGHT_OUT)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, read_password(cfg.password_file, "mqtt.password_file"))
        if cfg.tls.enabled:
            self._set_tls(client, cfg.tls)
        client.will_set(status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

        self._connect_props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(cfg.session_expiry_s)
            # Bounds how many unacknowledged messages the broker pushes at us: the flow control
            # that lets the network thread never wait (daemon.py).
            props.ReceiveMaximum = max(1, min(65535, int(receive_maximum)))
            # The broker discards larger messages instead of sending them: paho would otherwise
            # buffer a 100 MB payload whole before the parser's size check (room for the topic
            # and properties on top of the payload limit).
            props.MaximumPacketSize = min(MAX_PACKET_SIZE, int(cfg.max_payload_bytes) + PACKET_OVERHEAD)
            self._connect_props = props

    @staticmethod
    def _set_tls(client, tls) -> None:
        for key in ("ca_file", "cert_file", "key_file"):
            _check_readable(getattr(tls, key), f"mqtt.tls.{key}")
        key_password = None
        if tls.key_password_file is not None:
            key_password = read_secret(tls.key_password_file, "mqtt.tls.key_password_file")
        try:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, keyfile_password=key_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            if tls.key_file and tls.key_password_file and "PEM" in str(exc):
                key, why = "mqtt.tls.key_password_file", "cannot decrypt mqtt.tls.key_file with this password"
            elif tls.key_file and "PEM" in str(exc):
                key, why = "mqtt.tls.key_file", "cannot load the client key (encrypted without key_password_file, or not a key)"
            else:
                key, why = ("mqtt.tls.cert_file" if tls.cert_file else "mqtt.tls.ca_file"), "cannot set up TLS"
            raise ConfigError(key, f"{why}: {exc}") from None
        if tls.insecure:
            client.tls_insecure_set(True)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        c = self.cfg
        if self.v5:
            self.client.connect_async(c.host, c.port, c.keepalive_s, clean_start=False,
                                      properties=self._connect_props)
        else:
            self.client.connect_async(c.host, c.port, c.keepalive_s)
        self.client.loop_start()

    def wait_subscribed(self, timeout: Optional[float] = None) -> bool:
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def close_intake(self) -> None:
        """Deliver no more messages; those arriving now stay unacknowledged (redelivered later)."""
        self._intake = False

    @property
    def intake_open(self) -> bool:
        return self._intake

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, disconnect cleanly (the session stays), stop the network thread."""
        self._intake = False
        self._stopping = True
        if self.client.is_connected():
            try:
                info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        try:
            self.client.disconnect()
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.debug("disconnect: %s", exc)
        self.client.loop_stop()
        self._set_connected(False)

    # --- subscriptions --------------------------------------------------------------------

    def set_subscriptions(self, filters: Iterable[str]) -> None:
        """Change the subscribed filters (SIGHUP): unsubscribe the old, subscribe the new."""
        new = tuple(dict.fromkeys(filters))
        with self._lock:
            old = self._filters
            self._filters = new
        removed = [f for f in old if f not in new]
        added = [f for f in new if f not in old]
        if not self.client.is_connected():
            return  # on_connect subscribes to self._filters; removed ones may linger in the session
        if removed:
            rc, _ = self.client.unsubscribe(removed)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("unsubscribe %s failed: %s", removed, paho.error_string(rc))
        if added:
            self._subscribe(added)

    def _subscribe(self, filters) -> None:
        qos = self.cfg.qos
        topics = [(f, SubscribeOptions(qos=qos)) if self.v5 else (f, qos) for f in filters]
        rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("subscribe %s failed: %s", list(filters), paho.error_string(rc))
            return
        with self._lock:
            self._pending_subs[mid] = list(filters)

    # --- ack / publish --------------------------------------------------------------------

    def ack(self, token: Optional[AckToken]) -> bool:
        """Acknowledge a processed message. False when its connection is gone (it comes again)."""
        if token is None:
            return True
        generation, mid, qos = token
        # Under the lock that on_disconnect/on_connect take to bump the generation: an ack either
        # goes out on its own connection (or is discarded with it) or is not sent at all.
        with self._lock:
            if generation != self._generation:
                return False
            rc = self.client.ack(mid, qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload, qos: int = 0, retain: bool = False,
                expiry_s: Optional[int] = None) -> bool:
        """Publish; False (and a counted failure) when paho refuses or would drop it.

        While disconnected paho keeps QoS >= 1 messages (up to MAX_OUT_QUEUE) and sends them after
        the reconnect; QoS 0 messages are lost then. A topic the broker would find malformed is
        refused here: sent, it would cost the connection, and paho would re-send it after every
        reconnect (topics.py).
        """
        problem = publish_topic_problem(topic)
        if problem is not None:
            self._publish_failed(f"publish to {_escaped(topic)} refused: {problem}")
            return False
        props = None
        if expiry_s and self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as exc:
            self._publish_failed(f"publish to {_escaped(topic)} refused: {exc}")
            return False
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0):
            return True
        self._publish_failed(f"publish to {_escaped(topic)} failed: {paho.error_string(rc)}")
        return False

    def _publish_failed(self, message: str) -> None:
        self.publish_failures += 1
        if self.metrics is not None:
            self.metrics.publish_failures.inc()
        self._rlog.log("publish", logging.WARNING, "%s", message)

    # --- paho callbacks (network thread) --------------------------------------------------

    def _callback_error(self, where: str) -> None:
        self.callback_errors += 1
        exc = sys.exc_info()[1]
        self._rlog.log(("callback", where), logging.ERROR, "error in MQTT %s callback (%d so far): %s: %s",
                       where, self.callback_errors, type(exc).__name__, exc)
        log.debug("MQTT %s callback error", where, exc_info=True)

    def _set_connected(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.mqtt_connected.set(1 if up else 0)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        try:
            if reason_code.is_failure:
                self._rlog.log("connect", logging.ERROR, "MQTT broker %s:%d refused the connection: %s",
                               self.cfg.host, self.cfg.port, reason_code)
                return
            with self._lock:
                self._generation += 1
                filters = self._filters
                self._pending_subs.clear()
            if self._ever_connected and self.metrics is not None:
                self.metrics.mqtt_reconnects.inc()
            log.info("connected to MQTT broker %s:%d (MQTT %s, session %s)", self.cfg.host, self.cfg.port,
                     self.cfg.protocol, "resumed" if flags.session_present else "new")
            self._ever_connected = True
            self._set_connected(True)
            if filters:
                self._subscribe(filters)
            if flags.session_present or not filters:
                # A resumed session keeps our subscriptions: the broker may deliver the backlog
                # before the SUBACK, so do not hold READY behind it (we still resubscribe).
                self._subscribed.set()
            self.publish(self.status_topic, ONLINE, qos=1, retain=True)
            if self._on_connected_cb is not None:
                self._on_connected_cb()
        except Exception:  # noqa: BLE001
            self._callback_error("connect")

    def _on_connect_fail(self, client, userdata):
        try:
            # paho calls this from its `except OSError:` around the connect: the error is still
            # being handled, so it says why (e.g. the TLS certificate verification failure).
            exc = sys.exc_info()[1]
            why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            self._rlog.log("connect", logging.WARNING, "cannot connect to MQTT broker %s:%d%s; retrying",
                           self.cfg.host, self.cfg.port, why)
        except Exception:  # noqa: BLE001
            self._callback_error("connect_fail")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        try:
            with self._lock:
                self._generation += 1  # tokens of this connection are void from here on
            self._set_connected(False)
            if not self._stopping:
                self._rlog.log("disconnect", logging.WARNING, "disconnected from MQTT broker: %s; reconnecting",
                               reason_code)
        except Exception:  # noqa: BLE001
            self._callback_error("disconnect")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        try:
            with self._lock:
                filters = self._pending_subs.pop(mid, None)
            if filters is None:
                return
            failed = [(f, str(rc)) for f, rc in zip(filters, reason_codes) if rc.is_failure]
            if failed:
                log.error("broker refused subscriptions: %s", failed)
            granted = [f for f, rc in zip(filters, reason_codes) if not rc.is_failure]
            if granted:
                log.info("subscribed to %s (QoS %d)", ", ".join(granted), self.cfg.qos)
                self._subscribed.set()
        except Exception:  # noqa: BLE001
            self._callback_error("subscribe")

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        pass

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        try:
            if reason_code.is_failure:  # MQTT 5 PUBACK with an error (e.g. not authorized)
                self._publish_failed(f"broker refused a publish: {reason_code}")
        except Exception:  # noqa: BLE001
            self._callback_error("publish")

    def _on_message(self, client, userdata, msg):
        try:
            if not self._intake:
                return  # not acked: the broker delivers it again to the next session
            qos = msg.qos
            token = AckToken((self._generation, msg.mid, qos)) if qos > 0 else None
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = None  # the daemon counts it as unknown_topic (and acks it)
            self._on_message_cb(topic, msg.payload, token)
        except Exception:  # noqa: BLE001
            self._callback_error("message")

