"""``bench reconnect`` and ``bench heartbeat`` end to end, small, as real processes.

What is checked is correctness — the report's shape, that the fault happened and
was recovered from, and that the seq audit found nothing lost and nothing
duplicated — never how fast: timings belong in the benchmark's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 50


def run(*args: str) -> dict:
    argv = [sys.executable, "-m", "fanroute.cli", "bench", *args, "--clients", str(CLIENTS), "--warmup", "1", "--after", "1", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANROUTE_")}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def check_distribution(d: dict, count: int) -> None:
    assert set(d) == {"count", "missing", "min", "p50", "p95", "p99", "max"}
    assert d["missing"] == 0
    assert d["count"] == count
    assert 0 <= d["min"] <= d["p50"] <= d["p95"] <= d["p99"] <= d["max"]


def check_audit(report: dict) -> None:
    audit, pub = report["audit"], report["publisher"]
    assert pub["acked"] > 0 and pub["acked"] == pub["sent"] and pub["error_count"] == 0
    assert pub["acked_in_order"] and pub["drained"], pub
    assert audit["lost"] == 0, audit
    assert audit["duplicated"] == 0, audit
    assert audit["unrecovered"] == 0
    assert audit["stability"] == {"clients": CLIENTS, "stable": CLIENTS, "rate": 1.0}
    for t in report["targets"]:
        assert set(t) == {"metric", "measured", "unit", "op", "source", "fanroute", "source_ok", "fanroute_ok"}


@pytest.fixture(scope="module")
def reconnect() -> dict:
    return run("reconnect")


@pytest.fixture(scope="module")
def heartbeat() -> dict:
    return run("heartbeat")


def test_reconnect_report(reconnect: dict) -> None:
    assert reconnect["benchmark"] == "reconnect"
    assert reconnect["machine"]["nproc"] >= 1
    assert reconnect["config"]["clients"] == CLIENTS
    rec = reconnect["recovery"]
    # Clients start on the gateways in turn: half were on the killed one.
    assert rec["affected"] == CLIENTS // 2
    assert rec["recovered"] == rec["affected"] and rec["not_recovered"] == 0
    assert rec["all_recovered_within_bound"]
    for key in ("recovery_from_fault_s", "recovery_from_disconnect_s", "resubscribed_from_fault_s", "disconnect_seen_s"):
        check_distribution(rec[key], rec["affected"])
    # Everyone came back with since, inside the history, and nobody else dropped.
    assert rec["resumed_from_history"] == rec["affected"]
    assert rec["unaffected_disconnected"] == 0
    check_audit(reconnect)


def test_heartbeat_report(heartbeat: dict) -> None:
    assert heartbeat["benchmark"] == "heartbeat"
    server, client = heartbeat["server_side"], heartbeat["client_side"]
    # The gateway closed every frozen connection by heartbeat timeout.
    assert server["clients"] == CLIENTS and server["detected"] == CLIENTS
    assert server["connections_after"] == server["connections_before"] - CLIENTS
    check_distribution(server["detection_s"], CLIENTS)
    # Every client on the frozen gateway (half of them) declared it dead and
    # recovered on the other one.
    affected = CLIENTS // 2
    assert client["affected"] == affected and client["detected"] == affected
    assert client["disconnect_reasons"] == {"heartbeat": affected}
    check_distribution(client["detection_s"], affected)
    check_distribution(client["recovery_from_fault_s"], affected)
    check_audit(heartbeat)


def test_table_and_progress_for_people() -> None:
    argv = [sys.executable, "-m", "fanroute.cli", "bench", "reconnect", "--clients", "10", "--warmup", "0.5", "--after", "0.5"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recovery from the kill" in proc.stdout
    assert "source design" in proc.stdout and "fanroute goal" in proc.stdout


def test_bad_value_is_refused() -> None:
    argv = [sys.executable, "-m", "fanroute.cli", "bench", "reconnect", "--clients", "0"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--clients" in proc.stderr
