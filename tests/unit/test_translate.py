"""MeshStore + local pods -> Envoy resources: what a user's services become on the node."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from nodeagent.mesh.model import (
    REGISTRY_ONLY,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    MeshConfig,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.protocol import HTTP, HTTP2, TCP, port_protocol

HOST = "web.shop.svc.cluster.local"


def store(**mesh: Any) -> MeshStore:
    s = MeshStore()
    s.set_mesh_config(MeshConfig(**mesh))
    s.put_service(
        Service(
            "shop",
            "web",
            "10.96.0.10",
            (ServicePort(80, "http", 8080), ServicePort(5432, "tcp-db", 5432)),
            {"app": "web"},
        )
    )
    s.put_service(Service("shop", "grpc", "10.96.0.11", (ServicePort(9000, "grpc"),), {"app": "g"}))
    s.put_service(Service("shop", "headless", "None", (ServicePort(80, "http"),), {"app": "h"}))
    s.put_endpoint_slice(
        EndpointSlice(
            "shop",
            "web-abc",
            "web",
            (
                Endpoint(("10.244.1.5",), True, "node1"),
                Endpoint(("10.244.2.7",), True, "node2"),
                Endpoint(("10.244.2.9",), False, "node2"),
            ),
            (EndpointPort(8080, "http"), EndpointPort(5432, "tcp-db")),
        )
    )
    return s


def local(name: str, labels: dict[str, str] | None = None) -> LocalPod:
    return LocalPod(Pod("shop", name, labels=labels or {}), f"/run/netns/{name}")


def as_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def test_istio_protocol_selection() -> None:
    assert port_protocol("http") == HTTP
    assert port_protocol("http-web") == HTTP
    assert port_protocol("grpc-api") == HTTP2
    assert port_protocol("tcp-db") == TCP
    assert port_protocol("web") == TCP  # unnamed or unknown: no sniffing, TCP
    assert port_protocol("tcp", app_protocol="http") == HTTP  # appProtocol wins
    assert port_protocol("", app_protocol="kubernetes.io/h2c") == HTTP2


def test_clusters_follow_istio_names_and_carry_mark_and_netns_selector() -> None:
    out = translate(store(), [local("a")])
    clusters = out[e.CLUSTER]
    assert f"outbound|80||{HOST}" in clusters and f"outbound|5432||{HOST}" in clusters
    web = as_json(clusters[f"outbound|80||{HOST}"])
    assert web["type"] == "EDS" and web.get("lbPolicy", "ROUND_ROBIN") == "ROUND_ROBIN"
    bind = web["upstreamBindConfig"]
    assert bind["socketOptions"] == [{"level": "1", "name": "36", "intValue": "1337"}]
    assert bind["localAddressSelector"]["name"].endswith("filter_state_override")
    grpc = as_json(clusters["outbound|9000||grpc.shop.svc.cluster.local"])
    assert "typedExtensionProtocolOptions" in grpc  # HTTP/2 upstream
    assert {"PassthroughCluster", "BlackHoleCluster", "InboundPassthroughCluster"} <= set(clusters)


def test_endpoints_are_every_ready_endpoint_cluster_wide() -> None:
    cla = as_json(translate(store(), [])[e.ENDPOINT][f"outbound|80||{HOST}"])
    addresses = [
        (
            lb["endpoint"]["address"]["socketAddress"]["address"],
            lb["endpoint"]["address"]["socketAddress"]["portValue"],
        )
        for lb in cla["endpoints"][0]["lbEndpoints"]
    ]
    assert addresses == [("10.244.1.5", 8080), ("10.244.2.7", 8080)]  # not-ready one left out


def test_outbound_listener_matches_each_vip_port_and_falls_back_to_passthrough() -> None:
    listener = as_json(translate(store(), [local("a")])[e.LISTENER]["virtualOutbound/shop/a"])
    address = listener["address"]["socketAddress"]
    assert (address["address"], address["portValue"]) == ("127.0.0.1", 15001)
    assert address["networkNamespaceFilepath"] == "/run/netns/a"
    matches = {
        (
            c["filterChainMatch"]["prefixRanges"][0]["addressPrefix"],
            c["filterChainMatch"]["destinationPort"],
        ): c
        for c in listener["filterChains"]
    }
    assert set(matches) == {("10.96.0.10", 80), ("10.96.0.10", 5432), ("10.96.0.11", 9000)}
    http_chain = matches[("10.96.0.10", 80)]["filters"]
    assert http_chain[0]["typedConfig"]["onNewConnection"][0]["formatString"] == {
        "textFormatSource": {"inlineString": "/run/netns/a"}
    }
    assert http_chain[1]["name"] == "envoy.filters.network.http_connection_manager"
    tcp_chain = matches[("10.96.0.10", 5432)]["filters"]
    assert tcp_chain[1]["typedConfig"]["cluster"] == f"outbound|5432||{HOST}"
    default = listener["defaultFilterChain"]["filters"][1]["typedConfig"]
    assert default["cluster"] == "PassthroughCluster"


def test_registry_only_sends_unknown_destinations_to_the_black_hole() -> None:
    out = translate(store(outbound_traffic_policy=REGISTRY_ONLY), [local("a")])
    listener = as_json(out[e.LISTENER]["virtualOutbound/shop/a"])
    assert listener["defaultFilterChain"]["filters"][1]["typedConfig"]["cluster"] == (
        "BlackHoleCluster"
    )


def test_inbound_parses_http_only_on_ports_of_services_selecting_the_pod() -> None:
    out = translate(store(), [local("web-1", {"app": "web"}), local("other")])
    web = as_json(out[e.LISTENER]["virtualInbound/shop/web-1"])
    assert web["address"]["socketAddress"]["portValue"] == 15006
    assert [c["filterChainMatch"]["destinationPort"] for c in web["filterChains"]] == [8080]
    assert "inbound|8080||" in out[e.CLUSTER] and "inbound|8080||" in out[e.ROUTE]
    other = as_json(out[e.LISTENER]["virtualInbound/shop/other"])
    assert other.get("filterChains", []) == []
    assert other["defaultFilterChain"]["filters"][1]["typedConfig"]["cluster"] == (
        "InboundPassthroughCluster"
    )


def test_config_per_node_grows_with_local_pods_only_by_their_listeners() -> None:
    one = translate(store(), [local("a")])
    many = translate(store(), [local(f"p{i}") for i in range(10)])
    assert many[e.CLUSTER].keys() == one[e.CLUSTER].keys()
    assert many[e.ROUTE].keys() == one[e.ROUTE].keys()
    assert many[e.ENDPOINT].keys() == one[e.ENDPOINT].keys()
    assert len(many[e.LISTENER]) == 20
    assert translate(store(), [])[e.LISTENER] == {}  # remote pods get nothing here


def test_routes_send_every_request_to_the_service_cluster() -> None:
    route = as_json(translate(store(), [])[e.ROUTE][f"outbound|80||{HOST}"])
    (vhost,) = route["virtualHosts"]
    assert vhost["domains"] == ["*"]
    assert vhost["routes"][0]["route"]["cluster"] == f"outbound|80||{HOST}"
