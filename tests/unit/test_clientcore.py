"""The client rules (``fanroute.clientcore``), driven by the case table both clients share.

``tests/data/client_cases.json`` is also run against ``fanroute.js`` by
``gateway/static/tests/fanroute.test.mjs`` (under ``tests/browser``): a rule changed in
one language and not the other fails one of the two.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from fanroute import clientcore as cc
from fanroute.backoff import Backoff
from fanroute.codes import CloseCode, Reconnect
from tests.support import ROOT

TABLE = json.loads((ROOT / "tests/data/client_cases.json").read_text())
CASES = TABLE["cases"]
FIELDS: dict[str, list[str]] = TABLE["action_fields"]


class Scripted(random.Random):
    """Uniform draws from a list, repeated (``uniform(a, b)`` is ``a + (b - a) * random()``)."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = draws
        self.i = 0

    def random(self) -> float:
        x = self.draws[self.i % len(self.draws)]
        self.i += 1
        return x


def canonical(action: cc.Action) -> dict[str, Any]:
    """An action in the table's language-neutral form."""
    match action:
        case cc.Connect(url):
            return {"type": "connect", "url": url}
        case cc.Send(frame):
            return {"type": "send", "frame": frame}
        case cc.Ping():
            return {"type": "ping"}
        case cc.Deliver():
            return {"type": "deliver"}
        case cc.Subscribed(topic, epoch, seq, recovered, resumed):
            return {"type": "subscribed", "topic": topic, "epoch": epoch, "seq": seq, "recovered": recovered, "resumed": resumed}
        case cc.Unrecovered(topic, epoch, seq, previous):
            prev = None if previous is None else {"epoch": previous.epoch, "seq": previous.seq}
            return {"type": "unrecovered", "topic": topic, "epoch": epoch, "seq": seq, "previous": prev}
        case cc.SubscribeError(topic, code, _message, retry_at):
            return {"type": "subscribe_error", "topic": topic, "code": code, "retry_at": retry_at}
        case cc.Ready(session):
            return {"type": "ready", "session": session}
        case cc.Answer(id, _frame):
            return {"type": "answer", "id": id}
        case cc.Drop(code, _reason):
            return {"type": "drop", "code": code}
        case cc.ReconnectAt(at, delay, _code):
            return {"type": "reconnect", "at": at, "delay": delay}
        case cc.Stop(code, _reason):
            return {"type": "stop", "code": code}
        case cc.Presence(topic, subscribers):
            return {"type": "presence", "topic": topic, "subscribers": subscribers}
        case cc.FetchToken(reason):
            return {"type": "fetch_token", "reason": reason}
        case cc.Refreshed(expires):
            return {"type": "refreshed", "expires": expires}
        case cc.Published(publication, seq):
            return {"type": "published", "idem": publication.idem, "seq": seq}
        case cc.PublishRetry(publication, code, _message, retry_at):
            return {"type": "publish_retry", "idem": publication.idem, "code": code, "retry_at": retry_at}
        case cc.PublishFailed(publication, code, _message):
            return {"type": "publish_failed", "idem": publication.idem, "code": code}
    raise AssertionError(f"unknown action {action!r}")


def same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and isinstance(want, (int, float)) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def make(case: dict[str, Any]) -> cc.ClientCore[str]:
    settings = cc.Settings(**{**TABLE["settings_defaults"], **case["settings"]})
    return cc.ClientCore(case["urls"], settings, rng=Scripted(case["random"]))


def run(core: cc.ClientCore[str], step: dict[str, Any]) -> list[dict[str, Any]]:
    do, now = step["do"], step.get("now", 0.0)
    if do == "up":
        core.connect(now)
        core.opened(now)
        actions = core.received(step["frame"], now)
    elif do == "receive":
        actions = core.received(step["frame"], now)
    elif do == "closed":
        actions = core.closed(step["code"], now, step.get("reason", ""))
    elif do == "token":
        actions = core.give_token(step["token"], now, step.get("ttl"))
    elif do == "token_failed":
        actions = core.token_failed(now)
    elif do in ("start", "connect", "opened", "tick"):
        actions = getattr(core, do)(now)
    elif do == "subscribe":
        actions = core.subscribe(step["topic"], step.get("last"), step.get("presence", False))
    elif do == "unsubscribe":
        actions = core.unsubscribe(step["topic"])
    elif do == "stop":
        actions = core.stop()
    elif do == "publish":
        _, actions = core.publish(step["topic"], step["payload"], now, step.get("idem"), step.get("timeout"))
    elif do == "abandon":
        actions = core.abandon(held(core, step["idem"]))
    else:
        raise AssertionError(f"unknown step {do!r}")
    return [canonical(a) for a in actions]


