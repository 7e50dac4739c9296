"""Every error code and close code of the client protocol, each with what it means.

``gateway/PROTOCOL.md`` lists the same codes in its tables; a test checks that the two
agree, so a code is added here first. Each close code carries the rule a client
follows when it sees it (:class:`Reconnect`): the Python SDK and ``fanroute.js`` both
act on these rules.
"""

from __future__ import annotations

from enum import Enum, IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame."""

    BAD_REQUEST = "bad_request"  # the command is malformed; fix the client
    UNAUTHORIZED = "unauthorized"  # no valid token (the connection is then closed with 4001)
    FORBIDDEN = "forbidden"  # the identity may not do this on this topic
    RATE_LIMITED = "rate_limited"  # a rate limit refused it; slow down
    TOO_LARGE = "too_large"  # a size or count limit refused it
    UNAVAILABLE = "unavailable"  # the topic's shard is unreachable: not applied
    OUTCOME_UNKNOWN = "outcome_unknown"  # the link was lost after sending: retry with the same idem
    INTERNAL = "internal"  # the gateway failed handling it; nothing else is affected


class Reconnect(Enum):
    """What a client does after a close code."""

    NEVER = "never"  # terminal: do not reconnect on your own
    BACKOFF = "backoff"  # reconnect with the usual exponential backoff
    PROMPT = "prompt"  # reconnect within a second, with jitter (a draining gateway)
    LONGEST = "longest"  # reconnect after the longest backoff


class CloseCode(IntEnum):
    """WebSocket close codes the gateway sends (RFC 6455 and fanroute's 4xxx)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RESTART = 1012
    TRY_AGAIN = 1013
    UNAUTHORIZED = 4001
    DISCONNECTED = 4003
    SLOW_CONSUMER = 4008
    HEARTBEAT_TIMEOUT = 4009
    MESSAGE_TIMEOUT = 4010
    RATE_LIMIT = 4029

    @property
    def reconnect(self) -> Reconnect:
        return _RECONNECT.get(self, Reconnect.BACKOFF)


_RECONNECT = {
    CloseCode.POLICY: Reconnect.NEVER,
    CloseCode.UNAUTHORIZED: Reconnect.NEVER,
    CloseCode.DISCONNECTED: Reconnect.NEVER,
    CloseCode.RESTART: Reconnect.PROMPT,
    CloseCode.RATE_LIMIT: Reconnect.LONGEST,
}


#: The reason of the 4001 close for a token that expired on an open connection. It is
#: the one 4001 a client recovers from, with a new token from its token source; a
#: 4001 with any other reason means a token was refused, and stays terminal.
TOKEN_EXPIRED_REASON = "token expired"


def reconnect_rule(code: int | None) -> Reconnect:
    """The rule for any close code a client may see, fanroute's or not."""
    try:
        return CloseCode(code).reconnect
    except ValueError:
        return Reconnect.BACKOFF


# Close codes as metric label values: anything else a client sends is "other", so a
# hostile client cannot mint one time series per code it invents.
_LABELS = frozenset(int(c) for c in CloseCode) | {1005, 1006}


def close_code_label(code: int | None) -> str:
    """The metric label for a close code: itself when fanroute knows it, else ``other``."""
    return str(code) if code in _LABELS else "other"
