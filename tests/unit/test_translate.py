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
    IstioResource,
    MeshConfig,
    Namespace,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import endpoint_where
from nodeagent.translate.protocol import HTTP, HTTP2, TCP, port_protocol

HOST = "web.shop.svc.cluster.local"
# Every ALPN an Istio client offers on mesh mTLS: istio/istio pilot/pkg/networking/core
# (allIstioMtlsALPNs); servers take TLS for mesh mTLS only with one of them.
MTLS_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")


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


ME = "spiffe://cluster.local/ns/shop/sa/default"  # the identity of local("...") pods
NETNS_KEY = "envoy.network.upstream_bind_override.network_namespace"


def as_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def stamps(listener: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """object key -> set_filter_state entry, over every chain of LISTENER."""
    chains = [*listener.get("filterChains", []), listener.get("defaultFilterChain", {})]
    return {
        value["objectKey"]: value
        for chain in chains
        for f in chain.get("filters", [])
        if f["name"] == "envoy.filters.network.set_filter_state"
        for value in f["typedConfig"]["onNewConnection"]
    }


def chains_by_vip(listener: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {
        (
            c["filterChainMatch"]["prefixRanges"][0]["addressPrefix"],
            c["filterChainMatch"]["destinationPort"],
        ): c
        for c in listener["filterChains"]
        if c["filterChainMatch"].get("prefixRanges")
    }


def originate(out: dict[str, Any]) -> dict[str, Any]:
    return as_json(out[e.CLUSTER]["originate-mtls"])


def test_istio_protocol_selection() -> None:
    assert port_protocol("http") == HTTP
    assert port_protocol("http-web") == HTTP
    assert port_protocol("grpc-api") == HTTP2
    assert port_protocol("tcp-db") == TCP
    assert port_protocol("web") == TCP  # unnamed or unknown: no sniffing, TCP
    assert port_protocol("tcp", app_protocol="http") == HTTP  # appProtocol wins
    assert port_protocol("", app_protocol="kubernetes.io/h2c") == HTTP2


def test_service_clusters_follow_istio_names_and_name_no_identity() -> None:
    """One cluster per service port, whatever the local pods' identities (O(1) per pod): its
    endpoints are reached through the originate internal listener, which gets the endpoint's
    address and identity and the service's SNI as metadata (docs/o1-config.md)."""
    out = translate(store(), [local("a"), local("b", sa="other")])
    clusters = out[e.CLUSTER]
    outbound = {n for n in clusters if n.startswith("outbound|")}
    assert outbound == {
        f"outbound|80||{HOST}",
        f"outbound|5432||{HOST}",
        "outbound|9000||grpc.shop.svc.cluster.local",
        "outbound|80||headless.shop.svc.cluster.local",
    }
    web = as_json(clusters[f"outbound|80||{HOST}"])
    assert web["edsClusterConfig"]["serviceName"] == f"outbound|80||{HOST}"
    # Istio's default load balancing without a DestinationRule is LEAST_REQUEST (MeshConfig
    # defaultLBAlgorithm, istio.io/latest/docs/reference/config/networking/destination-rule/).
    assert web["type"] == "EDS" and web["lbPolicy"] == "LEAST_REQUEST"
    assert web["metadata"]["filterMetadata"]["nodeagent.service"] == {
        "name": f"outbound|80||{HOST}",
        "sni": f"outbound_.80_._.{HOST}",
    }
    socket = web["transportSocket"]
    assert socket["name"] == "envoy.transport_sockets.internal_upstream"
    passed = {
        (next(iter(m["kind"])), m["name"]) for m in socket["typedConfig"]["passthroughMetadata"]
    }
    assert passed == {
        ("host", "envoy.filters.listener.original_dst"),
        ("host", "nodeagent"),
        ("host", "envoy.transport_socket_match"),
        ("cluster", "nodeagent.service"),
    }
    grpc = as_json(clusters["outbound|9000||grpc.shop.svc.cluster.local"])
    assert "typedExtensionProtocolOptions" in grpc  # HTTP/2 upstream
    # The real sockets are made by originate-mtls: marked, in the caller's netns.
    bind = originate(out)["upstreamBindConfig"]
    assert bind["socketOptions"] == [{"level": "1", "name": "36", "intValue": "1337"}]
    assert bind["localAddressSelector"]["name"].endswith("filter_state_override")
    assert {"PassthroughCluster", "BlackHoleCluster", "InboundPassthroughCluster"} <= set(clusters)
    assert "outbound-internal" in clusters


def test_endpoints_are_every_ready_endpoint_cluster_wide() -> None:
    cla = as_json(translate(store(), [])[e.ENDPOINT][f"outbound|80||{HOST}"])
    endpoints = cla["endpoints"][0]["lbEndpoints"]
    internal = [lb["endpoint"]["address"]["envoyInternalAddress"] for lb in endpoints]
    assert internal == [
        {"serverListenerName": "originate", "endpointId": "10.244.1.5:8080"},
        {"serverListenerName": "originate", "endpointId": "10.244.2.7:8080"},
    ]  # not-ready one left out
    # originate's original_dst filter restores the address from this metadata.
    restored = [
        lb["metadata"]["filterMetadata"]["envoy.filters.listener.original_dst"]["local"]
        for lb in endpoints
    ]
    assert restored == ["10.244.1.5:8080", "10.244.2.7:8080"]


def test_a_pods_outbound_listener_names_no_service_and_stamps_who_calls() -> None:
    out = translate(store(), [local("a", labels={"version": "v1", "app": "web"})])
    listener = as_json(out[e.LISTENER]["virtualOutbound/shop/a"])
    address = listener["address"]["socketAddress"]
    assert (address["address"], address["portValue"]) == ("127.0.0.1", 15001)
    assert address["networkNamespaceFilepath"] == "/run/netns/a"
    assert [c["name"] for c in listener["filterChains"]] == ["virtualOutbound-blackhole"]
    default = listener["defaultFilterChain"]["filters"]
    assert default[-1]["typedConfig"]["cluster"] == "outbound-internal"
    stamped = stamps(listener)
    values = {k: v["formatString"]["textFormatSource"]["inlineString"] for k, v in stamped.items()}
    assert values == {
        NETNS_KEY: "/run/netns/a",
        "io.nodeagent.caller": ME,
        "io.nodeagent.pod": "shop/a",
        # Its labels, for a VirtualService match's sourceLabels (keys sorted, between commas).
        "io.nodeagent.labels": ",app=web,version=v1,",
        "envoy.filters.listener.original_dst.local_ip": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "envoy.filters.listener.original_dst.remote_ip": "%DOWNSTREAM_REMOTE_ADDRESS%",
        # Its side of Istio's metrics (istio_stats.py): a bare pod is its own workload.
        "io.nodeagent.peer.workload": "a",
        "io.nodeagent.peer.namespace": "shop",
        "io.nodeagent.peer.app": "web",
        "io.nodeagent.peer.version": "v1",
        "io.nodeagent.peer.canonical_service": "web",
        "io.nodeagent.peer.canonical_revision": "v1",
        "io.nodeagent.peer.cluster": "Kubernetes",
    }
    # Who calls must reach originate, two internal hops away; where to as well (a
    # DestinationRule PASSTHROUGH cluster connects there, translate/passthrough.py); where
    # from, only the next hop.
    assert stamped[NETNS_KEY]["sharedWithUpstream"] == "TRANSITIVE"
    assert stamped["io.nodeagent.caller"]["sharedWithUpstream"] == "TRANSITIVE"
    assert stamped["io.nodeagent.labels"]["sharedWithUpstream"] == "TRANSITIVE"
    local_ip = stamped["envoy.filters.listener.original_dst.local_ip"]
    assert local_ip["sharedWithUpstream"] == "TRANSITIVE"
    assert stamped["envoy.filters.listener.original_dst.remote_ip"]["sharedWithUpstream"] == "ONCE"


def test_outbound_internal_matches_each_vip_port_and_falls_back_to_passthrough() -> None:
    out = translate(store(), [local("a")])
    internal = as_json(out[e.LISTENER]["outbound-internal"])
    assert "internalListener" in internal and "address" not in internal
    matches = chains_by_vip(internal)
    assert set(matches) == {("10.96.0.10", 80), ("10.96.0.10", 5432), ("10.96.0.11", 9000)}
    (http,) = matches[("10.96.0.10", 80)]["filters"]
    assert http["name"] == "envoy.filters.network.http_connection_manager"
    assert http["typedConfig"]["rds"]["routeConfigName"] == f"outbound|80||{HOST}"
    (tcp,) = matches[("10.96.0.10", 5432)]["filters"]
    assert tcp["typedConfig"]["cluster"] == f"outbound|5432||{HOST}"
    default = internal["defaultFilterChain"]["filters"][-1]["typedConfig"]
    assert default["cluster"] == "PassthroughCluster"


def test_each_pod_stamps_its_netns_as_a_pool_key_even_within_one_service_account() -> None:
    # Pods of one identity share clusters; Envoy keeps their pooled upstream connections apart
    # only if the netns stamp is hashable and shared with the upstream connection (filters.py).
    out = translate(store(), [local("a", {"app": "web"}), local("b", {"app": "web"})])
    for pod in ("a", "b"):
        for kind in ("virtualOutbound", "virtualInbound"):
            stamp = stamps(as_json(out[e.LISTENER][f"{kind}/shop/{pod}"]))[NETNS_KEY]
            assert stamp["factoryKey"] == "envoy.hashable_string", kind
            assert stamp["formatString"] == {
                "textFormatSource": {"inlineString": f"/run/netns/{pod}"}
            }
        caller = stamps(as_json(out[e.LISTENER][f"virtualOutbound/shop/{pod}"]))
        assert caller["io.nodeagent.caller"]["factoryKey"] == "envoy.hashable_string"


def test_registry_only_sends_unknown_destinations_to_the_black_hole() -> None:
    out = translate(store(outbound_traffic_policy=REGISTRY_ONLY), [local("a")])
    listener = as_json(out[e.LISTENER]["outbound-internal"])
    assert listener["defaultFilterChain"]["filters"][-1]["typedConfig"]["cluster"] == (
        "BlackHoleCluster"
    )


def test_inbound_parses_http_only_on_ports_of_services_selecting_the_pod() -> None:
    out = translate(store(), [local("web-1", {"app": "web"}), local("other")])
    web = as_json(out[e.LISTENER]["virtualInbound/shop/web-1"])
    assert web["address"]["socketAddress"]["portValue"] == 15006
    # PERMISSIVE by default: mTLS (Istio's ALPN), the client's own TLS and plaintext on the
    # HTTP port, mTLS and plaintext on the TCP one, then mTLS for any other port.
    matches = [c["filterChainMatch"] for c in web["filterChains"]]
    alpn = {"transportProtocol": "tls", "applicationProtocols": list(MTLS_ALPNS)}
    assert matches == [
        {"destinationPort": 15006},  # the loop guard
        {"destinationPort": 5432, **alpn},
        {"destinationPort": 5432},
        {"destinationPort": 8080, **alpn},
        {"destinationPort": 8080, "transportProtocol": "tls"},
        {"destinationPort": 8080},
        alpn,
    ]
    # HTTP is parsed on the HTTP service port only; the TCP one is proxied as bytes.
    chains = {json.dumps(c["filterChainMatch"], sort_keys=True): c for c in web["filterChains"]}
    assert chains['{"destinationPort": 8080}']["filters"][1]["name"].endswith(
        "http_connection_manager"
    )
    assert chains['{"destinationPort": 5432}']["filters"][1]["name"].endswith("tcp_proxy")
    assert "inbound|8080||" in out[e.CLUSTER] and "inbound|8080||" in out[e.ROUTE]
    other = as_json(out[e.LISTENER]["virtualInbound/shop/other"])
    assert [c["filterChainMatch"] for c in other["filterChains"]] == [
        {"destinationPort": 15006},
        alpn,
    ]
    assert other["defaultFilterChain"]["filters"][1]["typedConfig"]["cluster"] == (
        "InboundPassthroughCluster"
    )


def test_config_per_node_grows_with_local_pods_only_by_their_listeners() -> None:
    """A pod adds its listeners (outbound and inbound; these pods serve no service, so no
    fast-path one); a new identity one TLS socket in originate-mtls; nothing is per pod x
    service or identity x service."""
    one = translate(store(), [local("a")])
    many = translate(store(), [local(f"p{i}", sa=f"sa{i % 5}") for i in range(10)])
    assert many[e.CLUSTER].keys() == one[e.CLUSTER].keys()
    assert many[e.ROUTE].keys() == one[e.ROUTE].keys()
    assert many[e.ENDPOINT].keys() == one[e.ENDPOINT].keys()
    for name in one[e.CLUSTER]:
        if name != "originate-mtls":  # its TLS sockets: one per identity
            assert many[e.CLUSTER][name] == one[e.CLUSTER][name], name
    shared = {"outbound-internal", "originate", "originate-tls", "mirror"}
    assert len(many[e.LISTENER]) == 20 + len(shared)
    assert set(translate(store(), [])[e.LISTENER]) == shared  # remote pods get nothing here
    assert len(originate(many)["transportSocketMatches"]) == 5 + 2  # + plaintext, no-identity


def test_routes_send_every_request_to_the_service_cluster() -> None:
    route = as_json(translate(store(), [local("a")])[e.ROUTE][f"outbound|80||{HOST}"])
    (vhost,) = route["virtualHosts"]
    assert vhost["domains"] == ["*"]
    assert vhost["routes"][0]["route"]["cluster"] == f"outbound|80||{HOST}"
    assert vhost["routes"][0]["route"]["retryPolicy"]["numRetries"] == 2


def socket_named(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    (match,) = [m for m in cluster["transportSocketMatches"] if m["name"] == name]
    socket: dict[str, Any] = match["transportSocket"]
    return socket


def test_each_local_identity_is_one_certificate_chosen_by_the_caller_stamp() -> None:
    """originate-mtls picks the transport socket per connection from the caller's SPIFFE ID
    (Cluster.transport_socket_matcher, FilterStateInput), then by the endpoint's tlsMode."""
    out = translate(store(), [local("a", sa="web"), local("b", sa="db"), local("c", sa="web")])
    cluster = originate(out)
    web, db = "spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"
    names = [m["name"] for m in cluster["transportSocketMatches"]]
    assert sorted(names) == sorted([web, db, "plaintext", "no-identity"])
    common = socket_named(cluster, web)["typedConfig"]["commonTlsContext"]
    assert common["tlsCertificateSdsSecretConfigs"][0]["name"] == web
    validation = common["combinedValidationContext"]
    assert validation["validationContextSdsSecretConfig"]["name"] == "ROOTCA"
    # The exact SAN comes per connection from the endpoint; the cluster keeps a floor.
    assert validation["defaultValidationContext"]["matchTypedSubjectAltNames"] == [
        {"sanType": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
    ]
    tree = cluster["transportSocketMatcher"]["matcherTree"]
    assert tree["input"]["typedConfig"]["key"] == "io.nodeagent.caller"
    by_caller = tree["exactMatchMap"]["map"]
    assert set(by_caller) == {web, db}
    auto = by_caller[web]["matcher"]["matcherTree"]
    assert auto["input"]["typedConfig"]["key"] == "io.nodeagent.tls"
    assert auto["exactMatchMap"]["map"]["istio"]["action"]["typedConfig"]["name"] == web
    otherwise = by_caller[web]["matcher"]["onNoMatch"]["action"]["typedConfig"]["name"]
    assert otherwise == "plaintext"
    unknown = cluster["transportSocketMatcher"]["onNoMatch"]["action"]["typedConfig"]["name"]
    assert unknown == "no-identity"
    no_cert = socket_named(cluster, "no-identity")["typedConfig"]["commonTlsContext"]
    assert "tlsCertificateSdsSecretConfigs" not in no_cert


def test_a_destination_rule_tls_mode_binds_its_namespace_callers_only() -> None:
    """A DestinationRule in the client's namespace front, tls.mode DISABLE for web.shop: callers
    in front send plaintext, callers in shop keep auto mTLS. Istio looks a rule up in the
    client's namespace, then the service's, then the root namespace
    (https://istio.io/latest/docs/ops/best-practices/traffic-management/#cross-namespace-configuration)."""
    s = store()
    s.put_istio(
        IstioResource(
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "front",
            "web",
            {"host": HOST, "trafficPolicy": {"tls": {"mode": "DISABLE"}}},
            {},
            {},
        )
    )
    caller = LocalPod(Pod("front", "f", service_account="f"), "/run/netns/f")
    out = translate(s, [local("a"), caller])
    by_caller = originate(out)["transportSocketMatcher"]["matcherTree"]["exactMatchMap"]["map"]
    front = by_caller["spiffe://cluster.local/ns/front/sa/f"]["matcher"]["matcherTree"]
    assert front["input"]["typedConfig"]["key"] == "io.nodeagent.service"
    overrides = {
        svc: m["action"]["typedConfig"]["name"] for svc, m in front["exactMatchMap"]["map"].items()
    }
    # front's own rule: its own copies of the clusters (service_views), the mode keyed by them.
    assert overrides == {
        f"outbound|80||{HOST}~front/web": "plaintext",
        f"outbound|5432||{HOST}~front/web": "plaintext",
    }
    shop = by_caller[ME]["matcher"]["matcherTree"]
    assert shop["input"]["typedConfig"]["key"] == "io.nodeagent.tls"  # auto mTLS
    # The service's cluster states the modes too: when they change, the cluster changes and
    # Envoy drains the connections it pooled under the old mode.
    web = as_json(out[e.CLUSTER][f"outbound|80||{HOST}~front/web"])
    assert web["metadata"]["filterMetadata"]["nodeagent.service"]["name"] == (
        f"outbound|80||{HOST}~front/web"
    )
    assert web["metadata"]["filterMetadata"]["nodeagent.service"]["tls_modes"] == {
        "front": "DISABLE"
    }


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
    metadata = {
        endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"]): lb[
            "metadata"
        ]["filterMetadata"]
        for lb in cla["endpoints"][0]["lbEndpoints"]
    }
    modes = {ep: m["envoy.transport_socket_match"]["tlsMode"] for ep, m in metadata.items()}
    assert modes == {"10.244.1.5:8080": "istio", "10.244.2.7:8080": "disabled"}
    # Secure naming: the server must present the identity of the pod behind that endpoint.
    assert metadata["10.244.1.5:8080"]["nodeagent"] == {
        "sans": "spiffe://cluster.local/ns/shop/sa/web"
    }
    assert "nodeagent" not in metadata["10.244.2.7:8080"]
    # originate hands both to originate-mtls as the well-known filter state it verifies with.
    listener = stamps(as_json(out[e.LISTENER]["originate"]))
    assert listener["envoy.network.upstream_subject_alt_names"]["formatString"] == {
        "textFormatSource": {"inlineString": "%DYNAMIC_METADATA(nodeagent:sans)%"}
    }
    assert listener["envoy.network.upstream_server_name"]["formatString"] == {
        "textFormatSource": {"inlineString": "%DYNAMIC_METADATA(nodeagent.service:sni)%"}
    }


# -- issue #12 ------------------------------------------------------------------------------------


def chain_named(listener: dict[str, Any], name: str) -> dict[str, Any]:
    (chain,) = [c for c in listener["filterChains"] if c["name"] == name]
    return chain


def terminal_cluster(chain: dict[str, Any]) -> str:
    """The cluster a TCP chain's last filter proxies to."""
    cluster: str = chain["filters"][-1]["typedConfig"]["cluster"]
    return cluster


def test_capture_ports_are_blackholed_not_passed_through_again() -> None:
    """A connection whose original destination is the capture listener's own port goes to the
    black hole: passing it through would reach the same listener again, forever (#12 defect 4).

    As Istio's sidecar: ``virtualOutbound-blackhole`` (destination_port 15001) and
    ``virtualInbound-blackhole`` (destination_port 15006), istio/istio
    pilot/pkg/networking/core/listener_builder.go, names in pilot/pkg/networking/util."""
    out = translate(store(), [local("web-1", {"app": "web"})])
    outbound = as_json(out[e.LISTENER]["virtualOutbound/shop/web-1"])
    guard = chain_named(outbound, "virtualOutbound-blackhole")
    assert guard["filterChainMatch"] == {"destinationPort": 15001}
    assert terminal_cluster(guard) == "BlackHoleCluster"
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web-1"])
    guard = chain_named(inbound, "virtualInbound-blackhole")
    assert guard["filterChainMatch"] == {"destinationPort": 15006}
    assert terminal_cluster(guard) == "BlackHoleCluster"


def test_a_service_targeting_the_inbound_capture_port_does_not_shadow_the_loop_guard() -> None:
    s = store()
    s.put_service(
        Service("shop", "odd", "10.96.0.12", (ServicePort(81, "http", 15006),), {"a": "o"})
    )
    inbound = as_json(translate(s, [local("o", {"a": "o"})])[e.LISTENER]["virtualInbound/shop/o"])
    on_15006 = [c for c in inbound["filterChains"] if "15006" in json.dumps(c["filterChainMatch"])]
    assert [c["name"] for c in on_15006] == ["virtualInbound-blackhole"]


def strict_on(port: int) -> IstioResource:
    return IstioResource(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "shop",
        "web",
        {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {port: {"mode": "STRICT"}}},
        {},
        {},
    )


def test_permissive_ports_take_tls_as_mesh_mtls_only_with_istio_alpn() -> None:
    """PERMISSIVE: a client's own TLS (no Istio ALPN) is passed through to the app untouched;
    mTLS chains match Istio's ALPNs (#12 defect 7). STRICT takes any TLS as mTLS and refuses
    the rest. Istio: pilot/pkg/networking/core/filterchain_options.go
    (inboundPermissiveTCPFilterChainMatchWithMxcOptionsAndPlainTLS, allIstioMtlsALPNs,
    inboundStrictTCPFilterChainMatchOptions)."""
    s = store()
    s.put_istio(strict_on(5432))
    inbound = as_json(
        translate(s, [local("web-1", {"app": "web"})])[e.LISTENER]["virtualInbound/shop/web-1"]
    )
    mtls = chain_named(inbound, "inbound|8080||-mtls")
    assert mtls["filterChainMatch"]["applicationProtocols"] == list(MTLS_ALPNS)
    assert "transportSocket" in mtls
    # Other TLS on the PERMISSIVE HTTP port: bytes to the app, no TLS termination, no HTTP.
    own_tls = chain_named(inbound, "inbound|8080||-tls")
    assert own_tls["filterChainMatch"] == {"destinationPort": 8080, "transportProtocol": "tls"}
    assert "transportSocket" not in own_tls
    assert terminal_cluster(own_tls) == "InboundPassthroughCluster"
    # The catch-all: mTLS only with Istio's ALPN; other TLS falls to the plain passthrough.
    catch_all = chain_named(inbound, "InboundPassthroughCluster-mtls")
    assert catch_all["filterChainMatch"]["applicationProtocols"][:2] == [
        "istio",
        "istio-peer-exchange",
    ]
    assert terminal_cluster(inbound["defaultFilterChain"]) == "InboundPassthroughCluster"
    # STRICT port: any TLS is taken as mTLS (a client without a mesh certificate fails the
    # handshake); anything else is refused.
    strict = chain_named(inbound, "inbound|5432||-mtls")
    assert strict["filterChainMatch"] == {"destinationPort": 5432, "transportProtocol": "tls"}
    refused = chain_named(inbound, "inbound|5432||")
    assert refused["filters"][0]["name"] == "envoy.filters.network.rbac"


def test_our_clients_offer_istio_alpn_on_tcp_and_http_clusters() -> None:
    """Servers tell mesh mTLS by ALPN, so every mTLS client socket must offer it."""
    out = translate(store(), [local("a")])
    for name in (ME, "no-identity"):
        common = socket_named(originate(out), name)["typedConfig"]["commonTlsContext"]
        assert common["alpnProtocols"][0] in MTLS_ALPNS, name


def test_ipv6_service_vips_match_as_one_host() -> None:
    """#12 defect 9: an IPv6 cluster IP is a /128, not a /32 (which would take a whole
    2^96-address block and clash with every other IPv6 service on the port)."""
    s = store()
    s.put_service(Service("shop", "v6a", "fd00:10:96::a", (ServicePort(80, "http"),), {"a": "6"}))
    s.put_service(Service("shop", "v6b", "fd00:10:96::b", (ServicePort(80, "http"),), {"a": "6"}))
    listener = as_json(translate(s, [local("a")])[e.LISTENER]["outbound-internal"])
    prefixes = {
        r["addressPrefix"]: r["prefixLen"]
        for c in listener["filterChains"]
        for r in c["filterChainMatch"].get("prefixRanges", [])
    }
    assert prefixes["fd00:10:96::a"] == 128 and prefixes["fd00:10:96::b"] == 128
    assert prefixes["10.96.0.10"] == 32


def test_a_headless_service_is_translated_not_reported_as_a_bad_object() -> None:
    """A headless Service (clusterIP None) has no VIP chain (callers dial pod IPs), but its
    clusters and endpoints are there and it is no problem to report."""
    from nodeagent.translate import build

    result = build(store(), [local("client")])
    assert result.problems == {}
    assert "outbound|80||headless.shop.svc.cluster.local" in result.resources[e.CLUSTER]
