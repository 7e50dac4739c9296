"""The gateway's plain-upgrade fast path agrees with websockets on every request it takes.

``gateway.wsconn.Handshake`` answers the common upgrade request itself and leaves
every other request to websockets' ``ServerProtocol``. The property: whatever
request head Hypothesis builds from plausible and broken parts, if the fast path
takes it, websockets accepts it too (a 101), with the same accept key, path,
Origin and offered subprotocols. What the fast path declines, websockets answers
as before, so no refusal can differ.
"""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.http11 import Request
from websockets.server import ServerProtocol

from fanroute.gateway import wsconn

KEY = base64.b64encode(b"0123456789abcdef").decode()

REQUEST_LINES = [
    "GET / HTTP/1.1", "GET /ws?token=abc HTTP/1.1", "POST / HTTP/1.1", "GET / HTTP/1.0",
    "GET  / HTTP/1.1", "GET /a b HTTP/1.1", "get / HTTP/1.1", "GET /é HTTP/1.1", "GET / HTTP/2",
]
NAMES = [
    "Host", "Upgrade", "upgrade", "Connection", "CONNECTION", "Sec-WebSocket-Key", "sec-websocket-key",
    "Sec-WebSocket-Version", "Origin", "Sec-WebSocket-Protocol", "Content-Length", "Transfer-Encoding",
    "User-Agent", "Sec-WebSocket-Extensions", "X Bad", "", " Upgrade",
]
VALUES = [
    "websocket", "WebSocket", "websocket, h2c", "", "Upgrade", "keep-alive, Upgrade", "close", "upgrade ,",
    KEY, "abc", base64.b64encode(b"short").decode(), "13", "8", "13, 8", "0", "5", "chunked",
    "fanroute.msgpack", "fanroute.msgpack, other", "bad;value", "http://example.com", "x\x01y", "é", "  13  ",
]

header = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES))
VALID = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]


@st.composite
def heads(draw) -> bytes:
    """A request head: mostly a valid upgrade with a header dropped, changed, added or recased."""
    line = draw(st.sampled_from(REQUEST_LINES[:2] if draw(st.integers(0, 3)) else REQUEST_LINES))
    headers = []
    for name, value in VALID:
        if draw(st.integers(0, 9)) == 0:
            continue  # dropped
        if draw(st.integers(0, 5)) == 0:
            value = draw(st.sampled_from(VALUES))
        if draw(st.integers(0, 5)) == 0:
            name = draw(st.sampled_from([name.lower(), name.upper(), name]))
        headers.append((name, value))
    headers += draw(st.lists(header, max_size=3))
    headers = draw(st.permutations(headers))
    text = line + "".join(f"\r\n{n}:{' ' if draw(st.booleans()) else ''}{v}" for n, v in headers)
    return text.encode("utf-8")


def websockets_answer(head: bytes) -> tuple[Request, int, str | None] | None:
    proto = ServerProtocol()
    proto.receive_data(head + b"\r\n\r\n")
    events = proto.events_received()
    if not events or not isinstance(events[0], Request):
        return None
    request = events[0]
    response = proto.accept(request)
    return request, response.status_code, response.headers.get("Sec-WebSocket-Accept")


def accept_header(response: bytes) -> str:
    for line in response.decode().split("\r\n"):
        name, _, value = line.partition(": ")
        if name == "Sec-WebSocket-Accept":
            return value
    raise AssertionError(f"no accept key in {response!r}")


@settings(max_examples=1500, deadline=None)
@given(heads())
def test_a_request_the_fast_path_takes_is_one_websockets_accepts_the_same_way(head: bytes) -> None:
    shake = wsconn.Handshake(head + b"\r\n\r\n")
    if not shake.plain:
        return
    answer = websockets_answer(head)
    assert answer is not None, head
    request, status, accept = answer
    assert status == 101, head
    response, opened = shake.accept(None)
    assert opened and response.startswith(b"HTTP/1.1 101 ")
    assert accept_header(response) == accept
    assert shake.path == request.path
    assert shake.origin == request.headers.get("Origin")
    assert shake.offered_subprotocols() == _subprotocols(request)


def _subprotocols(request: Request) -> list[str]:
    from websockets.exceptions import InvalidHandshake
    from websockets.headers import parse_subprotocol

    offered: list[str] = []
    try:
        for value in request.headers.get_all("Sec-WebSocket-Protocol"):
            offered.extend(parse_subprotocol(value))
    except InvalidHandshake:
        return []
    return offered


def test_what_browsers_and_client_libraries_send_takes_the_fast_path() -> None:
    chrome = (
        "GET /ws HTTP/1.1\r\nHost: localhost:8080\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0.0.0\r\nUpgrade: websocket\r\n"
        "Origin: http://localhost:8080\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "Sec-WebSocket-Protocol: fanroute.msgpack, other\r\n\r\n"
    ).encode()
    firefox = (
        "GET /?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive, Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    ).encode()
    for head in (chrome, firefox):
        shake = wsconn.Handshake(head + b'{"type":"ping"}')
        assert shake.plain and shake.parsed and shake.rest == b'{"type":"ping"}'
    shake = wsconn.Handshake(chrome)
    assert shake.origin == "http://localhost:8080" and shake.offered_subprotocols() == ["fanroute.msgpack", "other"]
    response, opened = shake.accept("fanroute.msgpack")
    assert opened and b"\r\nSec-WebSocket-Protocol: fanroute.msgpack\r\n" in response and b"Extensions" not in response


def test_what_the_fast_path_declines_websockets_answers() -> None:
    no_version = f"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    shake = wsconn.Handshake(no_version.encode())
    assert not shake.plain and shake.parsed
    response, opened = shake.accept(None)
    assert not opened and response.startswith(b"HTTP/1.1 400 ")
    post = f"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    response, opened = wsconn.Handshake(post.encode()).accept(None)
    assert not opened and response.startswith(b"HTTP/1.1 405 ")
    garbage = wsconn.Handshake(b"\x16\x03\x01 not http\r\n\r\n")
    assert not garbage.parsed and garbage.accept(None) == (wsconn.BAD_REQUEST, False)
