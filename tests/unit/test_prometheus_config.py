"""What a user copies for metrics (#19): the README's Prometheus scrape config, the node dashboard
(dashboards/nodeagent-node.json) and the collected PromQL of Istio's dashboards. Offline, no root;
the queries' results against a real Prometheus are tests/integration/test_istio_metrics.py's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nodeagent.metrics import SCRAPE_PATHS

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DASHBOARD = ROOT / "dashboards" / "nodeagent-node.json"
ISTIO_QUERIES = ROOT / "tests" / "data" / "istio-dashboard-queries.yaml"
DAEMONSET = ROOT / "daemonset" / "daemonset.yaml"


def readme_scrape_config() -> str:
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return block


def test_readme_scrape_config_keeps_the_daemonsets_annotated_pods() -> None:
    config = yaml.safe_load(readme_scrape_config())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert job["honor_labels"] is True
    rules = {tuple(r.get("source_labels", [])): r for r in job["relabel_configs"]}
    keep = rules[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]
    assert (keep["action"], keep["regex"]) == ("keep", True)
    path = rules[("__meta_kubernetes_pod_annotation_prometheus_io_path",)]
    assert path["target_label"] == "__metrics_path__"
    node = rules[("__meta_kubernetes_pod_node_name",)]
    assert node["target_label"] == "node"
    # What the rules read is what the DaemonSet's pods carry.
    (daemonset,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in SCRAPE_PATHS
    assert annotations["prometheus.io/port"] == "15020"
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"] is True  # pod IP = node IP


def test_readme_scrape_config_is_valid_for_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus, installed by `make setup` as root) is missing")
    # Debian's build has no Kubernetes discovery ("field kubernetes_sd_configs not found"): the
    # job is checked with a file discovery in its place, the rest (relabelling) as written.
    parsed = yaml.safe_load(readme_scrape_config())
    (job,) = parsed["scrape_configs"]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(parsed))
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _declared_metrics() -> set[str]:
    """The metric names the agent declares (a literal "nodeagent_..." in its sources)."""
    names = set()
    for source in (ROOT / "nodeagent").rglob("*.py"):
        names |= set(re.findall(r'"(nodeagent_[a-z0-9_]+)"', source.read_text()))
    return names


def test_node_dashboard_covers_the_node_and_names_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    text = "\n".join(exprs)
    for family in (
        "nodeagent_pods",  # pods captured by state
        "nodeagent_xds_pushes_total",
        "nodeagent_xds_nacks_total",
        "nodeagent_cert_earliest_expiry_timestamp_seconds",
        "nodeagent_envoy_restarts_total",
        "envoy_server_uptime",  # Envoy's own, from the merged endpoint
    ):
        assert family in text, family
    declared = _declared_metrics()
    for name in set(re.findall(r"\b(nodeagent_[a-z0-9_]+)", text)):
        base = re.sub(r"_(total|bucket)$", "", name)
        assert name in declared or base in declared, name
    for expr in exprs:
        assert 'node=~"$node"' in expr, expr  # every panel follows the node variable
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "node"]
    assert variable["allValue"] == ".*"


def test_istio_dashboard_queries_are_cited_and_use_istios_metrics() -> None:
    data = yaml.safe_load(ISTIO_QUERIES.read_text())
    for source in data["sources"].values():
        assert source["repository"] == "istio/istio"
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    queries = data["queries"]
    assert len(queries) >= 20
    names = set()
    for query in queries:
        assert query["dashboard"] in data["sources"]
        assert ("panel" in query) != ("variable" in query)
        names |= set(re.findall(r"\b(istio_[a-z_]+)", query["expr"]))
    # The standard metrics the dashboards read (the _seconds variant is Istio's own fallback).
    assert names >= {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    }
