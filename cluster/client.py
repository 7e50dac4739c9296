"""The Python client SDK (trio).

    async with fanroute.client.Client(["ws://127.0.0.1:8081/", "ws://127.0.0.1:8082/"]) as client:
        sub = await client.subscribe("prices.AAPL")
        seq = await client.publish("prices.AAPL", {"price": 189.5})
        async for item in sub:
            if isinstance(item, Unrecovered):
                ...  # continuity broke: refetch state from the application
            else:
                print(item.topic, item.seq, item.payload)

What it does for the application:

* keeps one connection to one of the gateway URLs, rotating through them;
* heartbeats: an app-level ``ping`` every ``ping_interval``; a connection from which
  nothing arrived for ``ping_interval + ping_timeout`` counts as dead;
* reconnects with exponential backoff and full jitter (``fanroute.backoff``), reset only
  after a connection stayed healthy for a while;
* resubscribes every topic with ``since`` after a reconnect, drops duplicates, and
  repairs gaps by resubscribing, so each subscription yields every message once and
  in ``seq`` order — or an explicit :class:`Unrecovered` marker where the cluster
  could not fill the gap (history too short, or the topic's epoch changed).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from fanroute import protocol as p
from fanroute.codes import CloseCode, ErrorCode
from fanroute.backoff import Backoff
from fanroute.errors import ClientError, ConnectionLost, RequestFailed

log = logging.getLogger("fanroute.client")

# Close codes after which reconnecting cannot help.
TERMINAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.POLICY})


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: Any
    seq: int


@dataclass(frozen=True, slots=True)
class Unrecovered:
    """Messages before this point may be lost: the stream goes on from ``seq + 1``."""

    topic: str
    epoch: str
    seq: int


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: Exception | None = None

    def resolve(self, value: Any) -> None:
        self.value = value
        self.event.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Subscription:
    """A topic's stream of :class:`Message` and :class:`Unrecovered` items."""

    def __init__(self, client: Client, topic: str, buffer: int) -> None:
        self.client = client
        self.topic = topic
        self.epoch: str | None = None
        self.seq = 0  # last seq handed to the application
        self.duplicates = 0
        self.gaps = 0
        self.confirmed = _Pending()
        self.recovering = False  # a resubscribe with since is in flight
        self._send, self._recv = trio.open_memory_channel[Message | Unrecovered](buffer)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message | Unrecovered:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def get(self) -> Message | Unrecovered:
        return await self._recv.receive()

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.topic)

    async def _put(self, item: Message | Unrecovered) -> None:
        await self._send.send(item)


