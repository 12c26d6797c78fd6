"""Security of the running daemon against a real mosquitto: mutual TLS, a plain client refused by a
TLS-only listener, the metrics endpoint over HTTPS with basic auth, and no secret in the logs
(even at DEBUG). Certificates come from a throwaway CA made in the test (tests/tls_ca.py)."""
from __future__ import annotations

import base64
import re
import shutil
import ssl
import subprocess
import time
import urllib.error

import pytest

pytest.importorskip("paho.mqtt.client")

from daemon_harness import (Publisher, batch_payloads, daemon_config, fetch, report,  # noqa: E402
                            wait_for, wait_online)
from tls_ca import find_openssl, make_pki  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]

# Distinctive strings: grepping the logs for them cannot hit anything by chance.
MQTT_PASSWORD = "mqttPw-7f3a9c1e-NEVER-LOG"
KEY_PASSPHRASE = "keyPass-5b2d8e44-NEVER-LOG"
METRICS_PASSWORD = "metricsPw-c91e0a77-NEVER-LOG"
WRONG_MQTT_PASSWORD = "wrongMqttPw-31d7b6f0-NEVER-LOG"
WRONG_KEY_PASSPHRASE = "wrongKeyPass-8a04e2c9-NEVER-LOG"
METRICS_USER = "prom"


@pytest.fixture
def pki(tmp_path):
    if find_openssl() is None:
        pytest.skip("openssl command not found")
    return make_pki(tmp_path / "pki", client_key_passphrase=KEY_PASSPHRASE)


def tls_broker(mosquitto_factory, pki, extra_config=()):
    """A broker with its plain loopback listener (test clients) and a TLS listener that requires a
    client certificate from our CA (the daemon). Returns (broker, tls_port)."""
    broker = mosquitto_factory(extra_config=list(extra_config))
    tls_port = broker.add_tls_listener(pki.server_cert, pki.server_key, pki.ca_cert, require_certificate=True)
    broker.restart()
    return broker, tls_port


def mutual_tls(pki, with_key_password=True) -> dict:
    tls = {"enabled": True, "ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert),
           "key_file": str(pki.client_key)}
    if with_key_password:
        tls["key_password_file"] = str(pki.client_key_passphrase_file)
    return tls


def plain_attempts_on_tls(broker) -> int:
    """Plain MQTT connections a TLS listener turned away (one of these lines per attempt)."""
    return len(re.findall(r"(?:Client connection from 127\.0\.0\.1 failed|OpenSSL Error\[0\]): "
                          r"[^\n]*wrong version number", broker.log_text()))


def client_port_of(broker, client_id: str, port: int) -> bool:
    """True when `client_id` connected through the listener on `port` (mosquitto's log)."""
    log = broker.log_text()
    for src in re.findall(rf"New client connected from 127\.0\.0\.1:(\d+) as {re.escape(client_id)} ", log):
        if re.search(rf"New connection from 127\.0\.0\.1:{src} on port {port}\.", log):
            return True
    return False


def publish_readings(broker, n_sensors=5, per_sensor=20, **auth) -> int:
    pub = Publisher(broker.host, broker.port, **auth)
    try:
        pub.publish_all(batch_payloads(n_sensors, per_sensor, per_message=25))
        return pub.wait_acked(60)
    finally:
        pub.close()


def test_mutual_tls_daemon_connects_with_client_certificate(mosquitto_factory, pki, tmp_path, daemons):
    broker, tls_port = tls_broker(mosquitto_factory, pki)
    # The listener really demands a client certificate: a client with only the CA gets nowhere.
    anon = Publisher(broker.host, tls_port, tls={"ca_certs": str(pki.ca_cert)})
    try:
        assert not anon.connected.wait(3), "TLS listener accepted a client without a certificate"
    finally:
        anon.close()

    cfg = daemon_config(tls_port, tmp_path, mqtt={"tls": mutual_tls(pki)})
    d = daemons(tmp_path, cfg).start()
    t0 = time.monotonic()
    d.wait_ready()
    ready_s = time.monotonic() - t0
    assert client_port_of(broker, cfg["mqtt"]["client_id"], tls_port), broker.log_text()[-3000:]
    wait_online(broker.host, broker.port)  # its retained status, seen through the plain listener
    published = publish_readings(broker)
    s = d.wait_handled(published, 60)
    assert s.readings == published and s.rejected == {}
    assert s.value("streamlstm_mqtt_connected") == 1
    assert d.stop() == 0, d.log_tail()
    assert "Traceback" not in d.log_text()
    report("security/mutual_tls", published=published, processed=s.readings, lost=published - s.readings,
           rejected=s.rejected, ready_s=round(ready_s, 2), peak_rss_mib=d.peak_rss_mib)


