"""The node proxy fails closed one object at a time (issue #12, defects 5 and 6).

No Envoy here: the NodeProxy's snapshot, status and metrics are read directly, and Envoy's NACKs
are handed to the xDS server's NACK hook the way its ADS streams do. The same behaviour against
the real Envoy is in tests/integration/test_envoy_guards.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from nodeagent.identity.ca import BuiltinCA
from nodeagent.identity.manager import IdentityManager
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
from nodeagent.proxy import NodeProxy, ProxySettings
from nodeagent.redirect.registry import CAPTURED, PodCapture, PodRegistry
from nodeagent.translate import envoy as e
from nodeagent.translate import translate
from nodeagent.translate.internal import endpoint_where
from nodeagent.xds import types
from nodeagent.xds.state import Nack

NS = "shop"
WEB_HOST = f"web.{NS}.svc.cluster.local"
DB_HOST = f"db.{NS}.svc.cluster.local"


def mesh_store() -> MeshStore:
    store = MeshStore()
    store.put_namespace(Namespace(NS, {"nodeagent.io/mesh": "enabled"}))
    store.put_pod(Pod(NS, "web-1", service_account="web", labels={"app": "web"}))
    store.put_service(
        Service(NS, "web", "10.96.0.10", (ServicePort(80, "http", 8080),), {"app": "web"})
    )
    store.put_service(
        Service(NS, "db", "10.96.0.20", (ServicePort(5432, "tcp-db"),), {"app": "db"})
    )
    return store


def capture(name: str) -> PodCapture:
    return PodCapture(NS, name, f"sandbox-{name}", f"/run/netns/{name}", state=CAPTURED)


def make_proxy(tmp_path: Path, store: MeshStore, *pods: str) -> tuple[NodeProxy, CollectorRegistry]:
    ca = BuiltinCA.load_or_create(tmp_path / "state", "cluster.local")
    metrics = CollectorRegistry()
    registry = PodRegistry(tmp_path / "pods")
    for name in pods:
        registry.put(capture(name))
    settings = ProxySettings(
        "n1", tmp_path / "run", Path("/opt/envoy/bin/envoy"), tmp_path / "e.log"
    )
    proxy = NodeProxy(
        settings, store, registry, metrics, IdentityManager(ca, "cluster.local", registry=metrics)
    )
    return proxy, metrics


def push_issued(proxy: NodeProxy) -> None:
    """A push, the renewal loop's pass that issues the identities it scheduled, the push that
    follows (what on_change asks for)."""
    proxy.push()
    asyncio.run(proxy.identities.renew_due())
    proxy.push()


def synced(proxy: NodeProxy, timeout: float, pod: str) -> str:
    """proxy.synced(...) with the push loop running, as in the agent."""

    async def wait() -> str:
        stop = asyncio.Event()
        pushing = asyncio.create_task(proxy._push_loop(stop))
        try:
            return await proxy.synced(timeout, pod=pod)
        finally:
            stop.set()
            await pushing

    return asyncio.run(wait())


SHARED_LISTENERS = {
    "outbound-internal",
    "originate",
    "originate-tls",
    "mirror",
}  # the node's, no pod's


def resources(proxy: NodeProxy, type_url: str) -> dict[str, object]:
    snapshot = proxy.cache.get(proxy.settings.node_id)
    assert snapshot is not None
    return dict(snapshot.of(type_url))


def test_a_captured_pod_missing_from_the_source_gets_no_identity(tmp_path: Path) -> None:
    """#12 defect 5: no certificate of a made-up service account ("default") and no
    listeners (its traffic is refused) until the pod is known; visible in status and metrics."""
    store = mesh_store()
    proxy, metrics = make_proxy(tmp_path, store, "web-1", "ghost")
    push_issued(proxy)
    secrets = set(resources(proxy, e.SECRET))
    assert secrets == {"spiffe://cluster.local/ns/shop/sa/web", "ROOTCA"}
    listeners = set(resources(proxy, e.LISTENER)) - SHARED_LISTENERS
    assert listeners == {
        "virtualOutbound/shop/web-1",
        "virtualInbound/shop/web-1",
        "inboundInternal/shop/web-1",
    }
    table = proxy.status_table()
    assert table["identity_unknown"] == ["shop/ghost"]
    assert metrics.get_sample_value("nodeagent_pods_identity_unknown") == 1
    # Its ADD (or any wait on it) fails at once, naming why.
    problem = synced(proxy, 5.0, "shop/ghost")
    assert problem.startswith("identity unknown: pod not in the source"), problem

    # Once the source has it, it gets its own identity and its listeners.
    store.put_pod(Pod(NS, "ghost", service_account="ghost-sa"))
    push_issued(proxy)
    assert "spiffe://cluster.local/ns/shop/sa/ghost-sa" in resources(proxy, e.SECRET)
    assert "virtualInbound/shop/ghost" in resources(proxy, e.LISTENER)
    assert proxy.status_table()["identity_unknown"] == []
    assert metrics.get_sample_value("nodeagent_pods_identity_unknown") == 0


def test_a_service_that_cannot_be_translated_is_left_out_alone(tmp_path: Path) -> None:
    """#12 defect 6: an exception while translating one Service drops that Service only."""
    store = mesh_store()
    store.put_service(Service(NS, "broken", "10.96.0.300", (ServicePort(81, "http"),), {"a": "b"}))
    proxy, metrics = make_proxy(tmp_path, store, "web-1")
    proxy.push()
    assert proxy.status_table()["error"] == ""
    clusters = resources(proxy, e.CLUSTER)
    assert f"outbound|80||{WEB_HOST}" in clusters
    assert not any("broken" in name for name in clusters)
    assert "virtualOutbound/shop/web-1" in resources(proxy, e.LISTENER)
    (rejected,) = proxy.status_table()["rejected"]  # type: ignore[misc]
    assert rejected["kind"] == "Service" and rejected["name"] == "broken"
    assert rejected["by"] == "translation" and "10.96.0.300" in rejected["reason"]
    assert metrics.get_sample_value("nodeagent_config_rejected", {"kind": "Service"}) == 1


