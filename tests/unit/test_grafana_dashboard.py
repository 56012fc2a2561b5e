"""deploy/grafana/dynamo-flexkv.json reads only metrics that exist: the connector's `vllm:flexkv_*`
(from the metric table in integration/vllm/stats.py) and vLLM's own prefix-cache counters. The real
`vllm serve` test (tests/integration/test_vllm_serve.py) checks the same names on a live /metrics page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import vllm.v1.metrics.loggers as vllm_loggers

from dynamo_flexkv.integration.vllm.stats import COUNTER, GAUGE, HISTOGRAM, METRICS
from tests.helpers import DASHBOARD, dashboard_metric_names


def connector_metric_names(histogram_series: tuple[str, ...] = ("_count",)) -> set[str]:
    """As prometheus_client exposes them: a counter's samples end in `_total`, a gauge's don't, a
    histogram's in `_bucket`, `_count` and `_sum` (one of them is enough for a panel)."""
    suffixes = {COUNTER: ("_total",), GAUGE: ("",), HISTOGRAM: histogram_series}
    return {spec.name + suffix for spec in METRICS.values() for suffix in suffixes[spec.kind]}


def vllm_counter_names() -> set[str]:
    source = Path(vllm_loggers.__file__).read_text()
    return {f"{name}_total" for name in re.findall(r'name="(vllm:[a-z_]+)"', source)}


def test_every_panel_reads_metrics_that_exist():
    panels = dashboard_metric_names()
    assert panels and all(panels.values()), f"a panel without a metric: {panels}"
    known = connector_metric_names(("_bucket", "_count", "_sum")) | vllm_counter_names()
    unknown = {title: names - known for title, names in panels.items() if names - known}
    assert not unknown, f"panels read metrics nobody exports: {unknown}"


def test_every_connector_metric_has_a_panel():
    shown = set().union(*dashboard_metric_names().values())
    # a histogram is shown by any of its series
    shown |= {name.removesuffix(suffix) + "_count" for name in shown for suffix in ("_bucket", "_sum")}
    assert connector_metric_names() <= shown, f"not on the dashboard: {connector_metric_names() - shown}"


def test_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    assert all(t["expr"] and t["refId"] for p in dashboard["panels"] for t in p["targets"])
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
