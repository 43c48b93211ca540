"""MeshStore + local pods -> Envoy resources: what a user's services become on the node."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from nodeagent.mesh.model import (
    REGISTRY_ONLY,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    MeshConfig,
    Namespace,
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


def local(name: str, labels: dict[str, str] | None = None, sa: str = "default") -> LocalPod:
    return LocalPod(
        Pod("shop", name, labels=labels or {}, service_account=sa), f"/run/netns/{name}"
    )


ME = "~shop~default"  # clusters and routes of the local identity shop/default


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
    assert f"outbound|80||{HOST}{ME}" in clusters and f"outbound|5432||{HOST}{ME}" in clusters
    web = as_json(clusters[f"outbound|80||{HOST}{ME}"])
    assert web["edsClusterConfig"]["serviceName"] == f"outbound|80||{HOST}"
    assert web["type"] == "EDS" and web.get("lbPolicy", "ROUND_ROBIN") == "ROUND_ROBIN"
    bind = web["upstreamBindConfig"]
    assert bind["socketOptions"] == [{"level": "1", "name": "36", "intValue": "1337"}]
    assert bind["localAddressSelector"]["name"].endswith("filter_state_override")
    grpc = as_json(clusters[f"outbound|9000||grpc.shop.svc.cluster.local{ME}"])
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
    assert tcp_chain[1]["typedConfig"]["cluster"] == f"outbound|5432||{HOST}{ME}"
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
    # PERMISSIVE by default: mTLS and plaintext on the HTTP port, then mTLS for any other port.
    matches = [c["filterChainMatch"] for c in web["filterChains"]]
    assert matches == [
        {"destinationPort": 5432, "transportProtocol": "tls"},
        {"destinationPort": 5432},
        {"destinationPort": 8080, "transportProtocol": "tls"},
        {"destinationPort": 8080},
        {"transportProtocol": "tls"},
    ]
    # HTTP is parsed on the HTTP service port only; the TCP one is proxied as bytes.
    chains = {json.dumps(c["filterChainMatch"], sort_keys=True): c for c in web["filterChains"]}
    assert chains['{"destinationPort": 8080}']["filters"][1]["name"].endswith(
        "http_connection_manager"
    )
    assert chains['{"destinationPort": 5432}']["filters"][1]["name"].endswith("tcp_proxy")
    assert "inbound|8080||" in out[e.CLUSTER] and "inbound|8080||" in out[e.ROUTE]
    other = as_json(out[e.LISTENER]["virtualInbound/shop/other"])
    assert [c["filterChainMatch"] for c in other["filterChains"]] == [{"transportProtocol": "tls"}]
    assert other["defaultFilterChain"]["filters"][1]["typedConfig"]["cluster"] == (
        "InboundPassthroughCluster"
    )


def test_config_per_node_grows_with_local_pods_only_by_their_listeners() -> None:
    one = translate(store(), [local("a")])
    many = translate(store(), [local(f"p{i}") for i in range(10)])  # one identity
    assert many[e.CLUSTER].keys() == one[e.CLUSTER].keys()
    assert many[e.ROUTE].keys() == one[e.ROUTE].keys()
    assert many[e.ENDPOINT].keys() == one[e.ENDPOINT].keys()
    assert len(many[e.LISTENER]) == 20
    assert translate(store(), [])[e.LISTENER] == {}  # remote pods get nothing here


def test_routes_send_every_request_to_the_service_cluster() -> None:
    route = as_json(translate(store(), [local("a")])[e.ROUTE][f"outbound|80||{HOST}{ME}"])
    (vhost,) = route["virtualHosts"]
    assert vhost["domains"] == ["*"]
    assert vhost["routes"][0]["route"]["cluster"] == f"outbound|80||{HOST}{ME}"
    assert vhost["routes"][0]["route"]["retryPolicy"]["numRetries"] == 2


def test_each_local_identity_gets_its_own_clusters_with_its_certificate() -> None:
    out = translate(store(), [local("a", sa="web"), local("b", sa="db"), local("c", sa="web")])
    names = {n for n in out[e.CLUSTER] if n.startswith(f"outbound|80||{HOST}")}
    assert names == {f"outbound|80||{HOST}~shop~web", f"outbound|80||{HOST}~shop~db"}
    web = as_json(out[e.CLUSTER][f"outbound|80||{HOST}~shop~web"])
    mtls, plain = web["transportSocketMatches"]
    assert mtls["match"] == {"tlsMode": "istio"} and plain["match"] == {}
    common = mtls["transportSocket"]["typedConfig"]["commonTlsContext"]
    assert common["tlsCertificateSdsSecretConfigs"][0]["name"] == (
        "spiffe://cluster.local/ns/shop/sa/web"
    )
    validation = common["combinedValidationContext"]["validationContextSdsSecretConfig"]
    assert validation["name"] == "ROOTCA"


def test_endpoints_of_mesh_pods_are_marked_for_auto_mtls() -> None:
    s = store()
    s.put_namespace(Namespace("shop", {"nodeagent.io/mesh": "enabled"}))
    s.put_pod(Pod("shop", "web-1", labels={"app": "web"}, service_account="web"))
    s.put_endpoint_slice(
        EndpointSlice(
            "shop",
            "web-abc",
            "web",
            (
                Endpoint(("10.244.1.5",), True, "node1", "shop/web-1"),
                Endpoint(("10.244.2.7",), True, "node2", "other/legacy"),
            ),
            (EndpointPort(8080, "http"), EndpointPort(5432, "tcp-db")),
        )
    )
    out = translate(s, [local("a")])
    cla = as_json(out[e.ENDPOINT][f"outbound|80||{HOST}"])
    modes = {
        lb["endpoint"]["address"]["socketAddress"]["address"]: lb["metadata"]["filterMetadata"][
            "envoy.transport_socket_match"
        ]["tlsMode"]
        for lb in cla["endpoints"][0]["lbEndpoints"]
    }
    assert modes == {"10.244.1.5": "istio", "10.244.2.7": "disabled"}
    # Secure naming: the server must present the identity of the pods behind the service.
    cluster = as_json(out[e.CLUSTER][f"outbound|80||{HOST}{ME}"])
    validation = cluster["transportSocketMatches"][0]["transportSocket"]["typedConfig"][
        "commonTlsContext"
    ]["combinedValidationContext"]["defaultValidationContext"]
    assert validation["matchTypedSubjectAltNames"] == [
        {"sanType": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/shop/sa/web"}}
    ]
