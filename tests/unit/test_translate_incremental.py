"""Incremental translation: after any sequence of changes, the node's config is exactly what a
fresh full translation of the final view gives (same resources, origins, chains and problems),
while unchanged resources stay the same objects and cost nothing to push again."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.mesh.model import (
    REGION_LABEL,
    REGISTRY_ONLY,
    ZONE_LABEL,
    DefaultProviders,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IstioResource,
    MeshConfig,
    Namespace,
    Node,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import POD, SERVICE, LocalPod, Origin, Translation, TranslationCache, build
from nodeagent.translate import envoy as e
from nodeagent.xds.cache import Changes, Snapshot, SnapshotCache, check_consistent

NODE = "n1"
ROOT = "istio-system"
NAMESPACES = ["a", "b", ROOT]
SERVICES = ["s0", "s1", "s2"]
PODS = ["p0", "p1", "p2", "p3"]
APPS = ["x", "y"]
PORTS = [
    ServicePort(80, "http", 8080),
    ServicePort(81, "grpc", 8081),
    ServicePort(5432, "tcp-db"),
    ServicePort(90, "", 9090, app_protocol="http"),
    ServicePort(53, "dns", protocol="UDP"),
]
VIPS = ["10.96.0.1", "10.96.0.2", "fd00::1", "None", "not-an-ip"]

names = st.sampled_from
labels = st.fixed_dictionaries(
    {"app": names(APPS)}, optional={"istio.io/dataplane-mode": names(["ambient", "none"])}
)


def pod_ips(name: str) -> tuple[str, ...]:
    return (f"10.244.0.{PODS.index(name) + 1}",)


services = st.builds(
    Service,
    names(["a", "b"]),
    names(SERVICES),
    names(VIPS),
    st.lists(names(PORTS), max_size=3, unique=True).map(tuple),
    st.one_of(st.just({}), st.builds(lambda app: {"app": app}, names(APPS))),
)
pods = st.builds(
    lambda ns, name, node, sa, lbl, uid: Pod(ns, name, uid, node, sa, lbl, pod_ips=pod_ips(name)),
    names(["a", "b"]),
    names(PODS),
    names([NODE, "n2"]),
    names(["default", "sa1"]),
    labels,
    names(["u1", "u2"]),
)
endpoints = st.builds(
    lambda ns, name, ready, node: Endpoint(pod_ips(name), ready, node, f"{ns}/{name}"),
    names(["a", "b"]),
    names(PODS),
    st.booleans(),
    names([NODE, "n2", ""]),  # "": the pod's node
)
slices = st.builds(
    lambda ns, svc, k, eps, ports, fqdn: EndpointSlice(
        ns, f"{svc}-{k}", svc, tuple(eps), ports, "FQDN" if fqdn else "IPv4"
    ),
    names(["a", "b"]),
    names(SERVICES),
    names(["k0", "k1"]),
    st.lists(endpoints, max_size=3),
    st.lists(
        st.builds(
            EndpointPort, names([8080, 8081, 5432, 9090]), names(["http", "grpc", "tcp-db", ""])
        ),
        max_size=3,
    ).map(tuple),
    names([False, False, True]),
)
peer_modes = names(["STRICT", "PERMISSIVE", "DISABLE", "UNSET"])
peer_authentications = st.builds(
    lambda ns, name, mode, app, port_mode: IstioResource(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        ns,
        name,
        {
            "mtls": {"mode": mode},
            **({"selector": {"matchLabels": {"app": app}}} if app else {}),
            **({"portLevelMtls": {8080: {"mode": port_mode}}} if port_mode else {}),
        },
    ),
    names(NAMESPACES),
    names(["pa0", "pa1"]),
    peer_modes,
    names(["", *APPS]),
    names(["", "STRICT", "DISABLE"]),
)
destination_rules = st.builds(
    lambda ns, name, host, mode, subsets, lb, export: IstioResource(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        ns,
        name,
        {
            "host": host,
            "trafficPolicy": {"tls": {"mode": mode}, **({"loadBalancer": lb} if lb else {})},
            **({"subsets": [{"name": a, "labels": {"app": a}} for a in subsets]}),
            **({"exportTo": export} if export else {}),
        },
    ),
    names(NAMESPACES),
    names(["dr0", "dr1"]),
    names(["s0", "s1.b.svc.cluster.local", "*.a.svc.cluster.local", "*"]),
    names(["DISABLE", "ISTIO_MUTUAL", "SIMPLE"]),
    st.lists(names(APPS), max_size=2, unique=True),
    names(
        [
            None,
            {"simple": "RANDOM"},
            {"consistentHash": {"httpHeaderName": "u"}},
            {
                "localityLbSetting": {
                    "distribute": [{"from": "r1/*", "to": {"r1/z1/*": 70, "r2/*": 30}}]
                }
            },
            {"localityLbSetting": {"failover": [{"from": "r1", "to": "r2"}]}},
        ]
    ),
    names([None, ["."], ["b"]]),
).map(
    # failover takes effect only with outlierDetection: half of the rules have it
    lambda rule: (
        replace(
            rule,
            spec={
                **rule.spec,
                "trafficPolicy": {**rule.spec["trafficPolicy"], "outlierDetection": {}},
            },
        )
        if rule.name == "dr1"
        else rule
    )
)
# Nodes: the localities of this node and of the other one.
nodes = st.builds(
    lambda name, region, zone: Node(
        name, {REGION_LABEL: region, ZONE_LABEL: zone} if region else {}
    ),
    names([NODE, "n2"]),
    names(["", "r1", "r2"]),
    names(["z1", "z2"]),
)
# VirtualServices: hosts, exportTo, HTTP routes to subsets (by weight, by caller labels), TCP.
destinations = st.builds(
    lambda host, subset: {"host": host, **({"subset": subset} if subset else {})},
    names(["s0", "s1.b.svc.cluster.local", "s2"]),
    names(["", *APPS]),
)
virtual_services = st.builds(
    lambda ns, name, hosts, export, first, second, source: IstioResource(
        "networking.istio.io",
        "v1",
        "VirtualService",
        ns,
        name,
        {
            "hosts": hosts,
            **({"exportTo": export} if export else {}),
            "http": [
                {
                    **({"match": [{"sourceLabels": {"app": source}}]} if source else {}),
                    "route": [
                        {"destination": first, "weight": 70},
                        {"destination": second, "weight": 30},
                    ],
                },
                {"route": [{"destination": first}]},
            ],
            "tcp": [{"route": [{"destination": second}]}],
        },
    ),
    names(["a", "b"]),
    names(["vs0", "vs1"]),
    st.lists(
        names(["s0", "s1.b.svc.cluster.local", "*.a.svc.cluster.local"]),
        min_size=1,
        max_size=2,
        unique=True,
    ),
    names([None, ["."], ["a"]]),
    destinations,
    destinations,
    names(["", *APPS]),
)
# Sidecars: namespace-wide or by selector, in a client namespace or the root one, egress hosts
# (with a port or not) and their own outboundTrafficPolicy.
sidecars = st.builds(
    lambda ns, name, app, hosts, port, mode: IstioResource(
        "networking.istio.io",
        "v1",
        "Sidecar",
        ns,
        name,
        {
            **({"workloadSelector": {"labels": {"app": app}}} if app else {}),
            "egress": [{"hosts": hosts, **({"port": {"number": port}} if port else {})}],
            **({"outboundTrafficPolicy": {"mode": mode}} if mode else {}),
        },
    ),
    names(NAMESPACES),
    names(["sc0", "sc1"]),
    names(["", *APPS]),
    st.lists(names(["./*", "b/*", f"{ROOT}/*", "*/s1.b.svc.cluster.local", "~/*"]), max_size=2),
    names([None, 80, 5432]),
    names(["", "ALLOW_ANY", REGISTRY_ONLY]),
)
# Istio's standard metrics (Istio's default mesh config turns them on) in two examples of three,
# off in the others (MeshConfig defaultProviders.metrics: []); a mesh config change may switch
# them (a change of its own: it recomputes everything).
NO_METRICS = DefaultProviders(metrics=())
metrics_on = names([False, True, True])
mesh_configs = st.builds(
    MeshConfig,
    names(["cluster.local", "example.org"]),
    st.just(ROOT),
    names(["ALLOW_ANY", REGISTRY_ONLY]),
    default_providers=names([DefaultProviders(), DefaultProviders(), NO_METRICS]),
)
origins = st.builds(Origin, names([SERVICE, POD]), names(["a", "b"]), names(SERVICES + PODS))

# One change: (what, argument).
changes = st.one_of(
    st.tuples(st.just("put_service"), services),
    st.tuples(st.just("delete_service"), st.tuples(names(["a", "b"]), names(SERVICES))),
    st.tuples(st.just("put_pod"), pods),
    st.tuples(st.just("delete_pod"), st.tuples(names(["a", "b"]), names(PODS))),
    st.tuples(st.just("put_slice"), slices),
    st.tuples(
        st.just("delete_slice"), st.tuples(names(["a", "b"]), names(SERVICES), names(["k0", "k1"]))
    ),
    st.tuples(
        st.just("put_istio"),
        peer_authentications | destination_rules | virtual_services | sidecars,
    ),
    st.tuples(
        st.just("delete_istio"),
        st.tuples(
            names(["PeerAuthentication", "DestinationRule", "VirtualService", "Sidecar"]),
            names(NAMESPACES),
            names(["pa0", "dr0", "pa1", "dr1", "vs0", "vs1", "sc0", "sc1"]),
        ),
    ),
    st.tuples(
        st.just("namespace"), st.tuples(names(["a", "b"]), names(["", "disabled", "enabled"]))
    ),
    st.tuples(st.just("mesh"), mesh_configs),
    st.tuples(st.just("put_node"), nodes),
    st.tuples(st.just("capture"), st.tuples(names(["a", "b"]), names(PODS))),
    st.tuples(st.just("release"), st.tuples(names(["a", "b"]), names(PODS))),
    st.tuples(st.just("exclude"), origins),
    st.tuples(st.just("include"), origins),
    st.tuples(st.just("push"), st.none()),
)
# After a change, whether to push (translate incrementally and check against a full one).
steps_ = st.lists(st.tuples(changes, names([True, True, False])), min_size=1, max_size=40)


class View:
    """The view and what the proxy would hand translation: captured pods, excluded objects."""

    def __init__(self) -> None:
        self.store = MeshStore(NODE)
        self.captured: set[str] = set()
        self.excluded: set[Origin] = set()

    def apply(self, what: str, arg: Any) -> None:
        s = self.store
        if what == "put_service":
            s.put_service(arg)
        elif what == "delete_service":
            s.delete_service("/".join(arg))
        elif what == "put_pod":
            s.put_pod(arg)
        elif what == "delete_pod":
            s.delete_pod("/".join(arg))
        elif what == "put_slice":
            s.put_endpoint_slice(arg)
        elif what == "delete_slice":
            s.delete_endpoint_slice(f"{arg[0]}/{arg[1]}-{arg[2]}")
        elif what == "put_istio":
            s.put_istio(arg)
        elif what == "delete_istio":
            s.delete_istio("/".join(arg))
        elif what == "namespace":
            name, injection = arg
            s.put_namespace(Namespace(name, {"istio-injection": injection} if injection else {}))
        elif what == "mesh":
            s.set_mesh_config(arg)
        elif what == "put_node":
            s.put_node(arg)
        elif what == "capture":
            self.captured.add("/".join(arg))
        elif what == "release":
            self.captured.discard("/".join(arg))
        elif what == "exclude":
            self.excluded.add(arg)
        elif what == "include":
            self.excluded.discard(arg)

    def local_pods(self) -> list[LocalPod]:
        found = [self.store.pods.get(key) for key in sorted(self.captured)]
        return [
            LocalPod(pod, f"/var/run/netns/{pod.name}")
            for pod in found
            if pod is not None and self.store.on_this_node(pod)
        ]


def serialized(t: Translation) -> dict[str, Any]:
    return {
        "resources": {
            type_url: {n: m.SerializeToString(deterministic=True) for n, m in by.items()}
            for type_url, by in t.resources.items()
        },
        "origins": t.origins,
        "chains": t.chains,
        "problems": t.problems,
    }


def seeded(metrics: bool = True) -> View:
    """A view where changes meet something: local pods of two identities, services selecting
    them, endpoints naming pods on both nodes. METRICS: Istio's standard metrics on (Istio's
    default mesh config) or off."""
    node = View()
    if not metrics:
        node.store.set_mesh_config(MeshConfig(default_providers=NO_METRICS))
    node.store.put_namespace(Namespace("a", {"istio-injection": "enabled"}))
    for i, name in enumerate(PODS):
        ns, sa = ("a", "default") if i % 2 else ("b", "sa1")
        node_name = NODE if i < 3 else "n2"
        app = APPS[i % 2]
        labels = {"app": app, **({"istio.io/dataplane-mode": "ambient"} if i == 2 else {})}
        node.store.put_pod(Pod(ns, name, "u1", node_name, sa, labels, pod_ips=pod_ips(name)))
        node.captured.add(f"{ns}/{name}")
    for i, name in enumerate(SERVICES):
        ns = "a" if i % 2 else "b"
        node.store.put_service(
            Service(ns, name, VIPS[i], (PORTS[i], PORTS[3]), {"app": APPS[i % 2]})
        )
        pods_ = [(("a" if j % 2 else "b"), p) for j, p in enumerate(PODS) if j % 2 == i % 2]
        node.store.put_endpoint_slice(
            EndpointSlice(
                ns,
                f"{name}-k0",
                name,
                tuple(Endpoint(pod_ips(p), True, NODE, f"{pns}/{p}") for pns, p in pods_),
                (EndpointPort(PORTS[i].port, PORTS[i].name), EndpointPort(9090, "")),
            )
        )
    return node


# typed_config blocks (Any) already converted in this process: their JSON's digest -> (type URL,
# serialized message). Translations build resources from dicts (envoy.message: json_format's
# ParseDict), and a fresh full one converts again the same loggers and filters it converted at
# the previous push: most of this test's time. A block's bytes depend only on its JSON, so reusing
# them changes no resource; a block never seen before is converted as before.
_CONVERTED: dict[bytes, tuple[str, bytes]] = {}


@contextlib.contextmanager
def converted_once() -> Iterator[None]:
    parser = getattr(json_format, "_Parser")  # noqa: B009 (private: no stub)
    convert = parser._ConvertAnyMessage

    def cached(self: Any, value: Any, message: Message, path: str) -> None:
        try:
            text = json.dumps(value, sort_keys=True)
        except TypeError:  # not plain JSON: no key for it
            convert(self, value, message, path)
            return
        how = f"{self.ignore_unknown_fields} {id(self.descriptor_pool)} "  # strict or not
        key = hashlib.blake2b((how + text).encode(), digest_size=16).digest()
        hit = _CONVERTED.get(key)
        if hit is None:
            convert(self, value, message, path)
            if len(_CONVERTED) > 10_000:  # a run makes a few hundred
                _CONVERTED.clear()
            hit = _CONVERTED[key] = (message.type_url, message.value)  # type: ignore[attr-defined]
        message.type_url, message.value = hit  # type: ignore[attr-defined]

    parser._ConvertAnyMessage = cached
    try:
        yield
    finally:
        parser._ConvertAnyMessage = convert


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps_, metrics_on)
def test_incremental_translation_equals_a_fresh_full_one(
    steps: list[tuple[tuple[str, Any], bool]], metrics: bool
) -> None:
    with converted_once():
        check_incremental_equals_full(steps, seeded(metrics))


def check_incremental_equals_full(steps: list[tuple[tuple[str, Any], bool]], node: View) -> None:
    cache = TranslationCache()
    xds = SnapshotCache()
    before = cache.build(node.store, node.local_pods(), excluded=node.excluded)
    pushed(xds, before)
    for (what, arg), push in [*steps, (("push", None), True)]:
        node.apply(what, arg)
        if not push and what != "push":
            continue
        local = node.local_pods()
        incremental = cache.build(node.store, local, excluded=set(node.excluded))
        if cache.release_sockets(incremental.tls_sockets):
            # Make before break: originate-tls keeps the sockets older clusters named until
            # Envoy holds the new ones; the agent then pushes again without them (proxy.py
            # _release_sockets), and only that push equals a fresh translation.
            check_changes(before, incremental)
            pushed(xds, incremental)
            before = incremental
            incremental = cache.build(node.store, local, excluded=set(node.excluded))
        full = build(node.store, local, excluded=set(node.excluded))
        assert serialized(incremental) == serialized(full)
        check_changes(before, incremental)
        pushed(xds, incremental)
        before = incremental


def check_changes(before: Translation, incremental: Translation) -> None:
    """INCREMENTAL names every name whose object is not the same as in BEFORE."""
    if incremental.changed is not None:
        assert incremental.base is before.resources
        for type_url, now in incremental.resources.items():
            then = before.resources.get(type_url, {})
            differ = {n for n in then.keys() | now.keys() if then.get(n) is not now.get(n)}
            assert differ <= incremental.changed.get(type_url, set()), type_url


def pushed(xds: SnapshotCache, translation: Translation) -> None:
    """Set TRANSLATION's snapshot as the agent does (with its changes, checked and encoded
    incrementally); its versions are those a snapshot made from scratch has."""
    changes = None
    if translation.base is not None and translation.changed is not None:
        changes = Changes(translation.base, translation.changed)
    version = str(id(translation))
    snapshot = Snapshot(version, translation.resources, changes)
    xds.set_snapshot(NODE, snapshot)
    fresh = Snapshot(version, translation.resources)
    check_consistent(fresh)
    for type_url in translation.resources:
        assert snapshot.versions(type_url) == fresh.versions(type_url), type_url


def pa(namespace: str, mode: str, app: str = "") -> IstioResource:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if app:
        spec["selector"] = {"matchLabels": {"app": app}}
    return IstioResource("security.istio.io", "v1", "PeerAuthentication", namespace, "pa", spec)


def dr(namespace: str, host: str, mode: str) -> IstioResource:
    spec = {"host": host, "trafficPolicy": {"tls": {"mode": mode}}}
    return IstioResource("networking.istio.io", "v1", "DestinationRule", namespace, "dr", spec)


def telemetry_metrics(namespace: str, app: str, mode: str) -> IstioResource:
    """A workload's Telemetry turning its MODE metrics off (mesh/telemetry.metrics)."""
    spec = {
        "selector": {"matchLabels": {"app": app}},
        "metrics": [{"overrides": [{"match": {"mode": mode}, "disabled": True}]}],
    }
    return IstioResource("telemetry.istio.io", "v1", "Telemetry", namespace, "t", spec)


