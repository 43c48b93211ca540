"""VirtualService tcp[] and tls[] rules the caller or the SNI decides (issue #15), on the shared
node Envoy: a service port's routes listener (translate/l4_routes.py) picks the first rule that
holds per connection; ports whose routing is the same for everyone keep their one chain.

Istio's semantics: istio.io/latest/docs/reference/config/networking/virtual-service/#TCPRoute,
#TLSRoute, #L4MatchAttributes, #TLSMatchAttributes, and istio/istio
pilot/pkg/networking/core/tls.go (matchTCP and matchTLS check port, gateways, sourceLabels and
sourceNamespace; a TLS port with a matching tls[] rule has no default chain, so an unmatched
SNI is closed; a TLS port ignores tcp[] rules and a TCP port tls[] ones).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, TranslationCache, internal
from nodeagent.translate import envoy as e
from nodeagent.translate.protocol import HTTPS, TCP, TLS, is_tls, port_protocol
from nodeagent.translate.virtual_service import SNI, Condition, L4Rule, tcp_rules, tls_rules
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import as_json

DB = "db.shop.svc.cluster.local"
WEB = "web.shop.svc.cluster.local"
DB_CHAIN, WEB_CHAIN = f"outbound|5432||{DB}", f"outbound|443||{WEB}"
DB_ROUTES, WEB_ROUTES = f"outbound-routes|5432||{DB}", f"outbound-routes|443||{WEB}"


def vs(spec: Mapping[str, Any], namespace: str = "shop", name: str = "r") -> IstioResource:
    return IstioResource("networking.istio.io", "v1", "VirtualService", namespace, name, spec)


def dr(host: str) -> IstioResource:
    spec = {
        "host": host,
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
    return IstioResource("networking.istio.io", "v1", "DestinationRule", "shop", host, spec)


def to(subset: str, host: str = "db", weight: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": {"host": host, "subset": subset}}
    if weight:
        out["weight"] = weight
    return out


def cluster_of(dest: Mapping[str, Any]) -> str:
    return f"outbound||{dest.get('subset', '')}|{dest['host']}"


# --- the rules, as translated ---


def test_tls_rules_exact_and_wildcard_sni_port_weights_and_source() -> None:
    spec = {
        "tls": [
            {
                "match": [{"port": 443, "sniHosts": ["a.example", "*.b.example"]}],
                "route": [to("v1", weight=90), to("v2", weight=10)],
            },
            {"match": [{"port": 8443, "sniHosts": ["other.example"]}], "route": [to("skipped")]},
            {
                "match": [
                    {"sniHosts": ["c.example"], "sourceLabels": {"app": "x"}},
                    {"sniHosts": ["c.example"], "sourceNamespace": "front", "gateways": ["mesh"]},
                ],
                "route": [to("v2")],
            },
            {"match": [{"sniHosts": ["d.example"], "gateways": ["gw"]}], "route": [to("gw")]},
        ]
    }
    first, second = tls_rules(vs(spec), 443, cluster_of, "10.96.0.5")
    ((sni,),) = first.when
    assert sni == Condition(
        SNI,
        (
            {"exact": "a.example", "ignore_case": True},
            {"suffix": ".b.example", "ignore_case": True},
        ),
    )
    assert first.route == {
        "weighted_clusters": {
            "clusters": [
                {"name": "outbound||v1|db", "weight": 90},
                {"name": "outbound||v2|db", "weight": 10},
            ]
        }
    }
    # Two matches: either; each its SNI and its caller (a gateways list with "mesh" keeps it).
    labels, namespace = second.when
    assert [c.input for c in labels] == [SNI, internal.LABELS_KEY]
    assert labels[1].matchers == ({"safe_regex": {"regex": r".*,app\=x,.*"}},)
    assert [c.input for c in namespace] == [SNI, internal.CALLER_KEY]
    assert namespace[1].matchers == ({"safe_regex": {"regex": "spiffe://[^/]+/ns/front/sa/[^/]+"}},)
    assert second.route == {"cluster": "outbound||v2|db"}


def test_tcp_rules_source_matches_are_conditions_up_to_the_first_rule_for_everyone() -> None:
    spec = {
        "tcp": [
            {"match": [{"sourceLabels": {"version": "v2", "app": "c"}}], "route": [to("v2")]},
            {"match": [{"port": 9999}], "route": [to("skipped")]},
            {"match": [{"sourceNamespace": "front"}, {"port": 5432}], "route": [to("v1")]},
            {"route": [to("never")]},
        ]
    }
    first, second = tcp_rules(vs(spec), 5432, cluster_of, "10.96.0.5")
    ((labels,),) = first.when
    # Keys sorted, each pair between commas: one regex for the whole selector.
    assert labels == Condition(
        internal.LABELS_KEY, ({"safe_regex": {"regex": r".*,app\=c,(.*,)?version\=v2,.*"}},)
    )
    assert first.route == {"cluster": "outbound||v2|db"}
    # One of its matches holds for every caller: the rule takes everyone, nothing after it.
    assert second == L4Rule((), {"cluster": "outbound||v1|db"})


def test_a_tls_match_needs_sni_hosts() -> None:
    with pytest.raises(ValueError, match=r"shop/r tls\[0\]\.match\[0\]\.sniHosts"):
        tls_rules(vs({"tls": [{"match": [{}], "route": [to("v1")]}]}), 443, cluster_of)


# --- on the node ---


def mesh(*rules: IstioResource, callers: int = 2) -> tuple[MeshStore, list[LocalPod]]:
    """db (TCP 5432) and web (TLS 443) in shop, v1 and v2 on n2; CALLERS pods on n1 in front,
    alternately app=curl and app=sleep."""
    s = MeshStore("n1")
    for ns in ("shop", "front"):
        s.put_namespace(Namespace(ns, {"istio-injection": "enabled"}))
    for name, ip, port, pname in (
        ("db", "10.96.0.5", 5432, "tcp-db"),
        ("web", "10.96.0.6", 443, "tls"),
    ):
        s.put_service(Service("shop", name, ip, (ServicePort(port, pname),), {"app": name}))
        endpoints = []
        for i, version in enumerate(("v1", "v2")):
            pod_ip = f"10.244.2.{10 * len(name) + i}"
            labels = {"app": name, "version": version}
            s.put_pod(Pod("shop", f"{name}-{version}", "u", "n2", name, labels, pod_ips=(pod_ip,)))
            endpoints.append(Endpoint((pod_ip,), True, "n2", f"shop/{name}-{version}"))
        s.put_endpoint_slice(
            EndpointSlice("shop", f"{name}-x", name, tuple(endpoints), (EndpointPort(port, pname),))
        )
    local = []
    for i in range(callers):
        app = "curl" if i % 2 == 0 else "sleep"
        pod = Pod("front", f"c{i}", "u", "n1", app, {"app": app}, pod_ips=(f"10.244.1.{i + 1}",))
        s.put_pod(pod)
        local.append(LocalPod(pod, f"/run/netns/c{i}"))
    for rule in rules:
        s.put_istio(rule)
    return s, local


def internal_chains(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = as_json(out[e.LISTENER][internal.OUTBOUND_INTERNAL])
    return {c["name"]: c for c in listener["filterChains"]}


def chain_clusters(listener: dict[str, Any]) -> dict[str, Any]:
    """Filter chain name -> where its tcp_proxy goes (cluster or weighted clusters)."""
    out = {}
    for chain in listener["filterChains"]:
        proxy = chain["filters"][-1]["typedConfig"]
        out[chain["name"]] = proxy.get("cluster") or proxy.get("weightedClusters")
    return out


DB_BY_LABELS = vs(
    {
        "hosts": ["db"],
        "tcp": [
            {"match": [{"sourceLabels": {"app": "curl"}}], "route": [to("v2")]},
            {"route": [to("v1")]},
        ],
    }
)
WEB_BY_SNI = vs(
    {
        "hosts": ["web", "a.example", "b.example"],
        "tls": [
            {"match": [{"sniHosts": ["a.example"]}], "route": [to("v1", "web")]},
            {"match": [{"sniHosts": ["b.example"]}], "route": [to("v2", "web")]},
        ],
    },
    name="web",
)


def test_tcp_source_labels_one_routes_listener_for_any_number_of_callers() -> None:
    made = []
    for callers in (2, 10):
        out = TranslationCache().build(*mesh(dr("db"), DB_BY_LABELS, callers=callers)).resources
        made.append((out[e.LISTENER][DB_ROUTES], out[e.CLUSTER][DB_ROUTES]))
        assert [n for n in out[e.LISTENER] if n.startswith("outbound-routes")] == [DB_ROUTES]
    assert made[0] == made[1]  # 2 or 10 callers: the very same listener and cluster
    out = TranslationCache().build(*mesh(dr("db"), DB_BY_LABELS)).resources
    hop = internal_chains(out)[DB_CHAIN]
    restamp, proxy = hop["filters"]
    assert proxy["typedConfig"]["cluster"] == DB_ROUTES
    (entry,) = restamp["typedConfig"]["onNewConnection"]
    assert entry["objectKey"] == "envoy.filters.listener.original_dst.local_ip"
    # TRANSITIVE: a DestinationRule PASSTHROUGH cluster behind the routes listener restores it.
    assert entry["sharedWithUpstream"] == "TRANSITIVE"
    listener = as_json(out[e.LISTENER][DB_ROUTES])
    assert listener["internalListener"] == {}
    # A server-first protocol must not wait for a ClientHello: no TLS inspector on a TCP port.
    assert [f["name"] for f in listener["listenerFilters"]] == [
        "envoy.filters.listener.original_dst"
    ]
    assert chain_clusters(listener) == {
        f"{DB_ROUTES}#0": f"outbound|5432|v2|{DB}",
        f"{DB_ROUTES}#1": f"outbound|5432|v1|{DB}",
    }
    matcher = listener["filterChainMatcher"]
    (first,) = matcher["matcherList"]["matchers"]
    single = first["predicate"]["singlePredicate"]
    assert single["input"]["typedConfig"]["key"] == internal.LABELS_KEY
    assert single["valueMatch"]["safeRegex"]["regex"] == r".*,app\=curl,.*"
    assert first["onMatch"]["action"]["name"] == f"{DB_ROUTES}#0"
    assert matcher["onNoMatch"]["action"]["name"] == f"{DB_ROUTES}#1"
    # The TLS port has no rule: its chain is as before, without a hop.
    assert chain_clusters({"filterChains": [internal_chains(out)[WEB_CHAIN]]}) == {
        WEB_CHAIN: WEB_CHAIN
    }
    assert WEB_ROUTES not in out[e.LISTENER]


def test_rules_the_same_for_every_caller_keep_the_one_chain() -> None:
    rule = vs({"hosts": ["db"], "tcp": [{"match": [{"port": 5432}], "route": [to("v2")]}]})
    out = TranslationCache().build(*mesh(dr("db"), rule)).resources
    assert DB_ROUTES not in out[e.LISTENER] and DB_ROUTES not in out[e.CLUSTER]
    proxy = internal_chains(out)[DB_CHAIN]["filters"][-1]["typedConfig"]
    assert proxy["cluster"] == f"outbound|5432|v2|{DB}"


def test_tls_sni_routes_and_an_unmatched_sni_is_closed() -> None:
    out = TranslationCache().build(*mesh(dr("web"), WEB_BY_SNI)).resources
    listener = as_json(out[e.LISTENER][WEB_ROUTES])
    assert [f["name"] for f in listener["listenerFilters"]] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
    ]
    assert chain_clusters(listener) == {
        f"{WEB_ROUTES}#0": f"outbound|443|v1|{WEB}",
        f"{WEB_ROUTES}#1": f"outbound|443|v2|{WEB}",
        f"{WEB_ROUTES}#2": "BlackHoleCluster",  # Istio: no chain for another SNI
    }
    sni = [
        m["predicate"]["singlePredicate"]
        for m in listener["filterChainMatcher"]["matcherList"]["matchers"]
    ]
    assert [p["valueMatch"] for p in sni] == [
        {"exact": "a.example", "ignoreCase": True},
        {"exact": "b.example", "ignoreCase": True},
    ]
    assert all(p["input"]["typedConfig"]["@type"].endswith("ServerNameInput") for p in sni)


def test_tls_rules_for_some_callers_only_leave_the_others_on_the_port_cluster() -> None:
    """A caller for which a tls[] match holds has only its SNI chains (another SNI is closed);
    any other caller gets the port's own cluster whatever the SNI (tls.go: !hasTLSMatch)."""
    rule = vs(
        {
            "hosts": ["web"],
            "tls": [
                {
                    "match": [{"sniHosts": ["a.example"], "sourceLabels": {"app": "curl"}}],
                    "route": [to("v2", "web")],
                }
            ],
        }
    )
    out = TranslationCache().build(*mesh(dr("web"), rule)).resources
    listener = as_json(out[e.LISTENER][WEB_ROUTES])
    assert list(chain_clusters(listener).values()) == [
        f"outbound|443|v2|{WEB}",
        "BlackHoleCluster",
        WEB_CHAIN,
    ]
    sni_and_curl, curl = listener["filterChainMatcher"]["matcherList"]["matchers"]
    assert len(sni_and_curl["predicate"]["andMatcher"]["predicate"]) == 2
    assert curl["predicate"]["singlePredicate"]["input"]["typedConfig"]["key"] == (
        internal.LABELS_KEY
    )


