"""The Kubernetes source against a stand-in API server: same records as the directory source,
watch events applied, bookmarks followed, 410 Gone relisted, dropped connections recovered; pods
of every node known (remote ones trimmed), and the testbed's stand-in serving a directory."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver_standin import APIServerStandIn
from store_writes import Writes

from nodeagent.mesh.model import Locality
from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.podstatus import (
    CAPTURE_ANNOTATION,
    REASON_ANNOTATION,
    PodAnnotator,
    kubernetes_patcher,
)
from nodeagent.sources.directory import DirectorySource
from nodeagent.sources.kubernetes import ISTIO_GROUPS, KubernetesSource, plural, remote_pod
from nodeagent.translate.internal import endpoint_where

BOOKINFO = Path(__file__).resolve().parents[1] / "data/istio/bookinfo/networking"  # istio_data.py
NODE = "node1"
WAIT = 5.0
# Namespace, Node, Pod, Service, EndpointSlice, ServiceAccount and the Istio kinds: one watch each.
KINDS = 6 + sum(group in ISTIO_GROUPS for group, _ in IstioSchemas.load().kinds())


def _bookinfo(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((BOOKINFO / name).read_text())
    doc["metadata"]["namespace"] = "shop"
    # As the API server stamps it on create (the stand-in keeps one given), so the directory
    # source reading the same file sees the same age.
    doc["metadata"]["creationTimestamp"] = "2026-01-02T03:04:05Z"
    return dict(doc)


NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "shop", "labels": {"nodeagent.io/mesh": "enabled"}},
}


NODE_OBJECT: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "node2",
        "labels": {
            "topology.kubernetes.io/region": "r1",
            "topology.kubernetes.io/zone": "z2",
            "kubernetes.io/hostname": "node2",
        },
    },
}


def _pod(name: str, node: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": "shop",
            "name": name,
            "uid": f"u-{name}",
            "labels": {"app": "web"},
        },
        "spec": {"nodeName": node, "serviceAccountName": "web"},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"namespace": "shop", "name": "web"},
    "spec": {
        "clusterIP": "10.96.0.10",
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
    },
}
SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "namespace": "shop",
        "name": "web-abc",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "endpoints": [
        {
            "addresses": ["10.244.1.7"],
            "conditions": {"ready": True},
            "nodeName": NODE,
            "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"},
        }
    ],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}
ACCOUNT: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "ServiceAccount",
    "metadata": {"namespace": "shop", "name": "web"},
}
INVALID_VS: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "VirtualService",
    "metadata": {"namespace": "shop", "name": "broken"},
    "spec": {"hosts": "reviews", "http": [{"route": "nowhere"}]},
}


def _objects() -> list[dict[str, Any]]:
    return [
        NAMESPACE,
        NODE_OBJECT,
        _pod("web-1", NODE, "10.244.1.7"),
        _pod("web-2", "node2", "10.244.2.9"),
        SERVICE,
        SLICE,
        ACCOUNT,
        _bookinfo("virtual-service-reviews-80-20.yaml"),
        _bookinfo("destination-rule-reviews.yaml"),
        INVALID_VS,
    ]


def _view(store: MeshStore, node: str | None = None) -> dict[str, Any]:
    """The store's records; NODE: pods of other nodes as the Kubernetes source keeps them."""
    return {
        "namespaces": dict(store.namespaces),
        "nodes": dict(store.nodes),
        "pods": {
            k: p if node is None or p.node_name == node else remote_pod(p)
            for k, p in store.pods.items()
        },
        "services": dict(store.services),
        "endpoint_slices": dict(store.endpoint_slices),
        "service_accounts": dict(store.service_accounts),
        "istio": dict(store.istio),
    }


async def _until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


@dataclass
class Running:
    server: APIServerStandIn
    store: MeshStore
    source: KubernetesSource