def test_plain_client_is_refused_by_tls_listener_and_daemon_keeps_retrying(mosquitto_factory, pki, tmp_path, daemons):
    broker, tls_port = tls_broker(mosquitto_factory, pki)
    cfg = daemon_config(tls_port, tmp_path)  # tls.enabled false: plain MQTT to a TLS-only port
    d = daemons(tmp_path, cfg).start()
    # Retrying: several connection attempts reach the TLS listener, none gets through.
    wait_for(lambda: plain_attempts_on_tls(broker) >= 3, 90, step=0.2,
             what="three plain connection attempts turned away by the TLS listener")
    s = d.scrape()
    assert d.alive(), d.log_tail()
    assert s.value("streamlstm_mqtt_connected") == 0
    assert s.readings == 0
    assert not any(m.get("READY") == "1" for m in d.notify.drain()), "READY without a broker connection"
    assert not client_port_of(broker, cfg["mqtt"]["client_id"], tls_port)
    log = d.log_text()
    assert re.search(r"cannot connect|disconnected|refused", log), log
    attempts = plain_attempts_on_tls(broker)
    assert d.stop() == 0, d.log_tail()
    assert "Traceback" not in d.log_text()
    report("security/plain_to_tls_refused", connection_attempts=attempts, mqtt_connected=0,
           processed=0, peak_rss_mib=d.peak_rss_mib)


def test_metrics_endpoint_https_with_basic_auth(mosquitto, pki, tmp_path, daemons):
    pw = tmp_path / "metrics-password"
    pw.write_text(METRICS_PASSWORD + "\n")
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    cfg = daemon_config(mosquitto.port, tmp_path, metrics={
        "tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
        "basic_auth_user": METRICS_USER, "basic_auth_password_file": str(pw)})
    d = daemons(tmp_path, cfg, scrape_auth=(METRICS_USER, METRICS_PASSWORD), scrape_context=ctx).start()
    d.wait_ready()
    url = d.metrics_url
    assert url.startswith("https://127.0.0.1:")
    published = publish_readings(mosquitto)
    s = d.wait_handled(published, 60)
    assert s.readings == published

    status, text = fetch(url, auth=(METRICS_USER, METRICS_PASSWORD), context=ctx)
    assert status == 200 and "streamlstm_readings_total" in text
    refused = {}
    for label, auth in (("no_auth", None), ("wrong_password", (METRICS_USER, WRONG_MQTT_PASSWORD)),
                        ("wrong_user", ("other", METRICS_PASSWORD))):
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(url, auth=auth, context=ctx)
        assert err.value.code == 401, label
        refused[label] = err.value.code
    # The server's certificate is checked against our CA: without it the client refuses.
    with pytest.raises(urllib.error.URLError) as err:
        fetch(url, auth=(METRICS_USER, METRICS_PASSWORD), context=ssl.create_default_context())
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
    # Plain HTTP to the HTTPS port gets no metrics.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        fetch(url.replace("https://", "http://"), auth=(METRICS_USER, METRICS_PASSWORD))
    assert d.alive()
    assert d.stop() == 0, d.log_tail()
    assert METRICS_PASSWORD not in d.log_text()
    report("security/metrics_https_basic_auth", published=published, processed=s.readings,
           lost=published - s.readings, http_status={"good": status, **refused}, peak_rss_mib=d.peak_rss_mib)