S2 = Origin(SERVICE, "b", "s2")
CASES: dict[str, list[tuple[str, Any]]] = {
    "an endpoint pod's new service account": [
        ("put_pod", Pod("a", "p3", "u1", "n2", "sa9", {"app": "y"}, pod_ips=pod_ips("p3")))
    ],
    "an endpoint pod's namespace joins the mesh": [("namespace", ("b", "enabled"))],
    "a mesh-wide PeerAuthentication": [("put_istio", pa(ROOT, "DISABLE"))],
    "a namespace's PeerAuthentication": [("put_istio", pa("a", "DISABLE"))],
    "a workload PeerAuthentication": [("put_istio", pa("b", "STRICT", "x"))],
    "a DestinationRule in a client's namespace": [("put_istio", dr("a", "*", "DISABLE"))],
    "a DestinationRule in the root namespace": [("put_istio", dr(ROOT, "*", "ISTIO_MUTUAL"))],
    "a DestinationRule in the service's namespace": [
        ("release", ("b", "p0")),
        ("release", ("b", "p2")),
        ("push", None),
        ("put_istio", dr("b", "s2", "DISABLE")),
    ],
    "a slice moved to another service": [
        ("put_slice", EndpointSlice("b", "s0-k0", "s2", (), ())),
    ],
    "a service changed while left out": [
        ("exclude", S2),
        ("push", None),
        ("put_service", Service("b", "s2", "10.96.0.9", (PORTS[0],), {"app": "x"})),
        ("push", None),
        ("include", S2),
    ],
    "a left-out service deleted": [
        ("exclude", S2),
        ("push", None),
        ("delete_service", ("b", "s2")),
    ],
    "a bad service fixed": [
        ("put_service", Service("b", "s0", "bad", (PORTS[0],), {})),
        ("push", None),
        ("put_service", Service("b", "s0", "10.96.0.9", (PORTS[0],), {})),
    ],
    "a VIP changed": [("put_service", Service("b", "s0", "10.96.0.9", (PORTS[0],), {}))],
    "a service with a bad VIP": [("put_service", Service("b", "s0", "bad", (PORTS[0],), {}))],
    "a service selecting a local pod": [
        ("put_service", Service("a", "s9", "", (PORTS[1],), {"app": "y"}))
    ],
    "a local pod of a new identity": [
        ("put_pod", Pod("a", "p3", "u1", NODE, "sa9", {"app": "y"}, pod_ips=pod_ips("p3"))),
        ("push", None),
        ("put_pod", Pod("b", "p9", "u1", NODE, "sa9", {"app": "x"})),
        ("capture", ("b", "p9")),
    ],
    "an identity's last local pod released": [("release", ("a", "p1"))],
    "a local pod released": [("release", ("b", "p2"))],
    "a workload's Telemetry on its server metrics": [
        ("put_istio", telemetry_metrics("a", "y", "SERVER"))
    ],
    "a workload's Telemetry on its client metrics": [
        ("put_istio", telemetry_metrics("b", "x", "CLIENT"))
    ],
    "mesh config": [("mesh", MeshConfig("example.org", ROOT, REGISTRY_ONLY))],
    "this node's locality": [("put_node", Node(NODE, {REGION_LABEL: "r1", ZONE_LABEL: "z1"}))],
    "a mesh-wide distribute": [
        ("put_node", Node(NODE, {REGION_LABEL: "r1", ZONE_LABEL: "z1"})),
        ("push", None),
        (
            "mesh",
            MeshConfig(
                locality_lb_setting='{"distribute": [{"from": "r1/z1/*", "to": {"r1/z1/*": 100}}]}'
            ),
        ),
    ],
    "an endpoint pod moved to another node": [
        (
            "put_slice",
            EndpointSlice(
                "a",
                "s1-k0",
                "s1",
                (Endpoint(pod_ips("p1"), True, "", "a/p1"),),
                (EndpointPort(80, "http"),),
            ),
        ),
        ("push", None),
        ("put_pod", Pod("a", "p1", "u1", "n2", "default", {"app": "y"}, pod_ips=pod_ips("p1"))),
        ("put_node", Node("n2", {REGION_LABEL: "r2"})),
    ],
}


