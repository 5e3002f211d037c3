"""Check rendered Kubernetes manifests against the "restricted" Pod Security Standard.

The rules are the baseline and restricted profiles of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy version "latest"),
applied to every pod template in the manifests: Pods, Deployments, StatefulSets, DaemonSets,
ReplicaSets, Jobs and CronJobs. What the admission controller would reject, this reports, so a
chart change that weakens a pod fails CI instead of an install.

    python k8s/tools/pod_security.py rendered.yaml ...   # exit 1 and one line per violation
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

Spec = Mapping[str, Any]

# Baseline: host namespaces, privileged, hostPath, host ports, /proc mount, sysctls, SELinux,
# AppArmor, Windows host process. Restricted adds the rest.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
ALLOWED_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
ALLOWED_APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
ALLOWED_SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _containers(spec: Spec) -> Iterator[tuple[str, Spec]]:
    for field in CONTAINER_LISTS:
        for container in spec.get(field) or []:
            yield f"{field}[{container.get('name', '?')}]", container


def _pod_level(spec: Spec) -> list[str]:
    found = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field} must be false")
    security = spec.get("securityContext") or {}
    if (security.get("windowsOptions") or {}).get("hostProcess"):
        found.append("securityContext.windowsOptions.hostProcess must be false")
    for sysctl in security.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    found += _selinux("securityContext", security)
    found += _apparmor("securityContext", security)
    if security.get("runAsUser") == 0:
        found.append("securityContext.runAsUser must not be 0")
    seccomp = (security.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ALLOWED_SECCOMP_TYPES:
        found.append(
            f"securityContext.seccompProfile.type must be RuntimeDefault or Localhost, "
            f"not {seccomp}"
        )
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"volumes[{volume.get('name')}]: hostPath volumes are forbidden")
        elif not kinds <= ALLOWED_VOLUME_TYPES:
            found.append(f"volumes[{volume.get('name')}]: type {sorted(kinds)} is not allowed")
    return found


def _selinux(where: str, security: Spec) -> list[str]:
    options = security.get("seLinuxOptions") or {}
    found = []
    if options.get("type", "") not in ALLOWED_SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {options['type']} is not allowed")
    for field in ("user", "role"):
        if options.get(field):
            found.append(f"{where}.seLinuxOptions.{field} must not be set")
    return found


def _apparmor(where: str, security: Spec) -> list[str]:
    profile = (security.get("appArmorProfile") or {}).get("type")
    if profile is not None and profile not in ALLOWED_APPARMOR_TYPES:
        return [f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost, not {profile}"]
    return []


def _container_level(spec: Spec, where: str, container: Spec) -> list[str]:
    pod_security = spec.get("securityContext") or {}
    security = container.get("securityContext") or {}
    found = []
    if security.get("privileged"):
        found.append(f"{where}: privileged must be false")
    if (security.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"{where}: windowsOptions.hostProcess must be false")
    if security.get("procMount", "Default") != "Default":
        found.append(f"{where}: procMount must be Default")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            found.append(f"{where}: hostPort {port['hostPort']} is forbidden")
    found += _selinux(where, security)
    found += _apparmor(where, security)
    if security.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation must be false")
    if security.get("runAsNonRoot") is False or not (
        security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")
    ):
        found.append(f"{where}: runAsNonRoot must be true (pod or container)")
    if security.get("runAsUser") == 0:
        found.append(f"{where}: runAsUser must not be 0")
    seccomp = (security.get("seccompProfile") or {}).get("type") or (
        pod_security.get("seccompProfile") or {}
    ).get("type")
    if seccomp not in ALLOWED_SECCOMP_TYPES:
        found.append(
            f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container)"
        )
    capabilities = security.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        found.append(f"{where}: capabilities.drop must include ALL")
    added = set(capabilities.get("add") or []) - ALLOWED_ADDED_CAPABILITIES
    if added:
        found.append(
            f"{where}: capabilities.add may only hold NET_BIND_SERVICE, not {sorted(added)}"
        )
    return found


def violations(spec: Spec) -> list[str]:
    """Every restricted-profile rule a pod spec breaks (empty when it passes)."""
    found = _pod_level(spec)
    for where, container in _containers(spec):
        found += _container_level(spec, where, container)
    return found


def pod_specs(document: Spec) -> Iterator[Spec]:
    """The pod spec(s) a manifest creates, whatever workload kind carries them."""
    kind = document.get("kind")
    spec = document.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def check_documents(documents: Sequence[Spec | None]) -> tuple[int, list[str]]:
    """(pods checked, "Kind/name: violation" lines) over rendered manifests."""
    checked, report = 0, []
    for document in documents:
        if not document:
            continue
        name = f"{document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        for spec in pod_specs(document):
            checked += 1
            report += [f"{name}: {line}" for line in violations(spec)]
    return checked, report


def main(paths: Sequence[str]) -> int:
    total, failures = 0, []
    for path in paths:
        checked, report = check_documents(list(yaml.safe_load_all(Path(path).read_text())))
        total += checked
        failures += [f"{path}: {line}" for line in report]
    for line in failures:
        print(line)
    if total == 0:
        print("pod_security: no pod spec found in", ", ".join(paths))
        return 1
    print(f"pod_security: {total} pod specs checked, {len(failures)} violations (restricted)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
