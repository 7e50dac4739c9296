"""Pieces the benchmarks' load generators share: raw WebSocket client frames,
frame splitting, process CPU time and the machine's description (free ports are
:func:`fanroute.localcluster.free_port`, imported here for the benchmarks).

Load generators speak WebSocket over plain sockets (not a client library) so that
the clients cost far less CPU than the servers they measure.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path
from collections.abc import Callable
from typing import Any

from fanroute.localcluster import free_port  # noqa: F401 - the one finder, re-exported


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final client frame. The mask key is zero, which RFC 6455 allows (the server
    cannot tell), so masking leaves the payload as it is and costs nothing."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def split_frames(buf: bytes, pos: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Split complete server frames off ``buf`` from ``pos``: (opcode, start, end) of
    each payload, and where the incomplete rest begins. Server frames are unmasked."""
    out = []
    n = len(buf)
    while pos + 2 <= n:
        ln = buf[pos + 1] & 0x7F
        if ln < 126:
            start = pos + 2
        elif ln == 126:
            if pos + 4 > n:
                break
            ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            start = pos + 4
        else:
            if pos + 10 > n:
                break
            ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            start = pos + 10
        end = start + ln
        if end > n:
            break
        out.append((buf[pos] & 0x0F, start, end))
        pos = end
    return out, pos


def expect(pipe: Any, kind: str, timeout: float, error: type[Exception], who: str) -> tuple:
    """The next report of a load-generator process, which must be ``kind``.

    Workers report ``(kind, ...)`` tuples over a multiprocessing pipe, or
    ``("error", text)``; anything else, silence or a dead worker raises ``error``.
    """
    if not pipe.poll(timeout):
        raise error(f"{who} did not answer {kind!r} within {timeout:g} s")
    try:
        msg = pipe.recv()
    except EOFError:
        raise error(f"{who} died") from None
    if msg[0] == "error":
        raise error(f"{who}: {msg[1]}")
    if msg[0] != kind:
        raise error(f"{who} answered {msg[0]!r}, expected {kind!r}")
    return msg


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "nofile": [soft, hard],
        # Other work on the machine skews every figure: recorded, not corrected for.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def emit_report(report: dict[str, Any], save: str | None, as_json: bool, render: Callable[[], None]) -> None:
    """Write a benchmark's report: to ``save`` as JSON if asked, then JSON or a table on stdout."""
    if save:
        Path(save).write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render()
