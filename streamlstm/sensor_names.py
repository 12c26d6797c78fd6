"""``sensor_name`` templates: how an input names the sensors it produces.

A template is text with placeholders, e.g. ``{sensor}/{field}``:

* ``{sensor}``: what the topic template captured (``zigbee2mqtt/{sensor}`` -> the device name),
  or, for ``format: batch``, the sensor id the payload names;
* ``{field}``: the field path a reading came from (inputs with ``fields``, and ``format: influx``);
* ``{measurement}`` and ``{tag.NAME}``: the measurement and a tag of an InfluxDB line
  (``format: influx`` only).

Templates are compiled once (config time) into literal and placeholder parts; rendering is a join.
"""
from __future__ import annotations

import re
from typing import Optional

__all__ = ["SensorName", "default_sensor_name", "template_problem"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TAG = re.compile(r"tag\.([A-Za-z0-9_.\-]+)\Z")
SIMPLE = ("sensor", "field", "measurement")


def default_sensor_name(fmt: str, has_fields: bool) -> str:
    """The template used when an input sets no ``sensor_name``."""
    if fmt == "influx" or has_fields:
        return "{sensor}/{field}"
    return "{sensor}"


def _parts(template: str):
    """[(is_placeholder, text)] or raises ValueError."""
    parts = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            parts.append((False, template[pos:m.start()]))
        name = m.group(1)
        if name not in SIMPLE and not _TAG.match(name):
            raise ValueError(f"unknown placeholder {{{name}}} (allowed: {{sensor}}, {{field}}, "
                             "{measurement}, {tag.NAME})")
        parts.append((True, name))
        pos = m.end()
    if pos < len(template):
        parts.append((False, template[pos:]))
    for is_ph, text in parts:
        if not is_ph and ("{" in text or "}" in text):
            raise ValueError("has an unbalanced { or }")
        if not is_ph and ("+" in text or "#" in text or "\x00" in text):
            # Sensor ids become topic levels of event topics: no MQTT wildcards in them.
            raise ValueError("must not contain '+', '#' or NUL (sensor ids become topic levels)")
    if not any(is_ph for is_ph, _ in parts):
        raise ValueError("has no placeholder: every reading of the input would be one sensor")
    return parts


def template_problem(template: str, fmt: str, has_fields: bool) -> Optional[str]:
    """Why `template` does not fit an input of format `fmt` (None: it does)."""
    try:
        parts = _parts(template)
    except ValueError as exc:
        return str(exc)
    names = {text for is_ph, text in parts if is_ph}
    per_field = fmt == "influx" or has_fields
    if per_field and "field" not in names:
        return ("must contain {field}: each field becomes its own sensor, so without it the "
                "fields of one message would be one sensor")
    if not per_field and "field" in names:
        return "{field} needs fields (or format: influx)"
    if fmt != "influx" and (names & {"measurement"} or any(n.startswith("tag.") for n in names)):
        return "{measurement} and {tag.NAME} need format: influx"
    return None


class SensorName:
    """A compiled template; ``render(sensor=..., field=..., ...)`` -> id, or None if a tag is missing."""

    __slots__ = ("template", "parts", "simple")

    def __init__(self, template: str):
        self.template = template
        self.parts = tuple(_parts(template))
        self.simple = self.parts == ((True, "sensor"),)

    def __repr__(self):
        return f"SensorName({self.template!r})"

    def render(self, sensor: str, field: Optional[str] = None, measurement: Optional[str] = None,
               tags: Optional[dict] = None) -> Optional[str]:
        if self.simple:
            return sensor
        out = []
        for is_ph, text in self.parts:
            if not is_ph:
                out.append(text)
            elif text == "sensor":
                out.append(sensor)
            elif text == "field":
                out.append(field or "")
            elif text == "measurement":
                out.append(measurement or "")
            else:
                value = (tags or {}).get(text[4:])
                if value is None:
                    return None
                out.append(value)
        return "".join(out)

    def missing_tag(self, tags: dict) -> Optional[str]:
        """The first {tag.NAME} of the template that `tags` lacks."""
        for is_ph, text in self.parts:
            if is_ph and text.startswith("tag.") and text[4:] not in tags:
                return text[4:]
        return None
