"""The gateway's admission rules with no sockets: every rule, on a fake clock.

Each test asks :class:`Admission` a question with the time passed in and checks the
decision: what is forwarded, answered with which error code, closed with which close
code, and which metric the shell is told to count. The last tests drive the HTTP
API's back-pressure against a fake shard link, still with no socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
import pytest
import trio
import trio.testing

from fanroute import protocol as p
from fanroute import wire
from fanroute.auth import ANONYMOUS, API, Authenticator, Identity
from fanroute.codes import CloseCode, ErrorCode
from fanroute.config import GatewayConfig
from fanroute.gateway import api as api_module
from fanroute.gateway.admission import (
    FORWARD,
    SEND_PING,
    SHED_SLACK,
    Admission,
    Answer,
    Authenticated,
    Close,
    ConnState,
    Count,
    Refuse,
    Wait,
)
from fanroute.gateway.hub import Hub
from fanroute.permissions import Policy, load_policy
from fanroute.ring import Ring
from tests.unit.test_access_rules import CONFIG, SECRET


@dataclass
class Clock:
    """A fake clock: ``now`` is monotonic time, ``wall`` Unix time; both move together."""

    now: float = 1000.0
    wall: float = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def token(sub: str, exp: float | None = None, **claims) -> str:
    body = {"sub": sub, "exp": exp if exp is not None else time.time() + 3600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture
def policy(tmp_path) -> Policy:
    f = tmp_path / "ns.toml"
    f.write_text(CONFIG)
    return load_policy(str(f))


def admission(policy: Policy | None = None, *, anonymous: bool = True, **settings) -> Admission:
    config = GatewayConfig(routers=[("s0", "inproc://s0")], **settings)
    auth = Authenticator(secret=SECRET, allow_anonymous=anonymous)
    return Admission(config, policy=policy or Policy(), auth=auth)


def open_conn(gate: Admission, clock: Clock, topics: dict[str, int] | None = None) -> ConnState:
    return gate.connection(topics if topics is not None else {}, clock.now)


PING = p.Ping(0, 1)


def publish(topic: str = "t.x") -> p.Publish:
    return p.Publish(topic, 1, 2)


# --- auth state, the auth deadline and token expiry ---------------------------------


def test_without_a_token_the_auth_deadline_passes_and_closes_4001():
    clock = Clock()
    gate = admission(anonymous=False, auth_timeout=5.0)
    state = open_conn(gate, clock)
    assert state.identity is None and state.auth_deadline == clock.now + 5.0
    clock.advance(4.9)
    assert not isinstance(gate.sweep(state, clock.now, clock.wall, clock.now, False), Close)
    clock.advance(0.2)
    due = gate.sweep(state, clock.now, clock.wall, clock.now, False)
    assert isinstance(due, Close) and due.code == CloseCode.UNAUTHORIZED == 4001
    assert due.counts == (Count("auth_failures", "timeout"),) and due.why == "unauthorized"


def test_a_valid_token_in_time_clears_the_deadline():
    clock = Clock()
    gate = admission(anonymous=False)
    state = open_conn(gate, clock)
    decision = gate.command(state, p.Connect(token("alice"), 1), clock.now)
    assert isinstance(decision, Authenticated) and decision.revoked == ()
    assert state.subject == "alice" and state.auth_deadline is None
    clock.advance(60)
    assert not isinstance(gate.sweep(state, clock.now, clock.wall, clock.now, False), Close)


def test_an_expired_token_closes_4001():
    clock = Clock()
    gate = admission()
    state = open_conn(gate, clock)
    state.identity = Identity("alice", {}, expires=clock.wall + 30)
    assert not isinstance(gate.sweep(state, clock.now, clock.wall, clock.now, False), Close)
    clock.advance(31)
    due = gate.sweep(state, clock.now, clock.wall, clock.now, False)
    assert isinstance(due, Close) and due.code == 4001 and due.reason == "token expired"
    assert due.counts == (Count("auth_failures", "expired"),)


def test_commands_before_a_token_are_unauthorized_but_the_connection_stays():
    clock = Clock()
    gate = admission(anonymous=False)
    state = open_conn(gate, clock)
    for cmd in (publish(), p.Subscribe("t.x", 1), p.Unsubscribe("t.x", 1)):
        decision = gate.command(state, cmd, clock.now)
        assert isinstance(decision, Answer) and decision.code == ErrorCode.UNAUTHORIZED and decision.counts == ()
    assert gate.command(state, PING, clock.now) is FORWARD
    required = gate.command(state, p.Connect(None, 1), clock.now)
    assert isinstance(required, Answer) and required.code == ErrorCode.UNAUTHORIZED


def test_anonymous_connections_may_send_commands_at_once():
    clock = Clock()
    gate = admission()
    state = open_conn(gate, clock)
    assert state.identity is ANONYMOUS and state.auth_deadline is None
    assert gate.command(state, publish(), clock.now) is FORWARD
    assert gate.command(state, p.Connect(None, 1), clock.now) is FORWARD


@pytest.mark.parametrize("refresh", [False, True])
def test_a_bad_token_closes_4001_after_an_unauthorized_answer(refresh):
    clock = Clock()
    gate = admission(anonymous=False)
    state = open_conn(gate, clock)
    cmd = p.Refresh("not.a.token", 3) if refresh else p.Connect("not.a.token", 3)
    decision = gate.command(state, cmd, clock.now)
    assert isinstance(decision, Close) and decision.code == 4001
    assert decision.answer is not None and decision.answer.code == ErrorCode.UNAUTHORIZED
    assert decision.counts == (Count("auth_failures", "refresh" if refresh else "token"),)
    assert state.identity is None


@pytest.mark.parametrize("kind", [p.Connect, p.Refresh])
def test_a_second_subject_closes_4001(kind):
    clock = Clock()
    gate = admission(anonymous=False)
    state = open_conn(gate, clock)
    assert isinstance(gate.authenticate(state, token("alice")), Authenticated)
    decision = gate.command(state, kind(token("mallory"), 2), clock.now)
    assert isinstance(decision, Close) and decision.code == CloseCode.UNAUTHORIZED
    assert "subject cannot change" in decision.answer.reason
    assert state.subject == "alice"


def test_an_anonymous_connection_may_authenticate_once():
    clock = Clock()
    gate = admission()
    state = open_conn(gate, clock)
    assert isinstance(gate.command(state, p.Connect(token("alice"), 1), clock.now), Authenticated)
    assert isinstance(gate.command(state, p.Connect(token("bob"), 2), clock.now), Close)


def test_a_narrowing_refresh_returns_the_revoked_topics_in_order(policy):
    clock = Clock()
    gate = admission(policy, anonymous=False)
    topics: dict[str, int] = {}
    state = open_conn(gate, clock, topics)
    wide = token("carol", role="staff", fanroute={"subscribe": ["vip.*"]})
    assert isinstance(gate.authenticate(state, wide), Authenticated)
    for topic in ("vip.a", "public.x", "staff.x", "vip.b"):
        assert gate.command(state, p.Subscribe(topic, 1), clock.now) is FORWARD
        topics[topic] = 1  # what the hub does when it carries the subscribe out
    decision = gate.command(state, p.Refresh(token("carol"), 9), clock.now)
    assert isinstance(decision, Authenticated)
    assert decision.revoked == ("vip.a", "staff.x", "vip.b")
    assert decision.count_each == Count("auth_failures", "revoked")
    assert state.identity is decision.identity and "role" not in state.identity.claims


def test_a_refresh_that_keeps_the_rights_revokes_nothing(policy):
    clock = Clock()
    gate = admission(policy, anonymous=False)
    state = open_conn(gate, clock, {"public.x": 1, "members.x": 1})
    gate.authenticate(state, token("alice"))
    decision = gate.command(state, p.Refresh(token("alice"), 2), clock.now)
    assert isinstance(decision, Authenticated) and decision.revoked == ()


# --- permissions ---------------------------------------------------------------------


def test_permissions_come_from_the_policy(policy):
    clock = Clock()
    gate = admission(policy)
    state = open_conn(gate, clock)
    assert gate.command(state, p.Subscribe("public.x", 1), clock.now) is FORWARD
    for cmd in (p.Subscribe("members.x", 1), publish("feed.x"), p.Subscribe("closed.x", 1)):
        decision = gate.command(state, cmd, clock.now)
        assert isinstance(decision, Answer) and decision.code == ErrorCode.FORBIDDEN
        assert decision.counts == (Count("auth_failures", "forbidden"),) and decision.reason
    gate.authenticate(state, token("alice"))
    assert gate.command(state, publish("members.x"), clock.now) is FORWARD
    assert gate.command(state, p.Unsubscribe("closed.x", 1), clock.now) is FORWARD


# --- rates and strikes ---------------------------------------------------------------


def test_the_command_rate_answers_rate_limited_and_refills():
    clock = Clock()
    gate = admission(command_rate=5)
    state = open_conn(gate, clock)
    assert [gate.command(state, PING, clock.now) for _ in range(5)] == [FORWARD] * 5
    refused = gate.command(state, PING, clock.now)
    assert isinstance(refused, Answer) and refused.code == ErrorCode.RATE_LIMITED
    assert refused.counts == (Count("limit_hits", "commands"),)
    clock.advance(0.2)  # one token back at 5/s
    assert gate.command(state, PING, clock.now) is FORWARD
    assert isinstance(gate.command(state, PING, clock.now), Answer)


def test_more_than_100_refusals_within_10_seconds_close_4029():
    clock = Clock()
    gate = admission(command_rate=1)
    state = open_conn(gate, clock)
    assert gate.command(state, PING, clock.now) is FORWARD
    for _ in range(100):
        decision = gate.command(state, PING, clock.now)
        assert isinstance(decision, Answer) and decision.code == ErrorCode.RATE_LIMITED
    decision = gate.command(state, PING, clock.now)
    assert isinstance(decision, Close) and decision.code == CloseCode.RATE_LIMIT == 4029
    assert decision.answer is not None and decision.answer.code == ErrorCode.RATE_LIMITED
    assert decision.counts == (Count("limit_hits", "commands"),) and decision.why == "rate_limit"


def test_strikes_older_than_the_window_are_forgiven():
    clock = Clock()
    gate = admission(command_rate=1, abuse_limit=3)
    state = open_conn(gate, clock)
    gate.command(state, PING, clock.now)
    for _ in range(3):
        assert isinstance(gate.command(state, PING, clock.now), Answer)
    clock.advance(10.5)
    gate.command(state, PING, clock.now)  # the refilled token
    for _ in range(3):
        assert isinstance(gate.command(state, PING, clock.now), Answer)
    assert isinstance(gate.command(state, PING, clock.now), Close)


def test_the_publish_rate_counts_publishes_only():
    clock = Clock()
    gate = admission(publish_rate=2)
    state = open_conn(gate, clock)
    assert gate.command(state, publish(), clock.now) is FORWARD
    assert gate.command(state, publish(), clock.now) is FORWARD
    refused = gate.command(state, publish(), clock.now)
    assert isinstance(refused, Answer) and refused.code == ErrorCode.RATE_LIMITED
    assert refused.counts == (Count("limit_hits", "publishes"),)
    assert gate.command(state, PING, clock.now) is FORWARD
    assert gate.command(state, p.Subscribe("t.y", 1), clock.now) is FORWARD


def test_without_rates_nothing_is_limited():
    clock = Clock()
    gate = admission()
    state = open_conn(gate, clock)
    assert state.commands is None and state.publishes is None
    assert all(gate.command(state, publish(), clock.now) is FORWARD for _ in range(10_000))


# --- the subscription cap -------------------------------------------------------------


def test_the_subscription_cap_answers_too_large():
    clock = Clock()
    gate = admission(max_subscriptions=2)
    topics = {"a.1": 1, "a.2": 1}
    state = open_conn(gate, clock, topics)
    assert state.subscriptions == 2
    refused = gate.command(state, p.Subscribe("a.3", 7), clock.now)
    assert isinstance(refused, Answer) and refused.code == ErrorCode.TOO_LARGE
    assert refused.counts == (Count("limit_hits", "subscriptions"),) and "at most 2" in refused.reason
    # A topic already held is not a new subscription: the hub answers it (bad_request).
    assert gate.command(state, p.Subscribe("a.1", 8), clock.now) is FORWARD
    del topics["a.2"]  # the state reads the hub's own mapping
    assert gate.command(state, p.Subscribe("a.3", 9), clock.now) is FORWARD


# --- back-pressure -------------------------------------------------------------------


def test_a_backlog_over_the_limit_means_wait():
    gate = admission(backlog_limit=100)
    assert gate.room("s0", 0) is None
    assert gate.room("s0", 100) is None
    assert gate.room("s0", 101) == Wait("s0")


# --- new connections ---------------------------------------------------------------


def test_the_connection_cap_closes_1013():
    clock = Clock()
    gate = admission(max_connections=3)
    assert gate.handshake(None, 3, clock.now) is None
    refused = gate.handshake(None, 4, clock.now)
    assert isinstance(refused, Close) and refused.code == CloseCode.TRY_AGAIN == 1013
    assert refused.counts == (Count("limit_hits", "connections"), Count("connections_rejected", "connections"))


def test_far_past_the_cap_connections_are_shed_at_accept_and_http_gets_503():
    gate = admission(max_connections=10)
    assert gate.shed(10 + SHED_SLACK - 1) is None
    shed = gate.shed(10 + SHED_SLACK)
    assert isinstance(shed, Refuse) and shed.status == 503
    assert shed.counts == (Count("limit_hits", "connections"), Count("connections_rejected", "connections"))
    assert gate.http_request(10) is None
    assert gate.http_request(11) == shed


def test_the_connection_rate_closes_1013_and_refills():
    clock = Clock()
    gate = admission(connection_rate=2)
    assert gate.handshake(None, 1, clock.now) is None
    assert gate.handshake(None, 1, clock.now) is None
    refused = gate.handshake(None, 1, clock.now)
    assert isinstance(refused, Close) and refused.code == 1013 and refused.why == "connection_rate"
    assert refused.counts == (Count("limit_hits", "connection_rate"), Count("connections_rejected", "connection_rate"))
    clock.advance(0.5)
    assert gate.handshake(None, 1, clock.now) is None


def test_a_foreign_origin_is_refused_with_403():
    clock = Clock()
    gate = admission(allowed_origins=["https://app.example"])
    refused = gate.handshake("https://evil.example", 1, clock.now)
    assert isinstance(refused, Refuse) and refused.status == 403
    assert refused.counts == (Count("connections_rejected", "origin"),)
    assert gate.handshake("https://app.example", 1, clock.now) is None
    assert gate.handshake(None, 1, clock.now) is None  # not a browser: no Origin to check
    assert admission().handshake("https://evil.example", 1, clock.now) is None  # no list: any Origin


def test_a_draining_gateway_refuses_with_503_before_anything_else():
    clock = Clock()
    gate = admission(max_connections=1, allowed_origins=["https://app.example"])
    gate.draining = True
    refused = gate.handshake("https://evil.example", 99, clock.now)
    assert isinstance(refused, Refuse) and refused.status == 503 and refused.body == b"draining\n"
    assert refused.counts == (Count("connections_rejected", "draining"),)


# --- heartbeats and unfinished messages -----------------------------------------------


def test_pings_are_sent_every_interval_and_an_unanswered_one_closes_4009():
    clock = Clock()
    gate = admission(ping_interval=10.0, ping_timeout=4.0)
    state = open_conn(gate, clock)
    opened = clock.now
    clock.advance(9.9)
    assert gate.heartbeat(state, opened, clock.now) is None
    clock.advance(0.1)
    assert gate.heartbeat(state, opened, clock.now) is SEND_PING
    assert state.ping_sent_at == state.last_ping == clock.now
    clock.advance(4.0)
    assert gate.heartbeat(state, opened, clock.now) is None  # not yet past the timeout
    clock.advance(0.1)
    due = gate.heartbeat(state, opened, clock.now)
    assert isinstance(due, Close) and due.code == CloseCode.HEARTBEAT_TIMEOUT == 4009
    assert due.counts == (Count("heartbeat_timeouts"),)


def test_anything_received_after_a_ping_answers_it():
    clock = Clock()
    gate = admission(ping_interval=10.0, ping_timeout=4.0)
    state = open_conn(gate, clock)
    clock.advance(10)
    assert gate.heartbeat(state, clock.now, clock.now) is SEND_PING
    clock.advance(1)
    last_rx = clock.now  # the pong
    clock.advance(8)
    assert gate.heartbeat(state, last_rx, clock.now) is None
    clock.advance(1)
    assert gate.heartbeat(state, last_rx, clock.now) is SEND_PING


def test_an_unfinished_message_closes_4010_even_while_pongs_arrive():
    clock = Clock()
    gate = admission(message_timeout=10.0, ping_interval=1.0, ping_timeout=1.0)
    state = open_conn(gate, clock)
    assert gate.sweep(state, clock.now, clock.wall, clock.now, True) is None
    assert state.partial_since == clock.now
    for _ in range(10):
        clock.advance(1.0)
        # Each ping is answered at once: the heartbeat stays alive, the message does not finish.
        assert gate.sweep(state, clock.now, clock.wall, clock.now, True) is SEND_PING
    clock.advance(0.1)
    due = gate.sweep(state, clock.now, clock.wall, clock.now, True)
    assert isinstance(due, Close) and due.code == CloseCode.MESSAGE_TIMEOUT == 4010
    assert due.counts == (Count("limit_hits", "message_timeout"),)


def test_a_finished_message_resets_the_unfinished_message_clock():
    clock = Clock()
    gate = admission(message_timeout=10.0)
    state = open_conn(gate, clock)
    gate.sweep(state, clock.now, clock.wall, clock.now, True)
    clock.advance(9)
    gate.sweep(state, clock.now, clock.wall, clock.now, False)
    assert state.partial_since is None
    clock.advance(9)
    gate.sweep(state, clock.now, clock.wall, clock.now, True)
    clock.advance(9)
    assert not isinstance(gate.sweep(state, clock.now, clock.wall, clock.now, True), Close)


# --- the HTTP publish API --------------------------------------------------------------


def test_api_items_follow_the_websocket_publish_rules(policy):
    clock = Clock()
    gate = admission(policy, max_frame=256)
    cmd = gate.api_publication({"topic": "feed.x", "payload": {"a": 1}, "idem": "k-1"}, 4, clock.now)
    assert cmd == p.Publish("feed.x", {"a": 1}, 4, "k-1")
    cases = [
        ("not a dict", ErrorCode.BAD_REQUEST),
        ({"topic": "feed.x"}, ErrorCode.BAD_REQUEST),
        ({"topic": "sp ace", "payload": 1}, ErrorCode.BAD_REQUEST),
        ({"topic": "feed.x", "payload": 1, "idem": ""}, ErrorCode.BAD_REQUEST),
        ({"topic": "feed.x", "payload": 1, "idem": "k" * 65}, ErrorCode.BAD_REQUEST),
        ({"topic": "feed.x", "payload": "x" * 300}, ErrorCode.TOO_LARGE),
        ({"topic": "closed.x", "payload": 1}, ErrorCode.FORBIDDEN),
    ]
    for item, code in cases:
        decision = gate.api_publication(item, 1, clock.now)
        assert isinstance(decision, Answer) and decision.code == code, item
    assert gate.api_state.identity is API
    assert gate.api_body(256 * 16) is None
    too_large = gate.api_body(256 * 16 + 1)
    assert too_large is not None and too_large.code == ErrorCode.TOO_LARGE


# --- the HTTP API's back-pressure, with a fake shard link (trio, no sockets) -------------


class FakeGateway:
    """What :class:`PublishApi` uses of the gateway: a hub one shard up, admission, links."""

    def __init__(self, backlog_limit: int) -> None:
        self.admission = admission(backlog_limit=backlog_limit)
        self.hub = Hub(Ring(["s0"]), inbox="inproc://gw", instance="i1")
        self.hub.link_up("s0")
        self.hub.on_shard_frames("s0", [[wire.WELCOME, "E", "i1"]])
        self.hub.to_shards["s0"] = []
        self.links = {"s0": type("Link", (), {"room": trio.Event()})()}
        self.most_queued = 0
        self.counted: list[Count] = []

    def flush(self) -> None:
        self.most_queued = max(self.most_queued, self.hub.backlog("s0"))

    def count(self, counts) -> None:
        self.counted.extend(counts)

    def drain(self, seq: list[int]) -> None:
        """The link takes what is queued; the shard answers every publication in it."""
        frames, self.hub.to_shards["s0"] = self.hub.to_shards["s0"], []
        self.hub.handed_off("s0")
        answers = []
        for frame in frames:
            seq[0] += 1
            answers.append([wire.PUBOK, frame[1], frame[3], seq[0]])
        link = self.links["s0"]
        link.room.set()
        link.room = trio.Event()
        self.hub.on_shard_frames("s0", answers)


async def test_an_http_batch_waits_for_room_instead_of_piling_frames_on():
    gw = FakeGateway(backlog_limit=3)
    api = api_module.PublishApi(gw)
    results: list = []

    async def publish() -> None:
        results.extend(await api._publish_all([{"topic": "a.x", "payload": i} for i in range(10)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        seq = [0]
        with trio.fail_after(10):
            while not results:
                # The batch has queued what it may and waits (for room or for answers).
                await trio.testing.wait_all_tasks_blocked()
                queued = gw.hub.backlog("s0")
                assert queued <= 4  # the limit, and the one publication that went over it
                gw.drain(seq)
    assert [r.get("seq") for r in results] == list(range(1, 11))
    assert gw.most_queued == 4


async def test_an_http_batch_stops_at_its_deadline_and_says_what_was_not_sent(monkeypatch):
    monkeypatch.setattr(api_module, "_TIMEOUT", 0.2)
    gw = FakeGateway(backlog_limit=1)  # and a link that never takes anything
    results = await api_module.PublishApi(gw)._publish_all(
        [{"topic": "a.x", "payload": i} for i in range(4)] + [{"topic": "closed", "payload": 1, "idem": ""}]
    )
    codes = [r["error"]["code"] for r in results]
    # Two were queued and never answered; the rest were never sent: not applied.
    assert codes == ["outcome_unknown"] * 2 + ["unavailable"] * 2 + ["bad_request"]
    assert "not applied" in results[2]["error"]["message"]


def test_every_count_a_decision_names_is_a_gateway_metric():
    from prometheus_client import CollectorRegistry

    from fanroute.gateway import admission as module
    from fanroute.metrics import GatewayMetrics

    metrics = GatewayMetrics(CollectorRegistry())
    gate = admission()
    decisions = [v for v in vars(module).values() if isinstance(v, (module.Forward, Answer, Close, Refuse))]
    decisions += [gate.too_many_subscriptions, module.forbidden("why")]
    counts = {c for d in decisions for c in d.counts} | {Authenticated.count_each}
    assert len(counts) >= 12
    for count in counts:
        family = getattr(metrics, count.metric)
        (family if count.label is None else family.labels(count.label)).inc()
