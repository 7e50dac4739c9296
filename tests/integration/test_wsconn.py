"""The gateway's own WebSocket engine (gateway/wsconn.py), alone and over real sockets."""

from __future__ import annotations

import base64
import struct

import orjson
import trio
from websockets.frames import Close, Frame, Opcode

from fanroute.gateway import wsconn
from tests.support import await_until, metric, start_standalone, urls, ws_connect, http_get

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade(extra: str = "", key: str | None = KEY) -> bytes:
    lines = ["GET /ws?x=1 HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame in ``data``."""
    out = []
    while data:
        op, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            (n,) = struct.unpack("!H", data[2:4])
            at = 4
        elif n == 127:
            (n,) = struct.unpack("!Q", data[2:10])
            at = 10
        out.append((op, data[at : at + n]))
        data = data[at + n :]
    return out


def test_upgrade_detection():
    assert wsconn.is_websocket_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\r\n")
    assert not wsconn.is_websocket_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_handshake_keeps_first_frames_and_writes_the_chosen_subprotocol():
    first = client_frame(Opcode.TEXT, b'{"type":"ping","ts":1}')
    shake = wsconn.Handshake(upgrade("Sec-WebSocket-Protocol: chat, fanroute.msgpack\r\nOrigin: https://a.example\r\n") + first)
    assert shake.rest == first and shake.path == "/ws?x=1" and shake.origin == "https://a.example"
    assert shake.offered_subprotocols() == ["chat", "fanroute.msgpack"]
    response, opened = shake.accept("fanroute.msgpack")
    assert opened and response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Protocol: fanroute.msgpack\r\n" in response
    response, opened = wsconn.Handshake(upgrade()).accept(None)
    assert opened and b"Sec-WebSocket-Protocol" not in response


def test_an_upgrade_without_a_key_is_answered_400():
    response, opened = wsconn.Handshake(upgrade(key=None)).accept(None)
    assert not opened and response.startswith(b"HTTP/1.1 400 ")
    assert wsconn.Handshake(b"junk\r\n\r\n").request is None


def test_messages_fragments_and_control_frames():
    ws = wsconn.WsConn(max_size=1024)
    data = (
        client_frame(Opcode.TEXT, "héllo".encode())
        + client_frame(Opcode.BINARY, b"\x81\xa1a")
        + client_frame(Opcode.TEXT, b"frag", fin=False)
        + client_frame(Opcode.PING, b"p1")
        + client_frame(Opcode.CONT, b"mented")
    )
    # Fed in two pieces, the second starting inside a frame: partial data is kept.
    assert ws.receive(data[:15]) == ["héllo"]
    assert ws.in_progress  # a frame has begun
    assert ws.receive(data[15:]) == [b"\x81\xa1a", "fragmented"]
    assert not ws.in_progress and not ws.done
    assert [server_frames(f) for f in ws.replies()] == [[(Opcode.PONG, b"p1")]]
    assert ws.replies() == []
    ws.receive(client_frame(Opcode.TEXT, b"half", fin=False))
    assert ws.in_progress  # a fragmented message has begun


def test_the_engine_is_let_go_only_between_messages_and_made_again_by_the_next_bytes():
    ws = wsconn.WsConn(max_size=1024)
    assert ws.engine_held is False and not ws.done and not ws.in_progress  # nothing arrived yet
    whole = client_frame(Opcode.TEXT, b"x" * 40)
    assert ws.receive(whole[:10]) == []
    ws.rest()
    assert ws.in_progress  # a frame has begun: its bytes stay
    assert ws.receive(whole[10:]) == ["x" * 40]
    ping = client_frame(Opcode.PING, b"p")
    ws.receive(ping[:3])  # a control frame begun: the engine has read its header
    ws.rest()
    assert ws.engine_held and ws.in_progress
    ws.receive(ping[3:])
    assert [server_frames(f) for f in ws.replies()] == [[(Opcode.PONG, b"p")]]
    ws.receive(client_frame(Opcode.PING, b"p"))
    ws.rest()
    assert ws.engine_held  # a pong is owed
    assert [server_frames(f) for f in ws.replies()] == [[(Opcode.PONG, b"p")]]
    ws.receive(client_frame(Opcode.TEXT, b"frag", fin=False))
    ws.rest()
    assert ws.engine_held  # a fragmented message is arriving
    assert ws.receive(client_frame(Opcode.CONT, b"ment")) == ["fragment"]
    ws.rest()
    assert not ws.engine_held and not ws.done and not ws.close_received and not ws.failed
    # A fresh engine goes on from there, with every rule: the size limit, 1007, the close.
    assert ws.receive(client_frame(Opcode.TEXT, b"again")) == ["again"]
    ws.rest()
    assert ws.receive(client_frame(Opcode.TEXT, b"y" * 2000)) == [] and ws.close_code == 1009
    ws.rest()
    assert ws.engine_held and ws.done  # a closing connection keeps its engine


def test_a_connection_at_rest_still_closes_and_ends_as_an_engine_would():
    ws = wsconn.WsConn(max_size=1024)
    ws.receive(client_frame(Opcode.TEXT, b"hi"))
    ws.rest()
    ((op, payload),) = server_frames(ws.close_frame(4008, "slow"))
    assert op == Opcode.CLOSE and Close.parse(payload).code == 4008 and ws.close_code == 4008
    eof = wsconn.WsConn(max_size=1024)
    eof.receive(client_frame(Opcode.TEXT, b"hi"))
    eof.rest()
    eof.receive_eof()
    assert eof.done and eof.close_received and eof.close_code == 1006


def test_too_big_invalid_utf8_and_protocol_errors_close_with_their_codes():
    for data, code in (
        (client_frame(Opcode.TEXT, b"x" * 2000), 1009),
        (client_frame(Opcode.TEXT, b"x" * 600, fin=False) + client_frame(Opcode.CONT, b"x" * 600), 1009),
        (client_frame(Opcode.TEXT, b"\xff\xfe"), 1007),
        (client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.CONT, b"\xc3", fin=False)
         + client_frame(Opcode.CONT, b"(", fin=True), 1007),
        (client_frame(Opcode.CONT, b"nothing before"), 1002),
        (Frame(Opcode.TEXT, b"unmasked").serialize(mask=False, extensions=[]), 1002),
    ):
        ws = wsconn.WsConn(max_size=1024)
        assert ws.receive(data) == []
        assert ws.done and ws.failed and ws.close_code == code
        ((op, payload),) = server_frames(b"".join(ws.replies()))
        assert op == Opcode.CLOSE and Close.parse(payload).code == code