def nack_of(proxy: NodeProxy, type_url: str, message: str) -> Nack:
    snapshot = proxy.cache.get(proxy.settings.node_id)
    assert snapshot is not None
    names = tuple(snapshot.of(type_url))
    return Nack(type_url, message, names, snapshot.version, "")


def test_a_service_envoy_rejects_is_left_out_and_its_vip_refused(tmp_path: Path) -> None:
    """#12 defect 6: the Service whose filter chain Envoy names is left out of every listener
    (its VIP:port goes to the black hole, never the passthrough), reported with kind/name, and
    tried again once it changes. Message: Envoy 1.40's own, for a clashing filter chain."""
    store = mesh_store()
    proxy, metrics = make_proxy(tmp_path, store, "web-1", "web-2")
    store.put_pod(Pod(NS, "web-2", service_account="web", labels={"app": "web"}))
    proxy.push()
    chain = f"outbound|5432||{DB_HOST}"
    message = (
        "Error adding/updating listener(s) outbound-internal: error adding listener"
        f" 'envoy://outbound-internal': filter chain '{chain}' has the same matching rules"
        " defined as 'x'. duplicate matcher is: {}\n"
    )
    proxy.xds.nacked(proxy.settings.node_id, nack_of(proxy, types.LISTENER, message))
    assert proxy.changed.is_set()  # the push loop pushes the rest again
    proxy.push()
    assert chain not in resources(proxy, e.CLUSTER)
    assert f"outbound|80||{WEB_HOST}" in resources(proxy, e.CLUSTER)
    listener = json_format.MessageToDict(resources(proxy, e.LISTENER)["outbound-internal"])  # type: ignore[arg-type]
    by_name = {c["name"]: c for c in listener["filterChains"]}
    assert chain not in by_name
    closed = by_name["BlackHoleCluster|10.96.0.20:5432"]
    assert closed["filters"][-1]["typedConfig"]["cluster"] == "BlackHoleCluster"
    (rejected,) = proxy.status_table()["rejected"]  # type: ignore[misc]
    assert (rejected["kind"], rejected["namespace"], rejected["name"]) == ("Service", NS, "db")
    assert rejected["by"] == "LDS" and "same matching rules" in rejected["reason"]
    assert (
        metrics.get_sample_value(
            "nodeagent_config_rejections_total", {"kind": "Service", "cause": "NACK"}
        )
        == 1
    )
    # Other pods are not held up: only the rejected object is reported.
    assert proxy.pod_problem("shop/web-1") == ""

    # A changed Service is tried again.
    store.put_service(
        Service(NS, "db", "10.96.0.21", (ServicePort(5432, "tcp-db"),), {"app": "db"})
    )
    proxy.push()
    assert chain in resources(proxy, e.CLUSTER)
    assert proxy.status_table()["rejected"] == []


