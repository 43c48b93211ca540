"""Accepted but not enforced, as an operator sees it (issue #12, defect 10): Istio resources the
agent accepts (schema-valid) but does not act on yet are listed by `nodeagent proxy-status`,
counted by `nodeagent_istio_resources_not_enforced{kind}` and warned about once in the agent's
log, however many pushes follow. DestinationRule fields per
https://istio.io/latest/docs/reference/config/networking/destination-rule/."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from nodeagent.mesh.enforcement import PLANNED
from nodeagent.testbed import layout
from nodeagent.testbed.cluster import Testbed, down
from nodeagent.testbed.topology import loads_topology
from tests.integration.helpers import node_cli, node_metrics, proxy_status, wait_for

pytestmark = pytest.mark.integration

NAME = "tbne"
TOPOLOGY = f"""
name: {NAME}
nodes: [{{name: n1}}]
namespaces: [{{name: shop, labels: {{nodeagent.io/mesh: enabled}}}}]
pods:
  - {{name: web, namespace: shop, node: n1, labels: {{app: web}},
      workload: {{type: fake-service, port: 80}}}}
services:
  - {{name: web, namespace: shop, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}
"""
ISTIO = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    hosts: ["*.local"]
    tls: {mode: AUTO_PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}, proxyProtocol: {version: V1}}
  subsets: [{name: v1, labels: {app: web}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""
GATEWAY_WARNING = (
    "Gateway shop/edge is accepted but not enforced: servers[0].tls.mode=AUTO_PASSTHROUGH"
)


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    down(NAME)
    try:
        yield Testbed.up(loads_topology(TOPOLOGY, "test_not_enforced"), TOPOLOGY, NAME)
    finally:
        down(NAME)


def _not_enforced(tb: Testbed) -> list[dict[str, object]]:
    proc = node_cli(tb.name, "n1", "proxy-status", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    items: list[dict[str, object]] = json.loads(proc.stdout)["not_enforced"]
    return items


def test_proxy_status_metrics_and_log_say_what_is_not_enforced(tb: Testbed) -> None:
    cluster = layout.cluster_dir(tb.name)
    (cluster / "istio.yaml").write_text(ISTIO)
    wait_for(lambda: len(_not_enforced(tb)) == 2, 10, "proxy-status lists the VS and the DR")
    assert _not_enforced(tb) == [
        {
            "kind": "DestinationRule",
            "namespace": "shop",
            "name": "web",
            # Subsets and ISTIO_MUTUAL are enforced; the PeerAuthentication entirely.
            "fields": ["trafficPolicy.proxyProtocol"],
            "planned": "#15 traffic management",
        },
        {
            "kind": "Gateway",
            "namespace": "shop",
            "name": "edge",
            "fields": ["servers[0].tls.mode=AUTO_PASSTHROUGH"],
            "planned": PLANNED["Gateway"],
        },
    ]
    table = node_cli(tb.name, "n1", "proxy-status").stdout
    assert "accepted, not enforced (2 Istio resources):" in table
    assert (
        "  DestinationRule shop/web: trafficPolicy.proxyProtocol (#15 traffic management)"
    ) in table
    assert f"  {GATEWAY_WARNING.replace(' is accepted but not enforced:', ':')}" in table

    metrics = node_metrics(tb.name, "n1")
    assert 'nodeagent_istio_resources_not_enforced{kind="Gateway"} 1.0' in metrics
    assert 'nodeagent_istio_resources_not_enforced{kind="DestinationRule"} 1.0' in metrics

    # More pushes (other resources change): the warning is not repeated.
    for i in range(3):
        pushed = int(proxy_status(tb, "n1")["version"])
        (cluster / "other.yaml").write_text(
            f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: sa{i}, namespace: shop}}\n"
        )
        wait_for(
            lambda pushed=pushed: int(proxy_status(tb, "n1")["version"]) > pushed,
            10,
            f"a push after ServiceAccount sa{i}",
        )
    log = (layout.logs_dir(tb.name) / "n1.agent.log").read_text()
    assert log.count(GATEWAY_WARNING) == 1