def test_close_from_the_peer_is_echoed_and_ends_reading():
    ws = wsconn.WsConn(max_size=1024)
    data = client_frame(Opcode.TEXT, b"last") + client_frame(Opcode.CLOSE, Close(1000, "bye").serialize())
    assert ws.receive(data + client_frame(Opcode.TEXT, b"after")) == ["last"]
    assert ws.done and ws.close_received and not ws.failed and ws.close_code == 1000
    ((op, payload),) = server_frames(b"".join(ws.replies()))
    assert op == Opcode.CLOSE and Close.parse(payload).code == 1000


def test_a_close_started_here_waits_for_the_peers_reply():
    ws = wsconn.WsConn(max_size=1024)
    ((op, payload),) = server_frames(ws.close_frame(4008, "slow consumer"))
    assert op == Opcode.CLOSE and Close.parse(payload) == Close(4008, "slow consumer")
    assert ws.done and not ws.close_received
    ws.receive(client_frame(Opcode.CLOSE, Close(4008, "").serialize()))
    assert ws.close_received and ws.replies() == []


async def raw_connect(port: int, head: bytes) -> tuple[trio.SocketStream, bytes]:
    """A raw TCP client: send ``head`` (and any frames after it), return the stream and the 101 head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, "closed during the handshake"
        buf += data
    response, _, rest = buf.partition(b"\r\n\r\n")
    return stream, response + b"\r\n\r\n" + rest


async def read_frames(stream: trio.SocketStream, buf: bytes, count: int) -> list[tuple[int, bytes]]:
    with trio.fail_after(10):
        while len(server_frames(buf)) < count:
            data = await stream.receive_some(65536)
            if not data:
                break
            buf += data
    return server_frames(buf)


async def test_frames_sent_with_the_handshake_are_all_answered_and_a_client_close_ends_tcp(nursery):
    bound = await start_standalone(nursery)
    url, admin = urls(bound)
    frames = b"".join(client_frame(Opcode.TEXT, orjson.dumps({"type": "ping", "ts": i})) for i in range(50))
    frames += client_frame(Opcode.PING, b"hb")
    stream, response = await raw_connect(bound.gateway.port, upgrade() + frames)
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    got = await read_frames(stream, rest, 51)
    assert [orjson.loads(d)["ts"] for op, d in got if op == Opcode.TEXT] == list(range(50))
    assert (Opcode.PONG, b"hb") in got
    await stream.send_all(client_frame(Opcode.CLOSE, Close(1000, "").serialize()))
    with trio.fail_after(10):
        buf = b""
        while data := await stream.receive_some(65536):  # the echo, then the server's TCP close
            buf += data
    assert server_frames(buf) == [(Opcode.CLOSE, Close(1000, "").serialize())]
    await stream.aclose()
    text = (await trio.to_thread.run_sync(http_get, admin + "/metrics"))[1]
    assert metric(text, "fanroute_gateway_bytes_in_total") >= len(frames)
    assert metric(text, "fanroute_gateway_command_seconds_count", 'command="ping"') == 50
    assert metric(text, "fanroute_gateway_connections_closed_total", 'code="1000"') == 1


async def test_hostile_bytes_on_the_fast_paths_get_their_answers_and_the_gateway_serves_on(nursery):
    """What the gateway's own handshake and frame reading see first: a malformed
    subprotocol list (400), frames cut one byte at a time with a ping between them
    (each message and the pong), a frame over --max-frame (1009), a frame with a RSV
    bit (1002). Other clients are served throughout."""
    bound = await start_standalone(nursery, max_frame=1024)
    url, _ = urls(bound)
    port = bound.gateway.port
    stream, response = await raw_connect(port, upgrade("Sec-WebSocket-Protocol: \r\n"))
    assert response.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()

    stream, response = await raw_connect(port, upgrade())
    assert response.startswith(b"HTTP/1.1 101 ")
    data = (
        client_frame(Opcode.TEXT, orjson.dumps({"type": "ping", "ts": 1}))
        + client_frame(Opcode.PING, b"hb")
        + client_frame(Opcode.TEXT, orjson.dumps({"type": "ping", "ts": 2}) + b" " * 200)
    )
    for i in range(len(data)):
        await stream.send_all(data[i : i + 1])
    got = await read_frames(stream, response.partition(b"\r\n\r\n")[2], 3)
    assert [orjson.loads(d)["ts"] for op, d in got if op == Opcode.TEXT] == [1, 2] and (Opcode.PONG, b"hb") in got
    await stream.aclose()

    too_big = client_frame(Opcode.TEXT, b"x" * 2000)
    rsv = client_frame(Opcode.BINARY, b"y")
    for frame, code in ((too_big, 1009), (bytes([rsv[0] | 0x40]) + rsv[1:], 1002)):
        stream, response = await raw_connect(port, upgrade() + frame)
        got = await read_frames(stream, response.partition(b"\r\n\r\n")[2], 1)
        assert got[-1][0] == Opcode.CLOSE and Close.parse(got[-1][1]).code == code
        await stream.aclose()
    async with ws_connect(url) as c:
        await c.subscribe("still.serving")


async def test_an_idle_connection_holds_no_buffer_and_no_writer(nursery):
    bound = await start_standalone(nursery)
    url, _ = urls(bound)
    async with ws_connect(url) as c:
        await c.subscribe("x.y")
        (conn,) = bound.gateway.conns.values()
        assert conn.outbox.size == 0 and conn.outbox._chunks is None and not conn.outbox._writing  # noqa: SLF001
        assert not conn.ws.in_progress
        # Quiet for a while, it lets go of its protocol engine too; the next command makes one.
        await await_until(lambda: not conn.ws.engine_held, what="the idle connection's engine let go")
        await c.subscribe("x.z")


async def test_a_client_that_stops_reading_is_closed_4008_with_a_whole_close_frame(nursery):
    bound = await start_standalone(nursery, outbox_limit=256 * 1024)
    url, _ = urls(bound)
    stream, response = await raw_connect(bound.gateway.port, upgrade())
    sub = client_frame(Opcode.TEXT, orjson.dumps({"type": "subscribe", "topic": "f.x", "id": 1}))
    await stream.send_all(sub)
    with trio.fail_after(10):
        while not bound.gateway.conns or "f.x" not in next(iter(bound.gateway.conns.values())).session.topics:
            await trio.sleep(0.01)
    (conn,) = bound.gateway.conns.values()
    # The client stops reading: the gateway's writes back up.
    async with ws_connect(url) as pub:
        payload = "y" * 4000
        with trio.fail_after(30):
            while bound.gateway.conns.get(conn.session) is conn and conn.close_code is None:
                for _ in range(20):
                    await pub.send({"type": "publish", "topic": "f.x", "payload": payload})
                await trio.sleep(0.01)
    assert conn.close_code == 4008
    # Everything the client now reads parses as whole frames, the close last.
    buf = response.partition(b"\r\n\r\n")[2]
    with trio.fail_after(20):
        while data := await stream.receive_some(1 << 20):
            buf += data
            if server_frames(buf) and server_frames(buf)[-1][0] == Opcode.CLOSE:
                break
    frames = server_frames(buf)
    assert frames[-1][0] == Opcode.CLOSE and Close.parse(frames[-1][1]).code == 4008
    assert all(op == Opcode.TEXT for op, _ in frames[:-1])
    await stream.aclose()