# A new CLIENT class (access logs, metrics) changes what every shared chain logs.
RECOMPUTE_ALL = {
    "mesh config",
    "a mesh-wide distribute",
    "a workload's Telemetry on its client metrics",
}


@pytest.mark.parametrize("case", CASES)
def test_each_kind_of_change_reaches_what_it_affects(case: str) -> None:
    """The dependencies one by one (the property test meets some of them only rarely)."""
    node = seeded()
    cache = TranslationCache()
    before = serialized(cache.build(node.store, node.local_pods(), excluded=set(node.excluded)))
    for what, arg in CASES[case]:
        node.apply(what, arg)
        if what == "push":
            cache.build(node.store, node.local_pods(), excluded=set(node.excluded))
    after = cache.build(node.store, node.local_pods(), excluded=set(node.excluded))
    full = serialized(build(node.store, node.local_pods(), excluded=set(node.excluded)))
    assert full != before  # the change matters
    assert serialized(after) == full
    # Everything is recomputed only for a new mesh config.
    assert cache.full_recomputes == 1 + (case in RECOMPUTE_ALL)


def bulk_view(n: int) -> View:
    node = View()
    for i in range(n):
        node.store.put_service(
            Service("a", f"svc{i}", f"10.96.{i // 250}.{i % 250 + 1}", (PORTS[0],), {"app": "x"})
        )
        node.store.put_endpoint_slice(
            EndpointSlice(
                "a",
                f"svc{i}-k0",
                f"svc{i}",
                (Endpoint((f"10.244.1.{i % 250 + 1}",), True, "n2"),),
                (EndpointPort(8080, "http"),),
            )
        )
    node.store.put_pod(Pod("a", "p0", "u1", NODE, labels={"app": "y"}, pod_ips=pod_ips("p0")))
    node.captured.add("a/p0")
    return node


