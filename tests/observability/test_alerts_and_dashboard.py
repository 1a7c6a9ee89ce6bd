"""deploy/prometheus and deploy/grafana against the real thing.

- promtool (Debian's, installed by set-up) checks the alert rules, runs their unit tests
  (deploy/prometheus/alerts.test.yml: each alert fires on the series it should, and only on them)
  and checks both Prometheus configurations.
- Every metric name in an alert expression or a dashboard query is one that a running product
  really exposes: the five services' /metrics, Envoy's /stats/prometheus, and the /metrics of each
  llama-server found through the Supervisor's file service discovery, exactly as Prometheus would.
- The dashboard has the panels operators need, all on the provisioned data source.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.common import binaries
from tests.fixtures.parts import REPO_ROOT, require_part
from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.observability.metric_names import PROMETHEUS_SERIES, exposed_names, promql_metric_names

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "lmcluster.json"


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    promtool = require_part(binaries.promtool_binary)
    result = subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    assert "SUCCESS: 10 rules found" in _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool("test", "rules", "alerts.test.yml")


def test_promtool_accepts_both_prometheus_configurations(tmp_path: Path) -> None:
    _promtool("check", "config", "prometheus.local.yml")
    # The deployment's file, with its rule file where the compose file mounts it from.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    _promtool("check", "config", str(tmp_path / "prometheus.yml"))


def _alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_the_alerts_the_issue_asks_for_exist() -> None:
    expressions = _alert_expressions()
    assert "lmc_cache_lookups_total" in expressions["LmcCacheHitRatioLow"]
    assert "> 5" in expressions["LmcApiErrors"] and "> 5" in expressions["LmcServiceErrors"]
    assert "> 0.90" in expressions["LmcKvCacheNearlyFull"]
    assert "lmc_router_queue_depth) > 10" in expressions["LmcQueueDepthHigh"]
    assert 'state="FAILED"' in expressions["LmcBackendFailed"]
    assert "lmc_supervisor_backend_restarts_total" in expressions["LmcBackendCrashLooping"]


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lmcluster-overview"
    titles = [panel["title"] for panel in _panels()]
    assert len(titles) == len(set(titles))
    for wanted in (
        r"^Latency p50 / p95 / p99", r"^Time to first token", r"^Hit ratio", r"^Lookups by result",
        r"^Rejected candidates", r"^Tokens/s", r"^Backends by state", r"^Queue depth", r"^Errors",
        r"^Slots busy", r"^KV cache usage", r"^Embedding batch size",
    ):  # fmt: skip
        assert any(re.search(wanted, title) for title in titles), f"no panel {wanted!r} in {titles}"
    latency = next(panel for panel in _panels() if panel["title"].startswith("Latency"))
    quantiles = {re.match(r"histogram_quantile\((0\.\d+)", t["expr"]).group(1) for t in latency["targets"]}  # type: ignore[union-attr]
    assert {"0.50", "0.95", "0.99"} <= quantiles
    # Every panel queries the provisioned Prometheus data source.
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prometheus_uid = next(d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus")
    for panel in _panels():
        assert panel["datasource"]["uid"] == prometheus_uid, panel["title"]
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "lmcluster.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_promql_name_extraction() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, cache) (rate(x_bucket{a="b{c}",d=~"e|f"}[$__rate_interval]))) / 1e3'
    ) == {"x_bucket"}
    assert promql_metric_names("max(a) == 0 and max(b{state=\"READY\"} offset 5m) > 1/60 or llamacpp:c") == {
        "a", "b", "llamacpp:c",
    }  # fmt: skip
    assert exposed_names("# TYPE h histogram\n# TYPE c_total counter\ng{x=\"1\"} 2\n") >= {
        "h_bucket", "h_count", "h_sum", "c_total", "g",
    }  # fmt: skip


# --- against a running product ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed(traced_stack: Stack) -> set[str]:
    """Every metric name the running product exposes, gathered as Prometheus would scrape it."""
    # Some traffic first, so that every labelled family has children (a miss and a hit).
    body = {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    for _ in range(2):
        assert httpx.post(f"{traced_stack.base_url}/chat/completions", json=body, timeout=120).status_code == 200
    names: set[str] = set(PROMETHEUS_SERIES)
    for service, url in traced_stack.metrics.items():
        page = httpx.get(url, timeout=10).text
        own = exposed_names(page)
        assert "lmc_grpc_server_handled_total" in own, f"{service} serves no RPC metrics at {url}"
        assert any(name.startswith(f"lmc_{service}_") for name in own), f"{service} serves none of its own metrics"
        names |= own
    names |= exposed_names(httpx.get(f"{traced_stack.admin_url}/stats/prometheus", timeout=10).text)

    # The llama-servers, found the way deploy/prometheus finds them: the Supervisor's file_sd file.
    targets_file = traced_stack.log_path.parent / "targets" / "llama-servers.json"
    groups = json.loads(targets_file.read_text())
    assert groups and all(set(group) == {"targets", "labels"} for group in groups), groups
    for group in groups:
        assert {"backend", "model", "variant"} <= set(group["labels"]), group
        for target in group["targets"]:
            names |= exposed_names(httpx.get(f"http://{target}/metrics", timeout=10).text)
    assert any(name.startswith("llamacpp:") for name in names)
    return names


@pytest.mark.slow
def test_every_alert_names_metrics_the_product_exposes(exposed: set[str]) -> None:
    for alert, expr in _alert_expressions().items():
        names = promql_metric_names(expr)
        assert names, f"{alert}: no metric in {expr!r}"
        missing = names - exposed
        assert not missing, f"{alert} asks for {sorted(missing)}, which nothing exposes"


@pytest.mark.slow
def test_every_dashboard_query_names_metrics_the_product_exposes(exposed: set[str]) -> None:
    for panel in _panels():
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            missing = names - exposed
            assert not missing, f"panel {panel['title']!r} asks for {sorted(missing)}, which nothing exposes"
