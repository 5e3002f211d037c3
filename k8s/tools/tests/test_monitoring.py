"""The monitoring check refuses PromQL that does not parse and metrics the code lacks."""

from __future__ import annotations

from get_helm import REPO_ROOT
from monitoring import check_dashboard, check_rules, defined_metrics


def test_rules_must_parse_and_name_metrics_the_code_defines() -> None:
    known = defined_metrics([REPO_ROOT / "libs" / "common" / "src", REPO_ROOT / "services"])
    assert {"shoal_http_requests_total", "shoal_session_fenced_writes_total"} <= known
    good = {
        "alert": "A",
        "expr": "rate(shoal_http_requests_total[5m]) > 0",
        "labels": {"severity": "x"},
    }
    histogram = {
        "record": "r:p99",
        "expr": "histogram_quantile(0.99, rate(shoal_http_request_duration_seconds_bucket[5m]))",
    }
    bad = {"alert": "B", "expr": "rate(shoal_nope_total[5m]", "labels": {}}
    document = {"spec": {"groups": [{"name": "g", "rules": [good, histogram, bad]}]}}
    checked, problems = check_rules(document, known)
    assert checked == 3
    assert problems == [
        "B: an alert without a severity label",
        "B: not PromQL: unclosed left parenthesis",
        "B: no such metric in the code: shoal_nope_total",
    ]


def test_dashboard_queries_are_checked_with_variables_filled_in() -> None:
    panel = {"id": 1, "title": "t", "targets": [{"expr": 'sum(shoal_x{namespace="$namespace"})'}]}
    checked, problems = check_dashboard({"panels": [panel]}, {"shoal_x"})
    assert (checked, problems) == (1, [])
