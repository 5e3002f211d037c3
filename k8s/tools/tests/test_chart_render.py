"""The chart renders what operators rely on: traffic rules, the KEK ring, the bundled NATS.

Each test renders the chart with the real helm (k8s/tools/get_helm.py) and reads the objects.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from get_helm import REPO_ROOT, ensure_helm

CHART = REPO_ROOT / "k8s" / "shoal"
CI = CHART / "ci"

Objects = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_helm()


def render(helm: Path, values: str, *sets: str) -> Objects:
    """The chart rendered as release "shoal" with a ci/ values file, by (kind, name)."""
    args = [str(helm), "template", "shoal", str(CHART), "-n", "shoal", "-f", str(CI / values)]
    for assignment in sets:
        args += ["--set", assignment]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return {
        (doc["kind"], doc["metadata"]["name"]): doc
        for doc in yaml.safe_load_all(result.stdout)
        if doc
    }


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def container_env(workload: dict[str, Any]) -> dict[str, Any]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container["env"]}


def test_gateway_from_keeps_scrapes_and_the_helm_test_pod(helm: Path) -> None:
    objects = render(helm, "external-nats-values.yaml")
    rules = objects["NetworkPolicy", "shoal-gateway"]["spec"]["ingress"]
    sources = [source for rule in rules for source in rule.get("from", [])]
    ingress_nginx = {"kubernetes.io/metadata.name": "ingress-nginx"}
    assert {"namespaceSelector": {"matchLabels": ingress_nginx}} in sources
    assert {"namespaceSelector": {}} in sources  # metricsFrom's default: Prometheus anywhere
    test_pod_labels = objects["Pod", "shoal-gateway-test"]["metadata"]["labels"]
    assert any(
        "podSelector" in source and matches(source["podSelector"]["matchLabels"], test_pod_labels)
        for source in sources
    )


def test_gateway_open_to_anyone_has_one_rule_without_from(helm: Path) -> None:
    objects = render(helm, "production-values.yaml")
    assert objects["NetworkPolicy", "shoal-gateway"]["spec"]["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}]},
        # /metrics is on its own port, open to metricsFrom only.
        {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]},
    ]


def test_metrics_on_their_own_port_by_default(helm: Path) -> None:
    objects = render(helm, "production-values.yaml")
    assert objects["ConfigMap", "shoal"]["data"]["SHOAL_METRICS_PORT"] == "9464"
    for name in ("gateway", "session"):
        container = objects["Deployment", f"shoal-{name}"]["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in container["containers"][0]["ports"]}
        assert ports["metrics"] == 9464
        service_ports = {p["name"] for p in objects["Service", f"shoal-{name}"]["spec"]["ports"]}
        assert service_ports == {"http", "metrics"}
    session_ingress = objects["NetworkPolicy", "shoal-session"]["spec"]["ingress"]
    assert session_ingress == [
        {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]}
    ]
    single = render(helm, "single-nats-values.yaml")
    assert "SHOAL_METRICS_PORT" not in single["ConfigMap", "shoal"]["data"]


def test_migrations_job_runs_shoal_migrate_before_the_services(helm: Path) -> None:
    objects = render(helm, "production-values.yaml")
    job = objects["Job", "shoal-migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["migrate"]
    assert container_env(job)["SHOAL_DATABASE_URL"] == {
        "secretKeyRef": {"name": "shoal-database", "key": "database-url"}
    }
    policy = objects["NetworkPolicy", "shoal-migrate"]
    assert policy["metadata"]["annotations"]["helm.sh/hook-weight"] == "-1"
    assert policy["spec"]["ingress"] == []
    assert objects["ConfigMap", "shoal"]["data"]["SHOAL_MIGRATE_ON_START"] == "false"
    plain = render(helm, "single-nats-values.yaml")
    assert ("Job", "shoal-migrate-1") in plain
    assert "annotations" not in plain["Job", "shoal-migrate-1"]["metadata"]
    argocd = render(helm, "external-nats-values.yaml")["Job", "shoal-migrate"]
    assert argocd["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    assert container_env(argocd)["SHOAL_DATABASE_URL"]["secretKeyRef"]["name"] == (
        "shoal-database-owner"
    )


@pytest.mark.parametrize(
    ("values", "open_egress"),
    [("production-values.yaml", False), ("single-nats-values.yaml", True)],
)
def test_scheduler_gets_webhook_egress_only_when_enabled(
    helm: Path, values: str, open_egress: bool
) -> None:
    egress = render(helm, values)["NetworkPolicy", "shoal-scheduler"]["spec"]["egress"]
    blocks = [
        peer["ipBlock"]["cidr"]
        for rule in egress
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]
    assert ("0.0.0.0/0" in blocks) is open_egress


def test_kek_ring_is_mounted_as_the_kek_file(helm: Path) -> None:
    keys = render(helm, "single-nats-values.yaml")["Deployment", "shoal-keys"]
    env = container_env(keys)
    assert "SHOAL_KEYS_KEK" not in env
    assert env["SHOAL_KEYS_KEK_FILE"] == "/etc/shoal/kek-ring/keks"
    assert env["SHOAL_KEYS_ACTIVE_KEK"] == "k2026"
    pod = keys["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kek-ring"]
    assert mount == {"name": "kek-ring", "mountPath": "/etc/shoal/kek-ring", "readOnly": True}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kek-ring"]
    assert volume["secret"]["secretName"] == "shoal-kek-ring"
    assert volume["secret"]["items"] == [{"key": "keks", "path": "keks"}]


def test_single_kek_stays_the_default(helm: Path) -> None:
    env = container_env(render(helm, "production-values.yaml")["Deployment", "shoal-keys"])
    assert env["SHOAL_KEYS_KEK"] == {"secretKeyRef": {"name": "shoal-keys", "key": "kek"}}
    assert "SHOAL_KEYS_KEK_FILE" not in env


def test_bundled_nats_is_a_three_server_cluster_the_services_can_reach(helm: Path) -> None:
    objects = render(helm, "production-values.yaml")
    nats = objects["StatefulSet", "shoal-nats"]
    assert nats["spec"]["replicas"] == 3
    conf = objects["ConfigMap", "shoal-nats-config"]["data"]["nats.conf"]
    for ordinal in range(3):
        assert f"nats://shoal-nats-{ordinal}.shoal-nats-headless.shoal.svc:6222" in conf
    assert 'sync_interval: "always"' in conf
    pod_labels = nats["spec"]["template"]["metadata"]["labels"]
    assert matches(objects["Service", "shoal-nats"]["spec"]["selector"], pod_labels)
    assert objects["ConfigMap", "shoal"]["data"]["SHOAL_NATS_URL"] == "nats://shoal-nats:4222"
    egress = objects["NetworkPolicy", "shoal-session"]["spec"]["egress"]
    nats_peers = [peer for rule in egress for peer in rule.get("to", []) if "podSelector" in peer]
    assert any(matches(peer["podSelector"]["matchLabels"], pod_labels) for peer in nats_peers)
    claim = nats["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_single_nats_server_has_no_cluster_block(helm: Path) -> None:
    objects = render(helm, "single-nats-values.yaml")
    assert objects["StatefulSet", "shoal-nats"]["spec"]["replicas"] == 1
    conf = objects["ConfigMap", "shoal-nats-config"]["data"]["nats.conf"]
    assert "cluster {" not in conf
    assert 'max_file_store: "4G"' in conf
    assert ("PodDisruptionBudget", "shoal-nats") not in objects


def test_session_service_is_a_deployment_by_default(helm: Path) -> None:
    objects = render(helm, "production-values.yaml")
    assert ("Deployment", "shoal-session") in objects
    assert ("StatefulSet", "shoal-session") in render(helm, "single-nats-values.yaml")


def test_api_limits_reach_the_gateway_only(helm: Path) -> None:
    objects = render(
        helm, "production-values.yaml", "apiLimits.ratePerKey=20", "apiLimits.burst=30"
    )
    gateway = container_env(objects["Deployment", "shoal-gateway"])
    assert gateway["SHOAL_RATE_LIMIT_PER_KEY"] == "20"
    assert gateway["SHOAL_RATE_LIMIT_BURST"] == "30"
    assert gateway["SHOAL_MAX_SOCKETS_PER_OWNER"] == "10000"
    assert gateway["SHOAL_MAX_SESSIONS_PER_OWNER"] == "10000"
    assert "SHOAL_RATE_LIMIT_PER_KEY" not in container_env(objects["Deployment", "shoal-keys"])


def test_api_limits_are_checked_by_the_schema(helm: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as caught:
        render(helm, "production-values.yaml", "apiLimits.burst=0")
    assert "apiLimits" in caught.value.stderr
