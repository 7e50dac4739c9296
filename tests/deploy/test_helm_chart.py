"""The Helm chart, rendered and linted by Helm's own Go SDK (helm-python-sdk), every
manifest validated strictly against Kubernetes' schemas, and the parts that must agree
with the code (shard names, the rules file, the dashboard) checked against it.

The rendering helpers here are also used by tests/deploy/test_helm_local_cluster.py.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm/fanroute"
PRODUCTION = ROOT / "helm/examples/production-values.yaml"
# Every values file: the chart's examples and the tests' own (each a variant below).
EXAMPLES = sorted((ROOT / "helm/examples").glob("*.yaml"))
TEST_VALUES = sorted((ROOT / "tests/data/helm").glob("*-values.yaml"))
CRD_SCHEMA = ROOT / "tests/data/helm/monitoring-crds.schema.json"
RULES = ROOT / "ops/prometheus/fanroute-rules.yml"
DASHBOARD = ROOT / "ops/grafana/fanroute.json"
# Two current Kubernetes minor versions, the oldest and newest kubernetes-validate ships.
KUBE_VERSIONS = ["1.33.0", "1.37.0"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
PROMTOOL = shutil.which("promtool")


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION.read_text())


def values_file(path: Path) -> Any:
    return lambda: yaml.safe_load(path.read_text())


def data_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / f"tests/data/helm/{name}-values.yaml").read_text())


def render(values: dict[str, Any] | None = None, name: str = "fanroute", namespace: str = "live") -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=name, namespace=namespace)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def find(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(o, o["spec"]["template"]) for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def auth_values() -> dict[str, Any]:
    """Keys given as values (the chart makes the Secret), origins, NodePort, no PDBs."""
    return {
        "auth": {"jwtSecret": "s3cret", "jwtPublicKey": "-----BEGIN PUBLIC KEY-----\n", "apiKey": "k3y",
                 "jwtAudience": "feeds", "jwtIssuer": "https://id.example"},
        "gateway": {"allowedOrigins": "https://app.example", "service": {"type": "NodePort"}, "pdb": {"enabled": False}},
        "router": {"pdb": {"enabled": False}},
        "serviceAccount": {"create": False},
    }


def inter_node_values() -> dict[str, Any]:
    """Every inter-node knob away from its default."""
    return {
        "cluster": {"existingSecret": "ops-cluster", "existingSecretKey": "hmac", "encrypt": True},
        "networkPolicy": {"enabled": True, "adminFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
             "podSelector": {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}]}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
        ]},
        "router": {"listenAddress": "0.0.0.0"},
        "gateway": {"inboxAddress": "0.0.0.0"},
    }


VARIANTS = {
    "default": lambda: None,
    "auth": auth_values,
    "inter-node": inter_node_values,
    **{f"example:{p.stem}": values_file(p) for p in EXAMPLES},
    **{f"test:{p.stem}": values_file(p) for p in TEST_VALUES},
}


def test_every_values_file_is_a_variant():
    """The variant-wide tests (lint, strict Kubernetes validation, the admin port's
    exposure) run for every example and test values file."""
    assert PRODUCTION in EXAMPLES and (ROOT / "helm/examples/ingress-nginx-values.yaml") in EXAMPLES
    assert {p.stem for p in TEST_VALUES} >= {"exposure-values", "recreate-values"}
    assert len(VARIANTS) == 3 + len(EXAMPLES) + len(TEST_VALUES)


def test_values_comments_name_files_that_exist():
    """values.yaml points readers at example files; each one it names must be there."""
    named = re.findall(r"helm/[\w./-]+\.ya?ml", (CHART / "values.yaml").read_text())
    assert "helm/examples/production-values.yaml" in named
    for path in named:
        assert (ROOT / path).is_file(), f"values.yaml names {path}, which does not exist"


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def variant(request) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]]]:
    values = VARIANTS[request.param]()
    return request.param, values, objects(render(values))


# -- Helm's own checks ------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lint_is_clean_in_strict_mode(name, kube_version):
    report = helm.lint(CHART, VARIANTS[name](), strict=True, namespace="live", kube_version=f"v{kube_version}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); strict fails on 2 and up.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_values_schema_rejects_values_that_cannot_work():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(None)
        for make in VARIANTS.values():
            chart.validate_schema(make())
        for bad in (
            {"router": {"replicas": 0}},
            {"gateway": {"port": 70000}},
            {"gateway": {"drainWindow": -1}},
            {"logLevel": "chatty"},
            {"logFormat": "xml"},
            {"gateway": {"limits": {"maxConnectionsPerUser": -1}}},
            {"gateway": {"service": {"type": "ExternalName"}}},
            {"gatway": {"replicas": 3}},  # a typo is an error, not a silently ignored key
            {"metrics": {"serviceMonitor": {"interval": "soon"}}},
            {"router": {"listenAddress": "tcp://0.0.0.0:7101"}},  # a host, not a URL
            {"gateway": {"inboxAddress": "0.0.0.0:7200"}},
            {"cluster": {"existingSecretKey": ""}},
            {"cluster": {"secret": "inline"}},
            {"cluster": {"encrypt": "yes"}},
            {"networkPolicy": {"enable": True}},
            {"networkPolicy": {"enabled": "yes"}},
            {"networkPolicy": {"adminFrom": [{"namespace": "monitoring"}]}},
            {"networkPolicy": {"adminFrom": [{}]}},
            # The admin Service is ClusterIP, always: there is no knob to expose it.
            {"gateway": {"adminService": {"type": "LoadBalancer"}}},
            {"gateway": {"service": {"adminPort": 9100}}},
            {"gateway": {"ingress": {"enabled": "yes"}}},
            {"gateway": {"ingress": {"enabled": True, "hosts": [{"host": "Live.Example.com", "paths": [{"path": "/"}]}]}}},
            {"gateway": {"ingress": {"enabled": True, "hosts": [{"host": "live.example.com", "paths": [{"path": "ws"}]}]}}},
            {"gateway": {"ingress": {"enabled": True, "hosts": [{"host": "live.example.com", "paths": []}]}}},
            {"gateway": {"ingress": {"enabled": True, "hosts": [{"paths": [{"path": "/", "pathType": "Regex"}]}]}}},
            {"gateway": {"ingress": {"enabled": True, "backend": {"port": 9100}}}},
            {"gateway": {"ingress": {"enabled": True, "tls": [{"secret": "x"}]}}},
            {"gateway": {"topologySpread": {"enabled": True, "whenUnsatisfiable": "Sometimes"}}},
            {"router": {"topologySpread": {"enabled": True, "maxSkew": 0}}},
            {"router": {"topologySpread": {"on": True}}},
            {"gateway": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname"}]}},
            {"gateway": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway", "minDomains": 2}]}},
            {"gateway": {"strategy": {"type": "BlueGreen"}}},
            {"gateway": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "one"}}}},
            {"gateway": {"strategy": {"rollingUpdate": {"partition": 1}}}},
            {"router": {"updateStrategy": {"type": "Recreate"}}},
            {"router": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": -1}}}},
            {"router": {"podManagementPolicy": "Serial"}},
            {"gateway": {"podLabels": {"app.kubernetes.io/component": "router"}}},  # would break selectors
            {"router": {"podLabels": {"app.kubernetes.io/instance": "other"}}},
            {"gateway": {"podLabels": {"team": 1}}},
            {"router": {"priorityClassName": "High Priority"}},
            {"gateway": {"envFrom": [{"configMap": "extra"}]}},
            {"gateway": {"envFrom": [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]}},
            {"router": {"envFrom": [{"secretRef": {}}]}},
            {"gateway": {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}},  # the chart's own
            {"gateway": {"extraVolumes": [{"name": "ca"}]}},  # no source
            {"router": {"extraVolumeMounts": [{"name": "ca"}]}},
            {"router": {"extraVolumeMounts": [{"name": "ca", "mountPath": "relative"}]}},
            {"replication": {"copies": 0}},
            {"replication": {"copies": "2"}},
            {"replication": {"copies": 1.5}},
            {"replication": {"copies": 2, "mode": "sync"}},
            {"replication": {"copies": None}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


# -- Kubernetes schemas -------------------------------------------------------------


def test_every_manifest_validates_strictly_against_kubernetes(variant, tmp_path):
    """kubernetes-validate --strict (unknown fields are errors) for two Kubernetes versions."""
    name, _, objs = variant
    files = []
    validated = [o for o in objs if o["kind"] not in CRD_KINDS]
    assert "NetworkPolicy" in {o["kind"] for o in validated}  # on in every variant
    for i, obj in enumerate(validated):
        path = tmp_path / f"{i:02d}-{obj['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(obj))
        files.append(str(path))
    args = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    result = subprocess.run([*args, *files], capture_output=True, text=True, timeout=120)
    # Any WARN means a kind without a schema slipped through unvalidated.
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_monitoring_resources_match_the_operator_api(tmp_path):
    """ServiceMonitor and PrometheusRule: a strict schema of the operator fields we use,
    and the rule groups must load in promtool."""
    objs = objects(render(production_values()))
    defs = json.loads(CRD_SCHEMA.read_text())
    for kind in CRD_KINDS:
        obj = one(objs, kind)
        jsonschema.validate(obj, {**defs, "$ref": f"#/$defs/{kind}"})
    rule = one(objs, "PrometheusRule")
    assert PROMTOOL, "promtool is missing: run ops/setup-prometheus.sh as root"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# -- What the release contains ------------------------------------------------------


def kinds(objs: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objs:
        out[o["kind"]] = out.get(o["kind"], 0) + 1
    return out


def test_default_release_objects():
    objs = objects(render())
    assert kinds(objs) == {
        "Deployment": 1, "StatefulSet": 1, "Service": 3, "PodDisruptionBudget": 2,
        "ConfigMap": 2, "ServiceAccount": 1, "Secret": 1, "NetworkPolicy": 2,
    }
    assert one(objs, "Deployment")["spec"]["replicas"] == 2
    assert one(objs, "StatefulSet")["spec"]["replicas"] == 3


def test_production_release_objects():
    objs = objects(render(production_values()))
    assert kinds(objs) == {
        "Deployment": 1, "StatefulSet": 1, "Service": 3, "PodDisruptionBudget": 2, "ConfigMap": 2,
        "ServiceAccount": 1, "HorizontalPodAutoscaler": 1, "ServiceMonitor": 1, "PrometheusRule": 1,
        "NetworkPolicy": 2,
    }
    deploy, hpa = one(objs, "Deployment"), one(objs, "HorizontalPodAutoscaler")
    assert "replicas" not in deploy["spec"]  # the HPA owns the count
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy["metadata"]["name"]}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "fanroute_gateway_connections"
    assert one(objs, "StatefulSet")["spec"]["replicas"] == 5


# -- Shards: stable names and addresses ------------------------------------------------


@pytest.mark.parametrize("release,namespace", [("fanroute", "live"), ("demo", "feeds")])
def test_gateways_get_every_shard_by_its_stable_dns_name(release, namespace):
    objs = objects(render(production_values(), name=release, namespace=namespace))
    sts, deploy = one(objs, "StatefulSet"), one(objs, "Deployment")
    headless = next(s for s in find(objs, "Service") if s["spec"].get("clusterIP") == "None")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"] == f"{release}-router-headless"
    assert sts["metadata"]["name"] == f"{release}-router"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["gateway", "--routers"]
    routers = args[2]
    # Shard names depend on the ordinal only (the ring hashes them); hosts are the pods' DNS names.
    assert routers.split(",") == [
        f"router-{i}=tcp://{release}-router-{i}.{release}-router-headless.{namespace}.svc.cluster.local:7101"
        for i in range(5)
    ]
    # Routers get the same list as their peers: they form a view before any gateway is up.
    router_args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert router_args[:3] == ["router", "--peers", routers]
    router_env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert router_env["POD_INDEX"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert router_env["FANROUTE_NAME"] == "router-$(POD_INDEX)"
    # The router listens on its pod IP: the address its DNS name above resolves to.
    assert router_env["FANROUTE_LISTEN"] == "tcp://$(POD_IP):7101"


def test_router_listens_on_the_pod_ip_unless_told_otherwise():
    def router_env(values: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        c = one(objects(render(values)), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        return env_of(c), [e["name"] for e in c["env"]]

    env, names = router_env(None)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["FANROUTE_LISTEN"] == "tcp://$(POD_IP):7101"
    assert names.index("POD_IP") < names.index("FANROUTE_LISTEN")  # $(VAR) sees earlier vars only
    env, _ = router_env({"router": {"listenAddress": "0.0.0.0", "port": 7300}})
    assert env["FANROUTE_LISTEN"] == "tcp://0.0.0.0:7300"


def test_gateway_inbox_listens_on_and_advertises_the_pod_ip():
    def gateway_env(values: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        c = one(objects(render(values)), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        return env_of(c), [e["name"] for e in c["env"]]

    env, names = gateway_env(None)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["FANROUTE_INBOX"] == "tcp://$(POD_IP):7200"
    assert env["FANROUTE_ADVERTISE"] == "tcp://$(POD_IP):7200"
    assert names.index("POD_IP") < min(names.index("FANROUTE_INBOX"), names.index("FANROUTE_ADVERTISE"))
    env, _ = gateway_env({"gateway": {"inboxAddress": "0.0.0.0"}})
    assert env["FANROUTE_INBOX"] == "tcp://0.0.0.0:7200"
    assert env["FANROUTE_ADVERTISE"] == "tcp://$(POD_IP):7200"  # shards still dial the pod IP


def test_every_fanroute_variable_is_a_flag_of_the_command_it_runs(variant):
    """The manifests use FANROUTE_* names; each must be a real flag of `fanroute gateway`
    or `fanroute router`, one of the auth variables read directly from the environment, or
    a flag announced and listed as pending in tests/deploy/test_helm_local_cluster.py."""
    from tests.deploy.test_helm_local_cluster import ENV_ONLY, PENDING_FLAGS, known_env

    _, _, objs = variant
    for _, pod in pod_specs(objs):
        container = pod["spec"]["containers"][0]
        command = container["args"][0]
        unknown = {n for n in env_of(container) if n.startswith("FANROUTE_")} - known_env(command) - ENV_ONLY - PENDING_FLAGS
        assert not unknown, f"{command}: no such flag for {sorted(unknown)}"


# -- Pods: probes, shutdown, security, resources ------------------------------------------


def test_probes_use_the_admin_port(variant):
    _, _, objs = variant
    for _, pod in pod_specs(objs):
        c = pod["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert env_of(c)["FANROUTE_ADMIN_PORT"] == str(ports["admin"])
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_gateway_grace_period_outlasts_prestop_and_drain(variant):
    _, values, objs = variant
    gw = (values or {}).get("gateway", {})
    drain = gw.get("drainWindow", 10)
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert env_of(c)["FANROUTE_DRAIN_WINDOW"] == str(drain)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_pods_run_as_non_root_with_a_read_only_root_and_resources(variant):
    _, _, objs = variant
    for _, pod in pod_specs(objs):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            assert c["resources"]["limits"]["memory"]
            assert c["command"] == ["fanroute"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_services_and_budgets_select_their_pods(variant):
    _, _, objs = variant
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")}

    def selected(selector: dict[str, str]) -> list[str]:
        return [n for n, t in pods.items() if selector.items() <= t["metadata"]["labels"].items()]

    for svc in find(objs, "Service"):
        [target] = selected(svc["spec"]["selector"])
        port_names = {p["name"] for p in pods[target]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for pdb in find(objs, "PodDisruptionBudget"):
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1
    for workload in (o for o in objs if o["kind"] in ("Deployment", "StatefulSet")):
        assert selected(workload["spec"]["selector"]["matchLabels"]) == [workload["metadata"]["name"]]


# -- Config, secrets --------------------------------------------------------------------


def test_namespaces_config_is_mounted_where_fanroute_config_points():
    toml = '[namespaces.market]\nhistory_size = 50\n'
    objs = objects(render({"namespacesConfig": toml}))
    cm = next(c for c in find(objs, "ConfigMap") if c["metadata"]["name"] == "fanroute-config")
    assert cm["data"]["namespaces.toml"].strip() == toml.strip()
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    path = Path(env_of(spec["containers"][0])["FANROUTE_CONFIG"])
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "fanroute-config" and path.name in cm["data"]
    # A config change rolls the gateways.
    before = one(objects(render()), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert before != after


def test_auth_values_become_a_secret_and_environment():
    objs = objects(render({"auth": {"jwtSecret": "s3cret", "apiKey": "k3y", "jwtPublicKey": "-----BEGIN PUBLIC KEY-----\n"}}))
    [secret] = [s for s in find(objs, "Secret") if s["metadata"]["name"] != "fanroute-cluster"]
    assert secret["metadata"]["name"] == "fanroute-auth"
    assert base64.b64decode(secret["data"]["jwt-secret"]) == b"s3cret"
    assert base64.b64decode(secret["data"]["api-key"]) == b"k3y"
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    assert env["FANROUTE_JWT_SECRET"]["secretKeyRef"] == {"name": "fanroute-auth", "key": "jwt-secret", "optional": True}
    assert env["FANROUTE_API_KEY"]["secretKeyRef"]["key"] == "api-key"
    key_file = Path(env["FANROUTE_JWT_PUBLIC_KEY_FILE"])
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == str(key_file.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "fanroute-auth"
    assert volume["secret"]["items"] == [{"key": "jwt-public-key", "path": key_file.name}]


def test_existing_secret_is_referenced_not_created():
    objs = objects(render(production_values()))
    assert find(objs, "Secret") == []  # neither the auth Secret nor the cluster Secret
    env = env_of(one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert env["FANROUTE_JWT_SECRET"]["secretKeyRef"]["name"] == "fanroute-auth"
    assert "FANROUTE_JWT_PUBLIC_KEY_FILE" not in env


def test_no_auth_means_no_secret_and_a_warning_in_the_notes():
    manifests = render()
    assert [s["metadata"]["name"] for s in find(objects(manifests), "Secret")] == ["fanroute-cluster"]
    assert "FANROUTE_JWT_SECRET" not in env_of(one(objects(manifests), "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert "clients connect anonymously" in manifests["fanroute/templates/NOTES.txt"]


# -- Inter-node links: the cluster secret and the NetworkPolicies --------------------------


def cluster_secret_refs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Workload name -> the secretKeyRef its container reads FANROUTE_CLUSTER_SECRET from."""
    out = {}
    for workload, pod in pod_specs(objs):
        source = env_of(pod["spec"]["containers"][0]).get("FANROUTE_CLUSTER_SECRET")
        assert isinstance(source, dict) and "secretKeyRef" in source, f"{workload['metadata']['name']}: {source!r}"
        out[workload["metadata"]["name"]] = source["secretKeyRef"]
    return out