def test_no_secret_in_logs_at_debug_level(mosquitto_factory, pki, tmp_path, daemons):
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd not found (apt-get install mosquitto)")
    pwfile = tmp_path / "mosquitto.passwd"
    subprocess.run([passwd, "-c", "-b", str(pwfile), "streamlstm", MQTT_PASSWORD], check=True,
                   capture_output=True, timeout=30)
    broker, tls_port = tls_broker(mosquitto_factory, pki, extra_config=[
        "allow_anonymous false", f"password_file {pwfile}"])
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "mqtt").write_text(MQTT_PASSWORD + "\n")
    (secrets_dir / "mqtt-wrong").write_text(WRONG_MQTT_PASSWORD + "\n")
    (secrets_dir / "key-wrong").write_text(WRONG_KEY_PASSPHRASE + "\n")
    (secrets_dir / "metrics").write_text(METRICS_PASSWORD + "\n")
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))

    def config(name, mqtt_password_file, key_password_file=None):
        tls = mutual_tls(pki)
        if key_password_file is not None:
            tls["key_password_file"] = key_password_file
        (tmp_path / name).mkdir()
        return daemon_config(tls_port, tmp_path / name,
                             mqtt={"username": "streamlstm", "password_file": mqtt_password_file, "tls": tls},
                             metrics={"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
                                      "basic_auth_user": METRICS_USER,
                                      "basic_auth_password_file": str(secrets_dir / "metrics")},
                             logging={"level": "DEBUG", "rejected_log_interval_s": 0})

    # 1. Everything right: connects over mutual TLS with user/password, processes, serves metrics.
    good = daemons(tmp_path / "good", config("good", str(secrets_dir / "mqtt")), name="good",
                   scrape_auth=(METRICS_USER, METRICS_PASSWORD), scrape_context=ctx).start()
    good.wait_ready()
    published = publish_readings(broker, username="streamlstm", password=MQTT_PASSWORD)
    s = good.wait_handled(published, 60)
    with pytest.raises(urllib.error.HTTPError):
        fetch(good.metrics_url, auth=(METRICS_USER, WRONG_MQTT_PASSWORD), context=ctx)
    assert good.stop() == 0, good.log_tail()
    assert "DEBUG" in good.log_text(), "DEBUG logging was not on"

    # 2. Wrong MQTT password: refused by the broker, the daemon retries and logs why.
    bad = daemons(tmp_path / "badpw", config("badpw", str(secrets_dir / "mqtt-wrong")), name="badpw",
                  scrape_auth=(METRICS_USER, METRICS_PASSWORD), scrape_context=ctx).start()
    wait_for(lambda: "refused the connection" in bad.log_text() or "not authori" in bad.log_text().lower(),
             90, what="the refused connection in the log")
    assert bad.alive() and bad.scrape().value("streamlstm_mqtt_connected") == 0
    assert bad.stop() == 0, bad.log_tail()

    # 3. Wrong key passphrase: a configuration error (exit 2) naming an mqtt.tls setting, not the passphrase.
    badkey = daemons(tmp_path / "badkey", config("badkey", str(secrets_dir / "mqtt"),
                                                 key_password_file=str(secrets_dir / "key-wrong")),
                     name="badkey").start()
    rc = badkey.proc.wait(120)
    badkey.cleanup()
    assert rc == 2, badkey.log_tail()
    assert "mqtt.tls" in badkey.log_text()

    basic = base64.b64encode(f"{METRICS_USER}:{METRICS_PASSWORD}".encode()).decode()
    secrets = (MQTT_PASSWORD, KEY_PASSPHRASE, METRICS_PASSWORD, WRONG_MQTT_PASSWORD, WRONG_KEY_PASSPHRASE, basic)
    logs = {d.name: d.log_text() for d in (good, bad, badkey)}
    leaks = {name: [x for x in secrets if x in text] for name, text in logs.items()}
    assert not any(leaks.values()), f"secrets in the daemon's stderr: {leaks}"
    report("security/no_secrets_in_logs", published=published, processed=s.readings,
           lost=published - s.readings, log_bytes={k: len(v) for k, v in logs.items()}, leaks=0,
           peak_rss_mib=good.peak_rss_mib)


def test_wrong_key_passphrase_is_a_config_error_naming_the_key(pki, tmp_path, daemons):
    wrong = tmp_path / "key-wrong"
    wrong.write_text(WRONG_KEY_PASSPHRASE + "\n")
    tls = dict(mutual_tls(pki), key_password_file=str(wrong))
    d = daemons(tmp_path, daemon_config(1, tmp_path, mqtt={"tls": tls})).start()  # fails before connecting
    rc = d.proc.wait(120)
    d.cleanup()
    log = d.log_text()
    assert rc == 2, log
    assert "Traceback" not in log and "mqtt.tls" in log, log
    assert WRONG_KEY_PASSPHRASE not in log and KEY_PASSPHRASE not in log
    # the operator is sent to the key password, not to the certificate
    assert re.search(r"mqtt\.tls\.key_(password_)?file", log), log


def test_wrong_broker_ca_is_logged_with_the_verification_reason(mosquitto_factory, pki, tmp_path, daemons):
    # The connect-failure line used to say only "cannot connect"; it names the TLS error now.
    other = make_pki(tmp_path / "other-ca")
    broker, tls_port = tls_broker(mosquitto_factory, pki)
    tls = dict(mutual_tls(pki), ca_file=str(other.ca_cert))
    d = daemons(tmp_path, daemon_config(tls_port, tmp_path, mqtt={"tls": tls})).start()
    wait_for(lambda: "cannot connect" in d.log_text(), 90, what="a connect-failure line")
    assert d.alive(), d.log_tail()
    assert re.search(r"cannot connect to MQTT broker [^\n]*CERTIFICATE_VERIFY_FAILED", d.log_text()), d.log_tail()
    assert d.stop() == 0, d.log_tail()