def held(core: cc.ClientCore[str], idem: str) -> cc.Outgoing:
    return next(p for p in core.publications if p.idem == idem)


def state(core: cc.ClientCore[str], key: str, want: Any) -> Any:
    if key == "phase":
        return core.phase
    if key == "attempt":
        return core.backoff.attempt
    if key == "deadline":
        return core.deadline
    if key == "topics":
        return list(core.streams)
    if key == "position":
        return {t: (None if (p := core.position(t)) is None else {"epoch": p.epoch, "seq": p.seq}) for t in want}
    if key == "stream":
        return {t: core.streams[t].state if t in core.streams else None for t in want}
    if key == "stats":
        return {k: getattr(core.stats, k) for k in want}
    if key == "token":
        return core.token
    if key == "publications":
        return {k: next((p.state for p in core.publications if p.idem == k), None) for k in want}
    raise AssertionError(f"unknown check {key!r}")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    core = make(case)
    for i, step in enumerate(case["steps"]):
        where = f"step {i} {json.dumps(step)}"
        got = run(core, step)
        if "expect" in step:
            want = [{k: a[k] for k in ["type", *FIELDS[a["type"]]]} for a in step["expect"]]
            assert same(got, want), f"{where}\n got  {got}\n want {want}"
        for key, want in step.get("check", {}).items():
            value = state(core, key, want)
            assert same(value, want), f"{where}\n {key}: got {value!r}, want {want!r}"


def test_the_table_covers_every_rule_and_every_close_code() -> None:
    covered = {tag for c in CASES for tag in c["covers"]}
    assert covered >= {
        "close-code", "gap", "duplicate", "unrecovered", "unsolicited", "resubscribe",
        "resubscribe-error", "heartbeat", "backoff", "last", "presence", "token", "publish",
    }
    closed = {s["code"] for c in CASES if "close-code" in c["covers"] for s in c["steps"] if s["do"] == "closed"}
    assert {int(c) for c in CloseCode} <= closed
    assert {1005, 1006, None} <= closed  # no status, abnormal closure, no close at all


def test_the_table_names_each_close_codes_rule_as_fanroute_codes_does() -> None:
    for case in CASES:
        if case["name"].startswith("close "):
            code, rule = case["name"][len("close "):].split(": ")
            assert cc.reconnect_rule(None if code == "None" else int(code)).value == rule  # type: ignore[attr-defined]


def test_every_action_type_has_its_fields_in_the_table() -> None:
    pub = cc.Outgoing("t", 1, "k-1", 10.0)
    kinds = {canonical(a)["type"] for a in (
        cc.Connect("u"), cc.Send({}), cc.PING, cc.DELIVER, cc.Subscribed("t", "e", 0, False, False),
        cc.Unrecovered("t", "e", 0), cc.SubscribeError("t", "c", "", None), cc.Ready(None), cc.Answer(1, {}),
        cc.Drop(None, ""), cc.ReconnectAt(0, 0, None), cc.Stop(None, ""), cc.Presence("t", 0), cc.FetchToken("connect"),
        cc.Refreshed(None), cc.Published(pub, 1), cc.PublishRetry(pub, "unavailable", "", 0.0),
        cc.PublishFailed(pub, "forbidden", ""),
    )}
    assert kinds == set(FIELDS)


# --- what the table cannot say ------------------------------------------------------------


def test_in_order_messages_take_the_allocation_free_path() -> None:
    core: cc.ClientCore[str] = cc.ClientCore(["u"])
    core.subscribe("t")
    core.connect(0)
    core.opened(0)
    core.received({"type": "connected"}, 0)
    core.received({"type": "subscribed", "topic": "t", "id": 1, "epoch": "e", "seq": 0, "recovered": False}, 0)
    assert core.message("t", 1) is cc.DELIVERED
    assert core.message("t", 1) is cc.NOTHING
    assert core.tick(0.1) is cc.NOTHING


def test_terminal_codes_are_those_fanroute_codes_says_never() -> None:
    assert cc.TERMINAL_CLOSE_CODES == {CloseCode.UNAUTHORIZED, CloseCode.DISCONNECTED, CloseCode.POLICY}
    assert all(c.reconnect is Reconnect.NEVER for c in cc.TERMINAL_CLOSE_CODES)


def test_reconnect_delay_for_4029_ignores_the_attempt_count() -> None:
    b = Backoff(min_delay=0.1, max_delay=4.0, rng=random.Random(1))
    for draw in (0.0, 0.5, 0.999):
        delay = cc.reconnect_delay(4029, b, Scripted([draw]))
        assert delay is not None and 4.0 <= delay < 6.0


