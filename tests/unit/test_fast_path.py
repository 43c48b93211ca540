"""The same-node fast path (issue #14 part 3): a call between two pods of one node is handed from
the caller's outbound side to the callee's inbound side inside the node Envoy, without TLS, and
keeps what the callee's inbound side enforces (PeerAuthentication) and tells the app (who called).
Cross-node endpoints, plaintext ones and the sidecar form are unchanged."""

from __future__ import annotations

from typing import Any

from nodeagent.mesh.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    Namespace,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, TranslationCache, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import endpoint_where
from tests.unit.test_authz import policy as authz_policy
from tests.unit.test_translate import as_json, stamps

HOST = "web.shop.svc.cluster.local"
HTTP_EDS = f"outbound|80||{HOST}"
TCP_EDS = f"outbound|5432||{HOST}"
TD = "spiffe://cluster.local/ns"
NETNS_KEY = "envoy.network.upstream_bind_override.network_namespace"


def mesh(*policies: IstioResource) -> MeshStore:
    """shop in the mesh; web (HTTP 80 -> 8080, TCP 5432) with web-1 here and web-2 elsewhere."""
    s = MeshStore()
    s.put_namespace(Namespace("shop", {"istio-injection": "enabled"}))
    s.put_namespace(Namespace("front", {"istio-injection": "enabled"}))
    ports = (ServicePort(80, "http", 8080), ServicePort(5432, "tcp-db", 5432))
    s.put_service(Service("shop", "web", "10.96.0.10", ports, {"app": "web"}))
    for name, ip, node in (("web-1", "10.244.1.5", "node1"), ("web-2", "10.244.2.7", "node2")):
        s.put_pod(Pod("shop", name, "u", node, "web", {"app": "web"}, pod_ips=(ip,)))
    s.put_pod(Pod("front", "f", "u", "node1", "f", {"app": "f"}, pod_ips=("10.244.1.9",)))
    s.put_endpoint_slice(
        EndpointSlice(
            "shop",
            "web-abc",
            "web",
            (
                Endpoint(("10.244.1.5",), True, "node1", "shop/web-1"),
                Endpoint(("10.244.2.7",), True, "node2", "shop/web-2"),
            ),
            (EndpointPort(8080, "http"), EndpointPort(5432, "tcp-db")),
        )
    )
    for policy in policies:
        s.put_istio(policy)
    return s


def here(s: MeshStore, key: str) -> LocalPod:
    pod = s.pods[key]
    return LocalPod(pod, f"/run/netns/{pod.name}")


def reached(out: dict[str, Any], eds: str) -> dict[str, str]:
    """endpoint ip:port -> the internal listener that reaches it."""
    cla = as_json(out[e.ENDPOINT][eds])
    return {
        endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"]): lb[
            "endpoint"
        ]["address"]["envoyInternalAddress"]["serverListenerName"]
        for lb in cla["endpoints"][0]["lbEndpoints"]
    }


def policy(kind: str, namespace: str, spec: dict[str, Any]) -> IstioResource:
    group = "security.istio.io" if kind == "PeerAuthentication" else "networking.istio.io"
    return IstioResource(group, "v1", kind, namespace, kind.lower(), spec)


def test_a_local_mesh_endpoint_is_reached_through_its_pods_fast_path() -> None:
    s = mesh()
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    for eds, port in ((HTTP_EDS, 8080), (TCP_EDS, 5432)):
        assert reached(out, eds) == {
            f"10.244.1.5:{port}": "inboundInternal/shop/web-1",  # here: no TLS
            f"10.244.2.7:{port}": "originate",  # another node: mTLS, unchanged
        }
    # The same endpoints while web-1 is not captured here: both through originate.
    out = translate(s, [here(s, "front/f")])
    assert set(reached(out, HTTP_EDS).values()) == {"originate"}


def test_the_sidecar_form_has_no_fast_path() -> None:
    s = mesh()
    out = translate(s, [here(s, "shop/web-1")], sidecar=True)
    assert "inboundInternal/shop/web-1" not in out[e.LISTENER]
    cla = as_json(out[e.ENDPOINT][HTTP_EDS])
    assert all(
        "socketAddress" in lb["endpoint"]["address"] for lb in cla["endpoints"][0]["lbEndpoints"]
    )


