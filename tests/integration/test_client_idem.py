"""The Python SDK publishes exactly once across a lost connection, against a real
standalone gateway.

The retry rule itself is the client core's (the ``publish:`` cases of
``tests/data/client_cases.json``); these tests show that the SDK carries it out over
real sockets and that the gateway's ``idem`` handling makes the retry harmless: a
publication the gateway applied, whose answer never reached the client, is sent again
with the same key after the reconnect, acknowledged with the original ``seq``, and
seen once by a subscriber.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from fanroute.client import Client, Message
from fanroute.errors import RequestFailed
from tests.support import DEADLINE, start_standalone, until, urls


class LosesAnAnswer(Client):
    """A client whose connection drops when the first ``published`` answer arrives,
    before the SDK sees it, and stays away until :attr:`back` is set. It records every
    publish frame it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.back = trio.Event()
        self.lost: list[dict[str, Any]] = []  # the answers it never saw
        self.sent: list[dict[str, Any]] = []

    async def _dispatch(self, ws: Any, msg: dict[str, Any]) -> None:
        if msg.get("type") == "published" and not self.lost:
            self.lost.append(msg)
            self.drop_connection(hold=self.back)
            return
        await super()._dispatch(ws, msg)

    async def _send(self, ws: Any, frame: dict[str, Any]) -> None:
        if frame.get("type") == "publish":
            self.sent.append(frame)
        await super()._send(ws, frame)



@pytest.fixture
async def gateway(nursery) -> str:
    return urls(await start_standalone(nursery))[0]


async def test_a_publish_whose_answer_is_lost_is_retried_after_the_reconnect_and_applied_once(gateway):
    async with Client(gateway) as watcher, LosesAnAnswer(gateway, min_delay=0.01, max_delay=0.1) as publisher:
        sub = await watcher.subscribe("idem.once")
        await publisher.wait_connected()
        acked: list[int] = []

        async def publish() -> None:
            acked.append(await publisher.publish("idem.once", {"n": 1}))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(publish)
            first = await sub.get()  # the gateway applied the first send...
            await until(lambda: bool(publisher.lost) and not publisher.connected, "the answer lost with the connection")
            assert not acked  # ...and the publisher does not know it yet: the outcome is open
            publisher.back.set()
        assert isinstance(first, Message) and first.payload == {"n": 1}
        # The retry went out on the new connection with the same key and got the original seq.
        assert publisher.connects == 2
        assert [f["idem"] for f in publisher.sent] == [publisher.sent[0]["idem"]] * 2
        assert publisher.sent[0]["id"] != publisher.sent[1]["id"]
        assert acked == [first.seq] == [publisher.lost[0]["seq"]]
        # Exactly once: the next publication follows it directly, nothing in between.
        marker = await watcher.publish("idem.once", "marker")
        with trio.fail_after(DEADLINE):
            following = await sub.get()
        assert isinstance(following, Message) and following.payload == "marker"
        assert following.seq == marker == first.seq + 1


async def test_a_publish_made_while_the_connection_is_down_goes_out_once_after_the_reconnect(gateway):
    async with Client(gateway) as watcher, Client(gateway, min_delay=0.01, max_delay=0.1) as publisher:
        sub = await watcher.subscribe("idem.away")
        await publisher.wait_connected()
        back = trio.Event()
        publisher.drop_connection(hold=back)
        await until(lambda: not publisher.connected, "the publisher to be away")
        acked: list[int] = []

        async def publish() -> None:
            acked.append(await publisher.publish("idem.away", "held", idem="app-key-1"))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(publish)
            await until(lambda: bool(publisher._core.publications), "the publication to be held")
            assert not acked
            back.set()
        with trio.fail_after(DEADLINE):
            got = await sub.get()
        assert isinstance(got, Message) and got.payload == "held" and acked == [got.seq]
        # The caller's own key makes a later publish with it a no-op with the same answer.
        assert await publisher.publish("idem.away", "held again", idem="app-key-1") == got.seq
        marker = await publisher.publish("idem.away", "marker")
        with trio.fail_after(DEADLINE):
            following = await sub.get()
        assert isinstance(following, Message) and (following.payload, following.seq) == ("marker", marker)
        assert marker == got.seq + 1


async def test_a_definite_refusal_is_raised_at_once_and_not_sent_again(gateway):
    async with LosesAnAnswer(gateway) as publisher:
        with trio.fail_after(DEADLINE), pytest.raises(RequestFailed) as refused:
            await publisher.publish("not a topic", 1)
        assert refused.value.code == "bad_request"
        assert len(publisher.sent) == 1
        assert not publisher._core.publications
        assert publisher.connects == 1 and not publisher.lost
