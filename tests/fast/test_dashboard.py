"""The Grafana dashboard (deploy/grafana/nomoat.json) parses, is laid out as
Grafana expects, and every query names only metrics and labels that nomoat's
/metrics exports (read from a running gateway, not from a list)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics_names import GENAI_LABELS, NOMOAT_LABELS
from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .support import pool

pytestmark = pytest.mark.anyio

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "nomoat.json"
# A metric name in PromQL: nomoat's and the GenAI conventions' prefixes.
METRIC = re.compile(r"\b((?:nomoat|gen_ai)_[a-z0-9_]+)")
# Labels a query groups by or matches on.
GROUPING = re.compile(r"\bby \(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!=|!~|=)")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


async def exported(gw: InProcessGateway) -> tuple[set[str], set[str]]:
    """The sample names /metrics can show, and every label it shows."""
    text = (await gw.http.get("/metrics")).text
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        for sample in family.samples:
            labels.update(sample.labels)
    return names, labels


def test_the_dashboard_parses_and_is_laid_out() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "nomoat"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    for expr in queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


async def test_every_query_names_a_metric_nomoat_exports(start: Start) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    hooks = [{"type": "shout", "name": "loud"}]
    async with start(pool("a", hooks=hooks)) as gw:
        # One request, so that the labelled families have samples (labels).
        assert (
            await gw.http.post(
                "/v1/chat/completions",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "stream": True,
                },
            )
        ).status_code == 200
        names, labels = await exported(gw)
    used_metrics: set[str] = set()
    for expr in queries(dashboard):
        # Label names (gen_ai_token_type) are no metrics: grouping and matchers out.
        found = set(METRIC.findall(GROUPING.sub("", MATCHERS.sub("", expr))))
        assert found, expr
        assert found <= names, (expr, found - names)
        used_metrics |= found
        grouped = {
            label.strip()
            for group in GROUPING.findall(expr)
            for label in group.split(",")
            if label.strip()
        }
        matched = {label for group in MATCHERS.findall(expr) for label in LABEL.findall(group)}
        # Seen on a sample, or declared (a family may have no sample yet).
        known = labels | {*GENAI_LABELS, *NOMOAT_LABELS, "le"}
        assert grouped | matched <= known, (expr, (grouped | matched) - known)
    # The GenAI metrics and the request counters are all on the dashboard.
    for name in (
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "gen_ai_client_operation_duration_seconds_bucket",
        "gen_ai_client_token_usage_sum",
        "nomoat_requests_total",
        "nomoat_requests_in_flight",
        "nomoat_retries_total",
        "nomoat_fallbacks_total",
        "nomoat_cooldowns_total",
        "nomoat_hook_duration_seconds_bucket",
        "nomoat_adapter_loads_total",
    ):
        assert name in used_metrics, name
