"""Hostile HTTP against the admin port and the client port, over real sockets.

Wrong and non-ASCII API keys, key guessing from one address, requests trickled a
byte at a time, keep-alive connections left idle, responses never read, malformed
and oversized requests: each is refused or closed by a limit, counted where the
limit has a metric, and the server goes on answering everyone else.
"""

from __future__ import annotations

import orjson
import pytest
import trio

from fanroute.admin import MAX_BODY, AdminServer, HttpApp, Request, Response
from fanroute.attempts import AttemptThrottle, address_key
from fanroute.gateway import api
from fanroute.gateway.api import KEY_ATTEMPT_BURST, PublishApi
from tests.support import DEADLINE, metric, start_standalone

API_KEY = "test-api-key"
PUBLISH = b'{"topic": "feed.x", "payload": 1}'


# --- a raw HTTP/1.1 client: bytes exactly as written, responses parsed by hand ---


class Raw:
    """One TCP connection on which the test writes bytes and reads responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.buf += data
        return bool(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        with trio.fail_after(DEADLINE):
            while b"\r\n\r\n" not in self.buf:
                if not await self._fill():
                    raise AssertionError(f"connection closed before a response: {self.buf!r}")
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            length = int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                if not await self._fill():
                    raise AssertionError("connection closed in the middle of a response body")
            body, self.buf = self.buf[:length], self.buf[length:]
            return int(status_line.split()[1]), headers, body

    async def closed(self) -> bytes:
        """Wait until the server closes; what it sent meanwhile."""
        with trio.fail_after(DEADLINE):
            while await self._fill():
                pass
        rest, self.buf = self.buf, b""
        return rest


def publish_request(key: bytes | None, body: bytes = PUBLISH) -> bytes:
    key_header = b"x-api-key: " + key + b"\r\n" if key is not None else b""
    return (
        b"POST /api/publish HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        + key_header
        + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def ask(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = await Raw.open(port)
    try:
        await conn.stream.send_all(raw)
        return await conn.response()
    finally:
        await conn.stream.aclose()


async def scrape(admin_port: int, name: str, labels: str) -> float:
    status, _, body = await ask(admin_port, b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
    assert status == 200
    try:
        return metric(body.decode(), name, labels)
    except KeyError:
        return 0.0  # a labelled counter appears only once it has counted


AUTH_FAILURES = ("fanroute_gateway_auth_failures_total", 'kind="api_key"')
KEY_LIMIT_HITS = ("fanroute_gateway_limit_hits_total", 'limit="api_key_attempts"')


@pytest.fixture
async def server(nursery):
    return await start_standalone(nursery, api_key=API_KEY)


# --- the HTTP publish API: keys ---------------------------------------------------


async def test_non_ascii_api_key_is_401_and_counted(server):
    before = await scrape(server.admin_port, *AUTH_FAILURES)
    for key in ("é".encode(), API_KEY.encode() + "é".encode(), b"\xff\xfe"):
        status, _, body = await ask(server.admin_port, publish_request(key))
        assert status == 401, body
        assert b'"unauthorized"' in body
    assert await scrape(server.admin_port, *AUTH_FAILURES) == before + 3
    status, _, _ = await ask(server.admin_port, publish_request(API_KEY.encode()))
    assert status == 200  # three failures are within the budget


async def serve_publish_api(nursery: trio.Nursery, bound, throttle: AttemptThrottle) -> int:
    """The standalone's publish API on an admin port of its own, with ``throttle``.

    Composed as ``fanroute.node`` composes it, so only the throttle's pace differs:
    one that never refills during the test keeps its assertions exact however
    slowly a loaded machine runs them.
    """
    admin = AdminServer(bound.gateway.registry, bound.gateway.ready)
    admin.route("POST", "/api/publish", PublishApi(bound.gateway, throttle).handle)
    return await nursery.start(admin.serve, "127.0.0.1", 0)


async def test_key_guessing_is_throttled_per_address(server, nursery):
    admin = await serve_publish_api(nursery, server, AttemptThrottle(KEY_ATTEMPT_BURST, rate=1e-6))
    assert (await ask(admin, publish_request(API_KEY.encode())))[0] == 200
    failures, hits = await scrape(admin, *AUTH_FAILURES), await scrape(admin, *KEY_LIMIT_HITS)
    answers = [await ask(admin, publish_request(f"guess-{i}".encode())) for i in range(20)]
    assert [status for status, _, _ in answers] == [401] * KEY_ATTEMPT_BURST + [429] * (20 - KEY_ATTEMPT_BURST)
    for _, headers, body in answers[KEY_ATTEMPT_BURST:]:
        assert int(headers["retry-after"]) >= 1
        assert b'"rate_limited"' in body
    assert await scrape(admin, *AUTH_FAILURES) == failures + KEY_ATTEMPT_BURST
    assert await scrape(admin, *KEY_LIMIT_HITS) == hits + 20 - KEY_ATTEMPT_BURST

    # While the address is over its budget even the right key is refused...
    status, headers, _ = await ask(admin, publish_request(API_KEY.encode()))
    assert status == 429 and "retry-after" in headers
    # ...requests without a key are not attempts, and are told a key is needed...
    assert (await ask(admin, publish_request(None)))[0] == 401
    # ...and everything else still answers.
    assert (await ask(admin, b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n"))[0] == 200


async def test_key_budget_refills_on_the_default_admin_port(server):
    admin = server.admin_port
    statuses = [(await ask(admin, publish_request(f"guess-{i}".encode())))[0] for i in range(20)]
    # Exact counts depend on how fast this machine is: the budget refills meanwhile.
    assert statuses[:KEY_ATTEMPT_BURST] == [401] * KEY_ATTEMPT_BURST and 429 in statuses
    # Refused tries do not spend the budget, so asking again until it refills is safe.
    with trio.fail_after(DEADLINE):
        while (status := (await ask(admin, publish_request(API_KEY.encode())))[0]) == 429:
            await trio.sleep(0.1)
    assert status == 200


async def test_publication_items_may_carry_an_idem_key(server):
    items = [
        {"topic": "feed.x", "payload": 1, "idem": "feed-1"},
        {"topic": "feed.x", "payload": 2, "idem": ""},
        {"topic": "feed.x", "payload": 3, "idem": "k" * 65},
        {"topic": "feed.x", "payload": 4, "idem": 7},
    ]
    status, _, body = await ask(server.admin_port, publish_request(API_KEY.encode(), orjson.dumps({"items": items})))
    assert status == 200
    results = orjson.loads(body)["results"]
    assert "seq" in results[0]
    assert [r["error"]["code"] for r in results[1:]] == ["bad_request"] * 3
    # A retry with the same key reaches the shard with it, and is not applied twice.
    status, _, body = await ask(server.admin_port, publish_request(API_KEY.encode(), orjson.dumps(items[0])))
    assert (status, orjson.loads(body)) == (200, {"topic": "feed.x", "seq": results[0]["seq"]})


async def test_no_answer_in_time_is_outcome_unknown_504(server, monkeypatch):
    monkeypatch.setattr(api, "_TIMEOUT", 0.2)
    monkeypatch.setattr(server.gateway.hub, "publish", lambda session, cmd: None)  # a shard that never answers
    status, _, body = await ask(server.admin_port, publish_request(API_KEY.encode()))
    assert status == 504
    assert orjson.loads(body)["error"]["code"] == "outcome_unknown"


# --- the client port: slow and idle connections ------------------------------------


@pytest.mark.parametrize("shape", ["body of the first request", "head of a keep-alive request"])
async def test_trickled_request_is_closed_by_its_deadline(server, shape):
    http = server.gateway.http
    http.request_timeout = 1.0
    http.idle_timeout = 5.0
    conn = await Raw.open(server.port)
    if shape == "body of the first request":
        # The head arrives whole (the gateway reads it itself); the body never does.
        await conn.stream.send_all(b"POST /index.html HTTP/1.1\r\nhost: test\r\ncontent-length: 400\r\n\r\n")
        trickle = b"x" * 400
    else:
        await conn.stream.send_all(b"GET /favicon.svg HTTP/1.1\r\nhost: test\r\n\r\n")
        assert (await conn.response())[0] == 200
        trickle = b"GET /favicon.svg HTTP/1.1\r\nhost: test\r\nx-pad: " + b"a" * 300 + b"\r\n\r\n"
    sent = 0
    closed = trio.Event()

    async def trickler() -> None:
        nonlocal sent
        for byte in trickle:
            if closed.is_set():
                return
            try:
                await conn.stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return
            sent += 1
            await trio.sleep(0.1)  # the slowness under test: far below any idle limit

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickler)
        rest = await conn.closed()
        closed.set()
    assert sent < len(trickle), "the trickle was allowed to finish"
    assert rest.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed(server):
    server.gateway.http.idle_timeout = 1.0
    conn = await Raw.open(server.port)
    for _ in range(2):  # kept alive between requests that come in time
        await conn.stream.send_all(b"GET /favicon.svg HTTP/1.1\r\nhost: test\r\n\r\n")
        status, headers, _ = await conn.response()
        assert status == 200 and headers.get("connection") != "close"
    assert await conn.closed() == b""  # then closed without a word once idle


# --- HttpApp itself: what the peer sends cannot make it raise ------------------------


@pytest.fixture
async def app(nursery):
    """An HttpApp with short limits, and an event per connection that ended."""
    app = HttpApp(idle_timeout=1.0, request_timeout=1.0)
    app.ended = []  # type: ignore[attr-defined]

    async def echo(request: Request) -> Response:
        return Response(200, request.body or request.client.encode())

    async def bad(_: Request) -> Response:
        return Response(200, b"", headers=[("x-broken", "a\r\nb")])  # HTTP cannot carry it

    big = Response(200, b"x" * 200_000)

    async def large(_: Request) -> Response:
        return big

    app.route("POST", "/echo", echo)
    app.route("GET", "/echo", echo)
    app.route("GET", "/bad", bad)
    app.route("GET", "/large", large)

    async def serve(stream: trio.SocketStream) -> None:
        ended = trio.Event()
        app.ended.append(ended)  # type: ignore[attr-defined]
        try:
            await app.handle(stream)
        finally:
            ended.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, serve, listeners)
    app.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
    return app


async def test_request_knows_the_client_address(app):
    status, _, body = await ask(app.port, b"GET /echo HTTP/1.1\r\nhost: test\r\n\r\n")
    assert (status, body) == (200, b"127.0.0.1")


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS on a plain port
        (b"GET /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nhost: test\r\nx-pad: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (b"POST /echo HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    ],
)
async def test_malformed_or_oversized_request_is_answered_and_closed(app, raw, status):
    conn = await Raw.open(app.port)
    await conn.stream.send_all(raw)
    answer, headers, body = await conn.response()
    assert answer == status and headers["connection"] == "close"
    assert body.count(b"\n") == 1  # one sentence
    assert await conn.closed() == b""
    assert (await ask(app.port, b"GET /echo HTTP/1.1\r\nhost: test\r\n\r\n"))[0] == 200


async def test_chunked_body_over_the_limit_gets_413(app):
    app.request_timeout = DEADLINE  # a loaded machine may take a while to send a megabyte
    conn = await Raw.open(app.port)
    await conn.stream.send_all(b"POST /echo HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
    with trio.move_on_after(DEADLINE):
        try:
            for _ in range(MAX_BODY // 65536 + 1):
                await conn.stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass
    assert (await conn.response())[0] == 413


async def test_100_continue_is_answered_before_the_body(app):
    app.request_timeout = DEADLINE
    conn = await Raw.open(app.port)
    await conn.stream.send_all(
        b"POST /echo HTTP/1.1\r\nhost: test\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
    )
    assert (await conn.response())[0] == 100
    await conn.stream.send_all(b"hi")
    assert (await conn.response())[::2] == (200, b"hi")


async def test_response_http_cannot_carry_closes_only_that_connection(app):
    conn = await Raw.open(app.port)
    await conn.stream.send_all(b"GET /bad HTTP/1.1\r\nhost: test\r\n\r\n")
    await conn.closed()
    assert (await ask(app.port, b"GET /echo HTTP/1.1\r\nhost: test\r\n\r\n"))[0] == 200


async def test_client_that_never_reads_its_responses_is_let_go(app):
    conn = await Raw.open(app.port)
    await conn.stream.send_all(b"GET /large HTTP/1.1\r\nhost: test\r\n\r\n" * 100)
    with trio.fail_after(DEADLINE):
        await app.ended[0].wait()
    received = len(await conn.closed())
    assert received < 100 * 200_000


# --- the per-address throttle, without sockets --------------------------------------


def test_throttle_allows_a_burst_then_the_refill_rate():
    t = AttemptThrottle(burst=3, rate=0.5)
    assert t.retry_after("10.0.0.1", 0.0) is None
    for _ in range(3):
        t.failed("10.0.0.1", 0.0)
    assert t.retry_after("10.0.0.1", 0.0) == pytest.approx(2.0)
    assert t.retry_after("10.0.0.1", 1.0) == pytest.approx(1.0)
    assert t.retry_after("10.0.0.2", 0.0) is None  # other addresses are untouched
    assert t.retry_after("10.0.0.1", 2.0) is None  # one more try earned
    t.failed("10.0.0.1", 2.0)
    assert t.retry_after("10.0.0.1", 2.0) == pytest.approx(2.0)


def test_asking_spends_nothing():
    t = AttemptThrottle(burst=1, rate=1.0)
    t.failed("10.0.0.1", 0.0)
    for i in range(10):
        assert t.retry_after("10.0.0.1", i / 20) is not None
    assert t.retry_after("10.0.0.1", 1.0) is None


def test_throttle_table_is_bounded_and_forgets_the_least_recent():
    t = AttemptThrottle(burst=1, rate=0.001, capacity=3)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        t.failed(host, 0.0)
    t.failed("10.0.0.1", 1.0)  # now the most recent
    t.failed("10.0.0.4", 1.0)  # the table is full: 10.0.0.2 goes
    assert len(t) == 3
    assert t.retry_after("10.0.0.2", 1.0) is None
    assert all(t.retry_after(h, 1.0) is not None for h in ("10.0.0.1", "10.0.0.3", "10.0.0.4"))
    for i in range(1000):  # a flood from many addresses
        t.failed(f"198.51.{i // 250}.{i % 250}", 2.0)
        assert len(t) <= 3


def test_fully_refilled_addresses_are_dropped():
    t = AttemptThrottle(burst=2, rate=1.0)
    t.failed("10.0.0.1", 0.0)
    assert len(t) == 1
    assert t.retry_after("10.0.0.1", 5.0) is None
    assert len(t) == 0


def test_addresses_are_grouped_as_a_subscriber_holds_them():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("") == ""
    t = AttemptThrottle(burst=1, rate=0.001)
    t.failed("2001:db8:1:2::1", 0.0)
    assert t.retry_after("2001:db8:1:2::abcd", 0.0) is not None


def test_throttle_refuses_nonsense_settings():
    for kwargs in ({"rate": 0.0}, {"burst": 0.5}, {"capacity": 0}):
        with pytest.raises(ValueError):
            AttemptThrottle(**kwargs)
