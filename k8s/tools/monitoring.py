"""Checks of the chart's monitoring objects: the PrometheusRule's rules and the Grafana
dashboard's queries parse as PromQL (promql-parser, the Rust parser Prometheus-compatible
databases use) and name only metrics the code defines. ``promtool check rules`` runs as well
when a promtool is on the PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import promql_parser
import yaml

_DEFINED = re.compile(r"""["'](shoal_[a-z0-9_]+)["']""")
_USED = re.compile(r"(?<![:\w])shoal_[a-z0-9_]+")
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum")


def defined_metrics(sources: Iterable[Path]) -> set[str]:
    """Every ``shoal_*`` metric name a Python source under ``sources`` declares."""
    names: set[str] = set()
    for root in sources:
        for path in root.rglob("*.py"):
            names |= set(_DEFINED.findall(path.read_text()))
    return names


def _unknown_metrics(expr: str, known: set[str]) -> list[str]:
    unknown = []
    for name in _USED.findall(expr):
        base = next((name.removesuffix(s) for s in _SERIES_SUFFIXES if name.endswith(s)), name)
        if name not in known and base not in known:
            unknown.append(name)
    return unknown


def _check_expr(where: str, expr: str, known: set[str]) -> list[str]:
    problems = []
    try:
        promql_parser.parse(expr)
    except ValueError as exc:
        problems.append(f"{where}: not PromQL: {exc}")
    problems += [f"{where}: no such metric in the code: {m}" for m in _unknown_metrics(expr, known)]
    return problems


def check_rules(document: Mapping[str, Any], known: set[str]) -> tuple[int, list[str]]:
    """(rules checked, problems) of a PrometheusRule."""
    problems: list[str] = []
    checked = 0
    for group in document["spec"]["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            if not name or ("alert" in rule) == ("record" in rule):
                problems.append(f"{group['name']}: a rule needs exactly one of alert/record")
                continue
            if "alert" in rule and "severity" not in (rule.get("labels") or {}):
                problems.append(f"{name}: an alert without a severity label")
            problems += _check_expr(name, str(rule["expr"]), known)
            checked += 1
    promtool = shutil.which("promtool")
    if promtool is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            yaml.safe_dump({"groups": document["spec"]["groups"]}, file)
            file.flush()
            result = subprocess.run(
                [promtool, "check", "rules", file.name], capture_output=True, text=True
            )
            if result.returncode != 0:
                problems.append(f"promtool check rules: {result.stdout}{result.stderr}")
    return checked, problems


def check_dashboard(dashboard: Mapping[str, Any], known: set[str]) -> tuple[int, list[str]]:
    """(queries checked, problems) of a Grafana dashboard."""
    problems: list[str] = []
    checked = 0
    ids = [panel.get("id") for panel in dashboard["panels"]]
    if len(set(ids)) != len(ids):
        problems.append("dashboard: panel ids repeat")
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            # Grafana's variables are not PromQL: give them a plain value to parse.
            expr = str(target["expr"]).replace("$namespace", "shoal")
            problems += _check_expr(f"panel {panel['title']!r}", expr, known)
            checked += 1
    return checked, problems


def check_documents(
    documents: Sequence[dict[str, Any] | None], known: set[str]
) -> tuple[int, list[str]]:
    """(rules and queries checked, problems) of every PrometheusRule and dashboard rendered."""
    checked, problems = 0, []
    for document in documents:
        if not document:
            continue
        if document.get("kind") == "PrometheusRule":
            count, found = check_rules(document, known)
        elif document.get("kind") == "ConfigMap" and "shoal.json" in (document.get("data") or {}):
            count, found = check_dashboard(json.loads(document["data"]["shoal.json"]), known)
        else:
            continue
        checked += count
        problems += found
    return checked, problems
