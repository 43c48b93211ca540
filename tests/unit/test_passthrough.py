"""DestinationRule ``loadBalancer.simple: PASSTHROUGH`` on the node (translate/passthrough.py).

Istio: istio.io/latest/docs/reference/config/networking/destination-rule/
#LoadBalancerSettings-SimpleLB
("forward the connection to the original IP address requested by the caller without doing any
form of load balancing"); istio/istio pilot/pkg/networking/core/cluster_traffic_policy.go
applyLoadBalancer (ORIGINAL_DST, CLUSTER_PROVIDED, no endpoints), cluster_builder.go
buildSubsetCluster and buildAutoMtlsSettings, cluster_tls.go applyUpstreamTLSSettings (an
ORIGINAL_DST cluster keeps its auto mTLS socket as its only one), pilot/pkg/model/push_context.go
BestEffortInferServiceMTLSMode (the endpoints decide only for a rule-level or subset-level
PASSTHROUGH; then the namespace's PeerAuthentication)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    Namespace,
    Pod,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import envoy as e
from nodeagent.translate import internal, translate
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import HOST, ME, as_json, local, store

WEB = f"outbound|80||{HOST}"
DB = f"outbound|5432||{HOST}"
WEB_SA = "spiffe://cluster.local/ns/shop/sa/web"
PASSTHROUGH = {"simple": "PASSTHROUGH"}
TLS_MATCH = "envoy.transport_socket_match"


def mesh(legacy: bool = False, endpoints: bool = True) -> MeshStore:
    """web.shop (80 http, 5432 tcp) with two mesh pods behind it (v1, v2); LEGACY: a third
    endpoint that is no mesh pod; ENDPOINTS False: none at all."""
    s = store()
    s.put_namespace(Namespace("shop", {"nodeagent.io/mesh": "enabled"}))
    found = []
    for name, ip, node, version in (
        ("web-1", "10.244.1.5", "node1", "v1"),
        ("web-2", "10.244.2.7", "node2", "v2"),
    ):
        s.put_pod(
            Pod("shop", name, labels={"app": "web", "version": version}, service_account="web")
        )
        found.append(Endpoint((ip,), True, node, f"shop/{name}"))
    if legacy:
        found.append(Endpoint(("10.244.2.9",), True, "node2", "other/legacy"))
    ports = (EndpointPort(8080, "http"), EndpointPort(5432, "tcp-db"))
    s.put_endpoint_slice(
        EndpointSlice("shop", "web-abc", "web", tuple(found) if endpoints else (), ports)
    )
    return s


def rule(spec: dict[str, Any], namespace: str = "shop") -> IstioResource:
    return IstioResource(
        "networking.istio.io", "v1", "DestinationRule", namespace, "web", {"host": HOST, **spec}
    )


def peer(mode: str, namespace: str = "shop") -> IstioResource:
    return IstioResource(
        "security.istio.io", "v1", "PeerAuthentication", namespace, "pa", {"mtls": {"mode": mode}}
    )


def translated(s: MeshStore, *resources: IstioResource, **kw: Any) -> dict[str, dict[str, Any]]:
    for res in resources:
        s.put_istio(res)
    return translate(s, [local("a")], **kw)


def the_endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    (only,) = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    return dict(only)


def is_passthrough(out: dict[str, dict[str, Any]], name: str) -> bool:
    """NAME is the node's PASSTHROUGH form: one endpoint, inline, no EDS resource."""
    c = as_json(out[e.CLUSTER][name])
    return "edsClusterConfig" not in c and "loadAssignment" in c and name not in out[e.ENDPOINT]


