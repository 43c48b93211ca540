"""Istio's standard metrics from the node Envoys (issue #19; translate/istio_stats.py).

Istio is the specification: istio.io/latest/docs/reference/config/metrics/ (names, types and
labels: ``istio_requests_total`` with ``reporter``, ``source_workload``, ...; TCP's
``istio_tcp_*``), and what Istio reports where it does not know a value: ``unknown``
(e.g. the source of a caller outside the mesh). Workloads are named as Istio's injector names
them from owner references (the testbed's pods stand for Deployments: a ReplicaSet owns them).

One S1-like chain across both nodes: sleep (n1) -> web-api (n1, the same-node fast path) ->
recommendation (n2, mTLS between nodes) -> purchase-history (n2); a caller outside the mesh
(default namespace, plaintext); a TCP service; failures with their response flags. A real
Prometheus (Debian's, tests/integration/prometheus.py) scrapes both nodes' merged :15020 endpoint
as the README's scrape job does: the issue's PromQL, Istio's dashboard panels, the node
dashboard (dashboards/nodeagent-node.json) and Envoy's own metrics answer from it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from nodeagent.testbed.cluster import Testbed
from tests.integration.helpers import (
    agent_pods,
    apply_docs,
    node_get,
    pod,
    running_testbed,
    topology_text,
)
from tests.integration.prometheus import (
    JOB,
    NODE_DASHBOARD,
    Prometheus,
    PromQLError,
    grafana_expr,
    istio_dashboard_queries,
    prometheus,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

NAME = "tbmetrics"
NS = "istioinaction"
WEB_API = f"http://web-api.{NS}:8080/"
MERGED = "http://127.0.0.1:15020/stats/prometheus"


def _topology() -> str:
    def fake(port: int, upstream: str = "", **env: str) -> dict[str, object]:
        if upstream:
            env["UPSTREAM_URIS"] = upstream
        return {"type": "fake-service", "port": port, "env": env}

    pods = [
        pod("sleep", "n1", {"app": "sleep"}, namespace=NS),
        pod("web-api", "n1", {"app": "web-api", "version": "v1"}, namespace=NS,
            workload=fake(8080, f"http://recommendation.{NS}:8080")),
        pod("recommendation", "n2", {"app": "recommendation", "version": "v1"}, namespace=NS,
            workload=fake(8080, f"http://purchase-history.{NS}:8080")),
        pod("purchase-history-v1", "n2", {"app": "purchase-history", "version": "v1"},
            namespace=NS, workload=fake(8080)),
        pod("db", "n2", {"app": "db"}, namespace=NS, workload=fake(9000)),
        pod("broken", "n1", {"app": "broken"}, namespace=NS,
            workload=fake(8080, ERROR_RATE="1", ERROR_CODE="500")),
        pod("slow", "n1", {"app": "slow"}, namespace=NS, workload=fake(8080, DELAY="1")),
        # Outside the mesh (namespace default is not in it): Istio's "unknown" source.
        pod("outsider", "n1", {"app": "outsider"}),
    ]  # fmt: skip
    for p in pods:  # each stands for a Deployment named after its pod (workload = pod name)
        p["deployment"] = p["name"]
    services = [
        {"name": name, "namespace": NS, "selector": {"app": name},
         "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}
        for name in ("web-api", "recommendation", "purchase-history", "broken", "nobody", "slow")
    ]  # fmt: skip
    services.append(
        {"name": "db", "namespace": NS, "selector": {"app": "db"},
         "ports": [{"name": "tcp", "port": 9000, "targetPort": 9000}]}
    )  # fmt: skip
    return topology_text(NAME, pods, services, mesh=(NS,))


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with running_testbed(_topology(), "test_istio_metrics") as bed:
        yield bed


_SERIES = re.compile(r"^(istio_\w+?)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series(tb: Testbed, name: str) -> list[tuple[dict[str, str], float]]:
    """Every series of Istio metric NAME both nodes export on their merged :15020 endpoint
    (labels, value)."""
    found = []
    for node in ("n1", "n2"):
        for line in node_get(tb.name, node, MERGED).splitlines():
            m = _SERIES.match(line)
            if m and m.group(1) == name:
                found.append((dict(_LABEL.findall(m.group(2))), float(m.group(3))))
    return found


def total(tb: Testbed, name: str, **labels: str) -> float:
    return sum(v for got, v in series(tb, name) if all(got.get(k) == w for k, w in labels.items()))


def curl(tb: Testbed, caller: str, url: str) -> str:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", url]
    return tb.exec(caller, argv).stdout


def side(prefix: str, workload: str, app: str = "", version: str = "unknown") -> dict[str, str]:
    """The labels Istio gives one side: a mesh workload of NS with its service account."""
    return {
        f"{prefix}_workload": workload,
        f"{prefix}_workload_namespace": NS,
        f"{prefix}_principal": f"spiffe://cluster.local/ns/{NS}/sa/{app or workload}",
        f"{prefix}_app": app or workload,
        f"{prefix}_version": version,
        f"{prefix}_canonical_service": app or workload,
        f"{prefix}_canonical_revision": version if version != "unknown" else "latest",
        f"{prefix}_cluster": "Kubernetes",
    }


def service_labels(name: str) -> dict[str, str]:
    return {
        "destination_service": f"{name}.{NS}.svc.cluster.local",
        "destination_service_name": name,
        "destination_service_namespace": NS,
    }


def test_requests_along_the_chain_are_labelled_by_workload_on_both_reporters(tb: Testbed) -> None:
    for _ in range(3):
        assert curl(tb, f"{NS}/sleep", WEB_API) == "200"
    sleep = side("source", "sleep")
    web_api = side("destination", "web-api", version="v1")
    web_api_src = side("source", "web-api", version="v1")
    recommendation = side("destination", "recommendation", version="v1")
    recommendation_src = side("source", "recommendation", version="v1")
    history = side("destination", "purchase-history-v1", app="purchase-history", version="v1")
    history["destination_principal"] = f"spiffe://cluster.local/ns/{NS}/sa/purchase-history"
    ok = {"request_protocol": "http", "response_code": "200", "response_flags": "-"}
    hops = [
        # sleep -> web-api: same node (n1), the fast path
        {**sleep, **web_api, **service_labels("web-api"), **ok},
        # web-api (n1) -> recommendation (n2): across nodes, mTLS
        {**web_api_src, **recommendation, **service_labels("recommendation"), **ok},
        # recommendation -> purchase-history: same node (n2)
        {**recommendation_src, **history, **service_labels("purchase-history"), **ok},
    ]
    for labels in hops:
        # Istio's client side does not know the server's policy; the server saw mTLS.
        for reporter, security in (("source", "unknown"), ("destination", "mutual_tls")):
            want = {**labels, "reporter": reporter, "connection_security_policy": security}
            wait_for(
                lambda w=want: total(tb, "istio_requests_total", **w) >= 3,
                10,
                lambda w=want: f"{w}\n" + "\n".join(map(str, series(tb, "istio_requests_total"))),
            )
    # The duration and size histograms carry the same labels (Envoy flushes them every 5 s).
    hop = {**hops[1], "reporter": "destination"}
    for histogram in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        wait_for(lambda h=histogram: total(tb, f"{h}_count", **hop) >= 3, 15, histogram)
    assert total(tb, "istio_response_bytes_sum", **hop) > 0


def test_a_caller_outside_the_mesh_is_an_unknown_source(tb: Testbed) -> None:
    assert curl(tb, "default/outsider", WEB_API) == "200"
    unknown = {
        f"source_{k}": "unknown" for k in ("workload", "workload_namespace", "principal", "app")
    }
    want = {
        "reporter": "destination",
        **unknown,
        "destination_workload": "web-api",
        "connection_security_policy": "none",
        "response_code": "200",
    }
    wait_for(lambda: total(tb, "istio_requests_total", **want) >= 1, 10, str(want))
    # No pod IP and no path among any label's values.
    for labels, _ in series(tb, "istio_requests_total"):
        assert not any(
            re.fullmatch(r"\d+\.\d+\.\d+\.\d+(:\d+)?|/.*", v) for v in labels.values()
        ), labels


def test_tcp_metrics_and_failures_show_codes_and_flags(tb: Testbed) -> None:
    caller = f"{NS}/sleep"
    # TCP: the db service's port is TCP; curl speaks HTTP over it, the mesh sees bytes.
    assert curl(tb, caller, f"http://db.{NS}:9000/") == "200"
    sleep = f"spiffe://cluster.local/ns/{NS}/sa/sleep"
    tcp = {"request_protocol": "tcp", "destination_workload": "db", "source_principal": sleep}
    # db is on n2: across nodes a TCP caller is known by its certificate only (no headers).
    source_workloads = {"source": "sleep", "destination": "unknown"}
    for reporter, workload in source_workloads.items():
        want = {**tcp, "reporter": reporter, "source_workload": workload}
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
            wait_for(lambda n=name, w=want: total(tb, n, **w) >= 1, 10, f"{name} {want}")
        assert total(tb, "istio_tcp_sent_bytes_total", **want) > 0
        assert total(tb, "istio_tcp_received_bytes_total", **want) > 0
    # 5xx from the app; UH: a service without endpoints.
    assert curl(tb, caller, f"http://broken.{NS}:8080/") == "500"
    assert curl(tb, caller, f"http://nobody.{NS}:8080/") == "503"
    broken = {"destination_workload": "broken", "response_code": "500"}
    wait_for(
        lambda: total(tb, "istio_requests_total", reporter="destination", **broken) >= 1, 10, "500"
    )
    no_endpoint = {
        "reporter": "source",
        "destination_service_name": "nobody",
        "destination_workload": "unknown",
        "response_code": "503",
        "response_flags": "UH",
    }
    wait_for(lambda: total(tb, "istio_requests_total", **no_endpoint) >= 1, 10, "UH")


def test_no_route_and_overflow_show_their_flags(tb: Testbed) -> None:
    """NR: a VirtualService routes only /only, so / has no route (404); UO: a DestinationRule's
    connection pool (istio.io/latest/docs/reference/config/networking/destination-rule/
    #ConnectionPoolSettings: one connection, one pending request) overflows under 6 concurrent
    requests to a backend that answers in 1 s (503)."""
    slow = f"slow.{NS}.svc.cluster.local"
    meta = {"namespace": NS}
    apply_docs(
        tb,
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "slow", **meta},
         "spec": {"hosts": [slow], "http": [{"match": [{"uri": {"prefix": "/only"}}],
                                             "route": [{"destination": {"host": slow}}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "slow", **meta},
         "spec": {"host": slow, "trafficPolicy": {"connectionPool": {
             "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}}},
    )  # fmt: skip
    caller = f"{NS}/sleep"
    wait_for(lambda: curl(tb, caller, f"http://slow.{NS}:8080/") == "404", 15, "no route for /")
    burst = (
        f"for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' -m 5"
        f" http://slow.{NS}:8080/only & done; wait"
    )
    bursts: list[list[str]] = []

    def overflowed() -> bool:
        # The route (404 above) can be in place a push before the DestinationRule's circuit
        # breaker is: a burst before it answers 200 six times, so burst again, bounded.
        bursts.append(tb.exec(caller, ["sh", "-c", burst], timeout=20).stdout.split())
        return "503" in bursts[-1] and "200" in bursts[-1]

    wait_for(overflowed, 30, lambda: f"no overflow (503) beside a 200 in bursts {bursts}", 0.5)
    # No route: no cluster either, so the destination service is unknown (as the workload).
    source = {"reporter": "source", "source_workload": "sleep"}
    for code, flag, service in (("404", "NR", "unknown"), ("503", "UO", "slow")):
        want = {
            **source,
            "destination_service_name": service,
            "response_code": code,
            "response_flags": flag,
        }
        wait_for(lambda w=want: total(tb, "istio_requests_total", **w) >= 1, 10, str(want))
    apply_docs(tb)


def test_telemetry_overrides_shape_server_metrics_and_silence_one_client(tb: Testbed) -> None:
    """Telemetry ``metrics`` (istio.io/latest/docs/reference/config/telemetry/#MetricsOverrides;
    the task istio.io/latest/docs/tasks/observability/metrics/customize-metrics/): NS's server
    side gets a ``request_method`` label (a CEL value) and loses ``grpc_response_status``;
    sleep's client side is off (a workload Telemetry) while web-api's, on the same node and the
    same shared chains, still reports."""
    meta = {"namespace": NS}
    server = {
        "match": {"metric": "REQUEST_COUNT", "mode": "SERVER"},
        "tagOverrides": {
            "request_method": {"value": "request.method"},
            "grpc_response_status": {"operation": "REMOVE"},
        },
    }
    apply_docs(
        tb,
        {"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
         "metadata": {"name": "namespace-metrics", **meta},
         "spec": {"metrics": [{"providers": [{"name": "prometheus"}], "overrides": [server]}]}},
        {"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
         "metadata": {"name": "sleep-client-off", **meta},
         "spec": {"selector": {"matchLabels": {"app": "sleep"}},
                  "metrics": [{"overrides": [{"match": {"mode": "CLIENT"}, "disabled": True}]}]}},
    )  # fmt: skip
    try:
        _overridden_metrics_show(tb)
    finally:
        apply_docs(tb)


def _overridden_metrics_show(tb: Testbed) -> None:
    caller = f"{NS}/sleep"
    by_method = {"reporter": "destination", "destination_workload": "broken",
                 "request_method": "GET", "response_code": "500"}  # fmt: skip

    def method_count() -> float:
        assert curl(tb, caller, f"http://broken.{NS}:8080/") == "500"
        return total(tb, "istio_requests_total", **by_method)

    wait_for(lambda: method_count() >= 1, 20, "a request_method label on broken's server side")
    assert all(
        "grpc_response_status" not in labels
        for labels, _ in series(tb, "istio_requests_total")
        if labels.get("request_method")
    )
    sleep_client = {"reporter": "source", "source_workload": "sleep"}
    web_api_client = {"reporter": "source", "source_workload": "web-api"}
    before = total(tb, "istio_requests_total", **sleep_client)
    web_api_before = total(tb, "istio_requests_total", **web_api_client)
    counted = total(tb, "istio_requests_total", **by_method)

    def more_counted() -> bool:
        # A connection the node Envoy pooled towards broken's inbound side before the change
        # keeps its old chain until it drains: ask again until three more are counted.
        assert curl(tb, caller, f"http://broken.{NS}:8080/") == "500"
        assert curl(tb, caller, WEB_API) == "200"  # web-api (n1) calls recommendation (n2)
        return (
            total(tb, "istio_requests_total", **by_method) >= counted + 3
            and total(tb, "istio_requests_total", **web_api_client) > web_api_before
        )

    wait_for(more_counted, 30, "broken's server side and web-api's client side count", 0.5)
    time.sleep(1)  # a stat the last calls would add is in the next scrape
    assert total(tb, "istio_requests_total", **sleep_client) == before


@pytest.fixture(scope="module")
def prom(tb: Testbed) -> Iterator[Prometheus]:
    with prometheus(tb) as running:
        running.wait_scraped()
        yield running


def drive(tb: Testbed, seconds: float) -> None:
    """S1.1 traffic for SECONDS: the chain from sleep, a caller outside the mesh, TCP calls
    from both (each curl bounded by its own timeout, the loop by time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert curl(tb, f"{NS}/sleep", WEB_API) == "200"
        assert curl(tb, "default/outsider", WEB_API) == "200"
        for caller in (f"{NS}/sleep", "default/outsider"):  # TCP over mTLS, and plaintext
            assert curl(tb, caller, f"http://db.{NS}:9000/") == "200"
        time.sleep(0.2)


def _empty_at_istio(expr: str) -> bool:
    """Istio's source reporter never says mutual_tls (its reference: "set to unknown when
    report is from source"), so a panel asking for both is empty at Istio too."""
    return 'reporter="source"' in expr and 'connection_security_policy="mutual_tls"' in expr


def test_a_real_prometheus_answers_istios_dashboard_queries(tb: Testbed, prom: Prometheus) -> None:
    """The issue's PromQL and the panels of Istio's service and workload dashboards
    (tests/data/istio-dashboard-queries.yaml), unchanged, over both nodes' :15020 scrapes."""
    drive(tb, 8)
    by_code = prom.wait_until(
        'sum(rate(istio_requests_total{reporter="destination"}[1m]))'
        " by (destination_workload, response_code)"
    )
    rates = {
        (s["metric"]["destination_workload"], s["metric"]["response_code"]): float(s["value"][1])
        for s in by_code
    }
    for workload in ("web-api", "recommendation", "purchase-history-v1"):
        assert rates.get((workload, "200"), 0) > 0, rates
    p90 = prom.values(
        "histogram_quantile(0.90, sum(rate(istio_request_duration_milliseconds_bucket"
        '{reporter="destination"}[1m])) by (le, destination_workload))',
        "destination_workload",
    )
    assert all(0 < p90[w] < 5000 for w in ("web-api", "recommendation")), p90
    # Who called web-api, as its destination reporter tells it: sleep over the fast path (mTLS),
    # the outsider as unknown and plaintext.
    callers = prom.values(
        'sum(rate(istio_requests_total{reporter="destination",destination_workload="web-api"}[1m]))'
        " by (source_workload)",
        "source_workload",
    )
    assert callers.get("sleep", 0) > 0 and callers.get("unknown", 0) > 0, callers
    fqdn = f".{NS}.svc.cluster.local"
    common = {"namespace": NS, "srcns": ".*", "srcwl": ".*", "dstsvc": ".*", "dstns": ".*",
              "dstwl": ".*", "dstcluster": ".*", "srccluster": ".*"}  # fmt: skip
    views = [
        {**common, "qrep": reporter, "workload": workload, "service": name + fqdn}
        for reporter in ("destination", "source")
        for workload, name in (("web-api", "web-api"), ("db", "db"), ("sleep", "web-api"))
    ]
    empty = []
    for q in istio_dashboard_queries():
        if not any(prom.query(grafana_expr(q["expr"], view)) for view in views):
            empty.append(q)
    assert [q for q in empty if not _empty_at_istio(q["expr"])] == []


# -- the merged endpoint and the node dashboard, on the same Prometheus ---------------------------


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
    # n1: sleep, web-api, broken, slow (the outsider's namespace is not in the mesh);
    # n2: recommendation, purchase-history-v1, db.
    assert captured == {"n1": 4.0, "n2": 3.0}


def test_envoys_own_metrics_are_in_the_merged_scrape(tb: Testbed, prom: Prometheus) -> None:
    assert curl(tb, f"{NS}/sleep", WEB_API) == "200"
    assert prom.values("envoy_server_live", "node") == {"n1": 1.0, "n2": 1.0}
    # The requests went through each node's Envoy, to the services' clusters. Envoy's default
    # cluster_name tag stops at the first dot of the service's name: the rest lands in the
    # metric's name (envoy_cluster_istioinaction_svc_cluster_local_upstream_rq_total).
    service = r'envoy_cluster_name=~"outbound\\|8080\\|\\|(web-api|purchase-history).*"'
    name = r'__name__=~"envoy_cluster_(.+_)?upstream_rq_total"'
    requests = prom.wait_until(f"sum by (node) ({{{name}, {service}}})")
    assert {s["metric"]["node"] for s in requests} == {"n1", "n2"}, requests
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


def test_a_query_that_does_not_parse_is_refused(prom: Prometheus) -> None:
    assert {q["dashboard"] for q in istio_dashboard_queries()} == {"service", "workload"}
    with pytest.raises(PromQLError, match="bad_data"):
        prom.query("sum(rate(istio_requests_total[1m])")