def test_a_pod_whose_listener_envoy_rejects_fails_alone(tmp_path: Path) -> None:
    store = mesh_store()
    store.put_pod(Pod(NS, "web-2", service_account="web", labels={"app": "web"}))
    proxy, _ = make_proxy(tmp_path, store, "web-1", "web-2")
    proxy.push()
    message = (
        "Error adding/updating listener(s) virtualInbound/shop/web-2: error adding listener"
        " '0.0.0.0:15006': something about this pod\n"
    )
    proxy.xds.nacked(proxy.settings.node_id, nack_of(proxy, types.LISTENER, message))
    proxy.push()
    assert set(resources(proxy, e.LISTENER)) - SHARED_LISTENERS == {
        "virtualOutbound/shop/web-1",
        "virtualInbound/shop/web-1",
        "inboundInternal/shop/web-1",
    }
    problem = synced(proxy, 5.0, "shop/web-2")
    assert "left out (LDS)" in problem and "virtualInbound/shop/web-2" in problem, problem
    assert proxy.pod_problem("shop/web-1") == ""


def test_fqdn_endpoint_slices_are_not_endpoints() -> None:
    """#12 defect 6: an ``addressType: FQDN`` slice holds host names, which Envoy would reject
    as endpoint IPs; Istio ignores such slices."""
    store = mesh_store()
    store.put_endpoint_slice(
        EndpointSlice(
            NS,
            "db-fqdn",
            "db",
            (Endpoint(("db.example.com",), True, ""),),
            (EndpointPort(5432, "tcp-db"),),
            address_type="FQDN",
        )
    )
    store.put_endpoint_slice(
        EndpointSlice(
            NS,
            "db-ip",
            "db",
            (Endpoint(("10.244.1.9",), True, ""),),
            (EndpointPort(5432, "tcp-db"),),
        )
    )
    cla = json_format.MessageToDict(translate(store, [])[e.ENDPOINT][f"outbound|5432||{DB_HOST}"])
    addresses = [
        endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"])
        for lb in cla["endpoints"][0]["lbEndpoints"]
    ]
    assert addresses == ["10.244.1.9:5432"]


def test_of_two_clashing_services_the_one_envoy_did_not_hold_is_left_out(tmp_path: Path) -> None:
    """Envoy names both chains of a clash; the Service it already held keeps serving."""
    store = mesh_store()
    proxy, _ = make_proxy(tmp_path, store, "web-1")
    version = proxy.push()
    proxy.xds.ack_received(proxy.settings.node_id, types.LISTENER, version)
    store.put_service(Service(NS, "clash", "10.96.0.20", (ServicePort(5432, "tcp"),), {"a": "c"}))
    proxy.push()
    message = (
        "Error adding/updating listener(s) outbound-internal: error adding listener"
        f" 'envoy://outbound-internal': filter chain 'outbound|5432||{DB_HOST}' has the same"
        " matching rules defined as 'outbound|5432||clash.shop.svc.cluster.local'."
    )
    proxy.xds.nacked(proxy.settings.node_id, nack_of(proxy, types.LISTENER, message))
    proxy.push()
    rejected = proxy.status_table()["rejected"]
    assert [(r["kind"], r["name"]) for r in rejected] == [("Service", "clash")]  # type: ignore[union-attr]
    assert f"outbound|5432||{DB_HOST}" in resources(proxy, e.CLUSTER)


