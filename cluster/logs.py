"""Logs a platform can ingest: one event per line, JSON or text, with stable field names.

``--log-format json`` writes each record as one JSON object on one line::

    {"ts":"2026-12-02T18:40:00.123Z","level":"info","logger":"fanroute.gateway",
     "message":"connection closed","event":"connection_closed","connection":"9f2c...",
     "user":"alice","code":4003,"reason":"disconnected by the server"}

``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``message`` are on
every line; a record that is one of fanroute's events (:func:`event`) also carries
``event`` and whichever of :data:`FIELDS` apply (``connection``, ``user``, ``topic``,
``code``, ``reason``, ``shard``, ``gateway``, and for replication ``router``,
``view``, ``members``, ``ready``). A field that does not apply is left
out rather than written as null. An exception adds ``error`` (its traceback).
``--log-format text`` writes the same record for a person: the message, then the
event and its fields as ``key=value``. The default, ``auto``, is JSON when stderr is
not a terminal (a container, a service manager, a file) and text when it is.

Why the standard library and no logging package: every module already logs through
``logging``; a formatter is all JSON output needs, and ``orjson`` (a runtime
dependency already) serialises a line in about a microsecond. structlog or
python-json-logger would add a dependency and a second way to log for that one
formatter. Events at high volume (every connection opened or closed) are logged at
``debug``, so a busy gateway pays one level check per connection unless asked.

Values in a line may come from clients (a topic, a user, a close reason): JSON
escapes them, and the text format quotes any value with spaces, quotes or control
characters, so a client cannot forge a line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import orjson

FORMATS = ("auto", "json", "text")
# Event fields, in the order the text format writes them.
FIELDS = ("event", "connection", "user", "topic", "code", "reason", "shard", "gateway", "router", "view", "members", "ready")
_EVENT_KEY = "fanroute_event"  # where event() puts its fields on a LogRecord


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (a subset of :data:`FIELDS`; ``None`` values are left out).

    The level check comes first, so an event nobody asked for costs no formatting.
    """
    if logger.isEnabledFor(level):
        values = {k: v for k, v in fields.items() if v is not None}
        values["event"] = name
        logger.log(level, message, extra={_EVENT_KEY: values})


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    return getattr(record, _EVENT_KEY, None) or {}


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = _fields(record)
        for key in FIELDS:
            if key in fields:
                line[key] = fields[key]
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _show(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """A line for a person: time, level, logger, message, then the event's fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        tail = " ".join(f"{key}={_show(fields[key])}" for key in FIELDS if key in fields)
        head, sep, rest = line.partition("\n")  # a traceback stays below the first line
        return f"{head} [{tail}]{sep}{rest}"


def resolve(fmt: str, stream: TextIO) -> str:
    """``auto`` as ``json`` or ``text`` for ``stream``: text only for a terminal."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    try:
        return "text" if isatty is not None and isatty() else "json"
    except ValueError:  # a closed stream
        return "json"


def setup(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Send every ``fanroute`` log record to ``stream`` (stderr) in ``fmt``; returns the format used.

    Replaces the root logger's handlers, so calling it again (a test, an embedder)
    does not double every line.
    """
    stream = sys.stderr if stream is None else stream
    chosen = resolve(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # ``debug`` is fanroute's own: the libraries under it (pynng logs every pipe
    # event at debug) stay at info.
    wanted = logging.getLevelName(level.upper())
    root.setLevel(max(wanted, logging.INFO))
    logging.getLogger("fanroute").setLevel(wanted)
    return chosen