def test_tcp_rules_do_not_apply_to_a_tls_port_nor_tls_rules_to_a_tcp_port() -> None:
    rule = vs(
        {
            "hosts": ["web", "db"],
            "tcp": [{"match": [{"port": 443}], "route": [to("v2", "web")]}],
            "tls": [{"match": [{"port": 5432, "sniHosts": ["db"]}], "route": [to("v2")]}],
        }
    )
    out = TranslationCache().build(*mesh(dr("web"), dr("db"), rule)).resources
    chains = internal_chains(out)
    assert chains[WEB_CHAIN]["filters"][-1]["typedConfig"]["cluster"] == WEB_CHAIN
    assert chains[DB_CHAIN]["filters"][-1]["typedConfig"]["cluster"] == DB_CHAIN


def test_namespaces_that_see_different_tcp_rules_are_told_apart_by_the_caller() -> None:
    """shop's own VirtualService (exportTo ".") binds shop's callers only; front's callers keep
    the port's cluster. Before, the node fell back to the port's cluster for both."""
    own = vs({"hosts": ["db"], "exportTo": ["."], "tcp": [{"route": [to("v2")]}]})
    s, local = mesh(dr("db"), own)
    home = Pod("shop", "sleep", "u", "n1", "sleep", {"app": "sleep"}, pod_ips=("10.244.1.9",))
    s.put_pod(home)
    out = TranslationCache().build(s, [*local, LocalPod(home, "/run/netns/home")]).resources
    listener = as_json(out[e.LISTENER][DB_ROUTES])
    assert chain_clusters(listener) == {
        f"{DB_ROUTES}#0": DB_CHAIN,  # front: guarded by its namespace
        f"{DB_ROUTES}#1": f"outbound|5432|v2|{DB}",  # shop: the last view, unguarded
    }
    (front,) = listener["filterChainMatcher"]["matcherList"]["matchers"]
    guard = front["predicate"]["singlePredicate"]
    assert guard["input"]["typedConfig"]["key"] == internal.CALLER_KEY
    assert guard["valueMatch"]["safeRegex"]["regex"] == "^spiffe://[^/]+/ns/(front)/sa/[^/]+$"


