"""The restricted-profile checker passes a hardened pod and names each rule a bad pod breaks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pod_security import check_documents, violations

RESTRICTED_CONTAINER: dict[str, Any] = {
    "name": "app",
    "image": "example/app:1",
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}
RESTRICTED_POD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [RESTRICTED_CONTAINER],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def pod_with(**changes: Any) -> dict[str, Any]:
    """The restricted pod with top-level fields or the container's securityContext changed."""
    pod = copy.deepcopy(RESTRICTED_POD)
    container_security = changes.pop("container_security", None)
    if container_security is not None:
        pod["containers"][0]["securityContext"].update(container_security)
    pod.update(changes)
    return pod


def test_a_restricted_pod_passes() -> None:
    assert violations(RESTRICTED_POD) == []


def test_pod_level_non_root_and_seccomp_cover_the_containers() -> None:
    pod = copy.deepcopy(RESTRICTED_POD)
    del pod["containers"][0]["securityContext"]["runAsNonRoot"]
    del pod["containers"][0]["securityContext"]["seccompProfile"]
    assert violations(pod) == []


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (
            pod_with(container_security={"allowPrivilegeEscalation": True}),
            "allowPrivilegeEscalation must be false",
        ),
        (pod_with(container_security={"privileged": True}), "privileged must be false"),
        (pod_with(container_security={"runAsNonRoot": False}), "runAsNonRoot must be true"),
        (pod_with(container_security={"runAsUser": 0}), "runAsUser must not be 0"),
        (
            pod_with(container_security={"capabilities": {"drop": ["NET_RAW"]}}),
            "capabilities.drop must include ALL",
        ),
        (
            pod_with(container_security={"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}),
            "capabilities.add may only hold NET_BIND_SERVICE",
        ),
        (
            pod_with(container_security={"seccompProfile": {"type": "Unconfined"}}),
            "seccompProfile.type",
        ),
        (pod_with(hostNetwork=True), "hostNetwork must be false"),
        (pod_with(hostPID=True), "hostPID must be false"),
        (
            pod_with(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
            "hostPath volumes are forbidden",
        ),
        (
            pod_with(volumes=[{"name": "nfs", "nfs": {"server": "x", "path": "/"}}]),
            "is not allowed",
        ),
        (
            pod_with(
                securityContext={
                    "runAsNonRoot": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                    "sysctls": [{"name": "kernel.msgmax", "value": "1"}],
                }
            ),
            "not a safe sysctl",
        ),
    ],
)
def test_a_bad_pod_is_caught(pod: dict[str, Any], expected: str) -> None:
    found = violations(pod)
    assert any(expected in line for line in found), found


def test_a_container_without_any_security_context_breaks_every_restricted_rule() -> None:
    pod = {"containers": [{"name": "bare", "image": "busybox"}]}
    found = violations(pod)
    assert len(found) == 4, found  # privilege escalation, non-root, seccomp, capabilities


def test_host_ports_and_init_containers_are_checked() -> None:
    pod = copy.deepcopy(RESTRICTED_POD)
    pod["initContainers"] = [
        {**RESTRICTED_CONTAINER, "name": "init", "ports": [{"containerPort": 80, "hostPort": 80}]}
    ]
    assert violations(pod) == ["initContainers[init]: hostPort 80 is forbidden"]


def test_workload_kinds_are_unwrapped_and_named_in_the_report() -> None:
    bad = pod_with(container_security={"allowPrivilegeEscalation": True})
    documents = [
        {"kind": "Deployment", "metadata": {"name": "web"}, "spec": {"template": {"spec": bad}}},
        {
            "kind": "CronJob",
            "metadata": {"name": "nightly"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": RESTRICTED_POD}}}},
        },
        {"kind": "ConfigMap", "metadata": {"name": "settings"}},
        None,
    ]
    checked, report = check_documents(documents)
    assert checked == 2
    assert report == ["Deployment/web: containers[app]: allowPrivilegeEscalation must be false"]
