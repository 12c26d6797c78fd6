"""MQTT topic-name rules, checked before a topic goes on the wire.

A PUBLISH whose topic the broker finds malformed makes it drop the whole connection (MQTT 5
section 1.5.4: ill-formed UTF-8 "MUST close the Network Connection"); paho then re-sends the
same queued message after every reconnect, a storm that blocks every other event. So a topic
built from untrusted text (a sensor id) is checked here first and refused locally instead.

The rules are mosquitto's (`mosquitto_validate_utf8` and `mosquitto_pub_topic_check`): not
empty, at most 65535 bytes of UTF-8, no wildcard (`+`, `#`), no NUL, no surrogate, no
control character (U+0001-U+001F, U+007F-U+009F) and no Unicode non-character.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["MAX_TOPIC_BYTES", "publish_topic_problem"]

MAX_TOPIC_BYTES = 65535


def _bad_code_point(c: str) -> bool:
    o = ord(c)
    return (o <= 0x1F or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or 0xFDD0 <= o <= 0xFDEF
            or (o & 0xFFFE) == 0xFFFE)


def publish_topic_problem(topic) -> Optional[str]:
    """Why `topic` cannot be published to, or None when a broker accepts it."""
    if type(topic) is not str or not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcard (+ or #) in a topic name"
    if not (topic.isascii() and topic.isprintable()):
        if any(_bad_code_point(c) for c in topic):
            return "control character, surrogate or non-character in the topic"
    if len(topic) > MAX_TOPIC_BYTES // 4 and len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"topic longer than {MAX_TOPIC_BYTES} bytes"
    return None
