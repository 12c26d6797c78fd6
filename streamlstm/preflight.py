"""What the daemon needs from the machine, checked before anything starts.

`check-config` and `run` both call `preflight(config)`, so a configuration that passes
`check-config` does not fail at service start on a file: secrets readable (and not empty where a
password is required), the broker's CA / client certificate and key present and loadable (with
their password), the metrics TLS certificate and basic-auth secret, and a writable checkpoint
directory (or one that can be created); with `source: kafka` also confluent-kafka, the Kafka
secrets and TLS files and the snapshot directory. Connecting to the broker is the one thing left out.

The checks reuse the code `run` uses to load these files (`MqttIO._set_tls`, the metrics
server's TLS context, `read_secret`), so both report the same key path and reason.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError, read_secret
from .runtime_config import PATH_KEYS, expand_paths, replace_path

__all__ = ["preflight"]


CREDENTIALS = "CREDENTIALS_DIRECTORY"


def preflight(config, env=None, *, notes=None):
    """The config with `$VAR` paths expanded (as checked); ConfigError listing every problem.

    `notes` (a list, from check-config): files under ``$CREDENTIALS_DIRECTORY`` while it is
    unset are skipped with a note instead of an error, because systemd sets it only for the
    service (LoadCredential=); `run` passes none and refuses them, as it always did.
    """
    env = os.environ if env is None else env
    checked = config
    if notes is not None and CREDENTIALS not in env:
        for keys in PATH_KEYS:
            value = config
            for k in keys:
                value = getattr(value, k)
            if isinstance(value, str) and CREDENTIALS in value:
                notes.append(f"{'.'.join(keys)}: not checked: ${CREDENTIALS} is set by systemd "
                             f"(LoadCredential=) only when the service starts")
                checked = replace_path(checked, keys, None)
    checked = expand_paths(checked, env)  # an unset variable is a ConfigError of its own
    errors: list = []

    def attempt(fn, *args):
        try:
            fn(*args)
        except ConfigError as exc:
            errors.extend(exc.errors)

    mqtt = checked.mqtt
    if mqtt.username is not None and mqtt.password_file is not None:
        from .mqtt_io import read_password
        attempt(read_password, mqtt.password_file, "mqtt.password_file")
    if mqtt.tls.enabled:
        attempt(_check_mqtt_tls, mqtt.tls)
    m = checked.metrics
    if m.enabled:
        if m.basic_auth_password_file is not None:
            attempt(read_secret, m.basic_auth_password_file, "metrics.basic_auth_password_file")
        if m.tls_cert_file is not None:
            from .metrics import _ssl_context
            attempt(_ssl_context, m)
    attempt(_check_directory, checked.checkpoint.directory, "checkpoint.directory")
    if checked.source == "kafka":
        from .kafka_source import client_settings, require_kafka
        attempt(require_kafka)
        attempt(client_settings, checked.kafka)  # reads the SASL / key password secrets, checks TLS files
        attempt(_check_directory, checked.kafka.snapshot_directory, "kafka.snapshot_directory")
    if errors:
        raise ConfigError("", errors=errors)
    return checked


def _check_mqtt_tls(tls) -> None:
    # A throwaway paho client: tls_set loads the CA, certificate and key exactly as at start.
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from .mqtt_io import MqttIO

    MqttIO._set_tls(paho.Client(CallbackAPIVersion.VERSION2), tls)


def _check_directory(path: str, key: str) -> None:
    """`path` is a writable directory, or the nearest existing ancestor lets us create it."""
    target = Path(path)
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot use {path!r}: {str(probe)!r} exists and is not a directory")
    if probe != target:
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(key, f"cannot create {path!r}: {str(probe)!r} is not writable")
        return
    try:
        # os.access is not enough (root, read-only mounts, ACLs): write and remove a probe file.
        with tempfile.NamedTemporaryFile(dir=target, prefix=".streamlstm-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"directory {path!r} is not writable: {exc.strerror or exc}") from None
    ckpt = target / "streamlstm.ckpt"
    if ckpt.exists() and not os.access(ckpt, os.R_OK):
        raise ConfigError(key, f"checkpoint {str(ckpt)!r} is not readable")
