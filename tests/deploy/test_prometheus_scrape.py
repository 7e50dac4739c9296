"""A real Prometheus (Debian's, from ops/setup-prometheus.sh) scraping a running local
cluster under light traffic: every dashboard query returns data, the dashboard's
variables list the pods, and every alert rule loads and evaluates cleanly.

Prometheus scrapes every second, so Grafana's ``$__rate_interval`` is replaced by a
window that holds enough samples; "All" of a variable is its regex ``.*``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

from tests.support import free_port, http_get, start_cluster, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops/prometheus/fanroute-rules.yml"
DASHBOARD = ROOT / "ops/grafana/fanroute.json"
PROMETHEUS = shutil.which("prometheus")
API_KEY = "scrape-test-key"
RATE_INTERVAL = "20s"
DEADLINE = 90.0  # Prometheus needs a few scrapes of traffic before rates exist


# Metrics whose queries only have to parse, not return data. Keep this list short and
# move a name out as soon as a run can produce it:
# Metrics a query may name before any process exports them (none at present).
NOT_YET_EXPORTED: set[str] = set()


def substitute(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable on "All"."""
    for var in ("$namespace", "$instance", "$pod"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"]) for p in dashboard()["panels"] if p["type"] != "row" for t in p["targets"]
    ]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(fanroute_\w+|up)\{", expr))


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[tuple[str, str]]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [addr], "labels": {"pod": pod, "namespace": "local"}} for pod, addr in pods],
                }
                for job, pods in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}; see {self.log.name}")
        try:
            return http_get(f"{self.url}/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Traffic:
    """Light, varied traffic: subscribers, a steady publisher, clients that come and go
    and resume, and one of each refusal (limit, bad key, foreign origin, bad frame), so
    that labelled counters have series."""

    def __init__(self, gateways: list[str], admin: str) -> None:
        self.gateways = gateways
        self.admin = admin
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.received = 0
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True) for f in (self._subscriber, self._publisher)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the tests and the fixture
            self.errors.append(exc)

    @staticmethod
    def _send(ws, frame: dict[str, Any]) -> None:
        ws.send(json.dumps(frame))

    @staticmethod
    def _until(ws, kind: str) -> dict[str, Any]:
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg.get("type") == kind:
                return msg

    def _subscriber(self) -> None:
        with connect(self.gateways[0]) as ws:
            for i in range(10):
                self._send(ws, {"type": "subscribe", "topic": f"t.{i}", "id": i + 1})
            while not self.stop.is_set():
                try:
                    ws.recv(timeout=0.2)
                    self.received += 1
                except TimeoutError:
                    pass

    def _publisher(self) -> None:
        self._refusals()
        with connect(self.gateways[-1]) as pub:
            n = 0
            while not self.stop.is_set():
                self._send(pub, {"type": "publish", "topic": f"t.{n % 10}", "payload": {"x": n}})
                n += 1
                if n % 20 == 0:
                    self._churn(n)
                self.stop.wait(0.05)

    def _churn(self, n: int) -> None:
        """A client that connects, subscribes, leaves, and comes back to resume."""
        topic = f"t.{n % 10}"
        with connect(self.gateways[n % len(self.gateways)]) as ws:
            self._send(ws, {"type": "subscribe", "topic": topic, "id": 1})
            sub = self._until(ws, "subscribed")
        with connect(self.gateways[(n + 1) % len(self.gateways)]) as ws:
            since = {"epoch": sub["epoch"], "seq": sub["seq"]}
            self._send(ws, {"type": "subscribe", "topic": topic, "id": 1, "since": since})
            self._until(ws, "subscribed")

    def _refusals(self) -> None:
        with connect(self.gateways[0]) as ws:
            for i in range(6):  # the gateways allow 5 subscriptions per connection
                self._send(ws, {"type": "subscribe", "topic": f"limit.{i}", "id": i + 1})
            assert self._until(ws, "error")["code"] == "too_large"
            self._send(ws, {"type": "subscribe", "topic": "", "id": 9})  # an invalid topic
            assert self._until(ws, "error")["code"] == "bad_request"
        try:
            with connect(self.gateways[0], origin="http://elsewhere.example"):
                pass
        except (InvalidStatus, WebSocketException):
            pass
        for key in ("wrong-key", API_KEY):
            req = urllib.request.Request(
                f"{self.admin}/api/publish",
                data=json.dumps({"topic": "t.0", "payload": {"api": True}}).encode(),
                headers={"Content-Type": "application/json", "X-API-Key": key},
                method="POST",
            )
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except urllib.error.HTTPError:
                pass


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A 2-gateway, 3-router cluster under traffic, scraped by Prometheus."""
    assert PROMETHEUS, "prometheus is missing: run ops/setup-prometheus.sh as root"
    workdir = tmp_path_factory.mktemp("prometheus")
    cluster = start_cluster(
        gateways=2,
        routers=3,
        gateway_args=[
            "--api-key", API_KEY,
            "--max-subscriptions", "5",
            "--allowed-origins", "http://fanroute.example",
        ],
        env={"FANROUTE_LOG_LEVEL": "warning"},
    )
    prom: Prometheus | None = None
    traffic: Traffic | None = None
    try:
        host = lambda proc: proc.admin.removeprefix("http://")  # noqa: E731
        prom = Prometheus(workdir, {
            "fanroute-gateway": [(f"gateway-{i}", host(g)) for i, g in enumerate(cluster.gateways)],
            "fanroute-router": [(f"router-{i}", host(r)) for i, r in enumerate(cluster.routers)],
        })
        wait_until(prom.ready, what="prometheus ready")
        traffic = Traffic([g.url for g in cluster.gateways], cluster.gateways[-1].admin)
        traffic.start()
        yield prom, cluster, traffic
    finally:
        if traffic is not None:
            traffic.join()
        if prom is not None:
            prom.stop()
        cluster.stop()
    assert not traffic.errors, traffic.errors


def wait_for_data(prom: Prometheus, exprs: list[str]) -> dict[str, list]:
    """Poll until every expression returns at least one sample; name those that never do."""
    pending = {e: [] for e in exprs}
    done: dict[str, list] = {}
    end = time.monotonic() + DEADLINE
    while pending and time.monotonic() < end:
        for expr in list(pending):
            answer = prom.query(expr)
            assert answer["status"] == "success", (expr, answer)
            if answer["data"]["result"]:
                done[expr] = answer["data"]["result"]
                del pending[expr]
        if pending:
            time.sleep(0.5)
    assert not pending, "no data for:\n" + "\n".join(pending)
    return done


def test_every_target_is_up(scraped):
    prom, cluster, _ = scraped
    # A comparison returns nothing until it holds: this waits for all five.
    wait_for_data(prom, [f'count(up{{job=~"fanroute-.*"}} == 1) == {len(cluster.all())}'])


def test_every_dashboard_query_returns_data(scraped):
    prom, _, traffic = scraped
    checked, parse_only = [], []
    for title, expr in dashboard_queries():
        (parse_only if metric_names(expr) & NOT_YET_EXPORTED else checked).append(substitute(expr))
    for expr in parse_only:
        assert prom.query(expr)["status"] == "success", expr
    results = wait_for_data(prom, checked)
    assert not traffic.errors, traffic.errors
    assert traffic.received > 0
    # A few values, not just presence: traffic really flowed through the cluster.
    by_title = {title: substitute(expr) for title, expr in dashboard_queries()}
    conns = float(results[by_title["Open connections"]][0]["value"][1])
    assert conns >= 2
    links = results[by_title["Shard links up (worst gateway)"]]
    assert {r["metric"]["shard"] for r in links} == {"router-0", "router-1", "router-2"}
    assert all(float(r["value"][1]) == 1 for r in links)
    assert {r["metric"]["pod"] for r in results[by_title["Open connections by pod"]]} <= {"gateway-0", "gateway-1"}


def test_dashboard_variables_list_the_pods(scraped):
    prom, _, _ = scraped
    variables = {v["name"]: v for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    expected = {
        "namespace": {"local"},
        "pod": {"gateway-0", "gateway-1", "router-0", "router-1", "router-2"},
    }
    for name, var in variables.items():
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1)), m.group(2)
        expr = f"count by ({label}) ({selector})"
        values = {r["metric"][label] for r in wait_for_data(prom, [expr])[expr]}
        assert values == expected.get(name, values) and len(values) >= 1, (name, values)


def test_every_alert_rule_loads_and_evaluates(scraped):
    prom, _, _ = scraped
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]

    def evaluated() -> bool:
        loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        return len(loaded) == len(exprs) and all(r["health"] == "ok" for r in loaded)

    wait_until(evaluated, timeout=DEADLINE, what="every rule evaluated with health ok")
    for expr in exprs:
        answer = prom.query(expr)
        assert answer["status"] == "success", (expr, answer)
    # Every series an alert reads exists, so an alert cannot stay silent because of a
    # renamed metric.
    names = sorted(set().union(*(metric_names(e) for e in exprs)) - NOT_YET_EXPORTED)
    wait_for_data(prom, [f'count({{__name__="{n}", job=~"fanroute-.*"}})' for n in names])
    assert not scraped[2].errors, scraped[2].errors