@contextlib.asynccontextmanager
async def _running(tmp_path: Path) -> AsyncIterator[Running]:
    """The stand-in holding _objects(), and a source synced from it."""
    server = APIServerStandIn()
    await server.start()
    for obj in _objects():
        server.add(obj)
    store = MeshStore()
    source = KubernetesSource(store, NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kc"))
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        async with asyncio.timeout(WAIT):
            await store.synced.wait()
        run = Running(server, store, source)
        await _until(lambda: server.watches() >= KINDS, "every kind watched")
        yield run
    finally:
        stop.set()
        async with asyncio.timeout(WAIT):
            await task
        await server.stop()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_plural_names() -> None:
    assert [plural(k) for k in ("Gateway", "ServiceEntry", "AuthorizationPolicy", "Sidecar")] == [
        "gateways",
        "serviceentries",
        "authorizationpolicies",
        "sidecars",
    ]


def test_same_records_as_the_directory_source(tmp_path: Path) -> None:
    async def scenario() -> None:
        files = tmp_path / "files"
        files.mkdir()
        (files / "cluster.yaml").write_text(yaml.safe_dump_all(_objects()))
        directory = MeshStore()
        DirectorySource(files, directory).scan()
        async with _running(tmp_path) as run:
            assert _view(run.store) == _view(directory, node=NODE)
            assert set(run.store.pods) == {"shop/web-1", "shop/web-2"}  # every node's pods
            assert "VirtualService/shop/reviews" in run.store.istio
            assert "DestinationRule/shop/reviews" in run.store.istio
            assert "VirtualService/shop/broken" not in run.store.istio
            assert list(run.source.invalid) == ["VirtualService/shop/broken"]
            assert any("spec.hosts" in p for p in run.source.invalid["VirtualService/shop/broken"])
            # Bookinfo's objects are v1; the source watched at the preferred version.
            assert run.store.istio["VirtualService/shop/reviews"].version == "v1"
            assert any(r.startswith("LIST /api/v1/pods") for r in run.server.requests)

    _run(scenario())


def _bump(obj: dict[str, Any], **labels: str) -> dict[str, Any]:
    changed = copy.deepcopy(obj)
    changed["metadata"].setdefault("labels", {}).update(labels)
    return changed


def test_watch_events_are_applied_and_unchanged_records_do_not_bump(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            server.add(_pod("web-3", NODE, "10.244.1.8"))
            server.add(_pod("web-4", "node2", "10.244.2.10"))  # another node: not ours
            await _until(lambda: "shop/web-3" in store.pods, "pod added")
            server.modify(_bump(SERVICE, tier="front"))
            await _until(
                lambda: store.services["shop/web"].labels == {"tier": "front"}, "service modified"
            )
            server.delete(ACCOUNT)
            await _until(lambda: "shop/web" not in store.service_accounts, "account deleted")
            # A modification that changes no record (resourceVersion only) moves nothing.
            generation = store.generation
            server.modify(SLICE)
            version = str(server.version)
            await _until(
                lambda: run.source.resource_versions["EndpointSlice"] == version, "event seen"
            )
            assert store.generation == generation
            assert store.pods["shop/web-4"].node_name == "node2"  # another node's: known too
            # An invalid Istio object arriving by watch is counted and skipped.
            server.modify({**INVALID_VS, "metadata": {**INVALID_VS["metadata"], "labels": {}}})
            server.delete(INVALID_VS)
            await _until(lambda: not run.source.invalid, "invalid object gone with its deletion")

    _run(scenario())


def test_a_nodes_locality_labels_are_followed_and_nothing_else(tmp_path: Path) -> None:
    """Nodes are watched for their locality (DestinationRule localityLbSetting): a relabel
    into another zone reaches the store; a change of any other label (a heartbeat's status
    too, which the store never sees) writes nothing."""

    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            assert store.locality_of("node2") == Locality("r1", "z2")
            assert "kubernetes.io/hostname" not in store.nodes["node2"].labels
            server.modify(_bump(NODE_OBJECT, **{"topology.kubernetes.io/zone": "z3"}))
            await _until(lambda: store.locality_of("node2").zone == "z3", "node relabelled")
            generation = store.generation
            server.modify(_bump(NODE_OBJECT, **{"topology.kubernetes.io/zone": "z3", "x": "y"}))
            version = str(server.version)
            await _until(lambda: run.source.resource_versions["Node"] == version, "event seen")
            assert store.generation == generation
            server.delete(NODE_OBJECT)
            await _until(lambda: "node2" not in store.nodes, "node deleted")

    _run(scenario())


def test_bookmark_advances_the_resource_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, source = run.server, run.source
            before = source.resource_versions["Namespace"]
            server.add(_pod("web-5", NODE, "10.244.1.9"))  # the global version moves on
            await _until(lambda: "shop/web-5" in run.store.pods, "pod added")
            assert source.resource_versions["Namespace"] == before
            server.bookmark()
            version = str(server.version)
            await _until(lambda: source.resource_versions["Namespace"] == version, "bookmarked")
            # A later re-watch starts from the bookmarked version, not the listed one.
            server.drop_watches()
            await _until(
                lambda: f"WATCH /api/v1/namespaces {version}" in server.requests, "re-watch"
            )

    _run(scenario())


def test_gone_mid_stream_relists_and_converges(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store, source = run.server, run.store, run.source
            server.hidden = True  # the watch stalls: these changes reach only a new LIST
            server.delete(_bookinfo("destination-rule-reviews.yaml"))
            server.delete(_pod("web-1", NODE, "10.244.1.7"))
            server.add(_pod("web-6", NODE, "10.244.1.10"))
            await asyncio.sleep(0.1)
            assert "DestinationRule/shop/reviews" in store.istio
            server.expire()
            await _until(lambda: "shop/web-6" in store.pods, "relisted pods")
            await _until(lambda: "DestinationRule/shop/reviews" not in store.istio, "relisted")
            assert set(store.pods) == {"shop/web-2", "shop/web-6"}
            assert source.relists["Pod"] >= 1 and source.relists["DestinationRule"] >= 1
            # Still watching after the relist.
            server.modify(_bump(NAMESPACE, extra="yes"))
            await _until(lambda: store.namespaces["shop"].labels.get("extra") == "yes", "watch")

    _run(scenario())


def test_a_relist_writes_only_what_changed_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 410 Gone every kind is listed again; the store gets the differences only."""

    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            writes = Writes(store, monkeypatch)
            server.hidden = True  # these changes reach only the new LISTs
            server.delete(_bookinfo("destination-rule-reviews.yaml"))
            server.modify(_bump(SERVICE, tier="front"))
            server.add(_pod("web-6", NODE, "10.244.1.10"))
            server.modify(SLICE)  # a new resourceVersion, the same record
            seen = len(server.requests)
            server.expire()
            await _until(
                lambda: sum(r.startswith("WATCH") for r in server.requests[seen:]) >= KINDS,
                "every kind relisted and watching again",
            )
            assert len(run.source.relists) == KINDS
            assert sorted(writes.calls) == ["delete_istio", "put_pod", "put_service"]
            assert store.services["shop/web"].labels == {"tier": "front"}

    _run(scenario())


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
def test_too_old_resource_version_on_rewatch_relists(tmp_path: Path, as_status: bool) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            server.gone_as_status = as_status
            server.hidden = True
            server.delete(SERVICE)
            server.drop_watches(compact=True)  # reconnects find their version compacted
            await _until(lambda: "shop/web" not in store.services, "relisted services")
            assert run.source.relists["Service"] >= 1

    _run(scenario())


def test_dropped_connection_is_recovered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            watches = sum(r.startswith("WATCH /api/v1/pods") for r in server.requests)
            server.drop_watches()
            server.add(_pod("web-7", NODE, "10.244.1.11"))
            await _until(lambda: "shop/web-7" in store.pods, "event after reconnect")
            assert sum(r.startswith("WATCH /api/v1/pods") for r in server.requests) > watches
            assert not run.source.relists  # resumed from the last version, no relist

    with caplog.at_level(logging.WARNING, "nodeagent.sources.kubernetes"):
        _run(scenario())
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_the_agent_reads_the_cluster_from_the_api_server_when_given_a_kubeconfig(
    tmp_path: Path,
) -> None:
    """`nodeagent run --kubeconfig`: the agent's sources are the API watch and the mesh config."""
    from nodeagent.agent import AgentConfig, _start_sources

    async def scenario() -> None:
        server = APIServerStandIn()
        await server.start()
        for obj in _objects():
            server.add(obj)
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text("trustDomain: example.org\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
        config = AgentConfig(
            node_name=NODE,
            kubeconfig=server.write_kubeconfig(tmp_path / "kc"),
            mesh_config=mesh,
        )
        store, stop = MeshStore(), asyncio.Event()
        tasks = _start_sources(config, store, stop)
        try:
            await asyncio.wait_for(store.synced.wait(), WAIT)
            assert store.mesh_config.trust_domain == "example.org"
            assert store.mesh_config.outbound_traffic_policy == "REGISTRY_ONLY"
            files = tmp_path / "files"
            files.mkdir()
            (files / "cluster.yaml").write_text(yaml.safe_dump_all(_objects()))
            directory = MeshStore()
            DirectorySource(files, directory).scan()
            assert _view(store) == _view(directory, node=NODE)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop()

    _run(scenario())


def test_capture_state_is_patched_onto_the_pod_and_seen_back_by_the_watch(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            patch, close = await kubernetes_patcher(tmp_path / "kc")
            try:
                annotator = PodAnnotator(store, patch)
                annotator.record("shop", "web-1", "failed", "listeners not ready: Envoy down")
                assert await annotator.flush()
                await _until(
                    lambda: (
                        store.pods["shop/web-1"].annotations.get(CAPTURE_ANNOTATION) == "failed"
                    ),
                    "the watch brought the patched pod back",
                )
                stored = server.objects["/api/v1/pods"][("shop", "web-1")]["metadata"]
                assert stored["annotations"] == {
                    CAPTURE_ANNOTATION: "failed",
                    REASON_ANNOTATION: "listeners not ready: Envoy down",
                }
                annotator.record("shop", "web-1", "captured", "repaired by reconcile")
                assert await annotator.flush()
                await _until(
                    lambda: REASON_ANNOTATION not in store.pods["shop/web-1"].annotations,
                    "the reason goes once captured",
                )
                # The pod already shows it: reconcile's next settle sends nothing.
                patches = [r for r in server.requests if r.startswith("PATCH")]
                annotator.record("shop", "web-1", "captured", "verified")
                assert await annotator.flush()
                assert [r for r in server.requests if r.startswith("PATCH")] == patches
                assert patches == ["PATCH /api/v1/namespaces/shop/pods/web-1"] * 2
                # A pod deleted meanwhile is dropped, not retried forever.
                annotator.record("shop", "deleted", "captured", "")
                assert await annotator.flush() and annotator.pending == {}
            finally:
                await close()

    _run(scenario())


# -- pods of every node (issue #12: remote endpoints keep their identity) ------------------------


def _find(tree: Any, key: str) -> list[Any]:
    """Every value of KEY anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [
            x for v in tree.values() for x in _find(v, key)
        ]
    if isinstance(tree, list):
        return [x for v in tree for x in _find(v, key)]
    return []


def test_an_endpoint_on_another_node_gets_mtls_and_its_pods_identity(tmp_path: Path) -> None:
    """The EDS endpoint of a mesh pod on another node is marked ``tlsMode: istio`` and the
    cluster verifies that pod's SPIFFE identity, as istiod's are from every pod (Istio docs,
    "Mutual TLS Migration" / auto mTLS: a client sends mTLS to workloads with a proxy;
    https://istio.io/latest/docs/concepts/security/#secure-naming). On main the source watched
    this node's pods only: the endpoint was plaintext and the SAN list empty."""
    from google.protobuf import json_format

    from nodeagent.translate import LocalPod, envoy, translate

    async def scenario() -> None:
        async with _running(tmp_path) as run:
            remote_slice = copy.deepcopy(SLICE)
            remote_slice["metadata"]["name"] = "web-remote"
            remote_slice["endpoints"] = [
                {
                    "addresses": ["10.244.2.9"],
                    "conditions": {"ready": True},
                    "nodeName": "node2",
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-2"},
                }
            ]
            run.server.add(remote_slice)
            await _until(lambda: "shop/web-remote" in run.store.endpoint_slices, "slice")
            caller = LocalPod(run.store.pods["shop/web-1"], "/run/netns/web-1")
            out = translate(run.store, [caller])
            host = "web.shop.svc.cluster.local"
            cla = json_format.MessageToDict(out[envoy.ENDPOINT][f"outbound|80||{host}"])
            endpoints = {
                endpoint_where(lb["endpoint"]["address"]["envoyInternalAddress"]["endpointId"]): (
                    _find(lb, "tlsMode"),
                    _find(lb, "sans"),
                )
                for group in cla["endpoints"]  # one per locality: node2 has one
                for lb in group["lbEndpoints"]
            }
            web = ["spiffe://cluster.local/ns/shop/sa/web"]
            assert endpoints == {
                "10.244.1.7:8080": (["istio"], web),
                "10.244.2.9:8080": (["istio"], web),
            }

    _run(scenario())


def test_a_pod_of_another_node_is_kept_trimmed_and_its_churn_moves_nothing(
    tmp_path: Path,
) -> None:
    annotations = {
        "nodeagent.io/mesh": "disabled",
        "sidecar.istio.io/inject": "false",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
        "nodeagent.io/capture": "captured",
        "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 4000 + "}",
    }

    async def scenario() -> None:
        async with _running(tmp_path) as run:
            server, store = run.server, run.store
            for name, node in (("db-1", "node2"), ("db-2", NODE)):
                pod = _pod(name, node, "10.244.2.20" if node == "node2" else "10.244.1.20")
                pod["metadata"]["annotations"] = dict(annotations)
                pod["spec"]["serviceAccountName"] = "db"
                server.add(pod)
            await _until(lambda: {"shop/db-1", "shop/db-2"} <= set(store.pods), "pods")
            remote, local = store.pods["shop/db-1"], store.pods["shop/db-2"]
            assert (remote.service_account, remote.node_name, dict(remote.labels)) == (
                "db",
                "node2",
                {"app": "web"},
            )
            assert remote.pod_ips == ("10.244.2.20",) and remote.uid == "u-db-1"
            assert dict(remote.annotations) == {
                "nodeagent.io/mesh": "disabled",
                "sidecar.istio.io/inject": "false",  # membership reads it (membership.decide)
                "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
            }
            assert dict(local.annotations) == annotations  # this node's pods are kept whole
            # The remote pod's status and capture state change: nothing the mesh reads did.
            generation = store.generation
            churn = copy.deepcopy(server.objects["/api/v1/pods"][("shop", "db-1")])
            churn["metadata"]["annotations"]["nodeagent.io/capture"] = "failed"
            churn["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
            server.modify(churn)
            version = str(server.version)
            await _until(lambda: run.source.resource_versions["Pod"] == version, "event seen")
            assert store.generation == generation

    _run(scenario())


def test_a_cni_add_waits_for_the_pod_on_its_own_node() -> None:
    """A record of the same name on another node (a StatefulSet pod that ran there, whose
    deletion the watch has not brought yet) is not the pod a CNI ADD here is for."""
    from nodeagent.mesh.model import Pod

    async def scenario() -> None:
        store = MeshStore(NODE)
        store.put_pod(Pod("shop", "db-0", uid="old", node_name="node2"))
        assert await store.wait_for_pod("shop", "db-0", 0.05) is None
        waiting = asyncio.create_task(store.wait_for_pod("shop", "db-0", WAIT))
        await asyncio.sleep(0)
        store.put_pod(Pod("shop", "db-0", uid="old", node_name="node2", labels={"x": "y"}))
        store.put_pod(Pod("shop", "db-0", uid="new", node_name=NODE))
        found = await waiting
        assert found is not None and found.uid == "new"
        # Without a node name (a bare YAML pod), every pod counts as this node's.
        assert await MeshStore().wait_for_pod("shop", "db-0", 0.01) is None

    _run(scenario())


# -- the testbed's stand-in: a cluster directory served ------------------------------------------


SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop, creationTimestamp: "2026-01-02T03:04:05Z"}
spec:
  hosts: [legacy.example.com]
  addresses: [1:20, 2001:db8::]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 2001:db8::1}]
"""


def test_the_testbed_apiserver_serves_its_cluster_directory(tmp_path: Path) -> None:
    """ClusterMirror turns file changes into watch events; the agents' records equal the
    directory source's; a patched annotation survives a rewrite of the pod's file."""
    from nodeagent.testbed.apiserver import ClusterMirror

    async def scenario() -> None:
        files = tmp_path / "cluster"
        (files / "pods").mkdir(parents=True)
        objects = _objects()
        pods = [o for o in objects if o["kind"] == "Pod"]
        (files / "rest.yaml").write_text(
            yaml.safe_dump_all([o for o in objects if o["kind"] != "Pod"])
        )
        for pod in pods:
            (files / "pods" / f"{pod['metadata']['name']}.yaml").write_text(yaml.safe_dump(pod))
        (files / ".hidden.yaml.tmp").write_text("{not yaml")
        # Written by hand, as a test applies Istio config: YAML that PyYAML (YAML 1.1) misreads
        # (the sexagesimal 1:20, 2001:db8:: refused); both readers must take it as Kubernetes.
        (files / "entry.yaml").write_text(SERVICE_ENTRY)
        server = APIServerStandIn()
        mirror = ClusterMirror(files, server)
        assert mirror.sync() and not mirror.sync()
        await server.start()
        store, stop = MeshStore(NODE), asyncio.Event()
        source = KubernetesSource(store, NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kc"))
        task = asyncio.create_task(source.run(stop))
        try:
            async with asyncio.timeout(WAIT):
                await store.synced.wait()
            directory = MeshStore()
            DirectorySource(files, directory).scan()
            assert _view(store) == _view(directory, node=NODE)
            entry = store.istio["ServiceEntry/shop/legacy"].spec
            assert entry["addresses"] == ["1:20", "2001:db8::"]

            patch, close = await kubernetes_patcher(tmp_path / "kc")
            try:
                await patch("shop", "web-1", {CAPTURE_ANNOTATION: "captured"})
            finally:
                await close()
            web1 = pods[0]
            web1["status"] = {"podIP": "10.244.1.70", "podIPs": [{"ip": "10.244.1.70"}]}
            (files / "pods" / "web-1.yaml").write_text(yaml.safe_dump(web1))
            (files / "pods" / "web-2.yaml").unlink()
            assert mirror.sync()
            await _until(
                lambda: (
                    "shop/web-2" not in store.pods
                    and store.pods["shop/web-1"].pod_ips == ("10.244.1.70",)
                ),
                "file changes reached the agent's store",
            )
            assert store.pods["shop/web-1"].annotations == {CAPTURE_ANNOTATION: "captured"}
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task
            await server.stop()

    _run(scenario())


def test_the_testbed_apiserver_sends_no_event_for_an_object_whose_file_did_not_change(
    tmp_path: Path,
) -> None:
    """As a real API server: another file's change MODIFIES only what it changed, so what a
    watcher receives per change does not grow with the cluster's objects."""
    from nodeagent.testbed.apiserver import ClusterMirror

    files = tmp_path / "cluster"
    files.mkdir()
    objects = _objects()
    (files / "rest.yaml").write_text(yaml.safe_dump_all([o for o in objects if o["kind"] != "Pod"]))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": "shop"},
        "stringData": {"k": "v"},
    }
    (files / "secret.yaml").write_text(yaml.safe_dump(secret))
    server = APIServerStandIn()
    mirror = ClusterMirror(files, server)
    assert mirror.sync()
    before = len(server.history)
    (files / "pods.yaml").write_text(yaml.safe_dump_all([o for o in objects if o["kind"] == "Pod"]))
    assert mirror.sync()
    added = [(e.type, e.object["kind"]) for e in server.history[before:]]
    assert added == [("ADDED", "Pod")] * sum(o["kind"] == "Pod" for o in objects)
    secret["stringData"] = {"k": "w"}
    (files / "secret.yaml").write_text(yaml.safe_dump(secret))
    assert mirror.sync()
    assert [(e.type, e.object["kind"]) for e in server.history[before + len(added) :]] == [
        ("MODIFIED", "Secret")
    ]


def test_the_testbed_apiserver_keeps_the_last_file_of_an_object_defined_twice(
    tmp_path: Path,
) -> None:
    """An object in two files is served as the later file (path order) says; removing that
    file serves the earlier one's again; removing both deletes it."""
    from nodeagent.testbed.apiserver import ClusterMirror

    files = tmp_path / "cluster"
    files.mkdir()

    def service(port: int) -> dict[str, Any]:
        out = copy.deepcopy(SERVICE)
        out["spec"]["ports"][0]["port"] = port
        return out

    def served() -> int | None:
        obj = server.objects.get("/api/v1/services", {}).get(("shop", "web"))
        return None if obj is None else int(obj["spec"]["ports"][0]["port"])

    server = APIServerStandIn()
    mirror = ClusterMirror(files, server)
    (files / "a.yaml").write_text(yaml.safe_dump(service(81)))
    (files / "b.yaml").write_text(yaml.safe_dump(service(82)))
    assert mirror.sync()
    assert served() == 82
    (files / "a.yaml").write_text(yaml.safe_dump(service(83)))  # the earlier file: no change
    before = len(server.history)
    assert mirror.sync()
    assert served() == 82 and len(server.history) == before
    (files / "b.yaml").unlink()
    assert mirror.sync()
    assert served() == 83
    assert [e.type for e in server.history[before:]] == ["MODIFIED"]
    (files / "a.yaml").unlink()
    assert mirror.sync() and not mirror.sync()
    assert served() is None
    assert [e.type for e in server.history[before:]] == ["MODIFIED", "DELETED"]


def test_the_testbed_apiserver_compares_only_the_objects_of_changed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of one file costs the stand-in that file's objects, not the whole directory's
    (a real API server does no work for objects nobody wrote; the benchmarks' thousands of
    services must not slow every change)."""
    from nodeagent.testbed import apiserver

    files = tmp_path / "cluster"
    files.mkdir()
    many = []
    for i in range(50):
        svc = copy.deepcopy(SERVICE)
        svc["metadata"]["name"] = f"svc-{i}"
        many.append(svc)
    (files / "many.yaml").write_text(yaml.safe_dump_all(many))
    (files / "one.yaml").write_text(yaml.safe_dump(_bookinfo("destination-rule-reviews.yaml")))
    server = APIServerStandIn()
    mirror = apiserver.ClusterMirror(files, server)
    assert mirror.sync()
    compared: list[str] = []
    as_stored = apiserver._as_stored
    monkeypatch.setattr(
        apiserver,
        "_as_stored",
        lambda desired, stored: (compared.append(desired["kind"]), as_stored(desired, stored)),
    )
    rule = _bookinfo("destination-rule-reviews.yaml")
    rule["spec"]["subsets"] = rule["spec"]["subsets"][:1]
    (files / "one.yaml").write_text(yaml.safe_dump(rule))
    before = len(server.history)
    assert mirror.sync()
    assert compared == ["DestinationRule"]
    assert [(e.type, e.object["kind"]) for e in server.history[before:]] == [
        ("MODIFIED", "DestinationRule")
    ]


def test_pods_are_listed_in_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LIST of every node's pods comes in pages (limit/continue), so the agent never holds
    the whole cluster's pod JSON at once; the store ends the same."""
    from nodeagent.sources import kubernetes

    monkeypatch.setattr(kubernetes, "LIST_PAGE", 2)

    async def scenario() -> None:
        async with _running(tmp_path) as run:
            pages = [r for r in run.server.requests if r == "LIST /api/v1/pods"]
            assert set(run.store.pods) == {"shop/web-1", "shop/web-2"}
            assert len(pages) == 1  # two pods fit one page of two
            for i in range(3, 8):
                run.server.add(_pod(f"web-{i}", "node2", f"10.244.2.{i}"))
            run.server.hidden = True
            run.server.delete(_pod("web-1", NODE, "10.244.1.7"))  # seen only by a new LIST
            run.server.expire()  # relist: 6 pods in 3 pages
            await _until(lambda: "shop/web-1" not in run.store.pods, "relisted")
            assert set(run.store.pods) == {f"shop/web-{i}" for i in range(2, 8)}
            pages = [r for r in run.server.requests if r == "LIST /api/v1/pods"]
            assert len(pages) == 1 + 3

    _run(scenario())