def test_urls_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        cc.ClientCore([])


def test_token_ttl_reads_exp_without_verifying() -> None:
    import jwt

    token = jwt.encode({"sub": "u", "exp": 1_000_030}, "k" * 32, algorithm="HS256")
    assert cc.token_ttl(token, 1_000_000.0) == 30.0
    assert cc.token_ttl(jwt.encode({"sub": "u"}, "k" * 32, algorithm="HS256"), 0) is None
    for bad in ("", "a.b", "a.!!!.c", "a.bm90IGpzb24.c", "a.WzFd.c"):  # not JSON, not an object
        assert cc.token_ttl(bad, 0) is None


def test_a_token_is_refreshed_a_third_of_its_life_early_and_at_most_the_lead_early() -> None:
    assert cc.refresh_delay(3.0) == 2.0
    assert cc.refresh_delay(60.0) == 40.0
    assert cc.refresh_delay(3600.0) == 3600.0 - cc.REFRESH_LEAD
    assert cc.refresh_delay(-5.0) == 0.0


def test_the_expired_token_reason_is_the_one_the_gateway_closes_with() -> None:
    from fanroute.codes import TOKEN_EXPIRED_REASON
    from fanroute.gateway import admission

    assert admission.TOKEN_EXPIRED.code == CloseCode.UNAUTHORIZED
    assert admission.TOKEN_EXPIRED.reason == TOKEN_EXPIRED_REASON
    # Every other 4001 the gateway sends has another reason: those stay terminal.
    others = [admission.AUTH_TIMEOUT.reason, "unauthorized"]
    assert TOKEN_EXPIRED_REASON not in others


def test_last_must_be_a_positive_integer() -> None:
    core: cc.ClientCore[str] = cc.ClientCore(["u"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            core.subscribe("t", last=bad)  # type: ignore[arg-type]


def test_automatic_idem_keys_have_a_random_prefix_per_client_and_fit_the_protocol() -> None:
    from fanroute.protocol import MAX_IDEM_LENGTH, check_idem

    a: cc.ClientCore[str] = cc.ClientCore(["u"])
    b: cc.ClientCore[str] = cc.ClientCore(["u"])
    assert a.idem_prefix != b.idem_prefix  # 96 random bits each
    assert len(a.idem_prefix) == 16 and set(a.idem_prefix) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    keys = [a.publish("t", i, 0.0)[0].idem for i in range(3)]
    assert keys == [f"{a.idem_prefix}-{n}" for n in (1, 2, 3)]
    a._idems = 10**20  # the counter never runs out of room
    assert len(a.next_idem()) <= MAX_IDEM_LENGTH
    longest: cc.ClientCore[str] = cc.ClientCore(["u"], cc.Settings(idem_prefix="p" * cc.IDEM_PREFIX_LENGTH))
    longest._idems = 10**20
    assert check_idem(longest.next_idem()) is not None


def test_idem_keys_and_prefixes_outside_the_protocol_are_refused() -> None:
    core: cc.ClientCore[str] = cc.ClientCore(["u"])
    for bad in ("", "x" * 65, 7):
        with pytest.raises(ValueError):
            core.publish("t", 1, 0.0, bad)  # type: ignore[arg-type]
    assert not core.publications
    for prefix in ("", "p" * (cc.IDEM_PREFIX_LENGTH + 1)):
        with pytest.raises(ValueError):
            cc.ClientCore(["u"], cc.Settings(idem_prefix=prefix))


def test_a_settled_publication_cannot_be_abandoned_and_its_late_answers_are_ignored() -> None:
    core: cc.ClientCore[str] = cc.ClientCore(["u"], cc.Settings(app_ping=0))
    core.connect(0)
    core.opened(0)
    core.received({"type": "connected"}, 0)
    pub, (send,) = core.publish("t", 1, 0.0)
    assert isinstance(send, cc.Send)
    (done,) = core.received({"type": "published", "topic": "t", "id": send.frame["id"], "seq": 3}, 0.1)
    assert done == cc.Published(pub, 3)
    assert core.abandon(pub) is cc.NOTHING
    # A second answer to the same id is no longer about the publication.
    assert core.received({"type": "error", "id": send.frame["id"], "code": "outcome_unknown"}, 0.2) == [
        cc.Answer(send.frame["id"], {"type": "error", "id": send.frame["id"], "code": "outcome_unknown"})
    ]
    assert not core.publications and core.stats.retries == 0
