"""The server API's rules (fanroute.gateway.control), its frames, the shard's relay and
info answers, and the per-user connection limit — all without sockets."""

from __future__ import annotations

import pytest

from fanroute import wire
from fanroute.auth import ANONYMOUS, Authenticator, Identity
from fanroute.codec import Encoding
from fanroute.codes import CloseCode, ErrorCode
from fanroute.config import ConfigError, GatewayConfig
from fanroute.errors import ProtocolError, WireError
from fanroute.gateway import control
from fanroute.gateway.admission import Admission
from fanroute.gateway.hub import Hub, Session
from fanroute.permissions import Policy
from fanroute.ring import Ring
from fanroute.router.shard import Shard

GW_A, GW_B = "tcp://127.0.0.1:7201", "tcp://127.0.0.1:7202"


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)


def session(name: str, topics: dict[str, int] | None = None) -> Session:
    s = Session(name, Encoding.JSON, Sink())
    s.topics.update(topics or {})
    return s


# --- who is connected as whom ----------------------------------------------------------


def test_users_index_counts_and_forgets_connections():
    users = control.Users()
    a1, a2, b = session("a1"), session("a2"), session("b")
    users.add("alice", a1)
    users.add("alice", a2)
    users.add("bob", b)
    assert users.count("alice") == 2 and users.sessions("alice") == [a1, a2] and len(users) == 2
    users.remove(a1)
    users.remove(a1)  # twice: harmless
    users.remove(session("never-added"))
    assert users.sessions("alice") == [a2] and users.user_of(a2) == "alice"
    users.remove(a2)
    assert users.count("alice") == 0 and len(users) == 1 and users.user_of(a2) is None


def test_targets_are_the_users_connections_or_those_on_the_topic():
    c = control.Control("i1")
    on, off = session("on", {"chat.1": 1}), session("off", {"chat.2": 1})
    other = session("other", {"chat.1": 1})
    c.users.add("alice", on)
    c.users.add("alice", off)
    c.users.add("bob", other)
    disconnect = c.command(control.Request(control.DISCONNECT, "alice"))
    unsubscribe = c.command(control.Request(control.UNSUBSCRIBE, "alice", topic="chat.1"))
    assert c.targets(disconnect) == [on, off]
    assert c.targets(unsubscribe) == [on]
    assert c.targets(c.command(control.Request(control.DISCONNECT, "nobody"))) == []


# --- commands: ids, frames, dedupe -------------------------------------------------------


def test_a_command_is_carried_out_once_per_gateway_however_many_shards_relay_it():
    origin, other = control.Control("i1"), control.Control("i2")
    cmd = origin.command(control.Request(control.DISCONNECT, "alice", reconnect=True))
    relayed = [wire.RELAY, *cmd.frame()[1:]]
    assert wire.check_shard_frame(relayed) == wire.RELAY
    # The origin carried it out already: its own copies come back and are ignored.
    assert origin.relayed(relayed) is None
    # Another gateway acts on the first copy only (one per shard arrives).
    assert other.relayed(relayed) == cmd
    assert other.relayed(relayed) is None
    assert other.relayed(list(relayed)) is None


def test_command_ids_differ_across_gateways_and_calls():
    a, b = control.Control("i1"), control.Control("i2")
    req = control.Request(control.DISCONNECT, "alice")
    ids = {a.command(req).id, a.command(req).id, b.command(req).id}
    assert len(ids) == 3


def test_remembered_ids_are_bounded():
    c = control.Control("i1", seen_ids=3)
    frames = [[wire.RELAY, f"x-{i}", "disconnect", "u", None, False] for i in range(5)]
    for frame in frames:
        assert c.relayed(frame) is not None
    assert len(c._seen) == 3
    assert c.relayed(frames[-1]) is None


