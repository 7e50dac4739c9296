"""The server API across the cluster: who is connected as whom, and commands that reach every gateway.

``POST /api/disconnect`` and ``POST /api/unsubscribe`` must act on every gateway, and
``GET /api/info`` must see every gateway and router, yet a gateway knows only its own
connections. The cluster already has links that reach everywhere: every gateway says
HELLO to every shard. So a command travels over them, not over a new network path:

1. the gateway that took the call carries it out on its own connections and sends it
   as a CTRL frame to every shard it reaches (``fanroute.wire``; sealed and MACed
   like every inter-node message);
2. each shard passes it on as RELAY to every gateway it knows (the sender too);
3. each gateway carries it out the first time it sees its id and ignores the copies
   (one per shard), so a command is carried out once per gateway even when some
   shards are down, as long as one shard links the two.

For info, each gateway reports its counts (connections, subscriptions, topics) to
every shard with its heartbeat (REPORT); the gateway answering ``GET /api/info`` asks
every shard (INFOQ) and merges the answers (INFO): each shard's own counts, and the
reports of the gateways it knows.

This module holds the rules and does no I/O: the index of connections by user (which
also counts them for ``--max-connections-per-user``), command ids and their dedupe,
the frames, and the merge. The shells (``gateway.server``, ``gateway.api``) carry the
commands out and move the frames.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fanroute import protocol as p
from fanroute import wire
from fanroute.codes import ErrorCode
from fanroute.errors import ProtocolError
from fanroute.gateway.hub import Session

SEEN_IDS = 4096  # command ids remembered for dedupe; a copy arrives within a link's delay
DISCONNECT, UNSUBSCRIBE = "disconnect", "unsubscribe"
MAX_USER_LENGTH = 1024  # a token's sub longer than this is refused as input, not looked up
_FIELDS = {DISCONNECT: ("user", "reconnect"), UNSUBSCRIBE: ("user", "topic")}


@dataclass(frozen=True, slots=True)
class Command:
    """One server API command: ``disconnect`` a user, or ``unsubscribe`` them from a topic."""

    id: str
    kind: str  # DISCONNECT or UNSUBSCRIBE
    user: str
    topic: str | None = None  # UNSUBSCRIBE only
    reconnect: bool = False  # DISCONNECT only: 1012 instead of 4003

    def frame(self, kind: int = wire.CTRL) -> list[Any]:
        return [kind, self.id, self.kind, self.user, self.topic, self.reconnect]

    @classmethod
    def from_frame(cls, frame: list[Any]) -> Command:
        """A CTRL or RELAY frame that passed :func:`fanroute.wire.check_shard_frame`."""
        _, id, kind, user, topic, reconnect = frame
        return cls(id, kind, user, topic, reconnect)


@dataclass(frozen=True, slots=True)
class Request:
    """A valid ``POST /api/disconnect`` or ``/api/unsubscribe`` body."""

    kind: str
    user: str
    topic: str | None = None
    reconnect: bool = False


def parse_request(kind: str, body: Any) -> Request:
    """The body of a disconnect or unsubscribe call, or :class:`ProtocolError` (``bad_request``) in one sentence.

    Unknown fields are refused rather than ignored: ``{"user": "a", "reconect": true}``
    would otherwise close with 4003 a client its operator meant to let back in.
    """
    fields = _FIELDS[kind]
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the body must be a JSON object with {' and '.join(fields)}")
    unknown = sorted(str(k) for k in body if k not in fields)
    if unknown:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"unknown field {unknown[0]!r}: {kind} takes {' and '.join(fields)}"
        )
    user = body.get("user")
    if not isinstance(user, str) or not user or len(user) > MAX_USER_LENGTH:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"user must be a token subject: a non-empty string of at most {MAX_USER_LENGTH} characters"
        )
    if kind == DISCONNECT:
        reconnect = body.get("reconnect", False)
        if type(reconnect) is not bool:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "reconnect must be true or false")
        return Request(kind, user, reconnect=reconnect)
    if "topic" not in body:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "unsubscribe needs a topic")
    return Request(kind, user, topic=p.check_topic(body["topic"]))


@dataclass(slots=True)
class Counts:
    """What a gateway reports of itself, and ``GET /api/info`` lists."""

    connections: int
    subscriptions: int
    topics: int


@dataclass(slots=True)
class InfoRequest:
    """A ``GET /api/info`` waiting for the shards' answers."""

    req: int
    waiting: set[str]  # shard names not answered yet
    answers: dict[str, list[Any]] = field(default_factory=dict)  # shard -> INFO frame
    on_done: Callable[[], None] = lambda: None

    @property
    def done(self) -> bool:
        return not self.waiting


