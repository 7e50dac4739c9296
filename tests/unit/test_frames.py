"""The gateway's whole-frame fast path reads exactly what websockets' engine reads.

``WsConn`` takes complete unfragmented text and binary frames itself and leaves
every other frame to websockets' ``Protocol``. The property: for any stream of
frames — valid, fragmented, control, oversized, unmasked, with RSV bits, invalid
UTF-8, truncated — cut into any chunks, a ``WsConn`` with the fast path gives the
same messages, the same replies (pongs, the close), the same end state and close
code as one that sends every byte to the engine, however often each lets go of
its engine between reads (``rest``), and as one engine that reads it all.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from fanroute.gateway import wsconn

MAX = 300


def masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


payloads = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"x" * 125, b"y" * 126, b"z" * MAX, b"w" * (MAX + 1), "h\u00e9llo".encode(), b"\xff\xfe", b"\xc3"]),
)


@st.composite
def frames(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "text", "binary", "binary", "frag", "ping", "pong", "close", "unmasked", "rsv", "long64"]))
    data = draw(payloads)
    if kind == "text":
        return masked(Opcode.TEXT, data)
    if kind == "binary":
        return masked(Opcode.BINARY, data)
    if kind == "frag":
        return masked(Opcode.TEXT, data[:3], fin=False) + masked(Opcode.CONT, data[3:])
    if kind == "ping":
        return masked(Opcode.PING, data[:20])
    if kind == "pong":
        return masked(Opcode.PONG, data[:20])
    if kind == "close":
        return masked(Opcode.CLOSE, Close(1000, "bye").serialize())
    if kind == "unmasked":
        return Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    if kind == "rsv":
        frame = masked(Opcode.BINARY, data)
        return bytes([frame[0] | 0x40]) + frame[1:]  # RSV1 set, no extension agreed
    # A small payload with a 64-bit length: legal, and left to the engine.
    mask = b"\x01\x02\x03\x04"
    return bytes([0x82, 0x80 | 127]) + struct.pack("!Q", len(data)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def feed(ws: wsconn.WsConn, chunks: list[bytes], rests: list[bool]) -> tuple:
    messages, replies = [], []
    for chunk, rest in zip(chunks, rests):
        if ws.done:
            break
        messages.append(ws.receive(chunk))
        replies.append(ws.replies())
        if rest:
            ws.rest()
    return messages, replies, ws.done, ws.close_code, ws.failed, ws.in_progress


@settings(max_examples=800, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=8), st.data())
def test_the_fast_path_and_the_engine_read_every_stream_alike(stream: list[bytes], data) -> None:
    raw = b"".join(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    rests = data.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    fast = feed(wsconn.WsConn(MAX), chunks, rests)
    engine = feed(wsconn.WsConn(MAX, whole_frames=False), chunks, rests)
    # The ground truth: one engine for the whole stream, never let go.
    truth = feed(wsconn.WsConn(MAX, whole_frames=False), chunks, [False] * len(chunks))
    assert fast == engine == truth


def test_plain_frames_never_make_an_engine() -> None:
    ws = wsconn.WsConn(MAX)
    data = masked(Opcode.TEXT, b'{"type":"ping"}') + masked(Opcode.BINARY, b"\x81") + masked(Opcode.TEXT, b"y" * 200)
    assert ws.receive(data) == ['{"type":"ping"}', b"\x81", "y" * 200]
    assert not ws.engine_held and not ws.in_progress and not ws.done
    # A ping needs the engine (it owes a pong); what follows it is read there too.
    assert ws.receive(masked(Opcode.PING, b"p") + masked(Opcode.TEXT, b"after")) == ["after"]
    assert ws.engine_held and ws.replies()