@pytest.mark.parametrize(
    "frame",
    [
        [wire.CTRL, "id", "ban", "alice", None, False],  # unknown kind
        [wire.CTRL, "", "disconnect", "alice", None, False],  # empty id
        [wire.CTRL, "x" * 65, "disconnect", "alice", None, False],
        [wire.CTRL, "id", "disconnect", 7, None, False],
        [wire.CTRL, "id", "unsubscribe", "alice", 3, False],
        [wire.CTRL, "id", "disconnect", "alice", None, 1],  # reconnect must be a bool
        [wire.CTRL, "id", "disconnect", "alice", None],
        [wire.REPORT, "i1", 1, 2],
        [wire.REPORT, "i1", 1, -2, 3],
        [wire.INFOQ, "1"],
    ],
)
def test_malformed_server_api_frames_from_gateways_are_refused(frame):
    with pytest.raises(WireError):
        wire.check_gateway_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        [wire.INFO, 1, [1, 2], []],
        [wire.INFO, 1, [1, 2, 3], [["i", "tcp://x", 1, 2]]],
        [wire.INFO, 1, [1, 2, 3], [["i", 5, 1, 2, 3]]],
        [wire.INFO, 1, [1, 2, -3], []],
        [wire.RELAY, "id", "disconnect", "alice", None, "no"],
    ],
)
def test_malformed_server_api_frames_from_shards_are_refused(frame):
    with pytest.raises(WireError):
        wire.check_shard_frame(frame)


# --- the HTTP bodies ------------------------------------------------------------------


def test_request_bodies_are_parsed():
    assert control.parse_request("disconnect", {"user": "alice"}) == control.Request("disconnect", "alice")
    assert control.parse_request("disconnect", {"user": "a", "reconnect": True}).reconnect is True
    call = control.parse_request("unsubscribe", {"user": "a", "topic": "chat.room1"})
    assert (call.user, call.topic) == ("a", "chat.room1")


@pytest.mark.parametrize(
    "kind, body, says",
    [
        ("disconnect", [], "JSON object"),
        ("disconnect", {}, "user"),
        ("disconnect", {"user": ""}, "user"),
        ("disconnect", {"user": 5}, "user"),
        ("disconnect", {"user": "x" * 1025}, "user"),
        ("disconnect", {"user": "a", "reconnect": "yes"}, "reconnect"),
        ("disconnect", {"user": "a", "reconect": True}, "'reconect'"),
        ("unsubscribe", {"user": "a"}, "topic"),
        ("unsubscribe", {"user": "a", "topic": ""}, "topic"),
        ("unsubscribe", {"user": "a", "topic": "bad topic"}, "topic"),
        ("unsubscribe", {"user": "a", "topic": "t", "reconnect": True}, "'reconnect'"),
    ],
)
def test_bad_bodies_are_one_sentence_naming_the_field(kind, body, says):
    with pytest.raises(ProtocolError) as caught:
        control.parse_request(kind, body)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert says in caught.value.message and "\n" not in caught.value.message


# --- the shard relays and answers --------------------------------------------------------


def hello(sh: Shard, inbox: str, instance: str) -> None:
    sh.receive(inbox, [[wire.HELLO, inbox, instance, []]], 0.0)


def test_a_shard_relays_a_command_to_every_gateway_it_knows_the_sender_too():
    sh = Shard("router-0", epoch="E")
    hello(sh, GW_A, "ia")
    hello(sh, GW_B, "ib")
    sh.take_outbound()
    sh.receive(GW_A, [[wire.CTRL, "c-1", "unsubscribe", "alice", "chat.1", False]], 0.0)
    out = sh.take_outbound()
    expected = [wire.RELAY, "c-1", "unsubscribe", "alice", "chat.1", False]
    assert out == {GW_A: [expected], GW_B: [expected]}


def test_a_shard_answers_info_with_its_counts_and_its_gateways_reports():
    sh = Shard("router-0", epoch="E")
    hello(sh, GW_A, "ia")
    hello(sh, GW_B, "ib")
    sh.receive(GW_A, [[wire.SUB, "t", 1, None, 0], [wire.REPORT, "ia", 3, 5, 2]], 0.0)
    sh.receive(GW_B, [[wire.SUB, "t", 1, None, 0], [wire.SUB, "u", 2, None, 0]], 0.0)  # no report yet
    sh.take_outbound()
    sh.receive(GW_B, [[wire.INFOQ, 7]], 0.0)
    (answer,) = sh.take_outbound()[GW_B]
    assert wire.check_shard_frame(answer) == wire.INFO
    assert answer == [wire.INFO, 7, [2, 2, 3], [["ia", GW_A, 3, 5, 2]]]
    sh.forget(GW_A)
    sh.receive(GW_B, [[wire.INFOQ, 8]], 0.0)
    assert sh.take_outbound()[GW_B][0][3] == []


