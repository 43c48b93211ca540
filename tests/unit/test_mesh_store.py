"""MeshStore: indexed reads answer what a scan over every object would, and the change log says
exactly what changed since a generation."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.mesh.model import Endpoint, EndpointSlice, IstioResource, Pod, Service
from nodeagent.mesh.store import ENDPOINT_SLICE, POD, SERVICE, MeshStore

names = st.sampled_from
NS = ["a", "b"]
APPS = ["x", "y"]

pods = st.builds(
    Pod,
    names(NS),
    names(["p0", "p1", "p2"]),
    st.just(""),
    names(["n1", "n2"]),
    names(["default", "sa"]),
    st.dictionaries(names(["app", "tier"]), names(APPS), max_size=2),
    st.just({}),
    st.just(False),
    st.lists(names(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), max_size=2, unique=True).map(tuple),
)
services = st.builds(
    Service,
    names(NS),
    names(["s0", "s1"]),
    st.just("10.96.0.1"),
    st.just(()),
    st.dictionaries(names(["app", "tier"]), names(APPS), max_size=2),
)
slices = st.builds(
    lambda ns, name, svc, pods_: EndpointSlice(
        ns, name, svc, tuple(Endpoint(("10.0.0.9",), True, "", p) for p in pods_)
    ),
    names(NS),
    names(["e0", "e1", "e2"]),
    names(["s0", "s1"]),
    st.lists(names(["a/p0", "b/p1", "a/p2"]), max_size=2),
)
istio = st.builds(
    lambda kind, ns, name: IstioResource("security.istio.io", "v1", kind, ns, name),
    names(["PeerAuthentication", "DestinationRule"]),
    names(NS),
    names(["r0", "r1"]),
)
ops = st.one_of(
    st.tuples(st.just("put"), pods | services | slices | istio),
    st.tuples(st.just("delete_pod"), names(["a/p0", "b/p1", "a/p2"])),
    st.tuples(st.just("delete_service"), names(["a/s0", "b/s1"])),
    st.tuples(st.just("delete_slice"), names(["a/e0", "b/e1", "a/e2"])),
    st.tuples(st.just("delete_istio"), names(["PeerAuthentication/a/r0", "DestinationRule/b/r1"])),
)


def apply(store: MeshStore, op: tuple[str, Any]) -> None:
    what, arg = op
    if what == "put":
        put = {
            Pod: store.put_pod,
            Service: store.put_service,
            EndpointSlice: store.put_endpoint_slice,
            IstioResource: store.put_istio,
        }[type(arg)]
        put(arg)  # type: ignore[operator]
    elif what == "delete_pod":
        store.delete_pod(arg)
    elif what == "delete_service":
        store.delete_service(arg)
    elif what == "delete_slice":
        store.delete_endpoint_slice(arg)
    else:
        store.delete_istio(arg)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, max_size=40))
def test_indexed_reads_answer_what_a_scan_would(steps: list[tuple[str, Any]]) -> None:
    store = MeshStore()
    for op in steps:
        apply(store, op)
    for svc in store.services.values():
        scanned = [
            s
            for s in store.endpoint_slices.values()
            if (s.namespace, s.service) == (svc.namespace, svc.name)
        ]
        assert sorted(store.slices_of(svc), key=lambda s: s.key) == sorted(
            scanned, key=lambda s: s.key
        )
    for key in ["a/p0", "b/p1", "a/p2"]:
        naming = [
            s for s in store.endpoint_slices.values() if any(e.pod == key for e in s.endpoints)
        ]
        assert store.slices_naming(key) == sorted(naming, key=lambda s: s.key)
    for node in ["n1", "n2"]:
        assert {p.key for p in store.pods_on_node(node)} == {
            p.key for p in store.pods.values() if p.node_name == node
        }
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"]:
        assert {p.key for p in store.pods_with_ip(ip)} == {
            p.key for p in store.pods.values() if ip in p.pod_ips
        }
    for ns in NS:
        assert {p.key for p in store.pods_in(ns)} == {
            p.key for p in store.pods.values() if p.namespace == ns
        }
        assert {s.key for s in store.services_in(ns)} == {
            s.key for s in store.services.values() if s.namespace == ns
        }
        for labels in [{}, {"app": "x"}, {"app": "y", "tier": "x"}, {"tier": "y"}]:
            expected = sorted(
                s.key
                for s in store.services.values()
                if s.namespace == ns
                and s.selector
                and all(labels.get(k) == v for k, v in s.selector.items())
            )
            assert [s.key for s in store.services_selecting(ns, labels)] == expected
        for kind in ["PeerAuthentication", "DestinationRule"]:
            assert {r.key for r in store.istio_in(kind, ns)} == {
                r.key for r in store.istio.values() if (r.kind, r.namespace) == (kind, ns)
            }
    for kind in ["PeerAuthentication", "DestinationRule"]:
        assert {r.key for r in store.istio_of_kind(kind)} == {
            r.key for r in store.istio.values() if r.kind == kind
        }


def test_the_change_log_names_what_changed_and_only_real_changes() -> None:
    store = MeshStore()
    web = Service("shop", "web", "10.96.0.1", selector={"app": "web"})
    store.put_service(web)
    seen = store.generation
    store.put_service(Service("shop", "web", "10.96.0.1", selector={"app": "web"}))  # equal
    assert store.generation == seen and store.changes_since(seen) == set()
    store.put_pod(Pod("shop", "web-1", node_name="n1"))
    store.put_endpoint_slice(EndpointSlice("shop", "web-abc", "web"))
    store.delete_service("shop/web")
    store.delete_service("shop/web")  # gone already: no change
    assert store.changes_since(seen) == {
        (POD, "shop/web-1"),
        (ENDPOINT_SLICE, "shop/web-abc"),
        (SERVICE, "shop/web"),
    }
    assert store.changes_since(store.generation) == set()


def test_a_consumer_further_behind_than_the_log_recomputes_everything() -> None:
    store = MeshStore(log_size=3)
    seen = store.generation
    for i in range(3):
        store.put_pod(Pod("shop", f"web-{i}"))
    assert store.changes_since(seen) is not None
    store.put_pod(Pod("shop", "web-3"))
    assert store.changes_since(seen) is None
    assert store.changes_since(seen + 1) == {
        (POD, "shop/web-1"),
        (POD, "shop/web-2"),
        (POD, "shop/web-3"),
    }
