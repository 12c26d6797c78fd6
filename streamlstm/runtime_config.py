"""What the daemon derives from a loaded configuration before it starts: file-path settings with
``$VAR`` / ``${VAR}`` expanded (``${CREDENTIALS_DIRECTORY}``: systemd's LoadCredential=), and the
payload parser's input specs."""
from __future__ import annotations

import dataclasses
import os
import re

from .config import ConfigError
from .payload import InputSpec

__all__ = ["PATH_KEYS", "expand_paths", "input_specs", "replace_path"]

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# File-path settings that may use ${CREDENTIALS_DIRECTORY} (systemd LoadCredential=) or $VARS.
PATH_KEYS = (
    ("mqtt", "password_file"), ("mqtt", "tls", "ca_file"), ("mqtt", "tls", "cert_file"),
    ("mqtt", "tls", "key_file"), ("mqtt", "tls", "key_password_file"), ("metrics", "tls_cert_file"),
    ("metrics", "tls_key_file"), ("metrics", "basic_auth_password_file"), ("checkpoint", "directory"),
    ("kafka", "password_file"), ("kafka", "tls", "ca_file"), ("kafka", "tls", "cert_file"),
    ("kafka", "tls", "key_file"), ("kafka", "tls", "key_password_file"), ("kafka", "snapshot_directory"),
)


def _expand(value: str, key: str, env) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        got = env.get(name)
        if got is None:
            hint = " (set by systemd's LoadCredential=; outside systemd set it yourself)" \
                if name == "CREDENTIALS_DIRECTORY" else ""
            raise ConfigError(key, f"environment variable ${name} used in {value!r} is not set{hint}")
        return got
    return _VAR.sub(sub, value)


def expand_paths(config, env=None):
    """Config with ``$VAR`` / ``${VAR}`` expanded in file-path settings; ConfigError (key path)
    when a variable is unset."""
    env = os.environ if env is None else env
    errors = []
    for keys in PATH_KEYS:
        obj = config
        for k in keys:
            obj = getattr(obj, k)
        if obj is None or "$" not in obj:
            continue
        try:
            value = _expand(obj, ".".join(keys), env)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        config = replace_path(config, keys, value)
    if errors:
        raise ConfigError("", errors=errors)
    return config


def replace_path(obj, keys, value):
    """`obj` (nested dataclasses) with the setting at `keys` set to `value`."""
    if len(keys) == 1:
        return dataclasses.replace(obj, **{keys[0]: value})
    return dataclasses.replace(obj, **{keys[0]: replace_path(getattr(obj, keys[0]), keys[1:], value)})


def input_specs(config) -> list:
    return [InputSpec.from_config(i, config.mqtt.max_payload_bytes) for i in config.inputs]
