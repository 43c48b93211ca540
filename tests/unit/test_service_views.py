"""VirtualServices and DestinationRules on the shared node Envoy (issue #15): one route table per
service port whatever the number of local pods; callers that see different routes (sourceLabels,
sourceNamespace, exportTo, a namespace's own DestinationRule) are told apart inside that one
table, by what their own listener stamped, never by a copy per pod.

Istio's semantics: istio.io/latest/docs/reference/config/networking/virtual-service/ (exportTo,
sourceLabels, "the first rule that matches"), .../destination-rule/ (exportTo, the client
namespace's rule first), istio.io/latest/docs/ops/best-practices/traffic-management/.
"""

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
from nodeagent.translate import LocalPod, TranslationCache
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import endpoint_where
from tests.unit.test_translate import as_json

HOST = "ph.shop.svc.cluster.local"
ROUTE = f"outbound|8080||{HOST}"
V1, V2 = f"outbound|8080|v1|{HOST}", f"outbound|8080|v2|{HOST}"


def resource(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> IstioResource:
    return IstioResource("networking.istio.io", "v1", kind, namespace, name, spec)


SUBSETS = resource(
    "DestinationRule",
    "shop",
    "ph",
    {
        "host": "ph",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
)


def to(subset: str, host: str = "ph") -> list[dict[str, Any]]:
    return [{"destination": {"host": host, "subset": subset}}]


def shop(*rules: IstioResource, callers: int = 2) -> tuple[MeshStore, list[LocalPod]]:
    """ph (v1 and v2) in shop; CALLERS pods here in front, alternately app=curl and app=sleep,
    and one sleep pod here in shop."""
    s = MeshStore("n1")
    for ns in ("shop", "front"):
        s.put_namespace(Namespace(ns, {"istio-injection": "enabled"}))
    s.put_service(Service("shop", "ph", "10.96.0.9", (ServicePort(8080, "http"),), {"app": "ph"}))
    endpoints = []
    for i, version in enumerate(("v1", "v2")):
        ip = f"10.244.2.{i + 1}"
        labels = {"app": "ph", "version": version}
        s.put_pod(Pod("shop", f"ph-{version}", "u", "n2", "ph", labels, pod_ips=(ip,)))
        endpoints.append(Endpoint((ip,), True, "n2", f"shop/ph-{version}"))
    s.put_endpoint_slice(
        EndpointSlice("shop", "ph-x", "ph", tuple(endpoints), (EndpointPort(8080, "http"),))
    )
    local = []
    for i in range(callers):
        app = "curl" if i % 2 == 0 else "sleep"
        pod = Pod("front", f"c{i}", "u", "n1", app, {"app": app}, pod_ips=(f"10.244.1.{i + 1}",))
        s.put_pod(pod)
        local.append(LocalPod(pod, f"/run/netns/c{i}"))
    home = Pod("shop", "sleep", "u", "n1", "sleep", {"app": "sleep"}, pod_ips=("10.244.1.200",))
    s.put_pod(home)
    local.append(LocalPod(home, "/run/netns/home"))
    for rule in rules:
        s.put_istio(rule)
    return s, local


def routes(out: dict[str, Any]) -> list[dict[str, Any]]:
    table = as_json(out[e.ROUTE][ROUTE])
    assert len(table["virtualHosts"]) == 1
    found: list[dict[str, Any]] = table["virtualHosts"][0]["routes"]
    return found


def guards(route: dict[str, Any]) -> list[str]:
    """The filter-state regexes a route's match requires of its caller."""
    return [m["stringMatch"]["safeRegex"]["regex"] for m in route["match"].get("filterState", [])]


def test_source_labels_one_route_table_for_any_number_of_local_pods() -> None:
    """Two pods of one node with different labels see different routes for the same host: the
    table holds the VirtualService's rules once, each match naming the caller's labels."""
    vs = resource(
        "VirtualService",
        "shop",
        "ph",
        {
            "hosts": ["ph"],
            "http": [
                {"match": [{"sourceLabels": {"app": "curl"}}], "route": to("v2")},
                {"route": to("v1")},
            ],
        },
    )
    tables = []
    for callers in (2, 10):
        s, local = shop(SUBSETS, vs, callers=callers)
        out = TranslationCache().build(s, local).resources
        # No route table per pod: the service port's one, and the local pods' inbound ones.
        assert [n for n in out[e.ROUTE] if n.startswith("outbound|")] == [ROUTE]
        tables.append(out[e.ROUTE][ROUTE])
    assert tables[0] == tables[1]  # 2 or 10 callers: the very same table
    first, second = routes(TranslationCache().build(*shop(SUBSETS, vs)).resources)
    assert guards(first) == [r".*,app\=curl,.*"]  # re.escape'd pairs
    assert first["route"]["cluster"] == V2
    assert guards(second) == [] and second["route"]["cluster"] == V1


def test_views_by_namespace_are_one_block_each_not_one_per_pod() -> None:
    """A VirtualService exported to its own namespace binds shop's callers only; front's callers
    (any number of them) share the other view. Each view's routes require the caller's
    namespace, so a caller never falls through into another view's routes."""
    vs = resource(
        "VirtualService",
        "shop",
        "ph",
        {"hosts": ["ph"], "exportTo": ["."], "http": [{"route": to("v2")}]},
    )
    for callers in (1, 6):
        out = TranslationCache().build(*shop(SUBSETS, vs, callers=callers)).resources
        found = routes(out)
        assert len(found) == 2  # two views, whatever the number of pods
        by_guard = {tuple(guards(r)): r["route"]["cluster"] for r in found}
        assert by_guard == {
            ("^spiffe://[^/]+/ns/(front)/sa/[^/]+$",): ROUTE,  # no VirtualService: the service
            ("^spiffe://[^/]+/ns/(shop)/sa/[^/]+$",): V2,
        }


def test_one_view_needs_no_guard() -> None:
    """Every local namespace sees the same rule: the routes as they are, no filter state."""
    vs = resource("VirtualService", "shop", "ph", {"hosts": ["ph"], "http": [{"route": to("v1")}]})
    out = TranslationCache().build(*shop(SUBSETS, vs)).resources
    (only,) = routes(out)
    assert guards(only) == [] and only["route"]["cluster"] == V1


def test_a_namespaces_own_destination_rule_gets_its_own_clusters() -> None:
    """front has its own DestinationRule for ph (other subsets): front's callers route to its
    copies of the clusters, shop's to the canonical ones named as Istio names them."""
    mine = resource(
        "DestinationRule",
        "front",
        "ph",
        {
            "host": "ph.shop.svc.cluster.local",
            "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
            "subsets": [{"name": "v1", "labels": {"version": "v2"}}],
        },
    )
    vs = resource(
        "VirtualService",
        "shop",
        "ph",
        {"hosts": ["ph"], "http": [{"route": to("v1", "ph.shop.svc.cluster.local")}]},
    )
    out = TranslationCache().build(*shop(SUBSETS, mine, vs)).resources
    variant = f"{V1}~front/ph"
    assert {V1, V2, variant} <= set(out[e.CLUSTER])
    assert as_json(out[e.CLUSTER][variant])["lbPolicy"] == "RANDOM"
    assert as_json(out[e.CLUSTER][V1])["lbPolicy"] == "LEAST_REQUEST"
    # front's v1 is the pods labelled version=v2.
    (group,) = as_json(out[e.ENDPOINT][variant])["endpoints"]
    assert [
        endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"])
        for lb in group["lbEndpoints"]
    ] == ["10.244.2.2:8080"]
    by_guard = {tuple(guards(r)): r["route"]["cluster"] for r in routes(out)}
    assert by_guard == {
        ("^spiffe://[^/]+/ns/(front)/sa/[^/]+$",): variant,
        ("^spiffe://[^/]+/ns/(shop)/sa/[^/]+$",): V1,
    }


def test_a_subset_selects_its_pods_and_an_undefined_one_has_no_cluster() -> None:
    vs = resource("VirtualService", "shop", "ph", {"hosts": ["ph"], "http": [{"route": to("v9")}]})
    out = TranslationCache().build(*shop(SUBSETS, vs)).resources
    for cluster, ip in ((V1, "10.244.2.1"), (V2, "10.244.2.2")):
        (group,) = as_json(out[e.ENDPOINT][cluster])["endpoints"]
        ids = [
            endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"])
            for lb in group["lbEndpoints"]
        ]
        assert ids == [f"{ip}:8080"]
    # A route to a subset no rule defines names a cluster that does not exist: Envoy answers
    # 503 NC (cluster_not_found), as Istio's sidecar does.
    (only,) = routes(out)
    assert only["route"]["cluster"] == f"outbound|8080|v9|{HOST}"
    assert only["route"]["cluster"] not in out[e.CLUSTER]


def test_a_virtual_service_change_rebuilds_only_the_services_it_names() -> None:
    s, local = shop(SUBSETS)
    s.put_service(Service("shop", "other", "10.96.0.8", (ServicePort(80, "http"),), {"app": "o"}))
    cache = TranslationCache()
    before = cache.build(s, local).resources
    s.put_istio(
        resource("VirtualService", "shop", "ph", {"hosts": ["ph"], "http": [{"route": to("v2")}]})
    )
    after = cache.build(s, local).resources
    assert cache.full_recomputes == 1
    other = "outbound|80||other.shop.svc.cluster.local"
    assert after[e.ROUTE][other] is before[e.ROUTE][other]  # untouched: the same object
    assert after[e.ROUTE][ROUTE] != before[e.ROUTE][ROUTE]
    (only,) = routes(after)
    assert only["route"]["cluster"] == V2


def test_a_joining_namespace_names_the_tables_its_view_changed() -> None:
    """A pod of a namespace new to the node adds its view to the tables where it differs: the
    translation names those tables for that namespace (its pods are ready only once Envoy
    holds them), and no table whose content stayed the same (that one is the very same
    message, so its push is skipped)."""
    vs = resource(
        "VirtualService",
        "shop",
        "ph",
        {"hosts": ["ph"], "exportTo": ["."], "http": [{"route": to("v2")}]},
    )
    s, local = shop(SUBSETS, vs, callers=0)  # only shop's own pod: one view, no guard
    s.put_service(Service("shop", "other", "10.96.0.8", (ServicePort(80, "http"),), {"app": "o"}))
    other = "outbound|80||other.shop.svc.cluster.local"
    cache = TranslationCache()
    before = cache.build(s, local)
    assert before.route_guards == {"shop": frozenset()}  # the first build: every table new
    newcomer = Pod("front", "c0", "u", "n1", "curl", {"app": "curl"}, pod_ips=("10.244.1.9",))
    s.put_pod(newcomer)
    joined = cache.build(s, [*local, LocalPod(newcomer, "/run/netns/c0")])
    assert cache.full_recomputes == 1
    assert joined.route_guards["front"] == {ROUTE}  # front's view differs from shop's there
    assert joined.resources[e.ROUTE][other] is before.resources[e.ROUTE][other]
    assert len(routes(joined.resources)) == 2  # now guarded: a block per view
    # A later push keeps naming them while front has a pod here; once it left, nothing.
    later = cache.build(s, [*local, LocalPod(newcomer, "/run/netns/c0")])
    assert later.route_guards == joined.route_guards
    assert "front" not in cache.build(s, local).route_guards


def test_a_joining_namespace_that_sees_the_same_routes_waits_for_nothing() -> None:
    vs = resource("VirtualService", "shop", "ph", {"hosts": ["ph"], "http": [{"route": to("v1")}]})
    s, local = shop(SUBSETS, vs, callers=0)
    cache = TranslationCache()
    before = cache.build(s, local)
    newcomer = Pod("front", "c0", "u", "n1", "curl", {"app": "curl"}, pod_ips=("10.244.1.9",))
    s.put_pod(newcomer)
    joined = cache.build(s, [*local, LocalPod(newcomer, "/run/netns/c0")])
    assert joined.route_guards["front"] == frozenset()
    assert joined.resources[e.ROUTE][ROUTE] is before.resources[e.ROUTE][ROUTE]
