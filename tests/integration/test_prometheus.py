"""A real Prometheus scrapes both nodes' merged endpoint (#19): Debian's /usr/bin/prometheus in the
testbed's resolver host, every second, ``<node>:15020/stats/prometheus`` of each node, found by
the README's scrape job from the DaemonSet's annotations (tests/integration/prometheus.py).

- Both nodes are scraped (``up == 1``): the merged text is valid exposition for Prometheus
  itself (it fails a whole scrape on a second ``# TYPE`` for one name).
- The agent's metrics answer PromQL (captured pods by node), and the node Envoy's own metrics are
  in the same scrape (``envoy_server_live``, the service's cluster counters after traffic); no
  ``envoy_istiocustom_`` name reaches Prometheus (renamed to Istio's, unit-tested on Envoy 1.40's
  own output in tests/unit/test_metrics_merge.py).
- Every PromQL of the node dashboard (dashboards/nodeagent-node.json) parses and returns data for
  the running nodes.
- Every expression collected from Istio's service and workload dashboards
  (tests/data/istio-dashboard-queries.yaml) parses on this Prometheus; they return data once the
  node Envoy emits Istio's standard metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import agent_pods, http_status
from tests.integration.prometheus import (
    JOB,
    NODE_DASHBOARD,
    Prometheus,
    PromQLError,
    grafana_expr,
    istio_dashboard_queries,
    prometheus,
)

pytestmark = pytest.mark.integration

NAME = "tbprom"
TOPOLOGY = f"""
name: {NAME}
nodes: [{{name: n1}}, {{name: n2}}]
namespaces:
  - {{name: shop, labels: {{nodeagent.io/mesh: enabled}}}}
pods:
  - {{name: web-1, namespace: shop, node: n1, serviceAccount: web, labels: {{app: web}},
     workload: {{type: fake-service, port: 80}}}}
  - {{name: client-1, namespace: shop, node: n2, serviceAccount: client, labels: {{app: client}}}}
  - {{name: client-2, namespace: shop, node: n1, serviceAccount: client, labels: {{app: client}}}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}},
     ports: [{{name: http, port: 8080, targetPort: 80}}]}}
"""
URL = "http://web.shop:8080/"
# Values for the Grafana variables of Istio's dashboards: real names of this testbed.
ISTIO_VARIABLES = {
    "qrep": "destination",
    "namespace": "shop",
    "workload": "web",
    "srcns": ".*",
    "srcwl": ".*",
    "dstsvc": ".*",
    "service": "web.shop.svc.cluster.local",
    "dstns": ".*",
    "dstwl": ".*",
    "dstcluster": ".*",
    "srccluster": ".*",
}


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        bed = Testbed.up(loads_topology(TOPOLOGY, "test_prometheus"), TOPOLOGY, "test_prometheus")
        # Cross-node and same-node traffic, so that the service's cluster stats exist.
        for client in ("shop/client-1", "shop/client-2"):
            assert http_status(bed.exec, client, URL) == "200"
        yield bed
    finally:
        down(NAME)


@pytest.fixture(scope="module")
def prom(tb: Testbed) -> Iterator[Prometheus]:
    with prometheus(tb) as running:
        running.wait_scraped()
        yield running


def test_both_nodes_merged_endpoints_are_scraped(prom: Prometheus) -> None:
    assert prom.values(f'up{{job="{JOB}"}}', "node") == {"n1": 1.0, "n2": 1.0}
    # The README's relabelling of the DaemonSet's pods: address, path and labels.
    targets = {t["labels"]["node"]: t for t in prom.active_targets()}
    for node, address in prom.targets.items():
        assert targets[node]["scrapeUrl"] == f"http://{address}/stats/prometheus"
        labels = targets[node]["labels"]
        assert (labels["namespace"], labels["pod"]) == ("nodeagent-system", f"nodeagent-{node}")
    # Each node's agent counts the scrapes it answered, and Envoy answered them all.
    prom.wait_until(f'nodeagent_scrapes_total{{job="{JOB}"}} > 2')
    failures = prom.values('nodeagent_scrape_failures_total{type="envoy"}', "node")
    assert failures == {"n1": 0.0, "n2": 0.0}


def test_captured_pods_by_node_answer_promql(tb: Testbed, prom: Prometheus) -> None:
    captured = prom.values('sum by (node) (nodeagent_pods{state="captured"})', "node")
    for node in ("n1", "n2"):
        pods = agent_pods(tb.name, node)
        assert captured[node] == sum(1 for r in pods.values() if r["state"] == "captured")
    assert captured == {"n1": 2.0, "n2": 1.0}


def test_envoys_own_metrics_are_in_the_merged_scrape(prom: Prometheus) -> None:
    assert prom.values("envoy_server_live", "node") == {"n1": 1.0, "n2": 1.0}
    # The clients' requests went through each node's Envoy, to the service's cluster. Envoy's
    # default cluster_name tag stops at the first dot of the service's name: the rest lands in
    # the metric's name (envoy_cluster_shop_svc_cluster_local_upstream_rq_total).
    service = r'envoy_cluster_name=~"outbound\\|8080\\|\\|web.*"'
    name = r'__name__=~"envoy_cluster_(.+_)?upstream_rq_total"'
    requests = prom.values(f"sum by (node) ({{{name}, {service}}})", "node")
    assert requests.get("n1", 0) >= 1 and requests.get("n2", 0) >= 1, requests
    # Istio's metrics reach Prometheus under Istio's names only.
    assert prom.query('count({__name__=~"envoy_istiocustom_.*"})') == []


def test_every_node_dashboard_query_returns_data(prom: Prometheus) -> None:
    dashboard = json.loads(NODE_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        for node in (".*", "n2"):  # "All", then one node
            found = prom.wait_until(grafana_expr(expr, {"node": node}), timeout=15)
            nodes = {s["metric"].get("node") for s in found}
            if node == "n2" and nodes != {None}:  # aggregated by node: only n2's series
                assert nodes == {"n2"}, (expr, nodes)


def test_istio_dashboard_queries_parse(prom: Prometheus) -> None:
    queries = istio_dashboard_queries()
    assert {q["dashboard"] for q in queries} == {"service", "workload"}
    for query in queries:
        prom.query(grafana_expr(query["expr"], ISTIO_VARIABLES))  # PromQLError if it does not
    with pytest.raises(PromQLError, match="bad_data"):
        prom.query("sum(rate(istio_requests_total[1m])")
