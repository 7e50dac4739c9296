"""The chart's command lines are the real ones: run every pod of a rendered release as a
local process, with exactly the command, args and environment of its manifest, and
check that the processes form a working cluster.

Only addresses change, the way a cluster's network would map them: each pod's
container ports become free loopback ports, 0.0.0.0 and the pod IP become 127.0.0.1,
and the routers' DNS names become the loopback ports of those router pods. Downward
API fields get the values Kubernetes would give; ConfigMap and Secret volumes are
written to a temporary directory. Probes are checked against the real admin port.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.support import DEADLINE, free_port, http_get, metric, wait_until, ws_connect
from tests.deploy.test_helm_chart import find, objects, one, production_values, render

# Variables fanroute reads directly rather than through a flag, if the chart sets any.
ENV_ONLY: set[str] = {"FANROUTE_JWT_PUBLIC_KEY"}
# Announced flags the chart may set before the CLI has them; the local run leaves them
# out (and says so). Once `fanroute gateway` and `fanroute router` have a flag, the
# local run passes its variable through like any other.
PENDING_FLAGS: set[str] = {"FANROUTE_CLUSTER_SECRET"}

FANROUTE = Path(sys.executable).with_name("fanroute")


def known_env(command: str) -> set[str]:
    """The FANROUTE_* names `fanroute <command>` understands, from its own parser."""
    from fanroute.cli import _env_name, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    names = set()
    for action in [*parser._actions, *sub._actions]:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                names.add(_env_name(opt))
    return names


@dataclass
class Pod:
    name: str
    index: int
    template: dict[str, Any]
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> loopback port
    popen: subprocess.Popen | None = None
    dropped: list[str] = field(default_factory=list)

    @property
    def container(self) -> dict[str, Any]:
        return self.template["spec"]["containers"][0]

    def port(self, name: str) -> int:
        number = next(p["containerPort"] for p in self.container["ports"] if p["name"] == name)
        return self.ports[number]


class LocalRelease:
    """A rendered release run as processes on 127.0.0.1."""

    def __init__(self, objs: list[dict[str, Any]], workdir: Path) -> None:
        self.objs = objs
        self.workdir = workdir
        self.variant = ""
        sts, deploy = one(objs, "StatefulSet"), one(objs, "Deployment")
        hpa = find(objs, "HorizontalPodAutoscaler")
        gateways = deploy["spec"].get("replicas") or hpa[0]["spec"]["minReplicas"]
        self.routers = [Pod(f"{sts['metadata']['name']}-{i}", i, sts["spec"]["template"]) for i in range(sts["spec"]["replicas"])]
        self.gateways = [Pod(f"{deploy['metadata']['name']}-{i}", i, deploy["spec"]["template"]) for i in range(gateways)]
        # The router pods' DNS names, as the headless Service publishes them.
        self.headless = sts["spec"]["serviceName"]
        self.prefix = sts["metadata"]["name"]
        for pod in self.pods:
            pod.ports = {p["containerPort"]: free_port() for p in pod.container["ports"]}

    @property
    def pods(self) -> list[Pod]:
        return [*self.routers, *self.gateways]

    # -- from manifest to process ----------------------------------------------------

    def _data(self, kind: str, name: str) -> dict[str, str]:
        for o in find(self.objs, kind):
            if o["metadata"]["name"] == name:
                if kind == "Secret":
                    return {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
                return dict(o.get("data", {}))
        return {}

    def _mounts(self, pod: Pod) -> dict[str, str]:
        """Write ConfigMap and Secret volumes to disk; mount path -> local directory."""
        volumes = {v["name"]: v for v in pod.template["spec"].get("volumes", [])}
        out = {}
        for mount in pod.container.get("volumeMounts", []):
            vol = volumes[mount["name"]]
            if "configMap" in vol:
                data = self._data("ConfigMap", vol["configMap"]["name"])
                items = vol["configMap"].get("items")
            elif "secret" in vol:
                data = self._data("Secret", vol["secret"]["secretName"])
                items = vol["secret"].get("items")
            else:
                continue
            local = self.workdir / pod.name / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for item in items or [{"key": k, "path": k} for k in data]:
                if item["key"] in data:
                    (local / item["path"]).write_text(data[item["key"]])
            out[mount["mountPath"]] = str(local)
        return out

    def _field(self, pod: Pod, path: str) -> str:
        return {
            "status.podIP": "127.0.0.1",
            "metadata.name": pod.name,
            "metadata.labels['apps.kubernetes.io/pod-index']": str(pod.index),
        }[path]

    def _address(self, pod: Pod, value: str) -> str:
        """Map one nng address or host to loopback."""
        def repl(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            dns = re.fullmatch(rf"{re.escape(self.prefix)}-(\d+)\.{re.escape(self.headless)}\..*", host)
            if dns:
                return f"tcp://127.0.0.1:{self.routers[int(dns.group(1))].ports[port]}"
            assert host in ("0.0.0.0", "127.0.0.1"), f"{pod.name}: unexpected host {host}"
            return f"tcp://127.0.0.1:{pod.ports[port]}"

        return re.sub(r"tcp://([^:,/]+):(\d+)", repl, value)

    def environment(self, pod: Pod) -> dict[str, str]:
        known = known_env(pod.container["args"][0]) | ENV_ONLY
        mounts = self._mounts(pod)
        resolved: dict[str, str] = {}
        for entry in pod.container.get("env", []):
            name = entry["name"]
            if "value" in entry:
                # Kubernetes expands $(VAR) from variables defined earlier in the list.
                value = re.sub(r"\$\((\w+)\)", lambda m: resolved.get(m.group(1), m.group(0)), entry["value"])
            else:
                source = entry["valueFrom"]
                if "fieldRef" in source:
                    value = self._field(pod, source["fieldRef"]["fieldPath"])
                else:
                    ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                    data = self._data("Secret" if "secretKeyRef" in source else "ConfigMap", ref["name"])
                    if ref["key"] not in data:
                        assert ref.get("optional"), f"{pod.name}: {name} needs {ref}"
                        continue
                    value = data[ref["key"]]
            resolved[name] = value
        env = {}
        for name, value in resolved.items():
            if name.startswith("FANROUTE_") and name not in known:
                assert name in PENDING_FLAGS, f"{pod.name}: {name} is not a flag of fanroute"
                pod.dropped.append(name)
                continue
            for path, local in mounts.items():
                value = value.replace(path, local)
            value = self._address(pod, value)
            if value == "0.0.0.0":
                value = "127.0.0.1"
            if name.endswith("_PORT") and value.isdigit():
                assert int(value) in pod.ports, f"{pod.name}: {name}={value} is not a container port"
                value = str(pod.ports[int(value)])
            env[name] = value
        leaks = {k: v for k, v in env.items() if "0.0.0.0" in v or ".svc." in v}
        assert not leaks, f"{pod.name}: addresses left unmapped: {leaks}"
        return env

    def argv(self, pod: Pod) -> list[str]:
        command = pod.container["command"]
        assert command == ["fanroute"], command
        return [str(FANROUTE), *(self._address(pod, arg) for arg in pod.container["args"])]

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FANROUTE_")}
        for pod in self.pods:
            env = {**base, **self.environment(pod), "PYTHONUNBUFFERED": "1"}
            pod.popen = subprocess.Popen(
                self.argv(pod), env=env, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )

    def probe(self, pod: Pod, kind: str) -> bool:
        get = pod.container[kind]["httpGet"]
        assert pod.popen is not None
        if pod.popen.poll() is not None:
            raise AssertionError(f"{pod.name} exited: {pod.popen.stderr.read().decode()}")
        try:
            return http_get(f"http://127.0.0.1:{pod.port(get['port'])}{get['path']}", timeout=2)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        for pod in self.pods:
            if pod.popen and pod.popen.poll() is None:
                pod.popen.send_signal(signal.SIGKILL)
        for pod in self.pods:
            if pod.popen:
                pod.popen.wait(timeout=10)
                pod.popen.stderr.close()


JWT_SECRET = "local-test-jwt-secret-0123456789abcdef"
API_KEY = "local-test-api-key"
CLUSTER_SECRET = "local-test-cluster-secret-0123456789abcdef"


def operator_secret(name: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    """A Secret an operator creates before installing with auth.existingSecret (or,
    given its data, cluster.existingSecret)."""
    data = data or {"jwt-secret": JWT_SECRET, "api-key": API_KEY}
    return {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


@pytest.fixture(params=["default", "production"])
def release(request, tmp_path):
    if request.param == "default":
        objs = objects(render())
    else:
        values = production_values()
        cluster = values["cluster"]
        objs = [
            *objects(render(values)),
            operator_secret(values["auth"]["existingSecret"]),
            operator_secret(cluster["existingSecret"], {cluster["existingSecretKey"]: CLUSTER_SECRET}),
        ]
    rel = LocalRelease(objs, tmp_path)
    rel.variant = request.param
    rel.start()
    try:
        yield rel
    finally:
        rel.stop()


def api_publish(port: int, topic: str, payload: Any, key: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=json.dumps({"topic": topic, "payload": payload}).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_rendered_release_runs_as_a_working_cluster(release):
    def all_ready() -> bool:
        return all(release.probe(p, "startupProbe") and release.probe(p, "readinessProbe") for p in release.pods)

    await trio.to_thread.run_sync(lambda: wait_until(all_ready, what="every pod's probes"))
    for pod in release.pods:
        assert release.probe(pod, "livenessProbe")
    dropped = sorted({n for p in release.pods for n in p.dropped})
    if dropped:
        print(f"left out, not yet flags of fanroute: {', '.join(dropped)}")

    # Every router runs under the shard name the gateways hash.
    for pod in release.routers:
        text = http_get(f"http://127.0.0.1:{pod.port('admin')}/metrics")[1]
        assert metric(text, "fanroute_router_topics", f'shard="router-{pod.index}"') == 0
    # Every gateway reaches every shard by the address the chart gave it.
    for pod in release.gateways:
        text = http_get(f"http://127.0.0.1:{pod.port('admin')}/metrics")[1]
        for r in release.routers:
            assert metric(text, "fanroute_gateway_shard_link_up", f'shard="router-{r.index}"') == 1

    production = release.variant == "production"
    first, last = release.gateways[0], release.gateways[-1]
    query = ""
    if production:
        # The namespaces config and the Secret are in force: anonymous clients are
        # refused, tokens signed with the Secret's key are accepted.
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
        query = f"?token={token}"
        async with ws_connect(f"ws://127.0.0.1:{first.port('ws')}/") as anon:
            await anon.send({"type": "subscribe", "topic": "chat.lobby", "id": 1})
            assert (await anon.recv_type("error"))["code"] == "unauthorized"
    namespace = "chat" if production else "t"
    topics = [f"{namespace}.{i}" for i in range(40)]

    # Publications cross gateways through every shard, and come back to the
    # subscriber's gateway on the inbox address it advertised.
    async with ws_connect(f"ws://127.0.0.1:{first.port('ws')}/{query}") as sub, \
            ws_connect(f"ws://127.0.0.1:{last.port('ws')}/{query}") as pub:
        for i, topic in enumerate(topics):
            await sub.subscribe(topic, id=i + 1)
        if production:
            await sub.subscribe("prices.ACME", id=100)
        # From here on the subscriber only collects messages (subscribe() skips them).
        for topic in topics:
            await pub.send({"type": "publish", "topic": topic, "payload": {"x": 1}})
        if production:
            status, _ = await trio.to_thread.run_sync(api_publish, last.port("admin"), "prices.ACME", {"p": 1}, "wrong")
            assert status == 401
            status, body = await trio.to_thread.run_sync(api_publish, last.port("admin"), "prices.ACME", {"p": 1}, API_KEY)
            assert (status, body["seq"]) == (200, 1)
            topics.append("prices.ACME")
        got = set()
        with trio.fail_after(DEADLINE):
            while len(got) < len(topics):
                msg = await sub.recv()
                if "type" not in msg and "seq" in msg:  # a message frame
                    assert msg["payload"] in ({"x": 1}, {"p": 1})
                    got.add(msg["topic"])
    busy = 0
    for pod in release.routers:
        text = http_get(f"http://127.0.0.1:{pod.port('admin')}/metrics")[1]
        busy += metric(text, "fanroute_router_publications_total") > 0
    assert busy == len(release.routers)  # 40 topics touch every shard


async def test_gateway_drains_within_its_grace_period(tmp_path):
    """SIGTERM after preStop: the gateway closes its clients with 1012 (they reconnect
    elsewhere) and exits before Kubernetes would kill it."""
    values = {"router": {"replicas": 1}, "gateway": {"replicas": 1, "drainWindow": 2, "preStopSleep": 1}}
    rel = LocalRelease(objects(render(values)), tmp_path)
    rel.start()
    try:
        await trio.to_thread.run_sync(lambda: wait_until(lambda: all(rel.probe(p, "readinessProbe") for p in rel.pods)))
        gw = rel.gateways[0]
        spec = gw.template["spec"]
        pre_stop = int(gw.container["lifecycle"]["preStop"]["exec"]["command"][1])
        budget = spec["terminationGracePeriodSeconds"] - pre_stop
        async with ws_connect(f"ws://127.0.0.1:{gw.port('ws')}/") as client:
            await client.subscribe("t.1")
            started = time.monotonic()
            gw.popen.send_signal(signal.SIGTERM)
            with trio.fail_after(budget):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await client.conn.get_message()
            assert closed.value.reason.code == 1012
            code = await trio.to_thread.run_sync(lambda: gw.popen.wait(timeout=budget))
        assert code == 0
        assert time.monotonic() - started < budget
    finally:
        rel.stop()