def test_real_envoy_accepts_the_routes_listeners_and_the_hop(tmp_path: Path) -> None:
    """The node's outbound-internal, routes listeners and their clusters in a static bootstrap
    that the venv's Envoy checks in validate mode."""
    mixed = vs(
        {
            "hosts": ["web", "a.example", "b.example"],
            "tls": [
                {
                    "match": [
                        {"sniHosts": ["a.example", "*.b.example"], "sourceLabels": {"app": "curl"}},
                        {"sniHosts": ["b.example"], "sourceNamespace": "front"},
                    ],
                    "route": [to("v1", "web", 30), to("v2", "web", 70)],
                }
            ],
        },
        name="web",
    )
    out = TranslationCache().build(*mesh(dr("db"), dr("web"), DB_BY_LABELS, mixed)).resources
    names = [internal.OUTBOUND_INTERNAL, DB_ROUTES, WEB_ROUTES]
    assert_envoy_accepts_resources(
        tmp_path,
        clusters=[out[e.CLUSTER][n] for n in (DB_ROUTES, WEB_ROUTES)],
        listeners=[out[e.LISTENER][n] for n in names],
        node_runtime=True,
    )


def test_https_and_tls_ports_are_tls_by_name_or_app_protocol() -> None:
    """Istio's protocol selection: the port name's prefix, or appProtocol (IsTLS: HTTPS, TLS)."""
    assert [port_protocol(n) for n in ("tls", "https-web", "tcp-db", "web")] == [
        TLS,
        HTTPS,
        TCP,
        TCP,
    ]
    assert port_protocol("db", app_protocol="tls") == TLS
    assert is_tls(port_protocol("x", app_protocol="HTTPS")) and not is_tls(TCP)