# --- info: asking and merging ---------------------------------------------------------------


def test_info_waits_for_each_shard_once_and_merges_gateways_once():
    c = control.Control("ia")
    done: list[bool] = []
    request, frame = c.ask_info(["s0", "s1"])
    request.on_done = lambda: done.append(True)
    assert frame == [wire.INFOQ, request.req] and not request.done
    a0 = [wire.INFO, request.req, [4, 2, 6], [["ia", GW_A, 9, 9, 9], ["ib", GW_B, 1, 2, 1]]]
    assert c.info_answer("s0", a0) is request
    assert c.info_answer("s0", a0) is None  # a duplicate changes nothing
    assert c.info_answer("s2", a0) is None  # nor a shard that was not asked
    assert c.info_answer("s1", [wire.INFO, request.req + 1, [0, 0, 0], []]) is None
    assert not request.done
    c.info_answer("s1", [wire.INFO, request.req, [1, 2, 1], [["ib", GW_B, 1, 2, 1]]])
    assert request.done
    c.end_info(request)
    assert c.info_requests == {}
    body = control.merge_info("ia", GW_A, control.Counts(3, 4, 2), ["s1", "s0", "s2"], request.answers)
    assert body["gateways"] == [
        {"instance": "ia", "inbox": GW_A, "self": True, "connections": 3, "subscriptions": 4, "topics": 2},
        {"instance": "ib", "inbox": GW_B, "self": False, "connections": 1, "subscriptions": 2, "topics": 1},
    ]
    assert body["routers"] == [
        {"name": "s0", "reachable": True, "connections": 2, "subscriptions": 6, "topics": 4},
        {"name": "s1", "reachable": True, "connections": 2, "subscriptions": 1, "topics": 1},
        {"name": "s2", "reachable": False},
    ]


def test_own_counts_and_the_report_frame():
    c = control.Control("ia")
    counts = control.own_counts([session("a", {"t": 1, "u": 1}), session("b", {"t": 1})], topics=2)
    assert counts == control.Counts(2, 3, 2)
    frame = c.report_frame(counts)
    assert wire.check_gateway_frame(frame) == wire.REPORT and frame == [wire.REPORT, "ia", 2, 3, 2]


def test_the_hub_hands_server_api_frames_to_the_shell():
    hub = Hub(Ring(["s0"]), inbox="inproc://gw", instance="i1")
    seen: list = []
    hub.on_control = lambda shard, frame: seen.append((shard, frame))
    relay = [wire.RELAY, "c-1", "disconnect", "alice", None, False]
    info = [wire.INFO, 1, [0, 0, 0], []]
    hub.on_shard_frames("s0", [relay, info, [wire.RELAY, "c-2", "nope", "a", None, False]])
    assert seen == [("s0", relay), ("s0", info)]
    assert hub.stats.frames_rejected == 1


# --- the per-user connection limit ---------------------------------------------------------


def admission(**settings) -> Admission:
    config = GatewayConfig(routers=[("s0", "inproc://s0")], **settings)
    return Admission(config, policy=Policy(), auth=Authenticator(secret="k" * 32))


def test_the_per_user_limit_is_off_by_default():
    gate = admission()
    assert gate.user_connection(Identity("alice"), 10_000) is None


def test_past_the_per_user_limit_the_new_connection_is_closed_with_1013():
    gate = admission(max_connections_per_user=2)
    alice = Identity("alice")
    assert gate.user_connection(alice, 0) is None
    assert gate.user_connection(alice, 1) is None
    refused = gate.user_connection(alice, 2)
    assert refused is not None and refused.code == CloseCode.TRY_AGAIN and refused.reason
    assert {(c.metric, c.label) for c in refused.counts} == {
        ("limit_hits", "user_connections"),
        ("connections_rejected", "user_connections"),
    }
    # Anonymous connections have no subject: never counted.
    assert gate.user_connection(ANONYMOUS, 99) is None


def test_a_negative_per_user_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="--max-connections-per-user"):
        GatewayConfig(routers=[("s0", "inproc://s0")], cluster_secret="s" * 16, max_connections_per_user=-1).check()


def test_disconnect_closes_with_4003_or_1012():
    assert Admission.disconnect(False).code == CloseCode.DISCONNECTED == 4003
    assert Admission.disconnect(True).code == CloseCode.RESTART == 1012