def test_rule_level_passthrough_reaches_originate_without_an_address_of_its_own() -> None:
    """The cluster's one host is originate, with no original_dst metadata: originate restores
    the address the caller dialled (the VIP:port its listener stamped, shared TRANSITIVE), so
    the node's service proxy picks the endpoint. All endpoints are mesh pods: mTLS, to the
    service's service accounts. No EDS, and no fast path (no local endpoint is named)."""
    out = translated(mesh(), rule({"trafficPolicy": {"loadBalancer": PASSTHROUGH}}))
    for name in (WEB, DB):
        assert is_passthrough(out, name), name
        c = as_json(out[e.CLUSTER][name])
        assert c.get("type", "STATIC") == "STATIC" and c.get("lbPolicy", "ROUND_ROBIN") == (
            "ROUND_ROBIN"
        )
        endpoint = the_endpoint(c)
        assert endpoint["endpoint"]["address"] == {
            "envoyInternalAddress": {"serverListenerName": internal.ORIGINATE}
        }
        meta = endpoint["metadata"]["filterMetadata"]
        assert internal.ORIGINAL_DST_META not in meta
        assert meta[TLS_MATCH] == {"tlsMode": "istio"}
        assert meta[internal.ENDPOINT_META] == {"sans": WEB_SA}
        # SNI and the rule's mode key cross to originate as for any service cluster.
        assert c["metadata"]["filterMetadata"][internal.CLUSTER_META]["name"] == name
    stamp = as_json(out[e.LISTENER]["virtualOutbound/shop/a"])["defaultFilterChain"]
    (values,) = [
        f["typedConfig"]["onNewConnection"]
        for f in stamp["filters"]
        if f["name"] == "envoy.filters.network.set_filter_state"
    ]
    local_ip = {v["objectKey"]: v for v in values}[f"{internal.ORIGINAL_DST_META}.local_ip"]
    assert local_ip["sharedWithUpstream"] == "TRANSITIVE"


def test_one_cluster_per_port_whatever_the_callers() -> None:
    """O(1) per pod: the PASSTHROUGH cluster names no caller (originate-mtls picks its
    certificate per connection)."""
    s = mesh()
    s.put_istio(rule({"trafficPolicy": {"loadBalancer": PASSTHROUGH}}))
    one = translate(s, [local("a")])[e.CLUSTER][WEB]
    many = translate(s, [local("a"), local("b", sa="other"), local("c", sa="third")])
    assert many[e.CLUSTER][WEB] == one


def test_port_level_passthrough_is_that_port_only_and_mtls_whatever_the_endpoints() -> None:
    """portLevelSettings: only port 80 passes through. Istio's inference reads the rule's
    top-level policy only, so a non-mesh endpoint does not turn its mTLS off."""
    level = {"portLevelSettings": [{"port": {"number": 80}, "loadBalancer": PASSTHROUGH}]}
    out = translated(mesh(legacy=True), rule({"trafficPolicy": level}))
    assert is_passthrough(out, WEB) and not is_passthrough(out, DB)
    assert DB in out[e.ENDPOINT]
    meta = the_endpoint(as_json(out[e.CLUSTER][WEB]))["metadata"]["filterMetadata"]
    assert meta[TLS_MATCH] == {"tlsMode": "istio"}


@pytest.mark.parametrize(
    ("legacy", "endpoints", "policies", "mode"),
    [
        (False, True, [], "istio"),  # every endpoint a mesh pod: PERMISSIVE fallback, mTLS
        (True, True, [], "disabled"),  # one without a sidecar: Istio infers DISABLE
        (False, False, [], "disabled"),  # no endpoint: DISABLE
        (False, True, [peer("DISABLE")], "disabled"),  # the namespace's PeerAuthentication
        (False, True, [peer("STRICT", "istio-system")], "istio"),  # the mesh's
    ],
)
def test_rule_level_auto_mtls_is_istios_inference(
    legacy: bool, endpoints: bool, policies: list[IstioResource], mode: str
) -> None:
    out = translated(
        mesh(legacy, endpoints), rule({"trafficPolicy": {"loadBalancer": PASSTHROUGH}}), *policies
    )
    meta = the_endpoint(as_json(out[e.CLUSTER][WEB]))["metadata"]["filterMetadata"]
    assert meta[TLS_MATCH] == {"tlsMode": mode}