def test_a_nack_naming_nothing_is_traced_by_re_pushing_halves(tmp_path: Path) -> None:
    """Envoy's EDS error names no resource ("malformed IP address: ..."): the proxy leaves half
    of the suspects out, asks Envoy again, and narrows down to the one object it rejects."""
    store = mesh_store()
    for i in range(6):
        store.put_service(
            Service(NS, f"s{i}", f"10.96.1.{i}", (ServicePort(80, "tcp"),), {"app": f"s{i}"})
        )
    proxy, _ = make_proxy(tmp_path, store, "web-1")
    bad = f"outbound|80||s4.{NS}.svc.cluster.local"  # the endpoints Envoy will not take
    node = proxy.settings.node_id
    version = proxy.push()
    snapshot = proxy.cache.get(node)
    assert snapshot is not None
    eds = tuple(snapshot.of(types.ENDPOINT))
    message = "malformed IP address: db.example.com. Consider setting resolver_name"
    proxy.xds.nacked(node, Nack(types.ENDPOINT, message, eds, version, "", eds))
    for _ in range(6):  # each round: the trial push, then Envoy's verdict on it
        if not proxy.changed.is_set():
            break
        proxy.changed.clear()
        version = proxy.push()
        snapshot = proxy.cache.get(node)
        assert snapshot is not None
        names = tuple(snapshot.of(types.ENDPOINT))
        if bad in names:
            proxy.xds.nacked(node, Nack(types.ENDPOINT, message, names, version, "", names))
        else:
            proxy.xds.ack_received(node, types.ENDPOINT, version)
    rejected = proxy.status_table()["rejected"]
    assert [(r["kind"], r["name"]) for r in rejected] == [("Service", "s4")]  # type: ignore[union-attr]
    assert "malformed IP address" in rejected[0]["reason"]  # type: ignore[index]
    proxy.push()
    names = set(resources(proxy, e.ENDPOINT))
    assert bad not in names and f"outbound|80||s3.{NS}.svc.cluster.local" in names


@pytest.mark.parametrize("scoped", [False, True])
def test_a_nack_of_the_shared_service_listener_naming_nothing_finds_the_service(
    tmp_path: Path, scoped: bool
) -> None:
    """outbound-internal holds every service's chain: when Envoy rejects it without naming a
    chain, every service in it is a suspect, and halving finds the one (the others keep
    serving, the culprit's VIP:port is black-holed). SCOPED: the pod is under a Sidecar, whose
    scope's listener holds the chains instead (mesh/sidecar_scope.py): the same."""
    store = mesh_store()
    shared = "outbound-internal"
    if scoped:
        spec = {"egress": [{"hosts": ["*/*"]}]}
        store.put_istio(IstioResource("networking.istio.io", "v1", "Sidecar", NS, "default", spec))
        shared = f"outbound-internal/{NS}/{NS}/default"
    for i in range(6):
        store.put_service(
            Service(NS, f"s{i}", f"10.96.1.{i}", (ServicePort(80, "tcp"),), {"app": f"s{i}"})
        )
    proxy, _ = make_proxy(tmp_path, store, "web-1")
    bad = f"outbound|80||s2.{NS}.svc.cluster.local"
    node = proxy.settings.node_id
    message = f"Error adding/updating listener(s) {shared}: something is wrong"

    def verdict() -> None:
        version = proxy.push()
        snapshot = proxy.cache.get(node)
        assert snapshot is not None
        listener = json_format.MessageToDict(snapshot.of(types.LISTENER)[shared])
        names = tuple(snapshot.of(types.LISTENER))
        if any(c["name"] == bad for c in listener["filterChains"]):
            nack = Nack(types.LISTENER, message, names, version, "", (shared,))
            proxy.xds.nacked(node, nack)
        else:
            proxy.xds.ack_received(node, types.LISTENER, version)

    verdict()
    for _ in range(8):  # each round: the trial push, then Envoy's verdict on it
        if not proxy.changed.is_set():
            break
        proxy.changed.clear()
        verdict()
    rejected = proxy.status_table()["rejected"]
    assert [(r["kind"], r["name"]) for r in rejected] == [("Service", "s2")]  # type: ignore[union-attr]
    proxy.push()
    listener = json_format.MessageToDict(resources(proxy, e.LISTENER)[shared])  # type: ignore[arg-type]
    chains = {c["name"] for c in listener["filterChains"]}
    assert bad not in chains and f"outbound|80||s3.{NS}.svc.cluster.local" in chains
    assert "BlackHoleCluster|10.96.1.2:80" in chains