def test_every_pod_gets_the_same_cluster_secret(variant):
    """Gateways and routers of a release must share one secret, from a Secret the chart
    renders with that key or the one the values name."""
    _, values, objs = variant
    refs = cluster_secret_refs(objs)
    assert set(refs) == {"fanroute-gateway", "fanroute-router"}
    [ref] = {json.dumps(r, sort_keys=True) for r in refs.values()}
    ref = json.loads(ref)
    assert "optional" not in ref  # a pod without the secret must not start
    existing = ((values or {}).get("cluster") or {}).get("existingSecret")
    if existing:
        assert ref["name"] == existing
        assert all(s["metadata"]["name"] != "fanroute-cluster" for s in find(objs, "Secret"))
    else:
        secret = next(s for s in find(objs, "Secret") if s["metadata"]["name"] == ref["name"])
        assert ref["key"] in secret["data"]


@pytest.mark.parametrize("encrypt", [None, False, True])
def test_every_pod_encrypts_the_links_or_none_does(encrypt):
    """cluster.encrypt reaches gateways and routers alike: pods sealing messages two ways
    could not talk."""
    objs = objects(render(None if encrypt is None else {"cluster": {"encrypt": encrypt}}))
    values = {env_of(pod["spec"]["containers"][0])["FANROUTE_CLUSTER_ENCRYPT"] for _, pod in pod_specs(objs)}
    assert values == {"true" if encrypt else "false"}