def test_a_port_without_mtls_is_not_on_the_fast_path() -> None:
    """PeerAuthentication DISABLE on web's 8080: callers send it plaintext (auto mTLS), the normal
    way, so it is not handed over with an identity; 5432 stays on the fast path."""
    disable = policy(
        "PeerAuthentication",
        "shop",
        {
            "selector": {"matchLabels": {"app": "web"}},
            "portLevelMtls": {"8080": {"mode": "DISABLE"}},
        },
    )
    s = mesh(disable)
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    assert reached(out, HTTP_EDS)["10.244.1.5:8080"] == "originate"
    assert reached(out, TCP_EDS)["10.244.1.5:5432"] == "inboundInternal/shop/web-1"
    fast = as_json(out[e.LISTENER]["inboundInternal/shop/web-1"])
    assert [c["filterChainMatch"] for c in fast["filterChains"]] == [{"destinationPort": 5432}]
    assert "defaultFilterChain" not in fast  # nothing else can be reached there


def test_a_destination_rule_sending_plaintext_keeps_the_normal_path() -> None:
    """A DestinationRule in front sets tls DISABLE for web: front's calls must reach web-1 as
    plaintext (refused there if it is STRICT), never with front's identity. Istio's client
    namespace lookup: https://istio.io/latest/docs/ops/best-practices/traffic-management/"""
    dr = policy(
        "DestinationRule", "front", {"host": HOST, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}
    )
    s = mesh(dr)
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    assert set(reached(out, HTTP_EDS).values()) == {"originate"}


def test_the_fast_path_listener_enforces_and_tells_what_the_inbound_one_does() -> None:
    """STRICT lets a mesh caller in (its identity was stamped by its own listener); the chain
    delivers from the callee's netns; HTTP gets x-forwarded-client-cert and -for from the filter
    state, as Istio's inbound sets them over mTLS (By= the callee, URI= the caller)."""
    strict = policy("PeerAuthentication", "shop", {"mtls": {"mode": "STRICT"}})
    s = mesh(strict)
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    fast = as_json(out[e.LISTENER]["inboundInternal/shop/web-1"])
    assert "internalListener" in fast and fast["statPrefix"] == "inboundInternal"
    assert "address" not in fast  # reachable only from this Envoy's own clusters
    chains = {c["name"]: c for c in fast["filterChains"]}
    assert set(chains) == {"inbound|8080||", "inbound|5432||"}
    http = chains["inbound|8080||"]
    assert http["filterChainMatch"] == {"destinationPort": 8080}
    stamp, hcm = http["filters"]
    assert stamp["name"] == "envoy.filters.network.set_filter_state"
    values = {v["objectKey"]: v for v in stamp["typedConfig"]["onNewConnection"]}
    assert (
        values[NETNS_KEY]["formatString"]["textFormatSource"]["inlineString"] == "/run/netns/web-1"
    )
    assert values[NETNS_KEY]["sharedWithUpstream"] == "ONCE"  # overrides the caller's
    callee = values["io.nodeagent.callee"]["formatString"]["textFormatSource"]["inlineString"]
    assert callee == f"{TD}/shop/sa/web"
    config = hcm["typedConfig"]
    assert config["rds"]["routeConfigName"] == "inboundInternal|8080||"
    # SANITIZE (the enum's default, so absent from JSON): nothing a caller sent survives.
    assert config.get("forwardClientCertDetails", "SANITIZE") == "SANITIZE"
    assert not config.get("useRemoteAddress")
    (tcp,) = chains["inbound|5432||"]["filters"][1:]
    assert tcp["typedConfig"]["cluster"] == "InboundPassthroughCluster"
    route = as_json(out[e.ROUTE]["inboundInternal|8080||"])
    headers = {h["header"]["key"]: h for h in route["requestHeadersToAdd"]}
    xfcc = headers["x-forwarded-client-cert"]
    assert xfcc["header"]["value"] == (
        "By=%FILTER_STATE(io.nodeagent.callee:PLAIN)%;URI=%FILTER_STATE(io.nodeagent.caller:PLAIN)%"
    )
    assert xfcc["appendAction"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    xff = headers["x-forwarded-for"]
    assert xff["header"]["value"] == "%FILTER_STATE(io.nodeagent.source:PLAIN)%"
    assert route["virtualHosts"][0]["routes"][0]["route"]["cluster"] == "inbound|8080||"
    # The caller's listener stamps its IP for that x-forwarded-for, TRANSITIVE as its identity.
    caller = stamps(as_json(out[e.LISTENER]["virtualOutbound/front/f"]))
    source = caller["io.nodeagent.source"]
    assert source["formatString"]["textFormatSource"]["inlineString"] == "10.244.1.9"
    assert source["sharedWithUpstream"] == "TRANSITIVE"


def test_a_pod_captured_or_released_changes_only_its_services_endpoints() -> None:
    s = mesh()
    s.put_service(Service("front", "other", "10.96.0.20", (ServicePort(80, "http"),), {"app": "o"}))
    cache = TranslationCache()
    before = cache.build(s, [here(s, "front/f")]).resources
    after = cache.build(s, [here(s, "front/f"), here(s, "shop/web-1")]).resources
    changed = {n for n, m in after[e.ENDPOINT].items() if before[e.ENDPOINT].get(n) is not m}
    assert changed == {HTTP_EDS, TCP_EDS}
    assert reached(after, HTTP_EDS)["10.244.1.5:8080"] == "inboundInternal/shop/web-1"
    again = cache.build(s, [here(s, "front/f")]).resources
    assert reached(again, HTTP_EDS)["10.244.1.5:8080"] == "originate"


def test_a_pod_no_service_names_has_no_fast_path_listener() -> None:
    """A client-only pod (no service selects it) is nobody's endpoint: it gets no fast-path
    listener, only its outbound and inbound ones."""
    s = mesh()
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    assert "inboundInternal/front/f" not in out[e.LISTENER]
    assert "virtualInbound/front/f" in out[e.LISTENER]


DENY_IP = {
    "selector": {"matchLabels": {"app": "web"}},
    "action": "DENY",
    "rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.9"]}}]}],
}


