"""Topic templates: the one grammar of ``sensors/{sensor}`` style topics, and the matcher.

An input template becomes a subscription (``{sensor}`` -> ``+``, ``{sensor+}`` -> ``#``) and a
matcher that turns a topic name back into a sensor id. Output templates (events, state) hold
``{sensor}`` only, plain topics (status) no placeholder. The configuration reports a problem
under its key path (``reason``); `TopicTemplate` raises it as a ValueError.

Literal ``+`` / ``#`` levels are the one policy switch: a configured input names its sensor with
the placeholder, so the config refuses them (``wildcards=False``); the matcher itself supports
them (``site/+/{sensor}/#``) for code that builds templates directly.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

from .topics import MAX_TOPIC_BYTES

__all__ = ["MAX_SENSOR_ID_CHARS", "TemplateProblem", "TopicTemplate", "filter_matches", "subscription_filter",
           "template_problem", "topic_problem", "valid_sensor_id", "valid_sensor_ids"]

ONE_LEVEL, LAST_LEVELS = "{sensor}", "{sensor+}"
INPUT_PLACEHOLDERS = (ONE_LEVEL, LAST_LEVELS)
MAX_SENSOR_ID_CHARS = 1024  # also the bound in UTF-8 bytes

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_NOT_A_PLACEHOLDER = "has a level that is not a valid placeholder"


class TemplateProblem(NamedTuple):
    reason: str      # as the config reports it, after the key path
    label: str = ""  # a short name of the problem, for TopicTemplate's message


def topic_problem(t: str, placeholders: tuple = ()) -> Optional[TemplateProblem]:
    """What is wrong with an output topic (template) holding only `placeholders`, or None."""
    if not t:
        return TemplateProblem("is empty")
    if "\0" in t:
        return TemplateProblem("must not contain NUL characters")
    try:
        size = len(t.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return TemplateProblem("is not valid UTF-8 text")
    if size > MAX_TOPIC_BYTES:
        return TemplateProblem(f"is longer than MQTT allows ({MAX_TOPIC_BYTES} bytes)")
    for ph in _PLACEHOLDER.findall(t):
        if ph not in placeholders:
            ok = " or ".join(placeholders) if placeholders else "none"
            return TemplateProblem(f"unknown placeholder {ph} (allowed: {ok})", _NOT_A_PLACEHOLDER)
    rest = _PLACEHOLDER.sub("", t)
    if "{" in rest or "}" in rest:
        return TemplateProblem("has an unbalanced { or }", _NOT_A_PLACEHOLDER)
    if "+" in rest or "#" in rest:
        return TemplateProblem("must not contain the MQTT wildcards + or # (the {sensor} placeholder is the wildcard)")
    return None


def template_problem(t: str, *, wildcards: bool = False) -> Optional[TemplateProblem]:
    """What is wrong with an input template, or None. `wildcards`: literal ``+`` / ``#`` levels
    are allowed (they match like in a subscription and capture nothing)."""
    levels = t.split("/")
    if wildcards:
        for i, level in enumerate(levels):
            text = _PLACEHOLDER.sub("", level)
            if ("+" in text or "#" in text) and level not in ("+", "#"):
                return TemplateProblem("'+' and '#' must fill a whole level")
            if level == "#" and i != len(levels) - 1:
                return TemplateProblem("'#' must be the last level")
        # Checked as if they were not there: the rest of the grammar is the same.
        t = "/".join("x" if level in ("+", "#") else level for level in levels)
    problem = topic_problem(t, INPUT_PLACEHOLDERS)
    if problem:
        return problem
    # MQTT wildcards stand for whole levels and '#' must be last, hence the level rules.
    count = t.count(ONE_LEVEL) + t.count(LAST_LEVELS)
    if count != 1:
        label = "has no {sensor} or {sensor+} level" if count == 0 else "has more than one {sensor}"
        return TemplateProblem("must contain {sensor} or {sensor+} exactly once", label)
    for i, level in enumerate(levels):
        if "{sensor" in level and level not in INPUT_PLACEHOLDERS:
            return TemplateProblem("the placeholder must be a whole topic level, e.g. 'sensors/{sensor}'",
                                   _NOT_A_PLACEHOLDER)
        if level == LAST_LEVELS and i != len(levels) - 1:
            return TemplateProblem("{sensor+} (several levels) must be the last topic level",
                                   "has {sensor+} where it must be the last level")
    return None


def subscription_filter(template: str) -> str:
    """MQTT subscription filter of an input topic template."""
    return template.replace(LAST_LEVELS, "#").replace(ONE_LEVEL, "+")


def filter_matches(filt: str, topic: str) -> bool:
    """Whether an MQTT subscription filter matches a topic name."""
    f, t = filt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def valid_sensor_id(sensor) -> bool:
    # Sensor ids become levels of event topics and appear in log lines: no wildcard, no control
    # or other non-printable character (a broker drops the connection over a control character
    # in a topic; a newline would forge a log line), no lone surrogate, a bounded length.
    if type(sensor) is not str or not sensor or len(sensor) > MAX_SENSOR_ID_CHARS:
        return False
    if "+" in sensor or "#" in sensor or not sensor.isprintable():
        return False
    # isprintable() already refused surrogates, so the encoding cannot fail.
    return sensor.isascii() or len(sensor.encode("utf-8")) <= MAX_SENSOR_ID_CHARS


def valid_sensor_ids(ids) -> bool:
    """Whether every id is valid (`valid_sensor_id`), checked with C-level passes over all of
    them (a batch payload names a sensor per item). False: check them one by one."""
    ids = list(ids)
    if not ids:
        return True
    if set(map(type, ids)) != {str}:
        return False
    lengths = list(map(len, ids))
    if min(lengths) == 0 or max(lengths) > MAX_SENSOR_ID_CHARS:
        return False
    text = "".join(ids)  # printable, ASCII and free of wildcards iff each id is
    if "+" in text or "#" in text or not text.isprintable():
        return False
    return text.isascii() or all(map(valid_sensor_id, ids))


# Level kinds of a compiled template.
_LIT, _PLUS, _HASH, _CAP, _CAP_MULTI = range(5)


class TopicTemplate:
    """``plant/{sensor}/temperature`` -> subscription ``plant/+/temperature``, match -> id.

    ``{sensor}`` captures one whole topic level; ``{sensor+}``, only as the last level, captures
    all remaining levels (subscribed as ``#``), joined with ``/``. Literal ``+`` / ``#`` levels
    match like MQTT wildcards and capture nothing. Like a broker, wildcards at the first level do
    not match topics starting with ``$``. Empty captured levels do not match.
    """

    __slots__ = ("template", "subscription", "_levels", "_nlevels", "_cap_index", "_simple")

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise ValueError(f"topic template must be a string, got {type(template).__name__}")
        problem = template_problem(template, wildcards=True)
        if problem:
            what = f"topic template {template!r}"
            raise ValueError(f"{what} {problem.label} ({problem.reason})" if problem.label
                             else f"{what}: {problem.reason}")
        kinds = []
        for i, level in enumerate(template.split("/")):
            if level in INPUT_PLACEHOLDERS:
                self._cap_index = i
            kinds.append({ONE_LEVEL: (_CAP, None), LAST_LEVELS: (_CAP_MULTI, None), "+": (_PLUS, None),
                          "#": (_HASH, None)}.get(level, (_LIT, level)))
        self.template = template
        self.subscription = subscription_filter(template)
        self._levels = tuple(kinds)
        self._nlevels = len(kinds)
        # Common case: literals and one {sensor}, matched with a length check and compares.
        self._simple = all(k in (_LIT, _CAP) for k, _ in kinds)

    def __repr__(self):
        return f"TopicTemplate({self.template!r})"

    def __eq__(self, other):
        return isinstance(other, TopicTemplate) and other.template == self.template

    def __hash__(self):
        return hash(self.template)

    def match(self, topic: str):
        """The sensor id for `topic`, or None when it does not fit the template."""
        if type(topic) is not str or not topic:
            return None
        # Published topic names never hold wildcards or NUL: such a string is no topic.
        if "+" in topic or "#" in topic or "\x00" in topic:
            return None
        parts = topic.split("/")
        levels = self._levels
        if self._simple:
            if len(parts) != self._nlevels:
                return None
            for (kind, literal), part in zip(levels, parts):
                if kind == _LIT and part != literal:
                    return None
            if self._cap_index == 0 and topic[0] == "$":
                return None
            sensor = parts[self._cap_index]
            return sensor if sensor and valid_sensor_id(sensor) else None
        return self._match_general(topic, parts)

    def _match_general(self, topic, parts):
        levels = self._levels
        if topic[0] == "$" and levels[0][0] != _LIT:
            return None
        sensor = None
        n = len(parts)
        for i, (kind, literal) in enumerate(levels):
            if kind == _HASH:
                # 'a/#' also matches 'a' (MQTT: '#' includes the parent level).
                if sensor is None or n < i:
                    return None
                return sensor if valid_sensor_id(sensor) else None
            if kind == _CAP_MULTI:
                rest = parts[i:]
                if not rest or not all(rest):
                    return None
                sensor = "/".join(rest)
                return sensor if valid_sensor_id(sensor) else None
            if i >= n:
                return None
            part = parts[i]
            if kind == _LIT:
                if part != literal:
                    return None
            elif kind == _CAP:
                if not part:
                    return None
                sensor = part
            # _PLUS matches any level, empty included (as in MQTT).
        if n != len(levels):
            return None
        return sensor if sensor is not None and valid_sensor_id(sensor) else None
