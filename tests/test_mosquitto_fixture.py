"""The real-broker fixture works with paho-mqtt 2.x: publish/receive, restart, persistence."""
import queue
import signal
import socket
import time

import pytest

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402


def _client(broker, client_id="", *, clean_start=True, session_expiry=0, topic=None, qos=1):
    """Started paho client; returns (client, received queue, connected-event queue)."""
    received: queue.Queue = queue.Queue()
    connects: queue.Queue = queue.Queue()
    c = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv5)
    c.reconnect_delay_set(min_delay=0.1, max_delay=0.5)

    def on_connect(client, userdata, flags, reason_code, properties):
        connects.put((reason_code, flags.session_present))
        if topic and not reason_code.is_failure:
            client.subscribe(topic, qos=qos)

    c.on_connect = on_connect
    c.on_message = lambda client, userdata, msg: received.put((msg.topic, msg.payload, msg.qos))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    c.connect(broker.host, broker.port, keepalive=10, clean_start=clean_start, properties=props)
    c.loop_start()
    rc, _ = connects.get(timeout=10)
    assert not rc.is_failure
    return c, received, connects


def _publish(broker, topic, payloads, qos=1):
    c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for p in payloads:
            c.publish(topic, p, qos=qos).wait_for_publish(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


def _wait_subscribed():
    # SUBACK is asynchronous; the tests publish from another client, so give it a moment.
    time.sleep(0.2)


def test_publish_and_receive(mosquitto):
    assert mosquitto.running
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    c, received, _ = _client(mosquitto, topic="sensors/#")
    try:
        _wait_subscribed()
        _publish(mosquitto, "sensors/t1", [b"21.5"])
        assert received.get(timeout=10) == ("sensors/t1", b"21.5", 1)
    finally:
        c.disconnect()
        c.loop_stop()
    assert "max_queued_messages 100000" in mosquitto.config_path.read_text()


def test_restart_same_port_and_client_reconnects(mosquitto):
    port = mosquitto.port
    c, received, connects = _client(mosquitto, topic="sensors/#")
    try:
        mosquitto.restart()
        assert mosquitto.running and mosquitto.port == port
        rc, _ = connects.get(timeout=15)  # paho's loop thread reconnected on its own
        assert not rc.is_failure
        _wait_subscribed()
        _publish(mosquitto, "sensors/t2", [b"1"])
        assert received.get(timeout=10)[:2] == ("sensors/t2", b"1")
    finally:
        c.disconnect()
        c.loop_stop()


def test_stop_and_kill(mosquitto):
    assert mosquitto.stop() == 0  # SIGTERM: clean exit
    assert not mosquitto.running
    with pytest.raises(OSError):
        socket.create_connection((mosquitto.host, mosquitto.port), timeout=1).close()
    mosquitto.start()
    assert mosquitto.kill() == -signal.SIGKILL
    assert not mosquitto.running


@pytest.mark.mosquitto(persistence=True)
def test_persistent_session_survives_broker_restart(mosquitto):
    # What the daemon relies on: QoS 1 + persistent session + broker persistence loses nothing
    # while the subscriber is offline, even across a broker restart.
    c, _, _ = _client(mosquitto, "streamlstm-test", clean_start=False, session_expiry=3600,
                      topic="sensors/#")
    _wait_subscribed()
    c.disconnect()
    c.loop_stop()

    _publish(mosquitto, "sensors/p", [str(i).encode() for i in range(50)])
    mosquitto.restart()  # SIGTERM saves the queue to data/mosquitto.db
    assert (mosquitto.data_dir / "mosquitto.db").exists()

    c, received, _ = _client(mosquitto, "streamlstm-test", clean_start=False, session_expiry=3600)
    try:
        got = [received.get(timeout=10)[1] for _ in range(50)]
        assert got == [str(i).encode() for i in range(50)]
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.mosquitto(max_queued_messages=5)
def test_max_queued_messages_is_applied(mosquitto):
    # Documents the failure mode from README/Troubleshooting: a small queue drops readings.
    c, _, _ = _client(mosquitto, "slow", clean_start=False, session_expiry=3600, topic="s/#")
    _wait_subscribed()
    c.disconnect()
    c.loop_stop()
    _publish(mosquitto, "s/x", [b"%d" % i for i in range(20)])
    c, received, _ = _client(mosquitto, "slow", clean_start=False, session_expiry=3600)
    try:
        got = []
        while True:
            try:
                got.append(received.get(timeout=1.0))
            except queue.Empty:
                break
        assert 0 < len(got) < 20
    finally:
        c.disconnect()
        c.loop_stop()


def test_factory_starts_independent_brokers(mosquitto_factory):
    a = mosquitto_factory()
    b = mosquitto_factory(max_queued_messages=0)
    assert a.port != b.port and a.running and b.running
    assert "max_queued_messages 0" in b.config_path.read_text()