def test_cluster_secret_is_generated_random_and_long():
    def generated() -> bytes:
        objs = objects(render())
        secret = next(s for s in find(objs, "Secret") if s["metadata"]["name"] == "fanroute-cluster")
        assert cluster_secret_refs(objs)["fanroute-router"] == {"name": "fanroute-cluster", "key": "cluster-secret"}
        assert cluster_secret_refs(objs)["fanroute-gateway"] == {"name": "fanroute-cluster", "key": "cluster-secret"}
        return base64.b64decode(secret["data"]["cluster-secret"])

    first, second = generated(), generated()
    assert len(first) >= 32 and len(second) >= 32
    assert first != second  # generated per install, not a constant shipped in the chart
    assert len(set(first)) > 10


def test_cluster_secret_is_kept_across_upgrades(tmp_path):
    """Offline, `lookup` finds nothing; in a cluster it returns the release's Secret, and
    its value must be kept. Feed the chart's helper what lookup would return."""
    chart = tmp_path / "fanroute"
    shutil.copytree(CHART, chart)
    (chart / "templates/zz-lookup-probe.yaml").write_text(
        '# {{ include "fanroute.clusterSecretData" (dict "data" (dict "cluster-secret" "a2VwdC12YWx1ZQ==")) }}\n'
        '# {{ include "fanroute.clusterSecretData" (dict) }}\n'
    )
    with helm.Chart.load(chart) as c:
        probe = c.render(None, name="fanroute", namespace="live")["fanroute/templates/zz-lookup-probe.yaml"]
    kept, fresh = (line.removeprefix("# ") for line in probe.splitlines())
    assert kept == "a2VwdC12YWx1ZQ=="
    assert fresh != kept and len(base64.b64decode(fresh)) >= 32
    # ...and the Secret's template asks lookup for itself, by the name it renders under.
    template = (CHART / "templates/cluster-secret.yaml").read_text()
    assert '$name := include "fanroute.clusterSecretName" .' in template
    assert 'name: {{ $name }}' in template
    assert re.search(r'include "fanroute.clusterSecretData" \(lookup "v1" "Secret" \.Release\.Namespace \$name\)', template)