def test_an_endpoint_change_rebuilds_only_that_service_and_pushes_only_its_endpoints() -> None:
    node = bulk_view(50)
    cache = TranslationCache()
    snapshots = SnapshotCache()
    first = cache.build(node.store, node.local_pods())
    snapshots.set_snapshot("n", Snapshot("1", first.resources))
    versions_before = {t: dict(snapshots.get("n").versions(t)) for t in first.resources}  # type: ignore[union-attr]

    node.store.put_endpoint_slice(
        EndpointSlice(
            "a",
            "svc7-k0",
            "svc7",
            (Endpoint(("10.244.1.8",), True, "n2"), Endpoint(("10.244.2.8",), True, "n2")),
            (EndpointPort(8080, "http"),),
        )
    )
    second = cache.build(node.store, node.local_pods())
    snapshot = Snapshot("2", second.resources)
    snapshots.set_snapshot("n", snapshot)

    assert cache.full_recomputes == 1
    changed = {
        (t, name)
        for t, by in second.resources.items()
        for name, msg in by.items()
        if first.resources[t].get(name) is not msg
    }
    # Only svc7's resources were rebuilt (its cluster and route are equal ones, new objects).
    assert (e.ENDPOINT, "outbound|80||svc7.a.svc.cluster.local") in changed
    assert all("svc7." in name for _, name in changed), changed
    assert serialized(second) == serialized(build(node.store, node.local_pods()))
    differing = {
        (t, name)
        for t in second.resources
        for name, version in snapshot.versions(t).items()
        if versions_before[t].get(name) != version
    }
    assert differing == {(e.ENDPOINT, "outbound|80||svc7.a.svc.cluster.local")}
