"""Every exception fanroute raises on purpose, under one root.

.. code-block:: text

    FanrouteError
    ├── ConfigError            a setting that cannot work: one sentence naming it (exit 2)
    ├── ProtocolError          a client command that cannot be carried out: ``code``, ``id``
    ├── AuthError              a token that cannot be accepted: why
    ├── WireError              an inter-node message refused: ``reason`` (mac, replay, malformed)
    ├── ClientError            what the Python SDK (``fanroute.client``) raises
    │   ├── RequestFailed      the gateway answered with an ``error`` frame: ``code``
    │   └── ConnectionLost     the connection dropped before the answer came
    ├── LocalClusterError      a local cluster's process died or was not ready in time
    └── BenchError             a benchmark that could not run as asked (``fanroute.bench``)

Servers never let one of these escape their loops on account of a single client or
message: a :class:`ProtocolError` becomes an ``error`` frame, a :class:`WireError` a
counted drop, an :class:`AuthError` an ``unauthorized`` answer and close ``4001``.
Only :class:`ConfigError` stops a process, at start-up. Catch :class:`FanrouteError`
to catch them all; anything else that escapes is a bug.
"""

from __future__ import annotations

from fanroute.codes import ErrorCode


class FanrouteError(Exception):
    """The root of every exception fanroute raises on purpose."""


class ConfigError(FanrouteError):
    """A setting that cannot work; the message is one sentence naming it."""


class ProtocolError(FanrouteError):
    """A command that cannot be carried out, with the code the client is told."""

    def __init__(self, code: ErrorCode | str, message: str, id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class AuthError(FanrouteError):
    """A token that cannot be accepted; the message says why."""


class WireError(FanrouteError):
    """An inter-node message or frame that does not follow the codec (``fanroute.wire``).

    ``reason`` is a short fixed word for the metric label (``mac``, ``replay``,
    ``malformed``), never text from the message.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ClientError(FanrouteError):
    """What the Python SDK raises."""


class RequestFailed(ClientError):
    """The gateway answered a command with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ClientError):
    """The connection dropped before the gateway answered; the outcome is unknown."""

    def __init__(self) -> None:
        super().__init__("connection lost before the answer")
        self.code = ErrorCode.OUTCOME_UNKNOWN
        self.message = "connection lost before the answer"


class LocalClusterError(FanrouteError):
    """A process of a local cluster died or was not ready in time; the message names
    it and ends with the last lines of its log."""


class BenchError(FanrouteError):
    """A benchmark that could not run as asked; the message says why."""
