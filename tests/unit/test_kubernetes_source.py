"""The Kubernetes source against a stand-in API server: same records as the directory source,
watch events applied, bookmarks followed, 410 Gone relisted, dropped connections recovered."""

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

from nodeagent.mesh.store import MeshStore
from nodeagent.mesh.validation import IstioSchemas
from nodeagent.podstatus import (
    CAPTURE_ANNOTATION,
    REASON_ANNOTATION,
    PodAnnotator,
    kubernetes_patcher,
)
from nodeagent.sources.directory import DirectorySource
from nodeagent.sources.kubernetes import ISTIO_GROUPS, KubernetesSource, plural

BOOKINFO = Path(__file__).resolve().parents[1] / "data/istio/bookinfo/networking"  # istio_data.py
NODE = "node1"
WAIT = 5.0
# Namespace, Pod, Service, EndpointSlice, ServiceAccount and the Istio kinds: one watch each.
KINDS = 5 + sum(group in ISTIO_GROUPS for group, _ in IstioSchemas.load().kinds())


def _bookinfo(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((BOOKINFO / name).read_text())
    doc["metadata"]["namespace"] = "shop"
    return dict(doc)


NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "shop", "labels": {"nodeagent.io/mesh": "enabled"}},
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
    return {
        "namespaces": dict(store.namespaces),
        "pods": {k: p for k, p in store.pods.items() if node is None or p.node_name == node},
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
            assert set(run.store.pods) == {"shop/web-1"}
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
            assert "shop/web-4" not in store.pods
            # An invalid Istio object arriving by watch is counted and skipped.
            server.modify({**INVALID_VS, "metadata": {**INVALID_VS["metadata"], "labels": {}}})
            server.delete(INVALID_VS)
            await _until(lambda: not run.source.invalid, "invalid object gone with its deletion")

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
            assert set(store.pods) == {"shop/web-6"}
            assert source.relists["Pod"] >= 1 and source.relists["DestinationRule"] >= 1
            # Still watching after the relist.
            server.modify(_bump(NAMESPACE, extra="yes"))
            await _until(lambda: store.namespaces["shop"].labels.get("extra") == "yes", "watch")

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
