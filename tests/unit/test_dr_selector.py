"""DestinationRule workloadSelector on the shared node Envoy (issue #15).

Istio: istio.io/latest/docs/reference/config/networking/destination-rule/ (workloadSelector: the
rule applies to the selected pods of its own namespace); pilot/pkg/model/sidecar.go
(SidecarScope.DestinationRule: a selecting rule first, else the rule without a selector). The node
groups local pods in client classes (namespace, and the labels of theirs the selectors read),
never one per pod (docs/o1-config.md): a class gets one copy of the clusters and routes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodeagent.mesh.model import IstioResource
from nodeagent.translate import LocalPod, TranslationCache
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import endpoint_where
from tests.unit.test_service_views import (
    HOST,
    ROUTE,
    SUBSETS,
    V1,
    guards,
    resource,
    routes,
    shop,
    to,
)
from tests.unit.test_translate import as_json, originate

SELECTED = f"{V1}~front/curl-only"
OWN = f"{ROUTE}~front/curl-only"
FRONT_WIDE = f"{V1}~front/front-wide"
FRONT = ("^spiffe://[^/]+/ns/(front)/sa/[^/]+$",)
FRONT_CURL = (*FRONT, r".*,app\=curl,.*")
SHOP = ("^spiffe://[^/]+/ns/(shop)/sa/[^/]+$",)
# front's rule for ph without a selector: its other pods use it (a namespace whose rules for a
# host all select other pods gives those no rule at all: policy._pick, istio/istio#57719).
NAMESPACE_WIDE = resource(
    "DestinationRule",
    "front",
    "front-wide",
    {"host": HOST, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
)


def selector_rule(**policy: Any) -> IstioResource:
    """front's rule for ph for its app=curl pods: its v1 is the pods labelled version=v2."""
    return resource(
        "DestinationRule",
        "front",
        "curl-only",
        {
            "host": HOST,
            "workloadSelector": {"matchLabels": {"app": "curl"}},
            "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}, **policy},
            "subsets": [{"name": "v1", "labels": {"version": "v2"}}],
        },
    )


def shop_with(*rules: IstioResource, callers: int = 2) -> Any:
    """shop() with a SUBSETS rule in shop, front's NAMESPACE_WIDE one, a VirtualService sending
    everyone to v1, and RULES."""
    vs = resource("VirtualService", "shop", "ph", {"hosts": ["ph"], "http": [{"route": to("v1")}]})
    return shop(SUBSETS, NAMESPACE_WIDE, vs, *rules, callers=callers)


def endpoint_ids(out: dict[str, Any], cluster: str) -> list[str]:
    (group,) = as_json(out[e.ENDPOINT][cluster])["endpoints"]
    return [
        endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"])
        for lb in group["lbEndpoints"]
    ]


def test_two_pods_of_one_namespace_see_different_clusters_for_the_same_host() -> None:
    """front's app=curl pods follow front's selector rule (its subsets, its load balancer);
    its app=sleep pods front's rule without a selector, shop's pod shop's rule."""
    out = TranslationCache().build(*shop_with(selector_rule())).resources
    assert as_json(out[e.CLUSTER][SELECTED])["lbPolicy"] == "RANDOM"
    assert as_json(out[e.CLUSTER][V1])["lbPolicy"] == "LEAST_REQUEST"
    assert endpoint_ids(out, SELECTED) == ["10.244.2.2:8080"]  # the selector rule's v1
    assert endpoint_ids(out, V1) == endpoint_ids(out, FRONT_WIDE) == ["10.244.2.1:8080"]
    found = routes(out)
    # The class's routes first, guarded by namespace and labels; then the namespace views.
    assert [(tuple(guards(r)), r["route"]["cluster"]) for r in found] == [
        (FRONT_CURL, SELECTED),
        (FRONT, FRONT_WIDE),
        (SHOP, V1),
    ]


def test_one_variant_per_class_whatever_the_number_of_pods() -> None:
    """2 or 10 front pods (half app=curl): the same clusters and the very same route table."""
    seen = []
    for callers in (2, 10):
        out = TranslationCache().build(*shop_with(selector_rule(), callers=callers)).resources
        clusters = sorted(n for n in out[e.CLUSTER] if n.startswith("outbound|"))
        seen.append((clusters, out[e.ROUTE][ROUTE]))
    assert seen[0] == seen[1]
    assert {n for n in seen[0][0] if "~front/curl-only" in n} == {OWN, SELECTED}