class Client:
    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        min_delay: float = 0.05,
        max_delay: float = 10.0,
        backoff_reset: float = 5.0,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        connect_timeout: float = 5.0,
        buffer: int = 10000,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("a client needs at least one gateway URL")
        self.token = token
        self.backoff = Backoff(min_delay=min_delay, max_delay=max_delay, reset_after=backoff_reset)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.buffer = buffer
        self.subscriptions: dict[str, Subscription] = {}
        self.connects = 0  # successful connections so far
        self.url: str | None = None  # the gateway currently connected to
        self.last_close_code: int | None = None
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._pending: dict[int, tuple[str, Any, _Pending]] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._terminal: ClientError | None = None
        self._kick: trio.CancelScope | None = None

    # --- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._run)
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def drop_connection(self) -> None:
        """Abandon the current connection (it will be re-established): for tests and tools."""
        if self._kick is not None:
            self._kick.cancel()

    # --- the application's side ------------------------------------------------------

    async def subscribe(self, topic: str) -> Subscription:
        """Subscribe and wait until the gateway confirmed; raises :class:`ClientError`."""
        p.check_topic(topic)
        if topic in self.subscriptions:
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"already subscribed to {topic!r}")
        sub = self.subscriptions[topic] = Subscription(self, topic, self.buffer)
        if self._ws is not None:
            await self._send_subscribe(self._ws, sub)
        try:
            await sub.confirmed.wait()
        except ClientError:
            self.subscriptions.pop(topic, None)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        sub = self.subscriptions.pop(topic, None)
        if sub is None:
            return
        sub._send.close()
        ws = self._ws
        if ws is not None:
            try:
                await self._request(ws, {"type": "unsubscribe", "topic": topic}, "unsubscribe", topic)
            except ClientError:
                pass

    async def publish(self, topic: str, payload: Any, *, ack: bool = True, timeout: float = 10.0) -> int | None:
        """Publish; with ``ack`` wait for the seq the cluster gave it.

        If the connection drops before the answer, :class:`ConnectionLost` is raised and
        the publication may or may not have happened.
        """
        with trio.fail_after(timeout):
            while True:
                await self._connected.wait()
                ws = self._ws
                if ws is None:
                    continue
                frame = {"type": "publish", "topic": topic, "payload": payload}
                if not ack:
                    try:
                        await ws.send_message(orjson.dumps(frame).decode())
                    except ConnectionClosed:
                        continue
                    return None
                return await self._request(ws, frame, "publish", topic)

    # --- the connection ----------------------------------------------------------------

    async def _request(self, ws: WebSocketConnection, frame: dict[str, Any], kind: str, ctx: Any) -> Any:
        id = next(self._ids)
        pending = _Pending()
        self._pending[id] = (kind, ctx, pending)
        frame["id"] = id
        try:
            await ws.send_message(orjson.dumps(frame).decode())
        except ConnectionClosed:
            self._pending.pop(id, None)
            raise ConnectionLost() from None
        return await pending.wait()

    async def _send_subscribe(self, ws: WebSocketConnection, sub: Subscription) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "topic": sub.topic}
        if sub.epoch is not None:
            frame["since"] = {"epoch": sub.epoch, "seq": sub.seq}
            sub.recovering = True
        id = next(self._ids)
        self._pending[id] = ("subscribe", sub, _Pending())
        frame["id"] = id
        try:
            await ws.send_message(orjson.dumps(frame).decode())
        except ConnectionClosed:
            pass  # resubscribed on the next connection

    async def _run(self) -> None:
        for attempt in itertools.count():
            url = self.urls[attempt % len(self.urls)]
            healthy_since: float | None = None
            try:
                async with open_websocket_url(
                    url, connect_timeout=self.connect_timeout, disconnect_timeout=1
                ) as ws:
                    healthy_since = trio.current_time()
                    await self._session(ws, url)
            except (OSError, HandshakeError, ConnectionClosed, DisconnectionTimeout, trio.TooSlowError) as exc:
                log.debug("connection to %s ended: %r", url, exc)
            self._disconnected()
            if self._terminal is not None:
                self._fail_all(self._terminal)
                return
            if healthy_since is not None:
                self.backoff.connection_lasted(trio.current_time() - healthy_since)
            delay = self.backoff.next_delay()
            if self.last_close_code == CloseCode.RESTART:
                # A draining gateway: come back soon, but spread over a short window.
                delay = min(delay, self.backoff.rng.uniform(0, 1.0))
            elif self.last_close_code == CloseCode.RATE_LIMIT:
                # Closed for abuse: stay away for the longest backoff (as fanroute.js).
                delay = self.backoff.rng.uniform(self.backoff.max_delay, 1.5 * self.backoff.max_delay)
            await trio.sleep(delay)

    def _disconnected(self) -> None:
        self._ws = None
        self.url = None
        if self._connected.is_set():
            self._connected = trio.Event()
        for id, (kind, ctx, pending) in list(self._pending.items()):
            if kind != "subscribe":
                pending.fail(ConnectionLost())
        self._pending.clear()

    def _fail_all(self, error: ClientError) -> None:
        for sub in self.subscriptions.values():
            sub.confirmed.fail(error)
            sub._send.close()

    async def _session(self, ws: WebSocketConnection, url: str) -> None:
        hello: dict[str, Any] = {"type": "connect", "id": 0}
        if self.token is not None:
            hello["token"] = self.token
        await ws.send_message(orjson.dumps(hello).decode())
        with trio.fail_after(self.connect_timeout):
            while True:
                reply = orjson.loads(await ws.get_message())
                if reply.get("type") == "connected":
                    break
                if reply.get("type") == "error":
                    self._terminal = RequestFailed(reply.get("code", "error"), reply.get("message", ""))
                    return
        interval = self._ping_interval or float(reply.get("ping_interval", 25))
        timeout = self._ping_timeout or float(reply.get("ping_timeout", 8))
        self._ws = ws
        self.url = url
        self.connects += 1
        self.last_close_code = None
        for sub in list(self.subscriptions.values()):
            await self._send_subscribe(ws, sub)
        self._connected.set()
        last_rx = [trio.current_time()]
        with trio.CancelScope() as kick:
            self._kick = kick
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, ws, interval, timeout, last_rx, nursery.cancel_scope)
                try:
                    while True:
                        data = await ws.get_message()
                        last_rx[0] = trio.current_time()
                        await self._dispatch(ws, data)
                except ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason is not None else None
                    self.last_close_code = code
                    if code in TERMINAL_CLOSE_CODES:
                        self._terminal = RequestFailed(ErrorCode.UNAUTHORIZED, exc.reason.reason or "closed")
                finally:
                    nursery.cancel_scope.cancel()
        self._kick = None

    async def _heartbeat(
        self, ws: WebSocketConnection, interval: float, timeout: float, last_rx: list[float], scope: trio.CancelScope
    ) -> None:
        deadline = interval + timeout
        while True:
            await trio.sleep(min(interval, deadline / 4))
            if trio.current_time() - last_rx[0] > deadline:
                log.info("no traffic for %.1fs: connection is dead", deadline)
                scope.cancel()
                return
            try:
                await ws.send_message(orjson.dumps({"type": "ping", "ts": int(time.time() * 1000)}).decode())
            except ConnectionClosed:
                return

    async def _dispatch(self, ws: WebSocketConnection, data: str | bytes) -> None:
        msg = orjson.loads(data)
        kind = msg.get("type")
        if kind is None or kind == "message":
            sub = self.subscriptions.get(msg.get("topic"))
            if sub is not None:
                await self._on_message(ws, sub, msg)
            return
        if kind == "pong":
            return
        id = msg.get("id")
        entry = self._pending.pop(id, None) if id is not None else None
        if kind == "subscribed":
            sub = entry[1] if entry is not None else self.subscriptions.get(msg.get("topic"))
            if sub is not None and self.subscriptions.get(sub.topic) is sub:
                await self._on_subscribed(sub, msg)
            return
        if entry is None:
            return
        kind_sent, ctx, pending = entry
        if kind == "error":
            error = RequestFailed(msg.get("code", "error"), msg.get("message", ""))
            if kind_sent == "subscribe":
                ctx.confirmed.fail(error)
            else:
                pending.fail(error)
        elif kind == "published":
            pending.resolve(msg.get("seq"))
        else:
            pending.resolve(msg)

    async def _on_subscribed(self, sub: Subscription, msg: dict[str, Any]) -> None:
        epoch, seq, recovered = msg["epoch"], msg["seq"], msg.get("recovered", False)
        was_recovering, sub.recovering = sub.recovering or msg.get("id") is None, False
        if was_recovering and not recovered:
            # The gap cannot be filled: say so in the stream, then go on from here.
            await sub._put(Unrecovered(sub.topic, epoch, seq))
            sub.epoch, sub.seq = epoch, seq
        elif not recovered:
            sub.epoch, sub.seq = epoch, seq
        else:
            sub.epoch = epoch  # the missed messages follow, from sub.seq + 1
        if not sub.confirmed.event.is_set():
            sub.confirmed.resolve(sub)

    async def _on_message(self, ws: WebSocketConnection, sub: Subscription, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if sub.epoch is None or sub.recovering or type(seq) is not int:
            return  # not confirmed yet: the subscribed reply sets where we stand
        if seq <= sub.seq:
            sub.duplicates += 1
            return
        if seq != sub.seq + 1:
            # A gap: ask again from the last message we have.
            sub.gaps += 1
            await ws.send_message(orjson.dumps({"type": "unsubscribe", "topic": sub.topic}).decode())
            await self._send_subscribe(ws, sub)
            return
        sub.seq = seq
        await sub._put(Message(sub.topic, msg.get("payload"), seq))
