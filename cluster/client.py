"""The Python client SDK (trio).

    async with fanroute.client.Client(["ws://127.0.0.1:8081/", "ws://127.0.0.1:8082/"]) as client:
        sub = await client.subscribe("prices.AAPL", last=1, presence=True)
        seq = await client.publish("prices.AAPL", {"price": 189.5})
        async for item in sub:
            if isinstance(item, Unrecovered):
                ...  # continuity broke: refetch state from the application
            elif isinstance(item, Presence):
                print(item.subscribers, "watching")
            else:
                print(item.topic, item.seq, item.payload)

What it does for the application — every rule below lives in :mod:`fanroute.clientcore`,
which the browser client follows case for case; this module only moves frames between
a trio-websocket connection and that core:

* keeps one connection to one of the gateway URLs, rotating through them;
* heartbeats: an app-level ``ping`` every ``ping_interval``; a connection from which
  nothing arrived for ``ping_interval + ping_timeout`` (the gateway's values from
  ``connected`` unless given here) counts as dead;
* reconnects with exponential backoff and full jitter (``fanroute.backoff``), reset only
  after a connection stayed up for ``backoff_reset`` seconds; obeys the close codes
  (4001, 4003 and 1008 stop it, 1012 brings it back within a second, 4029 keeps it
  away for the longest backoff);
* resubscribes every topic with ``since`` after a reconnect, drops duplicates, and
  repairs gaps by resubscribing, so each subscription yields every message once and
  in ``seq`` order — or an explicit :class:`Unrecovered` marker where the cluster
  could not fill the gap (history too short, or the topic's epoch changed);
* ``last=N`` starts a subscription with the topic's newest N messages, and asks for
  them again (with ``since``) whenever it resubscribes, so a subscription that cannot
  recover still starts from the latest value; ``presence=True`` yields a
  :class:`Presence` item whenever the topic's subscriber count changes (and
  :attr:`Subscription.subscribers` holds the latest); a message that carries
  ``skipped`` (a conflated topic) is delivered as it is, the gap announced, not repaired;
* ``token=`` is a string, or a callable (sync or async) returning one: the client
  then asks it for a token before every connection attempt and again a third of the
  token's life before its ``exp``, which it sends with ``refresh`` on the open
  connection; a connection closed with 4001 because its token expired reconnects
  with a new one. A callable that returns None (no token can be had) or a token the
  gateway refuses stops the client; one that raises is asked again after a backoff.

A subscribe refused for a transient reason (``unavailable``, ``rate_limited``,
``internal``) is retried with backoff, and :meth:`Client.subscribe` waits through it
(bound it with ``trio.fail_after``); any other refusal raises :class:`RequestFailed`
from ``subscribe()`` or, for a running subscription (a resubscribe refused, or the
server withdrawing it), from the subscription's iteration once the items before it
were read. A terminal close code ends every subscription the same way.

:meth:`Client.publish` returns the seq once the publication is acknowledged, through
retries: each publication carries an ``idem`` key (the caller's, or one the client
makes), and one whose outcome is open — the connection lost before the answer, or
answered ``unavailable``, ``outcome_unknown`` or ``internal`` — is sent again with the
same key on the next connection or after a backoff delay, so it is applied exactly
once. Within ``timeout`` and at most 10 sends; then it raises what was learnt last.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from fanroute import clientcore as cc
from fanroute import protocol as p
from fanroute.clientcore import TERMINAL_CLOSE_CODES, Message, Presence, Unrecovered
from fanroute.codes import CloseCode, ErrorCode
from fanroute.errors import ClientError, ConnectionLost, RequestFailed

log = logging.getLogger("fanroute.client")

__all__ = ["Client", "Message", "Presence", "Subscription", "TERMINAL_CLOSE_CODES", "TokenSource", "Unrecovered"]

#: A token source: called with no argument, returns a token (or None: none can be had).
TokenSource: TypeAlias = Callable[[], "str | None | Awaitable[str | None]"]

# What a terminal close code becomes for the application.
_TERMINAL_ERRORS = {
    CloseCode.UNAUTHORIZED: ErrorCode.UNAUTHORIZED,
    CloseCode.DISCONNECTED: "disconnected",
    CloseCode.POLICY: "policy_violation",
}


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


Item: TypeAlias = Message | Unrecovered | Presence


class Subscription:
    """A topic's stream of :class:`Message` and :class:`Unrecovered` items (and
    :class:`Presence` items when subscribed with ``presence=True``).

    Iteration ends when the application unsubscribes; it raises :class:`ClientError`
    when the subscription ended otherwise (refused, withdrawn, a terminal close)."""

    def __init__(self, client: Client, topic: str, buffer: int, last: int | None = None, presence: bool = False) -> None:
        self.client = client
        self.topic = topic
        self.last = last
        self.presence = presence
        self.error: ClientError | None = None  # why it ended, when not by unsubscribe
        self.confirmed = _Pending()
        self._stream: cc.Stream | None = None  # the core's state for the topic
        self._send, self._recv = trio.open_memory_channel[Item](buffer)

    # Where the stream stands, as the core tracks it.
    @property
    def epoch(self) -> str | None:
        return None if self._stream is None else self._stream.epoch

    @property
    def seq(self) -> int:
        """The last seq handed to the application (or where the stream started)."""
        return 0 if self._stream is None else self._stream.seq

    @property
    def duplicates(self) -> int:
        return 0 if self._stream is None else self._stream.duplicates

    @property
    def gaps(self) -> int:
        return 0 if self._stream is None else self._stream.gaps

    @property
    def subscribers(self) -> int | None:
        """The topic's latest subscriber count the gateway pushed (``presence=True``)."""
        return None if self._stream is None else self._stream.subscribers

    @property
    def recovering(self) -> bool:
        """A resubscribe with ``since`` is in flight (or waiting to be retried)."""
        s = self._stream
        return s is not None and s.epoch is not None and s.state in (cc.PENDING, cc.RETRY)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def get(self) -> Item:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self.error is not None:
                raise self.error from None
            raise

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.topic)

    async def _put(self, item: Item) -> None:
        await self._send.send(item)

    def _end(self, error: ClientError | None) -> None:
        if not self.confirmed.event.is_set():
            self.confirmed.fail(error or RequestFailed(ErrorCode.BAD_REQUEST, "unsubscribed"))
        if self.error is None:
            self.error = error
        self._send.close()