def test_a_same_named_pod_of_another_node_or_uid_lends_no_identity(tmp_path: Path) -> None:
    """#12 defect 5: the store may hold a record of that name that is not this pod (a StatefulSet
    pod that ran on another node, or the previous pod of that name): its service account is not
    this pod's identity."""
    store = MeshStore("n1")
    store.put_namespace(Namespace(NS, {"nodeagent.io/mesh": "enabled"}))
    store.put_pod(Pod(NS, "db-0", uid="old", node_name="n2", service_account="db"))
    proxy, _ = make_proxy(tmp_path, store)
    proxy.registry.put(
        PodCapture(NS, "db-0", "sandbox-db", "/run/netns/db", uid="new", state=CAPTURED)
    )
    proxy.push()
    assert "spiffe://cluster.local/ns/shop/sa/db" not in resources(proxy, e.SECRET)
    assert proxy.status_table()["identity_unknown"] == ["shop/db-0"]
    # Here, but an earlier pod of that name (another uid): still not this one.
    store.put_pod(Pod(NS, "db-0", uid="old", node_name="n1", service_account="db"))
    proxy.push()
    assert proxy.status_table()["identity_unknown"] == ["shop/db-0"]
    # The source catches up with this pod: its identity.
    store.put_pod(Pod(NS, "db-0", uid="new", node_name="n1", service_account="db"))
    push_issued(proxy)
    assert "spiffe://cluster.local/ns/shop/sa/db" in resources(proxy, e.SECRET)
    assert proxy.status_table()["identity_unknown"] == []


class DownCA:
    """A CA that cannot be reached."""

    def __init__(self, tmp_path: Path) -> None:
        self.root_pem = BuiltinCA.load_or_create(tmp_path / "state", "cluster.local").root_pem

    def sign(self, *_: object) -> list[bytes]:
        raise ConnectionError("CA service unreachable: connection refused")


def test_a_pods_add_waits_for_its_certificate_and_says_why_the_ca_did_not_issue(
    tmp_path: Path,
) -> None:
    store = mesh_store()
    metrics = CollectorRegistry()
    registry = PodRegistry(tmp_path / "pods")
    registry.put(capture("web-1"))
    settings = ProxySettings(
        "n1", tmp_path / "run", Path("/opt/envoy/bin/envoy"), tmp_path / "e.log"
    )
    identities = IdentityManager(DownCA(tmp_path), "cluster.local", registry=metrics)
    proxy = NodeProxy(settings, store, registry, metrics, identities)
    push_issued(proxy)
    assert set(resources(proxy, e.SECRET)) == {"ROOTCA"}
    problem = synced(proxy, 1.0, "shop/web-1")
    assert problem == (
        "the local CA could not issue a certificate for spiffe://cluster.local/ns/shop/sa/web:"
        " CA service unreachable: connection refused (waited 1s)"
    )
    assert "connection refused" in identities.problem()


def test_a_missing_certificate_never_turns_mesh_traffic_into_plaintext(tmp_path: Path) -> None:
    """Fail closed: the listeners and clusters are the same with or without the certificate
    (mTLS to mesh endpoints stays mTLS; Envoy just has no certificate to present)."""
    store = mesh_store()
    proxy, _ = make_proxy(tmp_path, store, "web-1")
    proxy.push()  # scheduled, not issued yet
    assert set(resources(proxy, e.SECRET)) == {"ROOTCA"}
    without = {t: resources(proxy, t) for t in (e.LISTENER, e.CLUSTER)}
    push_issued(proxy)
    assert "spiffe://cluster.local/ns/shop/sa/web" in resources(proxy, e.SECRET)
    assert {t: resources(proxy, t) for t in (e.LISTENER, e.CLUSTER)} == without
    cluster = json_format.MessageToDict(
        without[e.CLUSTER]["originate-mtls"], preserving_proto_field_name=True
    )
    (mesh,) = [
        m
        for m in cluster["transport_socket_matches"]
        if m["name"] == "spiffe://cluster.local/ns/shop/sa/web"
    ]
    assert mesh["transport_socket"]["name"] == "envoy.transport_sockets.tls"
