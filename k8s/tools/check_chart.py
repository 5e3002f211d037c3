"""Everything CI checks about the Helm chart, offline, with a real helm (``make chart``).

1. ``helm lint --strict`` with the defaults and with every ``ci/*.yaml``;
2. ``helm template`` of every ``ci/*.yaml`` (``production-values.yaml`` is the defaults plus the
   values an install must set);
3. ``kubernetes-validate --strict`` of each render for every version in KUBERNETES_VERSIONS;
4. the "restricted" Pod Security check of every rendered pod spec (``pod_security.py``);
5. the bundled NATS's rendered config parsed by the real nats-server (``nats-server -t``);
6. the PrometheusRule and the Grafana dashboard: PromQL that parses, over metrics the code
   defines (``monitoring.py``; ``promtool check rules`` too when one is on the PATH);
7. bad values rejected with the schema's or the guards' message (BAD_VALUES).

Exits non-zero on the first failing step, after printing what failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml
from get_helm import REPO_ROOT, ensure_helm
from monitoring import check_documents as check_monitoring
from monitoring import defined_metrics
from pod_security import check_documents

CHART = REPO_ROOT / "k8s" / "shoal"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
RELEASE, NAMESPACE = "shoal", "shoal"
VENV_BIN = Path(sys.executable).parent

# (why, `helm template` arguments, expected message); most start from production-values.yaml.
PRODUCTION = ("--values", str(PRODUCTION_VALUES))
BAD_VALUES: tuple[tuple[str, Sequence[str], str], ...] = (
    (
        "guard: the bare defaults lack the database Secret",
        [],
        "secrets.database.existingSecret is required",
    ),
    (
        "schema: an unknown log level",
        [*PRODUCTION, "--set", "config.logLevel=LOUD"],
        "at '/config/logLevel': value must be one of",
    ),
    (
        "schema: zero session partitions",
        [*PRODUCTION, "--set", "config.sessionPartitions=0"],
        "at '/config/sessionPartitions': minimum: got 0, want 1",
    ),
    (
        "schema: a misspelt top-level value",
        [*PRODUCTION, "--set", "replicaCount=3"],
        "additional properties 'replicaCount' not allowed",
    ),
    (
        "schema: a NATS cluster of two servers has no quorum",
        [*PRODUCTION, "--set", "nats.config.cluster.replicas=2"],
        "at '/nats/config/cluster/replicas': value must be one of 3, 5",
    ),
    (
        "guard: more stream replicas than NATS servers",
        [*PRODUCTION, "--set", "config.streamReplicas=5"],
        "config.streamReplicas cannot exceed nats.config.cluster.replicas",
    ),
    (
        "guard: a termination grace shorter than the drain",
        [*PRODUCTION, "--set", "services.gateway.terminationGracePeriodSeconds=10"],
        "services.gateway.terminationGracePeriodSeconds (10) must exceed",
    ),
    (
        "guard: the scheduler without its webhook secrets key",
        [*PRODUCTION, "--set", "secrets.scheduler.existingSecret="],
        "secrets.scheduler.existingSecret is required",
    ),
    (
        "guard: the keys service without any KEK",
        [*PRODUCTION, "--set", "secrets.keys.kekKey="],
        "the keys service needs a KEK",
    ),
    (
        "schema: an unknown migrations hook",
        [*PRODUCTION, "--set", "migrations.job.hook=flux"],
        "at '/migrations/job/hook': value must be one of",
    ),
    (
        "guard: NATS credentials both as a .creds file and as an NKey seed",
        [
            *PRODUCTION,
            "--set",
            "secrets.nats.files.existingSecret=nats-auth,secrets.nats.files.credsKey=a.creds"
            ",secrets.nats.files.nkeySeedKey=user.nk",
        ],
        "set credsKey or nkeySeedKey, not both",
    ),
    (
        "guard: a NATS client certificate without its key",
        [
            *PRODUCTION,
            "--set",
            "secrets.nats.files.existingSecret=nats-auth,secrets.nats.files.tlsCertKey=tls.crt",
        ],
        "tlsCertKey and tlsKeyKey go together",
    ),
    (
        "guard: a NATS credentials key without its Secret",
        [*PRODUCTION, "--set", "secrets.nats.files.credsKey=nats.creds"],
        "secrets.nats.files.existingSecret is required",
    ),
    (
        "guard: a KEK ring without the active KEK's id",
        [*PRODUCTION, "--set", "secrets.keys.kekRing.existingSecret=shoal-kek-ring"],
        "secrets.keys.kekRing.activeKek is required",
    ),
)


def step(title: str) -> None:
    print(f"== {title}", flush=True)


def run(command: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True)


def must(command: Sequence[str | Path]) -> str:
    result = run(command)
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(map(str, command))}\n{result.stdout}{result.stderr}")
    return result.stdout


def template(helm: Path, *args: str | Path) -> list[str | Path]:
    return [helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, *args]


def nats_configs(documents: Sequence[dict[str, object] | None]) -> list[str]:
    return [
        str(data["nats.conf"])
        for document in documents
        if document and document.get("kind") == "ConfigMap"
        for data in [document.get("data") or {}]
        if isinstance(data, dict) and "nats.conf" in data
    ]


def main() -> int:
    helm = ensure_helm()
    print(must([helm, "version", "--short"]).strip())
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)

        step("helm lint --strict")
        for values in (None, *CI_VALUES):
            values_args: list[str | Path] = ["--values", values] if values else []
            must([helm, "lint", "--strict", CHART, *values_args])
            print(f"  ok  {values.name if values else 'defaults'}")

        step("helm template")
        renders: dict[str, Path] = {}
        for values in CI_VALUES:
            rendered = must(template(helm, "--values", values))
            renders[values.name] = out / values.name
            renders[values.name].write_text(rendered)
            kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
            print(f"  ok  {values.name}: {len(kinds)} objects")

        for version in KUBERNETES_VERSIONS:
            step(f"kubernetes-validate --strict -k {version}")
            validate = VENV_BIN / "kubernetes-validate"
            must([validate, "--strict", "--quiet", "-k", version, *renders.values()])
            print(f"  ok  {len(renders)} renders")

        step("Pod Security Standard: restricted")
        for name, path in renders.items():
            checked, report = check_documents(list(yaml.safe_load_all(path.read_text())))
            if report or not checked:
                sys.exit("FAILED: " + name + "\n" + "\n".join(report or ["no pod spec rendered"]))
            print(f"  ok  {name}: {checked} pod specs")

        step("bundled NATS config (nats-server -t)")
        nats_server = shutil.which("nats-server", path=str(VENV_BIN)) or shutil.which("nats-server")
        if nats_server is None:
            sys.exit("FAILED: no nats-server to check the rendered NATS config with")
        for name, path in renders.items():
            for config in nats_configs(list(yaml.safe_load_all(path.read_text()))):
                conf = out / f"{name}.nats.conf"
                conf.write_text(config)
                result = subprocess.run(
                    [nats_server, "-c", str(conf), "-t"],
                    capture_output=True,
                    text=True,
                    env={"SERVER_NAME": "shoal-nats-0"},
                )
                if result.returncode != 0:
                    sys.exit(f"FAILED: {name}: {result.stdout}{result.stderr}")
                print(f"  ok  {name}")

        step("alert rules and dashboard: PromQL over the code's metrics")
        known = defined_metrics([REPO_ROOT / "libs" / "common" / "src", REPO_ROOT / "services"])
        monitored = 0
        for name, path in renders.items():
            checked, problems = check_monitoring(list(yaml.safe_load_all(path.read_text())), known)
            if problems:
                sys.exit("FAILED: " + name + "\n" + "\n".join(problems))
            if checked:
                print(f"  ok  {name}: {checked} rules and queries")
            monitored += checked
        if not monitored:
            sys.exit("FAILED: no ci/*.yaml renders the PrometheusRule or the dashboard")

        step("bad values are rejected with the expected message")
        for why, bad_args, expected in BAD_VALUES:
            result = run(template(helm, *bad_args))
            if result.returncode == 0 or expected not in result.stderr:
                sys.exit(
                    f"FAILED: {why}: expected an error containing {expected!r}, "
                    f"got exit {result.returncode}:\n{result.stderr}"
                )
            print(f"  ok  {why}: {expected!r}")
    print("chart: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
