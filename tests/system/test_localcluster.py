"""``fanroute local-cluster`` as a real process: it reports a process that dies and keeps
the rest up, ``--restart`` brings the dead one back under its name and ports, and
SIGTERM stops every process with exit status 0.

Everything is polled with generous deadlines (the machines are shared); the only
sleeps are the supervisor's and the helpers' poll intervals.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import CLUSTER_SECRET, DEADLINE, ROOT, free_port_run, http_get, wait_until

SLOW = 2 * DEADLINE  # a restart is a Python process starting on a busy machine
ROW = re.compile(r"^(?P<name>(?:router|gateway)-\d+)\s+(?P<url>\S+)\s+admin (?P<admin>http://\S+)/metrics\s+pid (?P<pid>\d+)$")


class Supervisor:
    """One ``fanroute local-cluster`` process and the lines it prints."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.base, self.admin_base, self.router_base = free_port_run(1), free_port_run(102), free_port_run(2)
        argv = [
            "local-cluster", "--gateways", "1", "--routers", "2",
            "--base-port", str(self.base), "--admin-base-port", str(self.admin_base),
            "--router-base-port", str(self.router_base), *args,
        ]
        env = dict(os.environ, FANROUTE_CLUSTER_SECRET=CLUSTER_SECRET, FANROUTE_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        self.stderr = open(tmp / "local-cluster.stderr", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fanroute.cli", *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.rows: dict[str, re.Match[str]] = {}
        try:
            at = 0
            while len(self.rows) < 3:  # the table of processes comes first
                at, row = self.wait_line(ROW.pattern, after=at)
                self.rows[row["name"]] = row
                at += 1
        except BaseException:
            self.close()
            raise
        assert set(self.rows) == {"router-0", "router-1", "gateway-0"}, self.lines

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_line(self, pattern: str, after: int = 0, timeout: float = SLOW) -> tuple[int, re.Match[str]]:
        """The first printed line from number ``after`` on that matches ``pattern``, and its number."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                for i in range(after, len(self.lines)):
                    if m := rx.search(self.lines[i]):
                        return i, m
                after = max(after, len(self.lines))
                if self.proc.poll() is not None and not self.changed.wait(timeout=1.0):
                    raise AssertionError(f"local-cluster exited ({self.proc.returncode}) before {pattern!r}: {self.output()}")
                if time.monotonic() > end:
                    raise AssertionError(f"no line {pattern!r} within {timeout:g} s: {self.output()}")
                self.changed.wait(timeout=1.0)

    def output(self) -> str:
        self.stderr.seek(0)
        return "\nstdout:\n" + "\n".join(self.lines) + "\nstderr:\n" + self.stderr.read().decode(errors="replace")[-3000:]

    def admin(self, name: str) -> str:
        return self.rows[name]["admin"]

    def pid(self, name: str) -> int:
        return int(self.rows[name]["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it stops its children
            try:
                self.proc.wait(timeout=SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in self.rows:  # never leave a child behind, whatever happened
            try:
                os.kill(self.pid(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stderr.close()


def status(url: str) -> int | None:
    try:
        return http_get(url, timeout=2)[0]
    except OSError:
        return None


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def supervisor(tmp_path):
    made: list[Supervisor] = []

    def start(*args: str) -> Supervisor:
        sup = Supervisor(tmp_path, *args)
        made.append(sup)
        return sup

    yield start
    for sup in made:
        sup.close()


def wait_ready(sup: Supervisor) -> None:
    for name in sup.rows:
        wait_until(lambda: status(sup.admin(name) + "/readyz") == 200, timeout=SLOW, what=f"{name} ready")


def stop_with_sigterm(sup: Supervisor, pids: list[int]) -> None:
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(timeout=SLOW) == 0, sup.output()
    for pid in pids:
        assert not running(pid), f"pid {pid} outlived local-cluster"
    for name in sup.rows:
        assert status(sup.admin(name) + "/healthz") is None, f"{name} still answers"


def test_restart_brings_a_killed_router_back_on_its_ports(supervisor):
    sup = supervisor("--restart")
    wait_ready(sup)
    victim, gateway, other = sup.pid("router-1"), sup.admin("gateway-0"), sup.admin("router-0")

    os.kill(victim, signal.SIGKILL)
    mark, _ = sup.wait_line(rf"^router-1\s+died: killed by SIGKILL \(pid {victim}\); the rest keep running; starting it again")
    # The rest keep serving meanwhile: same processes, still answering.
    assert sup.proc.poll() is None and running(sup.pid("gateway-0")) and running(sup.pid("router-0"))
    assert status(gateway + "/healthz") == 200 and status(other + "/readyz") == 200

    _, back = sup.wait_line(r"^router-1\s+restarted: pid (\d+)$", after=mark)
    new_pid = int(back.group(1))
    assert new_pid != victim and running(new_pid)
    sup.wait_line(rf"^router-1\s+ready \(pid {new_pid}\)$", after=mark)
    # Same name and ports: its admin port answers again, and the gateway's shard link
    # to router-1 (same nng address) is up again, so the gateway is ready again.
    assert status(sup.admin("router-1") + "/readyz") == 200
    wait_until(lambda: status(gateway + "/readyz") == 200, timeout=SLOW, what="the gateway ready again")

    stop_with_sigterm(sup, [sup.pid("gateway-0"), sup.pid("router-0"), new_pid])


def test_without_restart_the_cluster_runs_on_minus_the_dead_process(supervisor):
    sup = supervisor()
    wait_ready(sup)
    victim, gateway = sup.pid("router-1"), sup.admin("gateway-0")

    os.kill(victim, signal.SIGKILL)
    sup.wait_line(rf"^router-1\s+died: killed by SIGKILL \(pid {victim}\); the rest keep running$")
    # The gateway notices the lost shard and says so; everything else keeps running.
    wait_until(lambda: status(gateway + "/readyz") == 503, timeout=SLOW, what="the gateway to report the lost shard")
    assert "router-1" in http_get(gateway + "/readyz")[1]
    assert status(gateway + "/healthz") == 200 and status(sup.admin("router-0") + "/readyz") == 200
    assert sup.proc.poll() is None and running(sup.pid("gateway-0")) and running(sup.pid("router-0"))
    assert not any(line.startswith("router-1") and "restarted" in line for line in sup.lines), sup.lines

    stop_with_sigterm(sup, [sup.pid("gateway-0"), sup.pid("router-0")])


def test_sigterm_stops_every_process_with_exit_status_zero(supervisor):
    sup = supervisor()
    wait_ready(sup)
    stop_with_sigterm(sup, [sup.pid(name) for name in sup.rows])
