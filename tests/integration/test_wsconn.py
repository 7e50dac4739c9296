"""Guards the trio-websocket internals the gateway relies on (see gateway/wsconn.py)."""

import trio
from trio_websocket import WebSocketConnection, WebSocketServer

from fanroute.gateway import wsconn
from tests.support import start_standalone, urls, ws_connect


def test_internals_exist():
    assert hasattr(WebSocketServer, "_handle_connection")
    src = WebSocketConnection.__init__.__code__.co_names
    assert "_stream_lock" in src and "_stream" in src and "_message_parts" in src


def test_upgrade_detection():
    assert wsconn.is_websocket_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\r\n")
    assert not wsconn.is_websocket_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


async def test_gateway_connections_use_the_front_door_stream(nursery):
    bound = await start_standalone(nursery)
    url, _ = urls(bound)
    async with ws_connect(url) as c:
        await c.subscribe("x.y")
        (conn,) = bound.gateway.conns.values()
        assert isinstance(wsconn.stream_of(conn.ws), wsconn.ClientStream)
        assert isinstance(wsconn.write_lock(conn.ws), trio.StrictFIFOLock)
