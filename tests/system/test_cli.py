"""The command line: bad input gets one sentence naming the setting and exit 2; processes start and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.support import CLUSTER_SECRET, ROOT, free_port, free_port_run, http_get, wait_until


def run(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fanroute.cli", *args],
        cwd=ROOT,
        env={**os.environ, "FANROUTE_CLUSTER_SECRET": CLUSTER_SECRET, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,env,needle",
    [
        (["standalone", "--port", "99999"], {}, "--port"),
        (["standalone", "--bogus"], {}, "--bogus"),
        (["standalone"], {"FANROUTE_PORT": "abc"}, "FANROUTE_PORT"),
        (["standalone", "--ping-interval", "0"], {}, "--ping-interval"),
        (["standalone", "--shards", "0"], {}, "--shards"),
        (["--log-level", "loud", "standalone"], {}, "--log-level"),
        (["gateway", "--routers", "nonsense", "--admin-port", "off"], {}, "--routers"),
        (["gateway", "--inbox", "tcp://10.255.255.1:1", "--admin-port", "off"], {}, "--inbox"),
        (["router", "--listen", "tcp://1.2.3.4:1", "--admin-port", "off"], {}, "--listen"),
        (["router", "--history-size", "-1", "--admin-port", "off"], {}, "--history-size"),
        # A variable whose value fails a config check is named with the flag.
        (["standalone", "--admin-port", "off"], {"FANROUTE_PORT": "99999"}, "FANROUTE_PORT"),
        (["router", "--admin-port", "off"], {"FANROUTE_CLUSTER_SECRET": "short"}, "FANROUTE_CLUSTER_SECRET"),
        (["router"], {"FANROUTE_LOG_LEVEL": "loud"}, "FANROUTE_LOG_LEVEL"),
        (["standalone", "--jwt-require-exp", "maybe"], {}, "--jwt-require-exp"),
        (["standalone", "--admin-port"], {}, "--admin-port"),
        ([], {}, "COMMAND"),
        # Files the settings name.
        (["router", "--admin-port", "off", "--cluster-secret-file", "/nonexistent/secret"], {}, "--cluster-secret-file"),
        (["standalone", "--port", "0", "--admin-port", "off"], {"FANROUTE_CONFIG": "/nonexistent/ns.toml"}, "--config"),
        # Names that used to collide: local-cluster's router count is not the
        # gateway's shard list, and demo-feed's and the benchmarks' rates are their own.
        (["local-cluster"], {"FANROUTE_LOCAL_CLUSTER_ROUTERS": "many"}, "FANROUTE_LOCAL_CLUSTER_ROUTERS"),
        (["local-cluster", "--routers", "0"], {}, "--routers"),
        (["local-cluster", "--gateways", "0"], {"FANROUTE_ROUTERS": "router-0=tcp://127.0.0.1:7101"}, "--gateways"),
        (["gateway", "--admin-port", "off"], {"FANROUTE_ROUTERS": "nonsense"}, "FANROUTE_ROUTERS"),
        (["demo-feed"], {"FANROUTE_DEMO_FEED_RATE": "fast"}, "FANROUTE_DEMO_FEED_RATE"),
        (["bench", "fanout"], {"FANROUTE_BENCH_FANOUT_RATE": "fast", "FANROUTE_DEMO_FEED_RATE": "1"}, "FANROUTE_BENCH_FANOUT_RATE"),
        (["bench", "fanout", "--targets", "nginx"], {"FANROUTE_RATE": "fast"}, "--targets"),
        (["standalone", "--port", "99999"], {"FANROUTE_BENCH_FANOUT_RATE": "fast", "FANROUTE_RATE": "x"}, "--port"),
    ],
)
def test_bad_flags_get_one_sentence_and_exit_2(args, env, needle):
    result = run(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fanroute:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_variable_that_is_no_setting_is_named_in_a_warning():
    result = run("--log-level", "warning", "standalone", "--port", "99999", env={"FANROUTE_RATE": "5"})
    assert result.returncode == 2
    warning = next(line for line in result.stderr.splitlines() if "FANROUTE_RATE" in line)
    assert "FANROUTE_DEMO_FEED_RATE" in warning


def test_list_settings_prints_the_reference():
    result = run("--list-settings")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "cluster/SETTINGS.md").read_text()


def test_port_in_use_is_one_sentence():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("standalone", "--port", str(port), "--admin-port", "off")
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_environment_variables_set_flags():
    port, admin = free_port(), free_port()
    env = dict(os.environ, FANROUTE_PORT=str(port), FANROUTE_ADMIN_PORT=str(admin), FANROUTE_SHARDS="2")
    proc = subprocess.Popen([sys.executable, "-m", "fanroute.cli", "standalone"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert f"ws://127.0.0.1:{port}/" in line
        status, body = http_get(f"http://127.0.0.1:{admin}/readyz")
        assert status == 200 and "2 shards" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_local_cluster_starts_everything_and_stops_on_sigterm():
    # local-cluster numbers its ports consecutively from each base.
    base, admin, router = free_port_run(2), free_port_run(102), free_port_run(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanroute.cli", "local-cluster", "--gateways", "2", "--routers", "2",
         "--base-port", str(base), "--admin-base-port", str(admin), "--router-base-port", str(router)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        assert any(f"ws://127.0.0.1:{base}/" in line for line in lines)
        assert any(f"ws://127.0.0.1:{base + 1}/" in line for line in lines)
        wait_until(lambda: http_get(f"http://127.0.0.1:{admin + 1}/readyz")[0] == 200 if _up(admin + 1) else False,
                   what="second gateway ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    # Every child is gone with it.
    assert not _up(admin) and not _up(admin + 1)


def _up(port: int) -> bool:
    try:
        http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        return True
    except OSError:
        return False