def test_a_pod_whose_policies_read_the_callers_ip_is_off_the_fast_path() -> None:
    """An ipBlocks DENY on web: the fast path's downstream is an internal connection with no
    caller address, so front's calls go through originate (mTLS from front's netns, its pod IP
    the peer web-1's inbound RBAC judges), on every port; web-1 has no fast-path listener. A
    policy without IP keys keeps it."""
    s = mesh(authz_policy(DENY_IP, name="deny-ip"))
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    for eds, port in ((HTTP_EDS, 8080), (TCP_EDS, 5432)):
        assert reached(out, eds)[f"10.244.1.5:{port}"] == "originate"
    assert "inboundInternal/shop/web-1" not in out[e.LISTENER]
    principals = {"source": {"principals": ["cluster.local/ns/front/sa/f"]}}
    by_name = {**DENY_IP, "rules": [{"from": [principals]}]}
    s = mesh(authz_policy(by_name, name="deny-sa"))
    out = translate(s, [here(s, "front/f"), here(s, "shop/web-1")])
    assert reached(out, HTTP_EDS)["10.244.1.5:8080"] == "inboundInternal/shop/web-1"


def test_an_ip_policy_moves_only_its_pods_endpoints_and_back() -> None:
    """Incremental: adding the policy re-sends the endpoints of web-1's services only (another
    service of another local pod keeps its assignment); removing it restores the fast path."""
    s = mesh()
    s.put_service(Service("front", "other", "10.96.0.20", (ServicePort(80, "http"),), {"app": "f"}))
    pods = [here(s, "front/f"), here(s, "shop/web-1")]
    cache = TranslationCache()
    before = cache.build(s, pods).resources
    s.put_istio(authz_policy(DENY_IP, name="deny-ip"))
    after = cache.build(s, pods).resources
    changed = {n for n, m in after[e.ENDPOINT].items() if before[e.ENDPOINT].get(n) is not m}
    assert changed == {HTTP_EDS, TCP_EDS}
    assert reached(after, HTTP_EDS)["10.244.1.5:8080"] == "originate"
    assert "inboundInternal/shop/web-1" not in after[e.LISTENER]
    s.delete_istio("AuthorizationPolicy/shop/deny-ip")
    again = cache.build(s, pods).resources
    assert reached(again, HTTP_EDS)["10.244.1.5:8080"] == "inboundInternal/shop/web-1"
    assert "inboundInternal/shop/web-1" in again[e.LISTENER]