@pytest.mark.parametrize("key", [None, "hmac"])
def test_existing_cluster_secret_is_referenced_not_created(key):
    cluster = {"existingSecret": "ops-cluster", **({"existingSecretKey": key} if key else {})}
    manifests = render({"cluster": cluster})
    objs = objects(manifests)
    assert find(objs, "Secret") == []
    want = {"name": "ops-cluster", "key": key or "cluster-secret"}
    assert cluster_secret_refs(objs) == {"fanroute-gateway": want, "fanroute-router": want}
    assert f"Secret ops-cluster (key {key or 'cluster-secret'})" in manifests["fanroute/templates/NOTES.txt"]


def admitted(policy: dict[str, Any], port: int) -> list[list[dict[str, Any]] | None]:
    """The `from` of every ingress rule of the policy that opens the TCP port (None: anyone)."""
    out = []
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is None or any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
            out.append(rule.get("from"))
    return out


def policies_by_workload(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Workload name -> the one NetworkPolicy whose podSelector selects its pods."""
    out = {}
    for workload, pod in pod_specs(objs):
        labels = pod["metadata"]["labels"]
        [policy] = [p for p in find(objs, "NetworkPolicy") if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        out[workload["metadata"]["name"]] = policy
    return out


@pytest.mark.parametrize("release", ["fanroute", "demo"])
def test_network_policies_admit_only_the_release_to_the_nng_ports(release):
    objs = objects(render(name=release))
    policies = policies_by_workload(objs)
    assert set(policies) == {f"{release}-gateway", f"{release}-router"}
    templates = [pod for _, pod in pod_specs(objs)]
    other_release = [pod for _, pod in pod_specs(objects(render(name="other")))]
    for workload, pod in pod_specs(objs):
        policy = policies[workload["metadata"]["name"]]
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        nng = ports.get("nng") or ports["inbox"]
        [peers] = admitted(policy, nng)
        assert peers is not None and len(peers) == 1
        [peer] = peers
        # Pods of this namespace only (no namespaceSelector, no ipBlock)...
        assert set(peer) == {"podSelector"}
        labels = peer["podSelector"]["matchLabels"]
        assert "matchExpressions" not in peer["podSelector"]
        # ...that carry the release's labels: its gateways and routers, no other release's.
        assert all(labels.items() <= t["metadata"]["labels"].items() for t in templates)
        assert not any(labels.items() <= t["metadata"]["labels"].items() for t in other_release)
        # The admin port stays reachable by anyone (Prometheus, the HTTP publish API).
        assert admitted(policy, ports["admin"]) == [None]
        if "ws" in ports:
            assert admitted(policy, ports["ws"]) == [None]  # clients, from anywhere
        # Every container port is opened by some rule; nothing the pod serves is cut off.
        assert all(admitted(policy, p) for p in ports.values())


def test_network_policy_admin_peers_and_ports_follow_the_values():
    values = inter_node_values()
    values["router"].update(port=7111, adminPort=9211)
    values["gateway"].update(port=8088, adminPort=9111, inboxPort=7222)
    policies = policies_by_workload(objects(render(values)))
    router, gateway = policies["fanroute-router"], policies["fanroute-gateway"]
    peers = values["networkPolicy"]["adminFrom"]
    assert admitted(router, 9211) == [peers] and admitted(gateway, 9111) == [peers]
    assert admitted(gateway, 8088) == [None]
    for policy, nng in ((router, 7111), (gateway, 7222)):
        [[peer]] = admitted(policy, nng)
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "fanroute"
    # Ports the values moved away from are closed.
    assert admitted(router, 7101) == [] and admitted(gateway, 7200) == [] and admitted(gateway, 8080) == []


def test_network_policies_can_be_disabled():
    manifests = render({"networkPolicy": {"enabled": False}})
    assert find(objects(manifests), "NetworkPolicy") == []
    assert "networkPolicy.enabled is false" in manifests["fanroute/templates/NOTES.txt"]
    assert "networkPolicy.enabled is false" not in render()["fanroute/templates/NOTES.txt"]


def test_notes_tell_how_to_connect_and_where_the_dashboard_is():
    notes = render(namespace="feeds")["fanroute/templates/NOTES.txt"]
    assert "kubectl -n feeds port-forward svc/fanroute-gateway 8080:80" in notes
    assert "ws://fanroute-gateway.feeds.svc.cluster.local:80/" in notes
    assert "ConfigMap fanroute-dashboard" in notes and "grafana_dashboard=1" in notes


def test_notes_point_at_the_admin_service_and_the_ingress():
    notes = render(namespace="feeds")["fanroute/templates/NOTES.txt"]
    assert "kubectl -n feeds port-forward svc/fanroute-gateway-admin 9100" in notes
    notes = render(yaml.safe_load((ROOT / "helm/examples/ingress-nginx-values.yaml").read_text()))["fanroute/templates/NOTES.txt"]
    assert "websocat wss://live.example.com/" in notes


# -- Exposure: the client port outside, the admin port inside ------------------------------


def container_ports(pod: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}


def service_targets(svc: dict[str, Any], objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """(Service port name, selected workload, container port name) for every port of the
    Service, the target resolved by name or number on each pod template it selects."""
    out = []
    for workload, pod in pod_specs(objs):
        if not svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
            continue
        by_number = {n: name for name, n in container_ports(pod).items()}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            out.append((port["name"], workload, by_number.get(target, target)))
    return out


def ingress_backends(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ing in find(objs, "Ingress"):
        if "defaultBackend" in ing["spec"]:
            out.append(ing["spec"]["defaultBackend"]["service"])
        for rule in ing["spec"].get("rules", []):
            out.extend(path["backend"]["service"] for path in rule["http"]["paths"])
    return out


def test_admin_port_is_only_on_the_cluster_internal_admin_service(variant):
    """In every values file: the client Service, whatever its type, and every Ingress
    backend reach the client port alone; the admin port (/metrics, /api/*) is on a
    ClusterIP Service of its own."""
    _, values, objs = variant
    services = {s["metadata"]["name"]: s for s in find(objs, "Service")}
    client = services["fanroute-gateway"]
    want_type = ((values or {}).get("gateway", {}).get("service") or {}).get("type", "ClusterIP")
    assert client["spec"]["type"] == want_type
    assert [t for _, _, t in service_targets(client, objs)] == ["ws"]
    gateway_admin = one(objs, "Deployment")["spec"]["template"]
    assert all(p["port"] != container_ports(gateway_admin)["admin"] for p in client["spec"]["ports"])
    # Whatever could carry traffic from outside the cluster carries no admin port.
    exposed = [s for s in services.values() if s["spec"].get("type", "ClusterIP") != "ClusterIP"]
    exposed += [services[b["name"]] for b in ingress_backends(objs)]
    for svc in exposed:
        assert {t for _, _, t in service_targets(svc, objs)} == {"ws"}, svc["metadata"]["name"]
    for backend in ingress_backends(objs):
        assert backend["name"] == "fanroute-gateway"
        [port] = [p for p in client["spec"]["ports"] if p["name"] == backend["port"].get("name") or p["port"] == backend["port"].get("number")]
        assert port["targetPort"] == "ws"
    # The admin port has its own Service, ClusterIP with no way to change it.
    admin = services["fanroute-gateway-admin"]
    assert admin["spec"]["type"] == "ClusterIP"
    assert [(w["kind"], t) for _, w, t in service_targets(admin, objs)] == [("Deployment", "admin")]
    # The routers' admin port is on their headless Service only, which is internal too.
    for svc in services.values():
        if any(t == "admin" for _, _, t in service_targets(svc, objs)):
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
            assert svc["metadata"]["name"] in ("fanroute-gateway-admin", "fanroute-router-headless")


def test_network_policy_admits_to_the_admin_service_whom_the_values_say(variant):
    """The admin Services' target ports are open, in the gateways' and routers'
    NetworkPolicies, to networkPolicy.adminFrom (anyone when it is empty), and the
    client port to anyone (clients, the ingress controller, the load balancer)."""
    _, values, objs = variant
    peers = ((values or {}).get("networkPolicy") or {}).get("adminFrom") or None
    policies = policies_by_workload(objs)
    checked = set()
    for svc in find(objs, "Service"):
        for _, workload, target in service_targets(svc, objs):
            policy = policies[workload["metadata"]["name"]]
            port = container_ports(workload["spec"]["template"])[target]
            if target == "admin":
                assert admitted(policy, port) == [peers]
            elif target == "ws":
                assert admitted(policy, port) == [None]
            checked.add((workload["kind"], target))
    assert {("Deployment", "admin"), ("StatefulSet", "admin"), ("Deployment", "ws")} <= checked


def test_production_example_admits_prometheus_and_labelled_api_clients_to_the_admin_port():
    values = production_values()
    assert values["gateway"]["service"]["type"] == "LoadBalancer"
    peers = values["networkPolicy"]["adminFrom"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in peers
    assert {"podSelector": {"matchLabels": {"fanroute.io/api-client": "true"}}} in peers


def test_ingress_renders_for_the_client_service_with_websocket_timeouts():
    values = yaml.safe_load((ROOT / "helm/examples/ingress-nginx-values.yaml").read_text())
    objs = objects(render(values))
    ing = one(objs, "Ingress")
    assert ing["apiVersion"] == "networking.k8s.io/v1"
    assert ing["spec"]["ingressClassName"] == "nginx"
    notes = ing["metadata"]["annotations"]
    # Idle timeouts well above the heartbeat, so a quiet connection is never cut by the proxy.
    heartbeat = 25 + 8
    for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"):
        assert int(notes[key]) > 10 * heartbeat
    assert ing["spec"]["tls"] == [{"secretName": "live-example-com-tls", "hosts": ["live.example.com"]}]
    [rule] = ing["spec"]["rules"]
    assert rule["host"] == "live.example.com"
    assert rule["http"]["paths"] == [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "fanroute-gateway", "port": {"name": "ws"}}}}]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]  # sanity: rendered whole
    # Every host and path of the values, with Prefix when the values give no pathType.
    ing = one(objects(render(data_values("exposure"))), "Ingress")
    paths = [(r.get("host"), p["path"], p["pathType"]) for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert paths == [("live.example.com", "/", "Prefix"), ("live.example.com", "/ws", "Exact"), (None, "/feeds", "Prefix")]


def test_no_ingress_unless_enabled():
    assert find(objects(render()), "Ingress") == []
    assert find(objects(render(production_values())), "Ingress") == []
    ing = one(objects(render({"gateway": {"ingress": {"enabled": True}}})), "Ingress")
    assert "ingressClassName" not in ing["spec"] and "tls" not in ing["spec"]  # the cluster's default class


# -- Scheduling and rollout ----------------------------------------------------------------


def spread_of(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"].get("topologySpreadConstraints", [])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


def test_pods_spread_across_nodes_by_default_each_component_on_its_own(variant):
    """Unless the values turn the chart's spread off, gateways and routers each get a
    soft spread across nodes, selected by their own component's labels."""
    _, values, objs = variant
    workloads = {o["kind"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    for kind, component in (("Deployment", "gateway"), ("StatefulSet", "router")):
        mine, other = workloads[kind], workloads["StatefulSet" if kind == "Deployment" else "Deployment"]
        spread = ((values or {}).get(component) or {}).get("topologySpread") or {}
        constraints = spread_of(mine)
        for c in constraints:
            # Every constraint counts this component's pods and not the other's.
            assert selects(c["labelSelector"], mine["spec"]["template"]["metadata"]["labels"])
            assert not selects(c["labelSelector"], other["spec"]["template"]["metadata"]["labels"])
        if spread.get("enabled", True):
            first = constraints[0]
            assert first["topologyKey"] == spread.get("topologyKey", "kubernetes.io/hostname")
            assert first["whenUnsatisfiable"] == spread.get("whenUnsatisfiable", "ScheduleAnyway")
            assert first["maxSkew"] == spread.get("maxSkew", 1)
            assert first["labelSelector"] == {"matchLabels": mine["spec"]["selector"]["matchLabels"]}
        extra = ((values or {}).get(component) or {}).get("topologySpreadConstraints", [])
        assert len(constraints) == int(spread.get("enabled", True)) + len(extra)


def test_default_spread_is_soft_across_nodes():
    objs = objects(render())
    gateway, router = one(objs, "Deployment"), one(objs, "StatefulSet")
    base = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    assert spread_of(gateway) == [{**base, "matchLabelKeys": ["pod-template-hash"], "labelSelector": {"matchLabels": {
        "app.kubernetes.io/name": "fanroute", "app.kubernetes.io/instance": "fanroute", "app.kubernetes.io/component": "gateway"}}}]
    assert spread_of(router) == [{**base, "labelSelector": {"matchLabels": {
        "app.kubernetes.io/name": "fanroute", "app.kubernetes.io/instance": "fanroute", "app.kubernetes.io/component": "router"}}}]
    # Another release's pods are not counted.
    assert spread_of(one(objects(render(name="demo")), "StatefulSet"))[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"
    # Zones on top, as the production example adds them: the chart fills in the selector.
    prod = objects(render(production_values()))
    for workload in (one(prod, "Deployment"), one(prod, "StatefulSet")):
        node, zone = spread_of(workload)
        assert node["topologyKey"] == "kubernetes.io/hostname"
        assert zone["topologyKey"] == "topology.kubernetes.io/zone"
        assert zone["labelSelector"] == {"matchLabels": workload["spec"]["selector"]["matchLabels"]}
    none = objects(render(data_values("recreate")))
    assert "topologySpreadConstraints" not in one(none, "Deployment")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in one(none, "StatefulSet")["spec"]["template"]["spec"]


def test_rollouts_replace_one_pod_at_a_time_by_default():
    objs = objects(render())
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    sts = one(objs, "StatefulSet")["spec"]
    # Parallel starts every shard at once; updates still go one shard at a time.
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}
    assert "maxUnavailable" not in sts["updateStrategy"]["rollingUpdate"]


# -- Replication: rolling upgrades that keep every topic's stream ------------------------


def router_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def test_router_rolling_update_waits_for_readiness_one_router_at_a_time():
    """RollingUpdate with no maxUnavailable replaces one router at a time and waits for
    it to be ready; readiness is /readyz on the admin port (back in the view, caught
    up); Parallel, since a router is ready only once a majority of routers has started."""
    objs = objects(render())
    sts = one(objs, "StatefulSet")["spec"]
    assert sts["updateStrategy"]["type"] == "RollingUpdate"
    assert "maxUnavailable" not in sts["updateStrategy"].get("rollingUpdate", {})
    assert sts["podManagementPolicy"] == "Parallel"
    c = router_container(objs)
    admin = next(p["containerPort"] for p in c["ports"] if p["name"] == "admin")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert env_of(c)["FANROUTE_ADMIN_PORT"] == str(admin)
    [budget] = [b for b in find(objs, "PodDisruptionBudget") if b["metadata"]["name"] == "fanroute-router"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_router_pod_template_does_not_change_with_the_namespaces_config(variant):
    """Routers reload the mounted namespaces file, so editing it must not roll them: no
    checksum of the ConfigMap on their pod template. Gateways keep theirs."""
    _, _, objs = variant
    annotations = one(objs, "StatefulSet")["spec"]["template"]["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("checksum/")], annotations
    assert "checksum/config" in one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_editing_the_namespaces_config_rolls_gateways_not_routers():
    before, after = objects(render()), objects(render({"namespacesConfig": "[namespaces.chat]\npublish = \"api\"\n"}))
    assert one(before, "StatefulSet")["spec"] == one(after, "StatefulSet")["spec"]
    assert one(before, "Deployment")["spec"]["template"] != one(after, "Deployment")["spec"]["template"]
    # The routers still mount the file (and reload it).
    c = router_container(after)
    path = Path(env_of(c)["FANROUTE_CONFIG"])
    assert any(m["mountPath"] == str(path.parent) and m["name"] == "config" for m in c["volumeMounts"])
    # Pod annotations from the values still reach the routers.
    objs = objects(render({"router": {"podAnnotations": {"example.com/team": "live"}}}))
    assert one(objs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "live"}


@pytest.mark.parametrize("copies", [None, 1, 3])
def test_replication_copies_reach_the_routers(copies):
    values = None if copies is None else {"replication": {"copies": copies}}
    objs = objects(render(values))
    assert env_of(router_container(objs))["FANROUTE_COPIES"] == str(copies or 2)
    # Never more copies than routers: one router holds one copy.
    few = objects(render({"router": {"replicas": 1}, "replication": {"copies": copies or 2}}))
    assert env_of(router_container(few))["FANROUTE_COPIES"] == "1"
    # A setting of the routers only.
    assert "FANROUTE_COPIES" not in env_of(one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("values", [
    {"router": {"pdb": {"maxUnavailable": 2}}},
    {"router": {"pdb": {"maxUnavailable": "50%"}}},  # 2 of 3 routers, rounded up
    {"router": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}}}},
    {"router": {"replicas": 5, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}}},
     "replication": {"copies": 2}},
    {"router": {"pdb": {"maxUnavailable": 3}}, "replication": {"copies": 3}},
])
def test_chart_refuses_budgets_that_could_take_every_copy_down(values):
    with pytest.raises(helm.HelmRenderError, match="replication.copies"):
        render(values)


@pytest.mark.parametrize("values", [
    {"router": {"pdb": {"maxUnavailable": 2}}, "replication": {"copies": 3}},
    {"router": {"pdb": {"maxUnavailable": "34%"}, "replicas": 3}, "replication": {"copies": 3}},
    {"router": {"pdb": {"maxUnavailable": 2}}, "replication": {"copies": 1}},  # nothing to keep
    {"router": {"pdb": {"enabled": False, "maxUnavailable": 2}}},
    {"router": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": {"maxUnavailable": 2}}}},
    {"router": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}}},
])
def test_chart_accepts_budgets_that_keep_a_copy(values):
    objs = objects(render(values))
    assert one(objs, "StatefulSet")


def test_update_strategies_follow_the_values():
    objs = objects(render(data_values("exposure")))
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}}
    sts = one(objs, "StatefulSet")["spec"]
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}
    # The other types carry no rollingUpdate (Kubernetes refuses one), though the
    # defaults under it are still in the merged values.
    objs = objects(render(data_values("recreate")))
    assert one(objs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert one(objs, "StatefulSet")["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_env_from_volumes_labels_and_priority_render_for_both_components():
    values = data_values("exposure")
    objs = objects(render(values))
    for workload, component in ((one(objs, "Deployment"), "gateway"), (one(objs, "StatefulSet"), "router")):
        v = values[component]
        pod = workload["spec"]["template"]
        spec = pod["spec"]
        [c] = spec["containers"]
        assert c["envFrom"] == v["envFrom"]
        names = [e["name"] for e in c["env"]]
        assert "FANROUTE_CLUSTER_SECRET" in names  # the chart's own variables are still set (and win)
        assert spec["priorityClassName"] == "fanroute-critical"
        assert v["podLabels"].items() <= pod["metadata"]["labels"].items()
        # Pod labels only: selectors and the chart's labels are untouched.
        assert not set(v["podLabels"]) & set(workload["spec"]["selector"]["matchLabels"])
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == component
        for volume in v["extraVolumes"]:
            assert volume in spec["volumes"]
        for mount in v["extraVolumeMounts"]:
            assert mount in c["volumeMounts"]
        # The chart's own volumes stay, and every mount has its volume.
        assert {"config", "tmp"} <= {vol["name"] for vol in spec["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= {vol["name"] for vol in spec["volumes"]}
    # The log format on both, the per-user limit on gateways (fanroute's defaults when unset).
    assert env_of(one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0])["FANROUTE_MAX_CONNECTIONS_PER_USER"] == "5"
    for _, pod in pod_specs(objs):
        assert env_of(pod["spec"]["containers"][0])["FANROUTE_LOG_FORMAT"] == "text"
    for _, pod in pod_specs(objects(render())):
        env = env_of(pod["spec"]["containers"][0])
        assert "FANROUTE_LOG_FORMAT" not in env and "FANROUTE_MAX_CONNECTIONS_PER_USER" not in env
    # Defaults: none of them.
    for workload in (o for o in objects(render()) if o["kind"] in ("Deployment", "StatefulSet")):
        spec = workload["spec"]["template"]["spec"]
        assert "envFrom" not in spec["containers"][0] and "priorityClassName" not in spec
        assert [v["name"] for v in spec["volumes"]] == ["config", "tmp"]
        assert set(workload["spec"]["template"]["metadata"]["labels"]) == {
            "helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by", "app.kubernetes.io/component"}


# -- Monitoring: the same rules and dashboard as ops/ ------------------------------------


def test_prometheus_rule_carries_the_rules_file():
    rule = one(objects(render(production_values())), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar():
    objs = objects(render())
    cm = next(c for c in find(objs, "ConfigMap") if c["metadata"]["name"] == "fanroute-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["fanroute.json"]) == json.loads(DASHBOARD.read_text())
    assert all(c["metadata"]["name"] != "fanroute-dashboard" for c in find(objects(render({"metrics": {"dashboard": {"enabled": False}}})), "ConfigMap"))


# The replication row and what each panel must read (router/REPLICATION.md's metrics).
REPLICATION_PANELS = {
    "Topics on a single copy": {"fanroute_router_topics_single_copy"},
    "Copies behind": {"fanroute_router_copies_behind"},
    "Publications refused for safety": {"fanroute_router_refused_unsafe_total"},
    "Failovers and hand-offs": {"fanroute_router_failovers_total", "fanroute_router_handoffs_total"},
    "Re-sync bytes": {"fanroute_router_resync_bytes_total"},
    "View number by router": {"fanroute_router_view"},
    "Ready by router": {"fanroute_router_ready"},
}


def dashboard_rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    current = None
    for panel in sorted(board["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            current.append(panel)
    return rows


def test_dashboard_has_the_replication_panels():
    """The chart's dashboard shows replication: one row with each panel on its metrics,
    per router (by shard) so a lagging or refusing router stands out."""
    cm = next(c for c in find(objects(render()), "ConfigMap") if c["metadata"]["name"] == "fanroute-dashboard")
    row = {p["title"]: p for p in dashboard_rows(json.loads(cm["data"]["fanroute.json"]))["Replication"]}
    assert set(row) == set(REPLICATION_PANELS)
    for title, metrics in REPLICATION_PANELS.items():
        exprs = [t["expr"] for t in row[title]["targets"]]
        used = {m for e in exprs for m in re.findall(r"\b(fanroute_\w+)\{", e)}
        assert used == metrics, (title, used)
        for e in exprs:
            assert 'job="fanroute-router"' in e and "by (shard)" in e, e
            if "_total{" in e:
                assert e.count("rate(") == 1, e  # counters as rates
    assert row["Re-sync bytes"]["fieldConfig"]["defaults"]["unit"] == "Bps"
    assert row["Ready by router"]["fieldConfig"]["defaults"]["max"] == 1


def test_rules_alert_on_single_copy_and_refusals_for_safety():
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    single = rules["FanrouteTopicsOnSingleCopy"]
    assert "fanroute_router_topics_single_copy" in single["expr"] and single["expr"].rstrip().endswith("> 0")
    assert re.fullmatch(r"\d+m", single["for"]) and int(single["for"][:-1]) >= 2
    assert "fanroute_router_refused_unsafe_total" in rules["FanroutePublicationsRefusedUnsafe"]["expr"]


def service_monitor_selects(sm: dict[str, Any], svc: dict[str, Any]) -> bool:
    """Whether the ServiceMonitor's selector (matchLabels, Exists/In expressions) picks the Service."""
    labels = svc["metadata"]["labels"]
    selector = sm["spec"]["selector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] in ("Exists", "In"), e
        if e["key"] not in labels or (e["operator"] == "In" and labels[e["key"]] not in e["values"]):
            return False
    return True


def test_service_monitor_scrapes_the_admin_services_under_the_rules_job_names():
    """Scraping follows the admin port: the ServiceMonitor picks the gateways' admin
    Service and the routers' headless Service, never the client Service."""
    objs = objects(render(production_values()))
    sm = one(objs, "ServiceMonitor")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]
    scraped = [svc for svc in find(objs, "Service") if service_monitor_selects(sm, svc)]
    assert sorted(s["metadata"]["name"] for s in scraped) == ["fanroute-gateway-admin", "fanroute-router-headless"]
    jobs = set()
    for svc in scraped:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert "admin" in {p["name"] for p in svc["spec"]["ports"]}
        jobs.add(svc["metadata"]["labels"][sm["spec"]["jobLabel"]])
    assert jobs == {"fanroute-gateway", "fanroute-router"}
    rules_jobs = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert rules_jobs == jobs


# -- The image the chart runs --------------------------------------------------------

DOCKERFILE = ROOT / "ops/Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_image_runs_fanroute_as_the_chart_user():
    steps = dockerfile_instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim", final[0][1])
    user = [arg for op, arg in final if op == "USER"][-1]
    pod = one(objects(render()), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    # runAsNonRoot can only verify a numeric USER; it must be the chart's user.
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["fanroute"]


def test_image_contents_build_the_package_with_its_entry_point(tmp_path):
    """Exactly what the Dockerfile copies is enough to build fanroute and its `fanroute`
    command (the wheel is built offline with the installed setuptools)."""
    context = tmp_path / "context"
    context.mkdir()
    copied = set()
    for op, arg in dockerfile_instructions():
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _ = arg.split()
            for src in sources:
                path = ROOT / src
                if path.is_dir():
                    shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__", "results"))
                    copied.add(f"!{src}/")
                else:
                    shutil.copy(path, context / src)
                    copied.add(f"!{src}")
    ignore = [line for line in (ROOT / "ops/Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*" and copied <= set(ignore), copied - set(ignore)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(context)],
        capture_output=True, text=True, timeout=240,
    )
    assert build.returncode == 0, build.stderr
    import zipfile

    [wheel] = out.glob("fanroute-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fanroute/cli.py" in names and "fanroute/router/server.py" in names and "fanroute/bench/fanout.py" in names
    assert any(n.startswith("fanroute/gateway/static/") for n in names)
    # One import namespace: nothing else claims a top-level name in a user's environment.
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"fanroute"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fanroute = fanroute.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # The runtime requirements hold only what gateways and routers import: none of the
    # bench extras (whatever pyproject.toml lists there) is among them.
    import tomllib

    bench = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]}
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    runtime = {re.split(r"[<>=!~\[; ]", line.removeprefix("Requires-Dist:").strip(), maxsplit=1)[0].lower()
               for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert bench >= {"rich", "hdrhistogram"} and runtime and not runtime & bench, runtime & bench


def test_chart_refuses_ordered_ready_routers_when_streams_are_replicated():
    with pytest.raises(helm.HelmRenderError, match="OrderedReady"):
        render({"router": {"podManagementPolicy": "OrderedReady"}})
    # One copy: a router is ready on its own, and the order is the operator's choice.
    objs = objects(render({"router": {"podManagementPolicy": "OrderedReady"}, "replication": {"copies": 1}}))
    assert one(objs, "StatefulSet")["spec"]["podManagementPolicy"] == "OrderedReady"