def test_the_selector_rules_tls_mode_binds_the_selected_pods_clusters_only() -> None:
    """tls DISABLE in the selector rule: the originate-mtls override is keyed by the class's own
    clusters, which only the selected pods' routes name (two front pods of the same service
    account, one selected, the other not, send as their rule says)."""
    store, local = shop_with(selector_rule(tls={"mode": "DISABLE"}))
    out = TranslationCache().build(store, local).resources
    by_caller = originate(out)["transportSocketMatcher"]["matcherTree"]["exactMatchMap"]["map"]
    curl = by_caller["spiffe://cluster.local/ns/front/sa/curl"]["matcher"]["matcherTree"]
    overrides = {
        cluster: m["action"]["typedConfig"]["name"]
        for cluster, m in curl["exactMatchMap"]["map"].items()
    }
    assert overrides == {OWN: "plaintext", SELECTED: "plaintext"}
    meta = as_json(out[e.CLUSTER][SELECTED])["metadata"]["filterMetadata"]["nodeagent.service"]
    assert meta["name"] == SELECTED and meta["tls_modes"] == {"front": "DISABLE"}
    # front's unselected pods' clusters, and shop's, keep auto mTLS.
    for cluster in (V1, FRONT_WIDE):
        meta = as_json(out[e.CLUSTER][cluster])["metadata"]["filterMetadata"]["nodeagent.service"]
        assert "tls_modes" not in meta


def test_a_subsets_tls_mode_binds_that_subsets_cluster() -> None:
    """Subset-level tls.mode (destination-rule/#Subset trafficPolicy): only that subset's
    cluster is sent plaintext."""
    rule = resource(
        "DestinationRule",
        "shop",
        "ph",
        {
            "host": "ph",
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"tls": {"mode": "DISABLE"}},
                },
            ],
        },
    )
    out = TranslationCache().build(*shop(rule)).resources
    by_caller = originate(out)["transportSocketMatcher"]["matcherTree"]["exactMatchMap"]["map"]
    me = "spiffe://cluster.local/ns/shop/sa/sleep"
    tree = by_caller[me]["matcher"]["matcherTree"]["exactMatchMap"]["map"]
    overrides = {cluster: m["action"]["typedConfig"]["name"] for cluster, m in tree.items()}
    v2 = f"outbound|8080|v2|{HOST}"
    assert overrides == {ROUTE: me, V1: me, v2: "plaintext"}


def test_a_label_change_moves_a_pod_to_another_class_without_a_full_recompute() -> None:
    """front's app=sleep pod relabelled app=curl: it joins the selected class; front then has
    one class, whose routes need the namespace guard only."""
    store, local = shop_with(selector_rule(), callers=2)
    cache = TranslationCache()
    cache.build(store, local)
    sleeper = next(p for p in local if p.pod.name == "c1")
    moved = replace(sleeper.pod, labels={"app": "curl"})
    store.put_pod(moved)
    local = [LocalPod(moved, sleeper.netns) if p is sleeper else p for p in local]
    out = cache.build(store, local).resources
    assert cache.full_recomputes == 1
    assert [(tuple(guards(r)), r["route"]["cluster"]) for r in routes(out)] == [
        (FRONT, SELECTED),
        (SHOP, V1),
    ]
    # The same as a fresh translation of the new state.
    assert out[e.ROUTE][ROUTE] == TranslationCache().build(store, local).resources[e.ROUTE][ROUTE]


def test_a_tcp_port_sends_each_class_to_its_own_rules_cluster() -> None:
    """A TCP port without a VirtualService: the selected pods' connections go to the selector
    rule's copy of the port's cluster, through the port's routes listener (guarded by namespace
    and labels); front's other pods get no rule at all, since front's only rule for db selects
    other pods (policy._pick, istio/istio#57719): their own copy, without the shop rule's
    policy."""
    from tests.unit.test_l4_routes import DB, DB_CHAIN, DB_ROUTES, chain_clusters, dr, mesh

    rule = resource(
        "DestinationRule",
        "front",
        "db-curl",
        {
            "host": DB,
            "workloadSelector": {"matchLabels": {"app": "curl"}},
            "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
        },
    )
    out = TranslationCache().build(*mesh(dr("db"), rule)).resources
    assert as_json(out[e.CLUSTER][f"{DB_CHAIN}~front/db-curl"])["lbPolicy"] == "RANDOM"
    listener = as_json(out[e.LISTENER][DB_ROUTES])
    assert chain_clusters(listener) == {
        f"{DB_ROUTES}#0": f"{DB_CHAIN}~front/db-curl",
        f"{DB_ROUTES}#1": f"{DB_CHAIN}~none",
    }
    (selected,) = listener["filterChainMatcher"]["matcherList"]["matchers"]
    both = selected["predicate"]["andMatcher"]["predicate"]
    assert [p["singlePredicate"]["valueMatch"]["safeRegex"]["regex"] for p in both] == [
        "^spiffe://[^/]+/ns/(front)/sa/[^/]+$",
        r".*,app\=curl,.*",
    ]
