"""Home Assistant MQTT discovery: what the daemon announces, encoded (no MQTT, no state here).

Per sensor, two entities on one device per daemon (``mqtt.client_id``):

* ``binary_sensor`` (device class ``problem``): on while the sensor is anomalous;
* ``sensor``: the anomaly score (0..1), for history graphs and automations with own thresholds.

Both read the retained per-sensor state topic (`state_topic`); availability follows the daemon's
retained status topic. Entity ids are proposed with ``default_entity_id`` (``object_id`` is
deprecated since Home Assistant 2025.10 and ignored from 2026.4).

The daemon publishes these retained when a sensor first shows up, again after every (re)connect
(a broker without persistence forgets retained messages), and whenever Home Assistant's birth
message (``<discovery_prefix>/status`` = ``online``) says it restarted.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Optional

__all__ = ["birth_topic", "discovery_messages", "state_topic"]

BIRTH_ONLINE = b"online"


def state_topic(output) -> Optional[str]:
    """The per-sensor state topic in force: ``output.state_topic``, or, when discovery is on and
    it is unset, one derived from the status topic (``streamlstm/status`` ->
    ``streamlstm/state/{sensor}``), because the entities need a state to read."""
    if output.state_topic is not None:
        return output.state_topic
    if not output.homeassistant.enabled:
        return None
    parent, _, _ = output.status_topic.rpartition("/")
    return f"{parent}/state/{{sensor}}" if parent else "state/{sensor}"


def birth_topic(output) -> str:
    return f"{output.homeassistant.discovery_prefix}/status"


def _object_id(text: str) -> str:
    # Discovery topic levels and unique ids: [a-zA-Z0-9_-]; the hash keeps "a.b" and "a_b" apart.
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64]
    return f"{clean}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _entity_slug(object_id: str) -> str:
    # Entity ids are lower-case letters, digits and single underscores.
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", object_id.lower())).strip("_")


def discovery_messages(config, sensor: str, version: str) -> list:
    """[(topic, retained payload)] announcing `sensor`'s entities (its group is in the state's
    attributes: the shared device must not change with each sensor's group)."""
    out = config.output
    prefix = out.homeassistant.discovery_prefix
    node = _object_id(config.mqtt.client_id)
    obj = _object_id(sensor)
    slug = _entity_slug(obj)
    state = state_topic(out).replace("{sensor}", sensor)
    common = {
        "state_topic": state,
        "json_attributes_topic": state,
        "availability_topic": out.status_topic,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [f"streamlstm_{node}"], "name": f"streamlstm {config.mqtt.client_id}",
                   "model": "streamlstm", "sw_version": version},
    }
    flag = {
        "name": f"{sensor} anomaly",
        "unique_id": f"{node}_{obj}",  # unchanged since the first release: keeps the entity registry entry
        "default_entity_id": f"binary_sensor.streamlstm_{slug}",
        "device_class": "problem",
        "value_template": "{{ 'ON' if value_json.anomaly else 'OFF' }}",
        **common,
    }
    score = {
        "name": f"{sensor} anomaly score",
        "unique_id": f"{node}_{obj}_score",
        "default_entity_id": f"sensor.streamlstm_{slug}_score",
        "state_class": "measurement",
        "suggested_display_precision": 3,
        "value_template": "{{ value_json.score }}",
        **common,
    }
    return [
        (f"{prefix}/binary_sensor/{node}/{obj}/config", json.dumps(flag, separators=(",", ":")).encode()),
        (f"{prefix}/sensor/{node}/{obj}/config", json.dumps(score, separators=(",", ":")).encode()),
    ]
