"""Log line formats: plain text, JSON lines, and journald's priority prefixes.

* Under systemd (``$JOURNAL_STREAM`` set: stderr goes to the journal) each line starts with
  ``<N>``, the syslog priority (3 error, 4 warning, 6 info, 7 debug), which journald strips and
  stores as PRIORITY, so ``journalctl -p warning -u streamlstm`` works. journald adds its own
  time stamps, so the text format leaves them out there.
* ``logging.format: json``: one JSON object per line (``ts`` in ISO 8601 UTC, ``level``,
  ``logger``, ``message``, ``exc`` for tracebacks) for log shippers.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys

__all__ = ["FORMATS", "configure_logging", "make_formatter", "syslog_priority"]

FORMATS = ("text", "json")


def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                  .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _JournalFormatter(logging.Formatter):
    """Prefixes every physical line with the record's priority (journald reads lines)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def make_formatter(fmt: str = "text", env=None) -> logging.Formatter:
    env = os.environ if env is None else env
    journal = bool(env.get("JOURNAL_STREAM"))
    if fmt == "json":
        inner: logging.Formatter = _JsonFormatter()
    elif journal:
        inner = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    else:
        inner = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _JournalFormatter(inner) if journal else inner


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log lines to stderr (text or JSON; journald priority prefixes under systemd)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_streamlstm", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._streamlstm = True
        root.addHandler(handler)
    handler.setFormatter(make_formatter(fmt))
    root.setLevel(level)