def test_subset_level_passthrough_and_a_subset_of_a_passthrough_rule() -> None:
    """A subset's own PASSTHROUGH makes its cluster pass through, not the port's. A subset of a
    PASSTHROUGH rule stays ORIGINAL_DST in Istio whatever its own loadBalancer says."""
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": PASSTHROUGH}},
        {"name": "v2", "labels": {"version": "v2"}},
    ]
    out = translated(mesh(), rule({"subsets": subsets}))
    assert is_passthrough(out, f"outbound|80|v1|{HOST}")
    assert not is_passthrough(out, f"outbound|80|v2|{HOST}")
    assert not is_passthrough(out, WEB)
    s = mesh()
    own = {"loadBalancer": {"simple": "ROUND_ROBIN"}}
    spec = {
        "trafficPolicy": {"loadBalancer": PASSTHROUGH},
        "subsets": [{"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": own}],
    }
    out = translated(s, rule(spec))
    assert is_passthrough(out, f"outbound|80|v2|{HOST}")


def test_a_rules_tls_mode_still_decides() -> None:
    """tls ISTIO_MUTUAL: originate-mtls presents the caller's certificate on this cluster
    whatever its endpoints (a non-mesh one here); SIMPLE: the endpoint is originate-tls."""
    spec = {"trafficPolicy": {"loadBalancer": PASSTHROUGH, "tls": {"mode": "ISTIO_MUTUAL"}}}
    out = translated(mesh(legacy=True), rule(spec))
    originate = as_json(out[e.CLUSTER][internal.ORIGINATE_CLUSTER])
    by_caller = originate["transportSocketMatcher"]["matcherTree"]["exactMatchMap"]["map"]
    tree = by_caller[ME]["matcher"]["matcherTree"]
    assert tree["exactMatchMap"]["map"][WEB]["action"]["typedConfig"]["name"] == ME
    spec = {"trafficPolicy": {"loadBalancer": PASSTHROUGH, "tls": {"mode": "SIMPLE"}}}
    out = translated(mesh(), rule(spec))
    address = the_endpoint(as_json(out[e.CLUSTER][WEB]))["endpoint"]["address"]
    assert address["envoyInternalAddress"]["serverListenerName"] == internal.ORIGINATE_TLS


def test_sidecar_form_is_istios_original_destination_cluster() -> None:
    """The sidecar model (bench's comparison): Istio's own ORIGINAL_DST cluster, mTLS as its
    only socket (no per-endpoint match) or none at all."""
    out = translated(mesh(), rule({"trafficPolicy": {"loadBalancer": PASSTHROUGH}}), sidecar=True)
    c = as_json(out[e.CLUSTER][WEB])
    assert (c["type"], c["lbPolicy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED")
    assert "edsClusterConfig" not in c and WEB not in out[e.ENDPOINT]
    assert "transportSocketMatches" not in c
    assert c["transportSocket"]["name"] == "envoy.transport_sockets.tls"
    assert WEB_SA in json.dumps(c["transportSocket"])
    out = translated(
        mesh(legacy=True), rule({"trafficPolicy": {"loadBalancer": PASSTHROUGH}}), sidecar=True
    )
    c = as_json(out[e.CLUSTER][WEB])
    assert "transportSocket" not in c and "transportSocketMatches" not in c


def test_real_envoy_accepts_the_passthrough_clusters(tmp_path: Path) -> None:
    """The rule-, port- and subset-level clusters and originate, in a static bootstrap the
    venv's Envoy checks in validate mode."""
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": PASSTHROUGH}}
    ]
    spec = {
        "trafficPolicy": {
            "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": PASSTHROUGH}],
            "connectionPool": {"tcp": {"maxConnections": 5}},
        },
        "subsets": subsets,
    }
    out = translated(mesh(), rule(spec))
    names = [WEB, f"outbound|5432|v1|{HOST}"]
    assert all(is_passthrough(out, n) for n in names)
    assert_envoy_accepts_resources(
        tmp_path,
        clusters=[out[e.CLUSTER][n] for n in names],
        listeners=[out[e.LISTENER][internal.ORIGINATE]],
        node_runtime=True,
    )