class Users:
    """This gateway's connections by user (the token's ``sub``), in the order they authenticated.

    Anonymous connections have no subject and are not held.
    """

    def __init__(self) -> None:
        self._by_user: dict[str, dict[Session, None]] = {}
        self._user_of: dict[Session, str] = {}

    def add(self, user: str, session: Session) -> None:
        self._by_user.setdefault(user, {})[session] = None
        self._user_of[session] = user

    def remove(self, session: Session) -> None:
        user = self._user_of.pop(session, None)
        if user is None:
            return
        sessions = self._by_user[user]
        sessions.pop(session, None)
        if not sessions:
            del self._by_user[user]

    def user_of(self, session: Session) -> str | None:
        return self._user_of.get(session)

    def count(self, user: str) -> int:
        return len(self._by_user.get(user, ()))

    def sessions(self, user: str) -> list[Session]:
        return list(self._by_user.get(user, ()))

    def __len__(self) -> int:
        """Distinct users with at least one connection."""
        return len(self._by_user)


class Control:
    """One gateway's side of the server API (see the module docstring)."""

    def __init__(self, instance: str, *, seen_ids: int = SEEN_IDS) -> None:
        self.instance = instance
        self.users = Users()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_max = seen_ids
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(6)
        self.info_requests: dict[int, InfoRequest] = {}
        self._info_ids = itertools.count(1)

    # --- commands --------------------------------------------------------------------

    def command(self, request: Request) -> Command:
        """The command for a call to this gateway's API, with a cluster-unique id (already seen here)."""
        cmd = Command(f"{self._prefix}-{next(self._ids)}", request.kind, request.user, request.topic, request.reconnect)
        self._first(cmd.id)
        return cmd

    def relayed(self, frame: list[Any]) -> Command | None:
        """A RELAY from a shard: the command the first time its id arrives, else ``None``."""
        cmd = Command.from_frame(frame)
        return cmd if self._first(cmd.id) else None

    def _first(self, id: str) -> bool:
        if id in self._seen:
            return False
        self._seen[id] = None
        if len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)
        return True

    def targets(self, cmd: Command) -> list[Session]:
        """The local sessions ``cmd`` acts on: every connection of the user, or those subscribed to the topic."""
        sessions = self.users.sessions(cmd.user)
        if cmd.kind == UNSUBSCRIBE:
            return [s for s in sessions if cmd.topic in s.topics]
        return sessions

    # --- info ------------------------------------------------------------------------

    def report_frame(self, counts: Counts) -> list[Any]:
        """REPORT: this gateway's counts, sent to every shard with its heartbeat."""
        return [wire.REPORT, self.instance, counts.connections, counts.subscriptions, counts.topics]

    def ask_info(self, shards: Iterable[str]) -> tuple[InfoRequest, list[Any]]:
        """A new info request to ``shards`` (those up), and the INFOQ frame to send each."""
        req = next(self._info_ids)
        request = self.info_requests[req] = InfoRequest(req, set(shards))
        return request, [wire.INFOQ, req]

    def info_answer(self, shard: str, frame: list[Any]) -> InfoRequest | None:
        """An INFO frame from ``shard``: the request it answers, if still waiting."""
        request = self.info_requests.get(frame[1])
        if request is None or shard not in request.waiting:
            return None
        request.waiting.discard(shard)
        request.answers[shard] = frame
        return request

    def end_info(self, request: InfoRequest) -> None:
        self.info_requests.pop(request.req, None)


def merge_info(
    instance: str, inbox: str, own: Counts, shards: Iterable[str], answers: Mapping[str, list[Any]]
) -> dict[str, Any]:
    """The body of ``GET /api/info`` from this gateway's own counts and the shards' INFO answers.

    A gateway appears once, however many shards report it (they hold the same
    heartbeat report, at most a beat apart); this gateway's own counts are current.
    A shard that did not answer in time is listed with ``"reachable": false``.
    """
    gateways: dict[str, dict[str, Any]] = {
        instance: {"instance": instance, "inbox": inbox, "self": True, **_counts(own)}
    }
    routers = []
    for name in sorted(shards):
        frame = answers.get(name)
        if frame is None:
            routers.append({"name": name, "reachable": False})
            continue
        _, _, (topics, linked, interest), reports = frame
        routers.append(
            {"name": name, "reachable": True, "connections": linked, "subscriptions": interest, "topics": topics}
        )
        for g_instance, g_inbox, connections, subscriptions, g_topics in reports:
            if g_instance not in gateways:
                gateways[g_instance] = {
                    "instance": g_instance,
                    "inbox": g_inbox,
                    "self": False,
                    **_counts(Counts(connections, subscriptions, g_topics)),
                }
    listed = sorted(gateways.values(), key=lambda g: (not g["self"], g["instance"]))
    return {"gateways": listed, "routers": routers}


def own_counts(sessions: Iterable[Session], topics: int) -> Counts:
    """A gateway's counts: its connections, their subscriptions, and the topics they follow."""
    connections = subscriptions = 0
    for session in sessions:
        connections += 1
        subscriptions += len(session.topics)
    return Counts(connections, subscriptions, topics)


def _counts(c: Counts) -> dict[str, int]:
    return {"connections": c.connections, "subscriptions": c.subscriptions, "topics": c.topics}