class Client:
    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | TokenSource | None = None,
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
        if token is not None and not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a callable returning one")
        self.token = token
        settings = cc.Settings(
            min_delay=min_delay, max_delay=max_delay, backoff_reset=backoff_reset, ping_interval=ping_interval,
            ping_timeout=ping_timeout, connect_timeout=connect_timeout,
            token=token if isinstance(token, str) else None, fetch_token=callable(token),
        )
        self._core: cc.ClientCore[str] = cc.ClientCore(self.urls, settings)
        self.backoff = self._core.backoff
        self.connect_timeout = connect_timeout
        self.buffer = buffer
        self.subscriptions: dict[str, Subscription] = {}
        self.url: str | None = None  # the gateway currently connected to
        self.last_close_code: int | None = None
        self.last_close_reason = ""
        self.refreshes = 0  # tokens the gateway took with `refresh` on an open connection
        self._ws: WebSocketConnection | None = None  # set once `connected` arrived
        self._socket: WebSocketConnection | None = None  # the open socket, connected or not
        self._connected = trio.Event()
        self._pending: dict[int, tuple[str, _Pending]] = {}
        self._publications: dict[cc.Outgoing, _Pending] = {}  # publish() calls waiting for their answer
        self._nursery: trio.Nursery | None = None
        self._terminal: ClientError | None = None
        self._kick: trio.CancelScope | None = None
        self._dropped: cc.Drop | None = None
        self._hold: trio.Event | None = None
        self._session_scope = trio.CancelScope()  # the current connection's tasks
        self._session_nursery: trio.Nursery | None = None
        self._tick_wait = trio.CancelScope()  # the ticker's sleep, cut short when the period changes

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

    @property
    def connects(self) -> int:
        """Successful connections so far."""
        return self._core.stats.connects

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def drop_connection(self, *, hold: trio.Event | None = None) -> None:
        """Abandon the current connection (it will be re-established): for tests and tools.

        With ``hold``, the client does not reconnect before ``hold`` is set, so that a
        test can decide what happens while it is away."""
        self._hold = hold
        if self._kick is not None:
            self._kick.cancel()

    # --- the application's side ------------------------------------------------------

    async def subscribe(self, topic: str, *, last: int | None = None, presence: bool = False) -> Subscription:
        """Subscribe and wait until the gateway confirmed; raises :class:`ClientError`.

        ``last``: begin with the topic's newest ``last`` messages (and get them again
        whenever a resubscribe cannot recover); ``presence``: yield a
        :class:`Presence` item whenever the topic's subscriber count changes."""
        p.check_topic(topic)
        if last is not None and (type(last) is not int or last < 1):
            raise ValueError("last must be an integer of at least 1")
        if self._terminal is not None:
            raise self._terminal
        if topic in self.subscriptions:
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"already subscribed to {topic!r}")
        sub = self.subscriptions[topic] = Subscription(self, topic, self.buffer, last, presence)
        actions = self._core.subscribe(topic, last, presence)
        sub._stream = self._core.streams[topic]
        await self._apply(self._socket, actions)
        try:
            await sub.confirmed.wait()
        except ClientError:
            if self.subscriptions.get(topic) is sub:
                del self.subscriptions[topic]
                self._core.unsubscribe(topic)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        sub = self.subscriptions.pop(topic, None)
        if sub is None:
            return
        sub._end(None)
        ws = self._socket
        for action in self._core.unsubscribe(topic):
            if isinstance(action, cc.Send) and ws is not None:
                try:
                    await self._request(ws, action.frame, "unsubscribe")
                except ClientError:
                    pass

    async def publish(
        self, topic: str, payload: Any, *, ack: bool = True, timeout: float = 10.0, idem: str | None = None
    ) -> int | None:
        """Publish; with ``ack`` wait for the seq the cluster gave it, through retries.

        The publication carries ``idem`` (1 to 64 characters; by default a key unique
        to this client) and is sent again with it — on the next connection when the
        connection drops before the answer, after a backoff delay when the answer is
        ``unavailable``, ``outcome_unknown`` or ``internal`` — so the cluster applies it
        once and the seq returned is that one's. After ``timeout`` seconds, or 10 sends,
        it raises what it learnt last: :class:`RequestFailed` with that code,
        :class:`ConnectionLost` (sent, no answer came: it may have been applied), or
        ``trio.TooSlowError`` (nothing learnt). Any other error answer raises
        :class:`RequestFailed` at once, not sent again.

        Without ``ack`` it is sent once, without an ``id``, as soon as a connection is up.
        """
        if not ack:
            with trio.fail_after(timeout):
                while True:
                    if self._terminal is not None:
                        raise self._terminal
                    await self._connected.wait()
                    ws = self._ws
                    if ws is None:
                        continue
                    frame = {"type": "publish", "topic": topic, "payload": payload}
                    if idem is not None:
                        frame["idem"] = idem
                    try:
                        await ws.send_message(orjson.dumps(frame).decode())
                    except ConnectionClosed:
                        continue
                    return None
        if self._terminal is not None:
            raise self._terminal
        pub, actions = self._core.publish(topic, payload, trio.current_time(), idem, timeout)
        pending = self._publications[pub] = _Pending()
        try:
            await self._apply(self._socket, actions)
            with trio.move_on_at(pub.deadline):
                return await pending.wait()
            self._settle(self._core.abandon(pub))  # the deadline: fails it, unless it was just settled
            return await pending.wait()
        finally:
            self._publications.pop(pub, None)
            self._core.abandon(pub)  # a caller that went away: not sent again

    async def presence(self, topic: str, *, timeout: float = 10.0) -> int:
        """How many connections are subscribed to ``topic`` across the cluster (the
        right to subscribe to it is needed)."""
        p.check_topic(topic)
        with trio.fail_after(timeout):
            while True:
                if self._terminal is not None:
                    raise self._terminal
                await self._connected.wait()
                ws = self._ws
                if ws is None:
                    continue
                frame = {"type": "presence", "topic": topic, "id": self._core.next_id()}
                return await self._request(ws, frame, "presence")

    # --- the connection ----------------------------------------------------------------

    async def _request(self, ws: WebSocketConnection, frame: dict[str, Any], kind: str) -> Any:
        pending = _Pending()
        self._pending[frame["id"]] = (kind, pending)
        try:
            await ws.send_message(orjson.dumps(frame).decode())
        except ConnectionClosed:
            self._pending.pop(frame["id"], None)
            raise ConnectionLost() from None
        return await pending.wait()

    async def _run(self) -> None:
        actions = self._core.start(trio.current_time())
        while True:
            while not any(isinstance(a, cc.Connect) for a in actions):
                if any(isinstance(a, cc.FetchToken) for a in actions):
                    actions = await self._token_from_source()
                    continue
                if not await self._after_close(actions):  # the token source failed, or had none
                    return
                actions = self._core.connect(trio.current_time())
            url = next(a.url for a in actions if isinstance(a, cc.Connect))
            code: int | None = None
            reason = ""
            self._dropped = None
            try:
                async with open_websocket_url(
                    url, connect_timeout=self.connect_timeout, disconnect_timeout=1
                ) as ws:
                    code, reason = await self._session(ws, url)
            except (OSError, HandshakeError, ConnectionClosed, DisconnectionTimeout, trio.TooSlowError) as exc:
                log.debug("connection to %s ended: %r", url, exc)
                if isinstance(exc, ConnectionClosed) and exc.reason is not None:
                    code, reason = exc.reason.code, exc.reason.reason or ""
            if self._dropped is not None:
                code, reason = self._dropped.code, self._dropped.reason
            self.last_close_code, self.last_close_reason = code, reason
            self._disconnected()
            if not await self._after_close(self._core.closed(code, trio.current_time(), reason)):
                return
            hold, self._hold = self._hold, None
            if hold is not None:
                await hold.wait()
            actions = self._core.connect(trio.current_time())

    async def _after_close(self, actions: Sequence[cc.Action]) -> bool:
        """Wait for the next attempt (True), or end the client on a Stop (False)."""
        for action in actions:
            if isinstance(action, cc.Stop):
                error = _TERMINAL_ERRORS.get(action.code, "closed")  # type: ignore[call-overload]
                self._terminal = RequestFailed(error, action.reason or f"closed with {action.code}")
                self._fail_all(self._terminal)
                self._settle(actions)  # the publications held fail with it
                return False
        for action in actions:
            if isinstance(action, cc.ReconnectAt):
                await trio.sleep_until(action.at)
        return True

    # --- tokens ------------------------------------------------------------------------

    async def _ask_token_source(self) -> str | None:
        assert callable(self.token)
        result = self.token()
        if inspect.isawaitable(result):
            result = await result
        if result is not None and not isinstance(result, str):
            raise TypeError(f"the token source returned {type(result).__name__}, not a string")
        return result

    async def _token_from_source(self) -> Sequence[cc.Action]:
        """Ask the token source (within the connect timeout) and tell the core."""
        try:
            with trio.fail_after(self.connect_timeout):
                token = await self._ask_token_source()
        except Exception as exc:  # the application's code: whatever it raises, try again later
            log.warning("the token source failed: %r", exc)
            return self._core.token_failed(trio.current_time(), f"the token source failed: {exc!r}")
        ttl = cc.token_ttl(token, time.time()) if token else None
        return self._core.give_token(token, trio.current_time(), ttl)

    async def _refresh_token(self, ws: WebSocketConnection) -> None:
        await self._apply(ws, await self._token_from_source())

    def _disconnected(self) -> None:
        self._ws = self._socket = None
        self.url = None
        if self._connected.is_set():
            self._connected = trio.Event()
        for _kind, pending in self._pending.values():
            pending.fail(ConnectionLost())
        self._pending.clear()

    def _fail_all(self, error: ClientError) -> None:
        for sub in self.subscriptions.values():
            sub._end(error)

    async def _session(self, ws: WebSocketConnection, url: str) -> tuple[int | None, str]:
        """One connection, from the open socket to its end; returns the close code and reason."""
        self._socket = ws
        code: int | None = None
        reason = ""
        with trio.CancelScope() as kick:
            self._kick = kick
            async with trio.open_nursery() as nursery:
                self._session_scope = nursery.cancel_scope
                self._session_nursery = nursery
                await self._apply(ws, self._core.opened(trio.current_time()))
                nursery.start_soon(self._ticker, ws)
                try:
                    while True:
                        data = await ws.get_message()
                        try:
                            msg = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            continue
                        if isinstance(msg, dict):
                            await self._dispatch(ws, msg)
                except ConnectionClosed as exc:
                    if exc.reason is not None:
                        code, reason = exc.reason.code, exc.reason.reason or ""
                finally:
                    nursery.cancel_scope.cancel()
        self._kick = None
        self._session_nursery = None
        return code, reason

    async def _ticker(self, ws: WebSocketConnection) -> None:
        while True:
            with trio.CancelScope() as self._tick_wait:
                await trio.sleep(self._core.check_period)
            await self._apply(ws, self._core.tick(trio.current_time()))

    async def _dispatch(self, ws: WebSocketConnection, msg: dict[str, Any]) -> None:
        if msg.get("type") == "subscribed":
            topic = msg.get("topic")
            sub = self.subscriptions.get(topic) if isinstance(topic, str) else None
            if sub is not None:
                await self._on_subscribed(sub, msg)
            return
        await self._apply(ws, self._core.received(msg, trio.current_time()), msg)

    async def _on_subscribed(self, sub: Subscription, msg: dict[str, Any]) -> None:
        """A ``subscribed`` frame for ``sub``'s topic (a hook: the bench's SDK path wraps it)."""
        await self._apply(self._socket, self._core.received(msg, trio.current_time()), msg)

    async def _apply(self, ws: WebSocketConnection | None, actions: Sequence[cc.Action], frame: dict[str, Any] | None = None) -> None:
        """Carry out what the core asked for, in order."""
        for action in actions:
            if action is cc.DELIVER:
                assert frame is not None
                sub = self.subscriptions.get(frame["topic"])
                if sub is not None:
                    await sub._put(Message(sub.topic, frame.get("payload"), frame["seq"]))
            elif isinstance(action, cc.Send):
                await self._send(ws, action.frame)
            elif action is cc.PING:
                await self._send(ws, {"type": "ping", "ts": int(time.time() * 1000)})
            elif isinstance(action, cc.Unrecovered):
                sub = self.subscriptions.get(action.topic)
                if sub is not None:
                    await sub._put(action)
            elif isinstance(action, cc.Presence):
                sub = self.subscriptions.get(action.topic)
                if sub is not None and sub.presence:
                    await sub._put(action)
            elif isinstance(action, cc.FetchToken):
                if self._session_nursery is not None and ws is not None:
                    self._session_nursery.start_soon(self._refresh_token, ws)
            elif isinstance(action, cc.Refreshed):
                self.refreshes += 1
            elif isinstance(action, cc.Subscribed):
                sub = self.subscriptions.get(action.topic)
                if sub is not None and not sub.confirmed.event.is_set():
                    sub.confirmed.resolve(sub)
            elif isinstance(action, cc.SubscribeError):
                if action.retry_at is None:
                    sub = self.subscriptions.pop(action.topic, None)
                    if sub is not None:
                        sub._end(RequestFailed(action.code, action.message))
                else:
                    log.info("subscribe to %s refused (%s), again in %.2fs", action.topic, action.code,
                             action.retry_at - trio.current_time())
            elif isinstance(action, cc.Ready):
                self._ws = ws
                self.url = self._core.url
                self.last_close_code = None
                self._connected.set()
                self._tick_wait.cancel()  # the gateway's ping settings change the tick period
            elif isinstance(action, cc.Answer):
                self._answer(action)
            elif isinstance(action, (cc.Published, cc.PublishFailed)):
                self._settle((action,))
            elif isinstance(action, cc.PublishRetry):
                log.info("publication %s to %s answered %s, again in %.2fs", action.publication.idem,
                         action.publication.topic, action.code, action.retry_at - trio.current_time())
            elif isinstance(action, cc.Drop):
                log.info("dropping the connection to %s: %s", self._core.url, action.reason)
                self._dropped = action
                self._session_scope.cancel()
                return

    def _settle(self, actions: Sequence[cc.Action]) -> None:
        """Hand publications the core settled to the publish() calls waiting for them."""
        for action in actions:
            if isinstance(action, (cc.Published, cc.PublishFailed)):
                pending = self._publications.pop(action.publication, None)
                if pending is None:
                    continue
                if isinstance(action, cc.Published):
                    pending.resolve(action.seq)
                else:
                    pending.fail(self._publish_error(action))

    def _publish_error(self, action: cc.PublishFailed) -> Exception:
        if action.code == cc.DISCONNECTED:
            return ConnectionLost()
        if action.code == cc.TIMEOUT:
            return trio.TooSlowError(action.message)
        if action.code == cc.CLOSED and self._terminal is not None:
            return self._terminal
        return RequestFailed(action.code, action.message)

    def _answer(self, action: cc.Answer) -> None:
        entry = self._pending.pop(action.id, None) if action.id is not None else None
        if entry is None:
            return
        kind, pending = entry
        msg = action.frame
        if msg.get("type") == "error":
            pending.fail(RequestFailed(msg.get("code", "error"), msg.get("message", "")))
        elif kind == "presence":
            pending.resolve(msg.get("subscribers"))
        else:
            pending.resolve(msg)

    async def _send(self, ws: WebSocketConnection | None, frame: dict[str, Any]) -> None:
        if ws is None:
            return
        try:
            await ws.send_message(orjson.dumps(frame).decode())
        except ConnectionClosed:
            pass  # the read side notices; what was in flight is asked again on the next connection
