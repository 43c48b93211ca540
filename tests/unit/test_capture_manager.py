"""The agent side of CNI: membership, capture, registry, reconcile, over the real socket protocol.

A recording backend stands in for the kernel here; tests/integration runs the nftables backend.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import wire
from nodeagent.cni.server import CniServer
from nodeagent.mesh.model import Namespace, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.metrics import AgentMetrics
from nodeagent.redirect import CaptureCheck
from nodeagent.redirect.capture import CaptureSpec
from nodeagent.redirect.discovery import PodNetns
from nodeagent.redirect.manager import CaptureManager
from nodeagent.redirect.registry import PodRegistry
from tests.waiting import wait_for_async


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.installed: dict[Path, CaptureSpec] = {}
        self.calls: list[tuple[str, Path]] = []
        self.uids: dict[Path, str] = {}  # the pod UID each netns was applied with
        self.fail_apply = ""

    def apply(self, netns: Path, spec: CaptureSpec, uid: str = "") -> None:
        self.calls.append(("apply", netns))
        self.uids[netns] = uid
        if self.fail_apply:
            raise RuntimeError(self.fail_apply)
        self.installed[netns] = spec

    def verify(self, netns: Path, spec: CaptureSpec, uid: str = "") -> CaptureCheck:
        self.calls.append(("verify", netns))
        if netns not in self.installed:
            return CaptureCheck(False, "table inet nodeagent is missing")
        return CaptureCheck(self.installed[netns] == spec, "rules differ")

    def remove(self, netns: Path, uid: str = "") -> None:
        self.calls.append(("remove", netns))
        self.installed.pop(netns, None)


class ProbeRecorder:
    def __init__(self) -> None:
        self.ips: list[str] = []
        self.syncs = 0  # nft runs on the node's probe SNAT set
        self.wholes = 0  # of which rewrote the whole table
        self.hold = threading.Event()  # cleared: a sync waits (at most 5 s) until it is set
        self.hold.set()

    def sync(self, pod_ips: Any, whole: bool = False) -> None:
        self.syncs += 1
        self.wholes += whole
        self.hold.wait(5)
        self.ips = list(pod_ips)


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = MeshStore()
        self.store.put_namespace(Namespace("shop", {"nodeagent.io/mesh": "enabled"}))
        self.store.put_namespace(Namespace("plain"))
        self.backend = RecordingBackend()
        self.probes = ProbeRecorder()
        self.metrics = AgentMetrics()
        # What each (fake) network namespace holds, as discovery.netns_addresses reads it.
        self.addresses: dict[Path, set[str]] = {}
        self.manager = self.new_manager()

    def new_manager(self) -> CaptureManager:
        registry = PodRegistry(self.tmp / "state" / "pods")
        registry.load()
        return CaptureManager(
            self.store,
            self.backend,
            registry,
            self.metrics,
            ("kube-system",),
            probe_snat=self.probes,
            pod_wait=0.3,
            node_name="n1",
            netns_addresses=lambda netns: self.addresses.get(netns, set()),
        )

    def netns(self, name: str) -> str:
        path = self.tmp / f"netns-{name}"
        path.touch()
        return str(path)

    def cni_pod(self, name: str, namespace: str = "shop", ip: str = "10.244.1.7") -> dict[str, Any]:
        netns = self.netns(name)
        self.addresses[Path(netns)] = {ip}
        return {
            "namespace": namespace,
            "name": name,
            "containerId": f"id-{name}",
            "netns": netns,
            "ips": [ip],
            "network": "testbed",
        }

    def state_metric(self, namespace: str, pod: str, state: str) -> float | None:
        """1 when the agent shows POD in STATE (`nodeagent pods`) and nodeagent_pods{state}
        counts it; the metrics themselves name no pod (#12)."""
        shown = any(
            (r["namespace"], r["name"], r["state"]) == (namespace, pod, state)
            for r in self.manager.status()
        )
        count = self.metrics.registry.get_sample_value("nodeagent_pods", {"state": state}) or 0
        return 1.0 if shown and count >= 1 else None


def run(scenario: Callable[[Node], Awaitable[None]], tmp_path: Path) -> None:
    asyncio.run(scenario(Node(tmp_path)))


async def under_way(node: Node, key: str) -> None:
    """The CNI ADD of pod KEY has started: in its first step it looks the pod up and, missing
    or outdated, waits for the source (nothing in it yields before that)."""
    await wait_for_async(lambda: key in node.manager._adding, 2, f"the ADD of {key} under way")


def test_a_mesh_pod_is_captured_with_its_annotations(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        annotations = {"traffic.sidecar.istio.io/excludeInboundPorts": "9090"}
        node.store.put_pod(Pod("shop", "web", annotations=annotations))
        answer = await node.manager.add(node.cni_pod("web"), timeout=5)
        assert answer["ok"] and answer["state"] == "captured"
        (spec,) = node.backend.installed.values()
        assert spec.exclude_inbound_ports == (9090,)
        assert node.probes.ips == ["10.244.1.7"]
        assert node.state_metric("shop", "web", "captured") == 1
        persisted = PodRegistry(tmp_path / "state" / "pods")
        persisted.load()
        assert persisted.pods["id-web"].state == "captured"

    run(scenario, tmp_path)


def test_adds_queued_behind_a_probe_sync_share_the_next_one(tmp_path: Path) -> None:
    """A burst of ADDs costs a few updates of the node's probe SNAT set, not one each."""

    async def scenario(node: Node) -> None:
        names = [f"p{i}" for i in range(5)]
        for name in names:
            node.store.put_pod(Pod("shop", name))
        node.probes.hold.clear()
        pods = [node.cni_pod(n, ip=f"10.244.1.{i + 10}") for i, n in enumerate(names)]
        first = asyncio.create_task(node.manager.add(pods[0], timeout=5))
        await until(lambda: node.probes.syncs == 1, "the first ADD's probe sync")
        rest = [asyncio.create_task(node.manager.add(p, timeout=5)) for p in pods[1:]]
        await until(
            lambda: sum(r["state"] == "captured" for r in node.manager.status()) == 5,
            "every ADD captured, its probe sync queued",
        )
        node.probes.hold.set()
        answers = await asyncio.gather(first, *rest)
        assert [a["state"] for a in answers] == ["captured"] * 5
        assert node.probes.syncs == 2
        assert sorted(node.probes.ips) == [f"10.244.1.{i + 10}" for i in range(5)]

    run(scenario, tmp_path)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_pods_outside_the_mesh_are_recorded_not_captured(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("plain", "db"))
        answer = await node.manager.add(node.cni_pod("db", namespace="plain"), timeout=5)
        assert answer == {
            "ok": True,
            "state": "not-in-mesh",
            "reason": "no mesh label on pod or namespace (nodeagent.io/mesh=enabled,"
            " istio-injection=enabled, istio.io/dataplane-mode=ambient)",
        }
        assert node.backend.calls == []
        assert node.state_metric("plain", "db", "not-in-mesh") == 1

    run(scenario, tmp_path)


def test_a_pod_the_source_delivers_late_is_still_captured(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        adding = asyncio.create_task(node.manager.add(node.cni_pod("late"), timeout=5))
        await under_way(node, "shop/late")
        node.store.put_pod(Pod("shop", "late"))
        assert (await adding)["state"] == "captured"

    run(scenario, tmp_path)


def test_an_unknown_pod_fails_the_add(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        answer = await node.manager.add(node.cni_pod("ghost"), timeout=5)
        assert answer["ok"] is False
        assert "shop/ghost is unknown to the node agent" in answer["reason"]
        assert node.state_metric("shop", "ghost", "failed") == 1

    run(scenario, tmp_path)


def test_a_bad_annotation_fails_the_add_and_names_it(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        bad = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}
        node.store.put_pod(Pod("shop", "web", annotations=bad))
        answer = await node.manager.add(node.cni_pod("web"), timeout=5)
        assert answer["ok"] is False
        assert "excludeOutboundIPRanges" in answer["reason"] and "10.0.0.0/33" in answer["reason"]
        assert node.backend.installed == {}

    run(scenario, tmp_path)


def test_a_backend_failure_fails_the_add(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("shop", "web"))
        node.backend.fail_apply = "Operation not permitted"
        answer = await node.manager.add(node.cni_pod("web"), timeout=5)
        assert answer["ok"] is False and "Operation not permitted" in answer["reason"]

    run(scenario, tmp_path)


def test_del_removes_capture_and_forgets_the_pod(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("shop", "web"))
        pod = node.cni_pod("web")
        await node.manager.add(pod, timeout=5)
        assert (await node.manager.delete(pod))["ok"]
        assert node.backend.installed == {}
        assert node.manager.status() == []
        assert node.probes.ips == []
        assert node.state_metric("shop", "web", "captured") is None
        assert (await node.manager.delete(pod))["ok"]  # DEL twice is fine

    run(scenario, tmp_path)


def test_reconcile_repairs_lost_capture_and_reports_gone_netns(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        for name in ("a", "b", "c"):
            node.store.put_pod(Pod("shop", name))
            await node.manager.add(node.cni_pod(name), timeout=5)
        # A new agent process: same registry file, nothing in memory.
        node.manager = node.new_manager()
        node.backend.installed.pop(Path(tmp_path / "netns-b"))  # someone deleted the table
        Path(tmp_path / "netns-c").unlink()  # the pod's netns is gone
        assert node.probes.wholes == 0  # ADDs change only the set's elements
        summary = await node.manager.reconcile()
        assert summary == {"verified": 1, "repaired": 1, "failed": 0, "netns_missing": 1}
        assert node.probes.wholes == 1  # a reconcile pass also rewrites (repairs) the table
        states = {p["name"]: (p["state"], p["reason"]) for p in node.manager.status()}
        assert states["b"][0] == "captured" and "repaired" in states["b"][1]
        assert states["c"][0] == "netns-missing"
        assert node.metrics.registry.get_sample_value("nodeagent_capture_repairs_total") == 1

    run(scenario, tmp_path)


def test_pods_running_before_the_agent_are_found_and_captured(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        def pod(ns: str, name: str, ip: str, node_name: str = "n1") -> Pod:
            return Pod(ns, name, uid=f"uid-{name}", node_name=node_name, pod_ips=(ip,))

        node.store.put_pod(pod("shop", "web", "10.244.1.2"))
        node.store.put_pod(pod("shop", "lost", "10.244.1.3"))  # no process holds its netns
        node.store.put_pod(pod("plain", "outside", "10.244.1.4"))  # not in the mesh
        node.store.put_pod(pod("shop", "elsewhere", "10.244.2.2", node_name="n2"))
        node.store.put_pod(pod("shop", "known", "10.244.1.5"))
        await node.manager.add(node.cni_pod("known", ip="10.244.1.5"), timeout=5)
        asked: list[dict[str, list[str]]] = []
        web_netns = node.netns("web")

        def finder(pods: Mapping[str, Sequence[str]]) -> dict[str, PodNetns]:
            asked.append({uid: list(ips) for uid, ips in pods.items()})
            return {"uid-web": PodNetns("uid-web", web_netns, "c0ffee", 42)}

        node.manager.find_netns = finder
        summary = await node.manager.adopt_running("n1")
        assert summary == {"adopted": 1, "failed": 1}
        assert asked == [{"uid-web": ["10.244.1.2"], "uid-lost": ["10.244.1.3"]}]
        states = {p["name"]: p for p in node.manager.status()}
        assert states["web"]["state"] == "captured" and states["web"]["discovered"]
        assert node.backend.installed[Path(web_netns)] == CaptureSpec()
        assert node.backend.uids[Path(web_netns)] == "uid-web"  # eBPF finds its cgroup by it
        assert states["lost"]["state"] == "failed"
        assert "no process" in states["lost"]["reason"] and "10.244.1.3" in states["lost"]["reason"]
        assert "outside" not in states and "elsewhere" not in states
        assert sorted(node.probes.ips) == ["10.244.1.2", "10.244.1.5"]

        # A restarted agent re-verifies the found pod and tries the lost one again.
        node.manager = node.new_manager()
        node.manager.find_netns = finder
        assert (await node.manager.reconcile())["verified"] == 2
        assert await node.manager.adopt_running("n1") == {"adopted": 0, "failed": 1}

        # The runtime's DEL names the sandbox, which discovery never knew: the UID finds it.
        deleted = await node.manager.delete(
            {"namespace": "shop", "name": "web", "containerId": "sandbox-1", "uid": "uid-web"}
        )
        assert deleted["state"] == "removed"
        assert Path(web_netns) not in node.backend.installed
        # A new sandbox of the lost pod replaces its failed record.
        lost = node.cni_pod("lost", ip="10.244.1.3") | {"uid": "uid-lost"}
        assert (await node.manager.add(lost, timeout=5))["state"] == "captured"
        assert node.backend.uids[Path(lost["netns"])] == "uid-lost"
        assert [p["container_id"] for p in node.manager.status() if p["name"] == "lost"] == [
            "id-lost"
        ]

    run(scenario, tmp_path)


def test_the_socket_serves_concurrent_adds_and_rejects_garbage(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        server = CniServer(tmp_path / "run" / "cni.sock", node.manager, node.metrics)
        await server.start()
        assert (tmp_path / "run" / "cni.sock").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        path = str(tmp_path / "run" / "cni.sock")
        starting = await asyncio.to_thread(wire.request, path, {"command": "STATUS"}, 5)
        assert starting == {"ok": False, "reason": "the node agent is starting"}
        server.ready = True

        names = [f"p{i}" for i in range(20)]
        for name in names:
            node.store.put_pod(Pod("shop", name))
        requests = [
            asyncio.to_thread(
                wire.request,
                path,
                {
                    "command": "ADD",
                    "pod": node.cni_pod(name, ip=f"10.244.1.{i + 10}"),
                    "timeout": 5,
                },
                10,
            )
            for i, name in enumerate(names)
        ]
        answers = await asyncio.gather(*requests)
        assert [a["state"] for a in answers] == ["captured"] * 20
        assert len(node.probes.ips) == 20

        bad = await asyncio.to_thread(wire.request, path, {"command": "FROB"}, 5)
        assert bad["ok"] is False and "unknown command 'FROB'" in bad["reason"]
        status = await asyncio.to_thread(wire.request, path, {"command": "STATUS"}, 5)
        assert len(status["pods"]) == 20
        await server.stop()
        assert not (tmp_path / "run" / "cni.sock").exists()

    run(scenario, tmp_path)


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1]\n"])
def test_malformed_requests_get_an_answer(tmp_path: Path, garbage: bytes) -> None:
    async def scenario(node: Node) -> None:
        server = CniServer(tmp_path / "cni.sock", node.manager, node.metrics)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "cni.sock"))
        writer.write(garbage)
        answer = wire.decode(await reader.readline())
        writer.close()
        assert answer["ok"] is False and "malformed request" in answer["reason"]
        await server.stop()

    run(scenario, tmp_path)


# -- CNI GC (issue #12, defect 2) ------------------------------------------------------------------


def test_gc_removes_only_pods_that_the_runtime_and_the_agent_both_say_are_gone(
    tmp_path: Path,
) -> None:
    """CNI spec, GC: "a per-network operation"; runtimes list the valid attachments. The list
    alone never removes capture: istio-cni drops pods from its own pod informer, never from GC
    (istio/istio cni/pkg/plugin, cni/pkg/nodeagent/informers.go); we require both."""

    async def scenario(node: Node) -> None:
        for i, name in enumerate(("a", "b", "c")):
            node.store.put_pod(Pod("shop", name, uid=f"uid-{name}", node_name="n1"))
            pod = node.cni_pod(name, ip=f"10.244.1.{i + 2}") | {"uid": f"uid-{name}"}
            assert (await node.manager.add(pod, timeout=5))["state"] == "captured"
        web_netns = node.netns("web")
        node.store.put_pod(
            Pod("shop", "web", uid="uid-web", node_name="n1", pod_ips=("10.244.1.9",))
        )
        node.manager.find_netns = lambda pods: {
            "uid-web": PodNetns("uid-web", web_netns, "c0ffee", 42)
        }
        assert (await node.manager.adopt_running("n1"))["adopted"] == 1
        everyone = {"a", "b", "c", "web"}

        def captured() -> set[str]:
            return {p["name"] for p in node.manager.status() if p["state"] == "captured"}

        # An empty list, and a list that names none of the discovered pods: nothing goes.
        assert (await node.manager.gc([], "testbed"))["removed"] == 0
        assert (await node.manager.gc(["id-a", "id-b", "id-c"], "testbed"))["removed"] == 0
        # The runtime no longer lists b, but the agent's source still has b: b stays.
        assert (await node.manager.gc(["id-a", "id-c"], "testbed"))["removed"] == 0
        # Another network's GC knows nothing of this network's pods.
        node.store.delete_pod("shop/b")
        assert (await node.manager.gc(["other"], "other-net"))["removed"] == 0
        assert captured() == everyone and len(node.backend.installed) == 4
        # b is really gone (runtime and source): only b is removed.
        assert (await node.manager.gc(["id-a", "id-c"], "testbed"))["removed"] == 1
        assert captured() == everyone - {"b"}
        assert Path(tmp_path / "netns-b") not in node.backend.installed
        # A discovered pod gone from the source but whose netns still exists stays; once its
        # netns is gone too, it goes.
        node.store.delete_pod("shop/web")
        assert (await node.manager.gc(["id-a", "id-c"], "testbed"))["removed"] == 0
        Path(web_netns).unlink()
        assert (await node.manager.gc(["id-a", "id-c"], "testbed"))["removed"] == 1
        assert captured() == {"a", "c"}

    run(scenario, tmp_path)


def test_gc_over_the_socket_rejects_a_malformed_list(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("shop", "a"))
        await node.manager.add(node.cni_pod("a"), timeout=5)
        server = CniServer(tmp_path / "cni.sock", node.manager, node.metrics)
        await server.start()
        path = str(tmp_path / "cni.sock")
        for bad in ({}, {"validContainerIds": "id-x"}, {"validContainerIds": [1]}):
            answer = await asyncio.to_thread(wire.request, path, {"command": "GC", **bad}, 5)
            assert answer["ok"] is False and "validContainerIds" in answer["reason"]
        await server.stop()
        assert [p["state"] for p in node.manager.status()] == ["captured"]

    run(scenario, tmp_path)


# -- membership follows the source (issue #12, defect 3) -------------------------------------------


def test_membership_changes_adopt_and_release_running_pods(tmp_path: Path) -> None:
    """istio-cni's node agent reconciles pods on namespace and pod label changes (istio/istio
    cni/pkg/nodeagent/informers.go: AddPodToMesh / RemovePodFromMesh)."""

    async def scenario(node: Node) -> None:
        node.store.put_namespace(Namespace("shop", {}))
        # Known from its ADD while out of the mesh.
        node.store.put_pod(
            Pod("shop", "web", uid="uid-web", node_name="n1", pod_ips=("10.244.1.7",))
        )
        web = node.cni_pod("web") | {"uid": "uid-web"}
        assert (await node.manager.add(web, timeout=5))["state"] == "not-in-mesh"
        # Never seen by the agent (ADD missed while its CNI entry was missing).
        lost_netns = node.netns("lost")
        node.store.put_pod(
            Pod("shop", "lost", uid="uid-lost", node_name="n1", pod_ips=("10.244.1.8",))
        )
        node.store.put_pod(
            Pod("shop", "far", uid="uid-far", node_name="n2", pod_ips=("10.244.2.8",))
        )
        asked: list[list[str]] = []

        def finder(pods: Mapping[str, Sequence[str]]) -> dict[str, PodNetns]:
            asked.append(sorted(pods))
            return (
                {"uid-lost": PodNetns("uid-lost", lost_netns, "c0ffee", 42)}
                if "uid-lost" in pods
                else {}
            )

        node.manager.find_netns = finder
        assert await node.manager.reconcile_membership() == {
            "adopted": 0,
            "released": 0,
            "failed": 0,
        }

        def states() -> dict[str, tuple[str, str]]:
            return {p["name"]: (p["state"], p["reason"]) for p in node.manager.status()}

        def changes(change: str) -> float | None:
            return node.metrics.registry.get_sample_value(
                "nodeagent_membership_changes_total", {"change": change}
            )

        # The namespace joins the mesh (Istio's label): both are captured, the far pod is not.
        node.store.put_namespace(Namespace("shop", {"istio-injection": "enabled"}))
        summary = await node.manager.reconcile_membership()
        assert summary == {"adopted": 2, "released": 0, "failed": 0}
        assert asked == [["uid-lost"]]
        assert states()["web"][0] == "captured" and "istio-injection=enabled" in states()["web"][1]
        assert states()["lost"][0] == "captured" and "far" not in states()
        assert set(node.backend.installed) == {Path(web["netns"]), Path(lost_netns)}
        assert sorted(node.probes.ips) == ["10.244.1.7", "10.244.1.8"]
        assert changes("adopted") == 2
        assert await node.manager.reconcile_membership() == {
            "adopted": 0,
            "released": 0,
            "failed": 0,
        }

        # One pod opts out, then the namespace leaves: each is released once, with the reason.
        node.store.put_pod(
            Pod(
                "shop",
                "web",
                uid="uid-web",
                node_name="n1",
                pod_ips=("10.244.1.7",),
                labels={"sidecar.istio.io/inject": "false"},
            )
        )
        assert (await node.manager.reconcile_membership())["released"] == 1
        assert states()["web"] == (
            "not-in-mesh",
            "released from the mesh: pod opts out with label sidecar.istio.io/inject=false",
        )
        node.store.put_namespace(Namespace("shop", {"istio-injection": "disabled"}))
        assert (await node.manager.reconcile_membership())["released"] == 1
        assert states()["lost"][0] == "not-in-mesh"
        assert "istio-injection=disabled" in states()["lost"][1]
        assert node.backend.installed == {} and node.probes.ips == []
        assert changes("released") == 2
        assert node.state_metric("shop", "lost", "not-in-mesh") == 1

        # And back in: the same records are captured again.
        node.store.put_namespace(Namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
        assert (await node.manager.reconcile_membership())["adopted"] == 1  # web still opts out
        assert states()["lost"][0] == "captured"
        assert [p["container_id"] for p in node.manager.status() if p["name"] == "lost"] == [
            "discovered:uid-lost"
        ]

    run(scenario, tmp_path)


def test_the_store_watch_adopts_a_pod_without_a_reconcile_pass(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        stop = asyncio.Event()
        netns = node.netns("late")
        node.manager.find_netns = lambda pods: {"uid-late": PodNetns("uid-late", netns, "c", 1)}
        watching = asyncio.create_task(node.manager.watch_membership(stop, poll=0.02))
        node.store.put_pod(
            Pod("shop", "late", uid="uid-late", node_name="n1", pod_ips=("10.244.1.5",))
        )
        await wait_for_async(lambda: Path(netns) in node.backend.installed, 2, "late pod captured")
        stop.set()
        await watching
        assert [p["state"] for p in node.manager.status()] == ["captured"]

    run(scenario, tmp_path)


# -- CNI ADD checks the pod it is handed (issue #12, defect 9) -------------------------------------


def test_add_refuses_a_netns_without_the_pods_ip_or_a_foreign_uid(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("shop", "web", uid="uid-web"))
        pod = node.cni_pod("web", ip="10.244.1.7") | {"uid": "uid-web"}
        node.addresses[Path(pod["netns"])] = {"10.244.1.99"}  # someone else's namespace
        answer = await node.manager.add(pod, timeout=5)
        assert answer["ok"] is False
        assert "shop/web" in answer["reason"] and "10.244.1.99" in answer["reason"]
        assert "not the pod's IP 10.244.1.7" in answer["reason"]
        assert node.backend.installed == {}

        node.addresses[Path(pod["netns"])] = {"10.244.1.7"}
        other = pod | {"uid": "uid-impostor"}
        answer = await node.manager.add(other, timeout=1.5)
        assert answer["ok"] is False
        assert "K8S_POD_UID uid-impostor" in answer["reason"] and "(uid-web)" in answer["reason"]
        assert node.backend.installed == {}

        assert (await node.manager.add(pod, timeout=5))["state"] == "captured"

    run(scenario, tmp_path)


def test_add_waits_for_the_source_to_catch_up_with_a_recreated_pod(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        node.store.put_pod(Pod("shop", "db-0", uid="old"))  # the StatefulSet's previous pod
        pod = node.cni_pod("db-0") | {"uid": "new"}
        adding = asyncio.create_task(node.manager.add(pod, timeout=5))
        await under_way(node, "shop/db-0")  # it found the old pod: it waits for the new one
        node.store.put_pod(Pod("shop", "db-0", uid="new"))
        assert (await adding)["state"] == "captured"

    run(scenario, tmp_path)


def test_a_deleted_pod_is_not_adopted_again_while_the_source_still_lists_it(
    tmp_path: Path,
) -> None:
    async def scenario(node: Node) -> None:
        record = Pod("shop", "web", uid="uid-web", node_name="n1", pod_ips=("10.244.1.7",))
        node.store.put_pod(record)
        pod = node.cni_pod("web") | {"uid": "uid-web"}
        await node.manager.add(pod, timeout=5)
        node.manager.find_netns = lambda pods: {
            "uid-web": PodNetns("uid-web", pod["netns"], "c", 1)
        }
        await node.manager.delete(pod)  # the runtime tears it down; the API still has it
        assert await node.manager.reconcile_membership() == {
            "adopted": 0,
            "released": 0,
            "failed": 0,
        }
        assert node.manager.status() == [] and node.backend.installed == {}
        # A pod found in /proc that then leaves the source without a DEL is forgotten.
        node.store.delete_pod("shop/web")
        node.store.put_pod(Pod("shop", "db", uid="uid-db", node_name="n1", pod_ips=("10.244.1.8",)))
        node.manager.find_netns = lambda pods: {}
        assert (await node.manager.reconcile_membership())["failed"] == 1
        node.store.delete_pod("shop/db")
        await node.manager.reconcile_membership()
        assert node.manager.status() == []

    run(scenario, tmp_path)


class RecordingDns:
    def __init__(self) -> None:
        self.serving: dict[str, tuple[Path, bool]] = {}
        self.sandboxes: dict[str, str] = {}

    async def serve(
        self, key: str, namespace: str, netns: Path, auto_allocate: bool, sandbox: str = ""
    ) -> None:
        self.sandboxes[key] = sandbox
        self.serving[key] = (netns, auto_allocate)

    async def stop(self, key: str) -> None:
        self.serving.pop(key, None)


def test_dns_capture_opts_in_per_mesh_default_and_pod_and_follows_the_pod(tmp_path: Path) -> None:
    """ISTIO_META_DNS_CAPTURE from the mesh's defaultConfig.proxyMetadata or the pod's
    proxy.istio.io/config: the pod's capture takes port 53 and the DNS proxy listens in it,
    again after an agent restart (reconcile), and not after DEL."""

    async def scenario(node: Node) -> None:
        dns = RecordingDns()
        node.manager.dns = dns
        opt_in = {"proxy.istio.io/config": 'proxyMetadata: {ISTIO_META_DNS_CAPTURE: "true"}'}
        node.store.put_pod(Pod("shop", "web", annotations=opt_in))
        node.store.put_pod(Pod("shop", "plain"))
        assert (await node.manager.add(node.cni_pod("web"), timeout=5))["ok"]
        assert (await node.manager.add(node.cni_pod("plain", ip="10.244.1.8"), timeout=5))["ok"]
        dns_of = {p.name: s.dns for p, s in node.backend.installed.items()}
        assert dns_of == {"netns-web": True, "netns-plain": False}
        assert list(dns.serving) == ["shop/web"]
        assert dns.sandboxes["shop/web"] == "id-web"  # where the runtime keeps its resolv.conf

        node.manager.dns = restarted = RecordingDns()  # a new agent: nothing listens yet
        assert (await node.manager.reconcile())["verified"] == 2
        assert list(restarted.serving) == ["shop/web"]

        await node.manager.delete({"containerId": "id-web", "namespace": "shop", "name": "web"})
        assert restarted.serving == {}

    run(scenario, tmp_path)


class NamedBackend(RecordingBackend):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def test_a_pods_capture_mode_annotation_picks_its_backend(tmp_path: Path) -> None:
    """nodeagent.io/capture-mode: on an eBPF node a pod may ask for nftables; a mode the node
    does not run gets the node's (logged); a value that is no mode fails the ADD, named. DEL,
    check and reconcile go to the backend that holds the pod."""

    async def scenario(node: Node) -> None:
        ebpf, nft = NamedBackend("ebpf"), NamedBackend("nftables")
        node.backend = ebpf
        manager = node.new_manager()
        manager.backends["nftables"] = nft  # as agent.py passes it (others=) in eBPF mode
        annotations = {
            "asks-nft": {"nodeagent.io/capture-mode": "nftables"},
            "default": {},
            "bad": {"nodeagent.io/capture-mode": "iptables"},
        }
        for name, wanted in annotations.items():
            node.store.put_pod(Pod("shop", name, annotations=wanted))
        pods = {name: node.cni_pod(name) for name in annotations}
        assert (await manager.add(pods["asks-nft"], timeout=5))["state"] == "captured"
        assert (await manager.add(pods["default"], timeout=5))["state"] == "captured"
        bad = await manager.add(pods["bad"], timeout=5)
        assert not bad["ok"] and "nodeagent.io/capture-mode: 'iptables'" in bad["reason"]
        assert set(nft.installed) == {Path(pods["asks-nft"]["netns"])}
        assert set(ebpf.installed) == {Path(pods["default"]["netns"])}
        shown = {r["name"]: r["backend"] for r in manager.status() if r["state"] == "captured"}
        assert shown == {"asks-nft": "nftables", "default": "ebpf"}
        # Lost in nftables: reconcile repairs it there, never in eBPF.
        nft.installed.clear()
        assert (await manager.reconcile())["repaired"] == 1
        assert set(nft.installed) == {Path(pods["asks-nft"]["netns"])}
        assert set(ebpf.installed) == {Path(pods["default"]["netns"])}
        assert (await manager.check(pods["asks-nft"]))["ok"]
        await manager.delete(pods["asks-nft"])
        assert nft.installed == {} and ("remove", Path(pods["asks-nft"]["netns"])) in nft.calls

        # On an nftables-only node, a pod asking for eBPF is captured by nftables.
        node.store.put_pod(
            Pod("shop", "asks-ebpf", annotations={"nodeagent.io/capture-mode": "ebpf"})
        )
        node.backend = nft
        only_nft = node.new_manager()
        assert (await only_nft.add(node.cni_pod("asks-ebpf"), timeout=5))["state"] == "captured"
        assert Path(node.netns("asks-ebpf")) in nft.installed

    run(scenario, tmp_path)


def test_a_node_whose_capture_mode_changed_moves_its_pods_at_the_first_reconcile(
    tmp_path: Path,
) -> None:
    """nftables before a restart, eBPF after: each pod's nftables capture is removed and the
    pod captured by eBPF (its record names the backend that holds it)."""

    async def scenario(node: Node) -> None:
        nft = NamedBackend("nftables")
        node.backend = nft
        node.store.put_pod(Pod("shop", "web"))
        pod = node.cni_pod("web")
        assert (await node.manager.add(pod, timeout=5))["state"] == "captured"
        ebpf = NamedBackend("ebpf")
        node.backend = ebpf
        restarted = node.new_manager()  # the same registry on disk
        restarted.backends["nftables"] = nft
        assert (await restarted.reconcile())["repaired"] == 1
        assert nft.installed == {} and set(ebpf.installed) == {Path(pod["netns"])}
        assert [r["backend"] for r in restarted.status()] == ["ebpf"]
        assert (await restarted.reconcile())["verified"] == 1


class SteeringBackend(RecordingBackend):
    """eBPF's inbound: the pod's listener is steered once Envoy has it (ebpf.EbpfBackend)."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: set[Path] = set()  # netns where "Envoy" listens on :15006
        self.steered: list[Path] = []

    def steer(self, netns: Path, uid: str = "") -> str:
        if netns not in self.listening:
            return f"nothing listens on 0.0.0.0:15006 in {netns}"
        self.steered.append(netns)
        return ""

    def steer_missing(self, pods: dict[str, Path]) -> list[str]:
        return [uid for uid, netns in pods.items() if not self.steer(netns, uid)]


class SyncedProxy:
    def __init__(self, backend: SteeringBackend, listens: bool = True) -> None:
        self.backend = backend
        self.listens = listens

    async def synced(self, timeout: float, *, pod: str = "") -> str:
        # Envoy took the pod's listeners: it listens in the pod's netns now (unless it failed to)
        if self.listens:
            self.backend.listening |= set(self.backend.installed)
        return ""


def test_add_steers_the_inbound_listener_once_envoy_has_it(tmp_path: Path) -> None:
    """An ADD answers only once sk_lookup can hand the pod's inbound to Envoy (fail closed: a
    pod whose listener cannot be steered fails its ADD, naming why)."""

    async def scenario(node: Node) -> None:
        backend = SteeringBackend()
        node.backend = backend
        node.manager = node.new_manager()
        node.manager.proxy = SyncedProxy(backend)
        node.store.put_pod(Pod("shop", "web"))
        pod = {**node.cni_pod("web"), "uid": ""}
        answer = await node.manager.add(pod, timeout=5)
        assert answer["ok"] and answer["state"] == "captured", answer
        assert backend.steered == [Path(pod["netns"])]
        node.manager.proxy = None  # no Envoy: the listener never appears
        node.store.put_pod(Pod("shop", "api"))
        answer = await node.manager.add(node.cni_pod("api", ip="10.244.1.8"), timeout=5)
        assert answer["ok"] and backend.steered == [Path(pod["netns"])]  # nothing to wait for
        node.manager.proxy = SyncedProxy(backend, listens=False)
        node.store.put_pod(Pod("shop", "db"))
        answer = await node.manager.add(node.cni_pod("db", ip="10.244.1.9"), timeout=5)
        assert not answer["ok"] and "listeners not ready: nothing listens" in answer["reason"]

    run(scenario, tmp_path)


def test_the_listener_watch_steers_pods_whose_entry_went(tmp_path: Path) -> None:
    """Envoy restarted: the kernel dropped the entries of its closed sockets; the watch puts
    the new ones back within its interval."""

    async def scenario(node: Node) -> None:
        backend = SteeringBackend()
        node.backend = backend
        node.manager = node.new_manager()
        node.store.put_pod(Pod("shop", "web", uid="u-web"))
        pod = {**node.cni_pod("web"), "uid": "u-web"}
        assert (await node.manager.add(pod, timeout=5))["ok"]
        backend.listening.add(Path(pod["netns"]))
        stop = asyncio.Event()
        watch = asyncio.create_task(node.manager.watch_listeners(stop, interval=0.01))
        await until(lambda: Path(pod["netns"]) in backend.steered, "the listener steered")
        stop.set()
        await asyncio.wait_for(watch, 2)

    run(scenario, tmp_path)
