"""CaptureManager: the one owner of every local pod's traffic capture.

It answers the CNI plugin (ADD/DEL/CHECK/GC), decides mesh membership from the MeshStore, drives
the redirect backend, keeps the registry and the node's probe SNAT set in step, and reconciles:
on start and periodically it re-verifies each captured pod and re-applies what was lost, and
whenever the store changes it adopts running pods that joined the mesh and releases those that
left it (as istio-cni's node agent does from its pod and namespace informers). A pod's state is
always visible (registry, status, metrics): never silently out of the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nodeagent.mesh.membership import decide
from nodeagent.mesh.model import Pod
from nodeagent.mesh.proxy_metadata import DNS_AUTO_ALLOCATE, flag
from nodeagent.mesh.store import MeshStore
from nodeagent.metrics import AgentMetrics
from nodeagent.redirect import RedirectBackend
from nodeagent.redirect.capture import CAPTURE_MODE, CaptureSpec, CaptureSpecError
from nodeagent.redirect.discovery import PodNetns, find_pod_netns, netns_addresses
from nodeagent.redirect.registry import (
    CAPTURED,
    FAILED,
    NETNS_MISSING,
    NOT_IN_MESH,
    PodCapture,
    PodRegistry,
    discovered_key,
)

log = logging.getLogger("nodeagent.capture")

# A CNI ADD may arrive before the source has delivered its pod; wait this long at most.
DEFAULT_POD_WAIT = 20.0
# Threads entering pod network namespaces. Their own pool: nothing else can starve capture.
CAPTURE_WORKERS = 4

T = TypeVar("T")


class ProbeSource(Protocol):
    def sync(self, pod_ips: Sequence[str], whole: bool = False) -> None: ...

    def remove(self) -> None: ...


class DnsServer(Protocol):
    """The agent's DNS proxy (nodeagent.dns): listens in a pod whose DNS is captured."""

    async def serve(
        self, key: str, namespace: str, netns: Path, auto_allocate: bool, sandbox: str = ""
    ) -> None: ...

    async def stop(self, key: str) -> None: ...


class Proxy(Protocol):
    """The node's Envoy, as capture sees it: told of changes, asked whether it holds them."""

    async def synced(self, timeout: float, *, pod: str = "") -> str: ...


# Pod UID -> its IPs in, pod UID -> where its network namespace is out (see discovery).
NetnsFinder = Callable[[Mapping[str, Sequence[str]]], Mapping[str, PodNetns]]

# (namespace, name, state, reason): show a pod's state on the pod (see podstatus); never blocks.
Annotate = Callable[[str, str, str, str, str], None]  # namespace, name, state, reason, backend

# The addresses a network namespace owns (see discovery.netns_addresses); blocking.
AddressReader = Callable[[Path], set[str]]

# How long a DEL waits for Envoy to drop the pod's listeners before its netns may go.
DEL_SYNC_TIMEOUT = 5.0
# Store changes are coalesced this long before membership is reconciled.
MEMBERSHIP_DEBOUNCE = 0.2


class CaptureManager:
    def __init__(
        self,
        store: MeshStore,
        backend: RedirectBackend,
        registry: PodRegistry,
        metrics: AgentMetrics,
        excluded_namespaces: Sequence[str],
        probe_snat: ProbeSource | None = None,
        pod_wait: float = DEFAULT_POD_WAIT,
        proxy: Proxy | None = None,
        find_netns: NetnsFinder = find_pod_netns,
        annotate: Annotate | None = None,
        node_name: str = "",
        netns_addresses: AddressReader = netns_addresses,
        dns: DnsServer | None = None,
        others: Sequence[RedirectBackend] = (),
    ) -> None:
        self.store = store
        self.backend = backend  # the node's --capture-mode
        # By name, the node's and OTHERS: what a pod's capture-mode annotation may pick.
        self.backends = {b.name: b for b in (*others, backend)}
        self._mode_warned: set[str] = set()  # pods told their capture-mode is not run here
        self.registry = registry
        self.metrics = metrics
        self.excluded_namespaces = tuple(excluded_namespaces)
        self.probe_snat = probe_snat
        self.pod_wait = pod_wait
        self.proxy = proxy
        self.find_netns = find_netns
        self.annotate = annotate
        self.node_name = node_name
        self.netns_addresses = netns_addresses
        self.dns = dns
        self._adding: set[str] = set()  # namespace/name of pods whose CNI ADD is under way
        self._deleted: set[tuple[str, str]] = set()  # (namespace/name, uid) the runtime DELeted
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._probe_lock = asyncio.Lock()
        self._probes_asked = 0  # _sync_probes calls so far; those up to _probes_synced are done
        self._probes_whole_asked = self._probes_whole_synced = 0  # the same, for WHOLE calls
        self._probes_synced = 0
        self._membership_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(CAPTURE_WORKERS, thread_name_prefix="capture")

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args))

    # -- CNI commands -----------------------------------------------------------------------------

    async def add(self, pod: dict[str, Any], timeout: float) -> dict[str, Any]:
        namespace, name = str(pod.get("namespace", "")), str(pod.get("name", ""))
        container_id, netns = str(pod.get("containerId", "")), str(pod.get("netns", ""))
        if not (namespace and name and container_id and netns):
            return _fail("ADD needs namespace, name, containerId and netns")
        started = time.monotonic()
        self._adding.add(f"{namespace}/{name}")
        try:
            return await self._add(pod, timeout, started)
        finally:
            self._adding.discard(f"{namespace}/{name}")

    async def _add(self, pod: dict[str, Any], timeout: float, started: float) -> dict[str, Any]:
        namespace, name = str(pod.get("namespace", "")), str(pod.get("name", ""))
        container_id, netns = str(pod.get("containerId", "")), str(pod.get("netns", ""))
        uid = str(pod.get("uid", ""))
        self._deleted -= {d for d in self._deleted if d[0] == f"{namespace}/{name}"}
        async with self._locks[container_id]:
            if uid:
                # A new sandbox of a pod found at start: the one we found is gone.
                self.registry.pop(discovered_key(uid))
            capture = PodCapture(
                namespace=namespace,
                name=name,
                container_id=container_id,
                netns=netns,
                uid=uid,
                ips=[str(ip) for ip in pod.get("ips") or []],
                backend=self.backend.name,
                network=str(pod.get("network", "")),
            )
            # Leave the plugin a second to turn our answer into its own.
            wait = max(0.5, min(self.pod_wait, timeout - 1.0))
            record = await self._wait_for_pod(namespace, name, uid, wait)
            if record is None:
                return self._settle(
                    capture,
                    FAILED,
                    f"pod {namespace}/{name} is unknown to the node agent "
                    f"(no source delivered it within {wait:.0f}s)",
                )
            if uid and record.uid and record.uid != uid:
                return self._settle(
                    capture,
                    FAILED,
                    f"pod {namespace}/{name}: the runtime's K8S_POD_UID {uid} is not the uid of "
                    f"the pod the node agent knows ({record.uid}); refusing to capture",
                )
            membership = decide(
                record, self.store.namespaces.get(namespace), self.excluded_namespaces
            )
            if not membership.in_mesh:
                return self._settle(capture, NOT_IN_MESH, membership.reason)
            if not capture.ips:
                capture.ips = list(record.pod_ips)
            problem = await self._netns_problem(capture)
            if problem:
                return self._settle(capture, FAILED, problem)
            try:
                spec = self._spec_of(record.annotations)
            except CaptureSpecError as e:
                return self._settle(capture, FAILED, str(e))
            capture.spec = spec.to_json()
            problem = await self._apply(capture, spec)
            if problem:
                return self._settle(capture, FAILED, problem)
            answer = self._settle(capture, CAPTURED, membership.reason)
            # The node's probe SNAT set takes the pod's IPs while Envoy takes its listeners.
            probes = asyncio.create_task(self._sync_probes())
            try:
                if self.proxy is not None:
                    # The app must not start before the node's Envoy listens for it (fail closed).
                    left = timeout - (time.monotonic() - started) - 1.0
                    problem = await self.proxy.synced(max(1.0, left), pod=capture.key)
                    if not problem:
                        left = timeout - (time.monotonic() - started) - 1.0
                        problem = await self._steer(capture, max(1.0, left))
                    if problem:
                        answer = self._settle(capture, FAILED, f"listeners not ready: {problem}")
            finally:
                await probes
            if uid:  # a membership pass may have adopted the pod meanwhile: this ADD owns it
                self.registry.pop(discovered_key(uid))
        if not answer["ok"]:
            await self._sync_probes()  # its IPs leave the set again
        return answer

    async def _wait_for_pod(self, namespace: str, name: str, uid: str, wait: float) -> Pod | None:
        """The source's record of the pod, preferring one with UID (a re-created pod of the same
        name may reach the source after its ADD): the latest record once WAIT has passed."""
        deadline = time.monotonic() + wait
        record = await self.store.wait_for_pod(namespace, name, wait)
        while record is not None and uid and record.uid and record.uid != uid:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
            record = self.store.pods.get(f"{namespace}/{name}")
        return record

    async def _netns_problem(self, capture: PodCapture) -> str:
        """Empty when the network namespace we were handed holds one of the pod's IPs."""
        if not capture.ips:
            return (
                f"pod {capture.key}: no IP in the CNI result or the pod record to check its "
                f"network namespace {capture.netns} against; refusing to capture"
            )
        try:
            owned = await self._in_thread(self.netns_addresses, Path(capture.netns))
        except Exception as e:
            return f"pod {capture.key}: cannot read the addresses of {capture.netns}: {e}"
        if not owned & set(capture.ips):
            return (
                f"pod {capture.key}: network namespace {capture.netns} holds "
                f"{', '.join(sorted(owned)) or 'no address'}, not the pod's IP "
                f"{', '.join(capture.ips)}; refusing to capture"
            )
        return ""

    async def delete(self, pod: dict[str, Any]) -> dict[str, Any]:
        if pod.get("namespace") and pod.get("name"):
            # The runtime is tearing this pod down: membership passes must not adopt it again
            # while its record lingers in the source.
            self._deleted.add((f"{pod['namespace']}/{pod['name']}", str(pod.get("uid", ""))))
        capture = self.registry.find(
            str(pod.get("containerId", "")),
            str(pod.get("namespace", "")),
            str(pod.get("name", "")),
            str(pod.get("uid", "")),
        )
        if capture is None:
            return {"ok": True, "state": "unknown"}
        async with self._locks[capture.container_id]:
            self.registry.pop(capture.container_id)
            self.metrics.forget_pod(capture.namespace, capture.name)
            if self.proxy is not None and capture.state == CAPTURED:
                # Envoy drops the pod's listeners before the runtime removes its netns.
                problem = await self.proxy.synced(DEL_SYNC_TIMEOUT, pod=capture.key)
                if problem:
                    log.warning("pod %s: %s", capture.key, problem)
            await self._stop_dns(capture)  # its sockets would keep the netns alive
            if capture.state == CAPTURED and os.path.exists(capture.netns):
                try:
                    await self._in_thread(
                        self._backend_of(capture).remove, Path(capture.netns), capture.uid
                    )
                except Exception as e:  # the netns is on its way out anyway
                    log.warning("removing capture of %s failed: %s", capture.key, e)
        self._locks.pop(capture.container_id, None)
        log.info("pod %s removed (sandbox %s)", capture.key, capture.container_id[:12])
        await self._sync_probes()
        return {"ok": True, "state": "removed"}

    async def check(self, pod: dict[str, Any]) -> dict[str, Any]:
        capture = self.registry.find(
            str(pod.get("containerId", "")),
            str(pod.get("namespace", "")),
            str(pod.get("name", "")),
            str(pod.get("uid", "")),
        )
        if capture is None:
            return _fail("the node agent has no record of this pod")
        if capture.state == NOT_IN_MESH:
            return {"ok": True, "state": NOT_IN_MESH}
        if capture.state != CAPTURED or capture.spec is None:
            return _fail(f"pod {capture.key} is {capture.state}: {capture.reason}")
        result = await self._in_thread(
            self._backend_of(capture).verify,
            Path(capture.netns),
            CaptureSpec.from_json(capture.spec),
            capture.uid,
        )
        return {"ok": True, "state": CAPTURED} if result.ok else _fail(result.reason)

    async def gc(self, valid_container_ids: Sequence[str], network: str = "") -> dict[str, Any]:
        """CNI GC: forget sandboxes that the runtime no longer has AND the agent agrees are gone.

        GC is per network (CNI spec): only pods ADDed on NETWORK (or before networks were
        recorded) are candidates. The runtime's list alone never removes a pod's capture: its pod
        must also be gone from the agent's view (no pod of that uid on this node), as istio-cni
        removes pods from its own pod informer, never from GC. Pods found at start (discovered)
        have no sandbox id the runtime could list: they go only once their netns is gone too.
        An empty list removes nothing.
        """
        valid = set(valid_container_ids)
        if not valid:
            log.warning("CNI GC of network %r with no valid attachments: nothing removed", network)
            return {"ok": True, "removed": 0, "reason": "empty list of valid attachments"}
        stale = []
        for cid, capture in list(self.registry.pods.items()):
            if capture.discovered:
                runtime_gone = not (capture.netns and os.path.exists(capture.netns))
            else:
                runtime_gone = cid not in valid and capture.network in ("", network)
            if runtime_gone and self._pod_gone(capture):
                stale.append(capture)
        for capture in stale:
            log.info("CNI GC: pod %s (sandbox %s) is gone", capture.key, capture.container_id[:20])
            await self.delete({"containerId": capture.container_id, "namespace": capture.namespace})
        return {"ok": True, "removed": len(stale)}

    def _pod_gone(self, capture: PodCapture) -> bool:
        """The agent's own view: no pod of this uid (or, without a uid, this name) on this node."""
        pod = self.store.pods.get(capture.key)
        if pod is None:
            return True
        if capture.uid and pod.uid and pod.uid != capture.uid:
            return True  # a new pod of the same name
        return bool(self.node_name and pod.node_name and pod.node_name != self.node_name)

    def status(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in sorted(self.registry.pods.values(), key=lambda c: c.key)]

    # -- reconcile --------------------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Re-verify every pod that should be captured; re-apply what is missing or altered.

        Pods are checked side by side (the capture threads bound how many at once), each under
        its own lock; the probe SNAT set is synced once at the end.
        """
        started = time.monotonic()
        summary = {"verified": 0, "repaired": 0, "failed": 0, "netns_missing": 0}
        captures = list(self.registry.pods.values())
        for outcome in await asyncio.gather(*(self._reconcile_locked(c) for c in captures)):
            if outcome:
                summary[outcome] += 1
        await self._sync_probes(whole=True)
        await self._sweep()
        level = logging.INFO
        if summary["repaired"] or summary["failed"] or summary["netns_missing"]:
            level = logging.WARNING
        log.log(
            level,
            "reconcile of %d pods in %.3fs: %s",
            len(captures),
            time.monotonic() - started,
            summary,
        )
        return summary

    async def _steer(self, capture: PodCapture, wait: float) -> str:
        """eBPF: hand the pod's inbound listener, which Envoy now has, to sk_lookup (its captured
        inbound is dropped until then); "" when done or the backend needs nothing of the kind.
        Envoy has ACKed the pod's listeners: a warming one listens within WAIT seconds."""
        steer = getattr(self._backend_of(capture), "steer", None)
        if steer is None:
            return ""
        deadline = time.monotonic() + wait
        while True:
            try:
                problem: str = await self._in_thread(steer, Path(capture.netns), capture.uid)
            except Exception as e:
                return f"inbound listener not steered: {e}"
            if not problem or time.monotonic() >= deadline:
                return problem
            await asyncio.sleep(0.05)

    async def watch_listeners(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        """eBPF: steer again, within INTERVAL, the inbound listener of every captured pod whose
        entry the kernel dropped (Envoy restarted or re-created the socket): until then the
        pod's inbound is refused. Also steers pods whose app listens itself (no Envoy)."""
        steer_missing = getattr(self.backend, "steer_missing", None)
        if steer_missing is None:
            return
        while not stop.is_set():
            pods = {
                c.uid: Path(c.netns)
                for c in self.registry.pods.values()
                if c.state == CAPTURED
                and c.backend == self.backend.name  # not an eBPF node's nftables pods
                and c.uid
                and c.netns
                and os.path.exists(c.netns)
            }
            if pods:
                steered = await self._in_thread(steer_missing, pods)
                if steered:
                    log.info("inbound listener steered again for pods %s", steered)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _sweep(self) -> None:
        """Let a backend that keeps per-pod state outside the pods (eBPF's pins and map
        entries) drop what belongs to no captured pod: a pod deleted while the agent was away."""
        for backend in self.backends.values():
            sweep = getattr(backend, "sweep", None)
            if sweep is None:
                continue
            keep = {
                c.uid: Path(c.netns)
                for c in self.registry.pods.values()
                if c.state == CAPTURED and c.uid and c.netns and c.backend == backend.name
            }
            try:
                dropped = await self._in_thread(sweep, keep)
            except Exception as e:
                log.error("sweeping %s capture state of gone pods failed: %s", backend.name, e)
                continue
            if dropped:
                log.info("%s capture of gone pods removed: %s", backend.name, dropped)

    async def _reconcile_locked(self, capture: PodCapture) -> str:
        """_reconcile_one under the pod's lock; "" for a pod with nothing to verify."""
        if capture.state == NOT_IN_MESH or capture.spec is None:
            self.metrics.set_pod_state(capture.namespace, capture.name, capture.state)
            return ""
        async with self._locks[capture.container_id]:
            if self.registry.pods.get(capture.container_id) is not capture:
                return ""  # deleted or replaced meanwhile
            return await self._reconcile_one(capture)

    async def _reconcile_one(self, capture: PodCapture) -> str:
        assert capture.spec is not None
        if not os.path.exists(capture.netns):
            await self._stop_dns(capture)
            self._settle(capture, NETNS_MISSING, f"network namespace {capture.netns} is gone")
            return "netns_missing"
        spec = CaptureSpec.from_json(capture.spec)
        held, wanted = self._backend_of(capture), self._backend_for(capture, spec)
        try:
            check = await self._in_thread(held.verify, Path(capture.netns), spec, capture.uid)
        except Exception as e:
            check_ok, why = False, f"verify failed: {e}"
        else:
            check_ok, why = check.ok, check.reason
        if check_ok and held is not wanted:  # the node's --capture-mode changed across a restart
            check_ok, why = False, f"held by {held.name}, wanted in {wanted.name}"
        if check_ok:
            problem = await self._serve_dns(capture, spec)  # listening again after a restart
            if problem:
                self._settle(capture, FAILED, problem)
                return "failed"
            self._settle(capture, CAPTURED, capture.reason if capture.state == CAPTURED else "")
            return "verified"
        log.warning("pod %s: capture %s; re-applying", capture.key, why)
        problem = await self._apply(capture, spec)
        if problem:
            self._settle(capture, FAILED, problem)
            return "failed"
        self.metrics.capture_repairs.inc()
        self._settle(capture, CAPTURED, f"repaired by reconcile ({why})")
        return "repaired"

    async def adopt_running(self, node_name: str) -> dict[str, int]:
        """Capture the mesh pods of NODE_NAME that run without the agent having seen their ADD.

        They started before nodeagent was installed (or while its CNI entry was missing): find
        each one's network namespace in /proc and capture it as ADD would have.
        """
        pods = [
            p for p in self.store.pods.values() if p.node_name == node_name and p.uid and p.pod_ips
        ]
        pods = [
            p
            for p in pods
            if self._unknown(p)
            and decide(p, self.store.namespaces.get(p.namespace), self.excluded_namespaces).in_mesh
        ]
        started = time.monotonic()
        summary = await self._adopt_found([(p, "running before the agent") for p in pods])
        if pods:
            log.info(
                "pods running before the agent: %s in %.2fs", summary, time.monotonic() - started
            )
        return summary

    def _unknown(self, pod: Pod) -> bool:
        """No CNI ADD and no earlier adoption (a failed one is retried) for this pod."""
        return not any(not (c.discovered and c.state == FAILED) for c in self._records_of(pod))

    def _records_of(self, pod: Pod) -> list[PodCapture]:
        return [
            c
            for c in self.registry.pods.values()
            if (c.namespace, c.name) == (pod.namespace, pod.name) and c.uid in ("", pod.uid)
        ]

    async def _adopt_found(self, pods: Sequence[tuple[Pod, str]]) -> dict[str, int]:
        """Find each pod's netns in /proc and capture it; WHY (per pod) goes into its reason."""
        summary = {"adopted": 0, "failed": 0}
        if not pods:
            return summary
        found = await self._in_thread(self.find_netns, {p.uid: p.pod_ips for p, _ in pods})
        for pod, why in pods:
            where = found.get(pod.uid)
            capture = PodCapture(
                namespace=pod.namespace,
                name=pod.name,
                container_id=discovered_key(pod.uid),
                netns=where.path if where else "",
                uid=pod.uid,
                ips=list(pod.pod_ips),
                backend=self.backend.name,
                discovered=True,
            )
            async with self._locks[capture.container_id]:
                outcome = await self._adopt_one(capture, pod.annotations, why)
            summary[outcome] += 1
        await self._sync_probes()
        if self.proxy is not None and summary["adopted"]:
            problem = await self.proxy.synced(DEL_SYNC_TIMEOUT)
            if problem:
                log.warning("adopted pods: %s", problem)
        return summary

    async def _adopt_one(
        self, capture: PodCapture, annotations: Mapping[str, str], why: str
    ) -> str:
        if not capture.netns:
            self._settle(
                capture,
                FAILED,
                f"{why}, but no process of it in /proc has a network "
                f"namespace holding its IP ({', '.join(capture.ips)})",
            )
            return "failed"
        try:
            spec = self._spec_of(annotations)
        except CaptureSpecError as e:
            self._settle(capture, FAILED, str(e))
            return "failed"
        capture.spec = spec.to_json()
        problem = await self._apply(capture, spec)
        if problem:
            self._settle(capture, FAILED, problem)
            return "failed"
        self._settle(capture, CAPTURED, f"{why}; found in {capture.netns}")
        return "adopted"

    # -- membership -------------------------------------------------------------------------------

    async def watch_membership(self, stop: asyncio.Event, poll: float = 0.1) -> None:
        """Reconcile membership whenever the store changes (coalesced): labels, pods, namespaces.

        Polls the store's generation: the store's change event belongs to the push loop.
        """
        seen = -1  # a first pass at once: changes since the caller's last pass are not lost
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
            if self.store.generation == seen or stop.is_set():
                continue
            await asyncio.sleep(MEMBERSHIP_DEBOUNCE)
            seen = self.store.generation
            # A failed pass ends the task: its supervisor logs, counts and restarts it.
            await self.reconcile_membership(retry_failed=False)

    async def reconcile_membership(self, *, retry_failed: bool = True) -> dict[str, int]:
        """Bring every running pod of this node in line with its membership as the store has it now.

        In the mesh and not captured -> adopt: in the netns of its CNI ADD, or found in /proc when
        the agent never saw its ADD (created while the agent was down or its CNI entry missing).
        Captured and no longer in the mesh -> release: capture removed, Envoy's listeners
        dropped, state not-in-mesh with the reason. Pods whose ADD is under way are left to it;
        failed adoptions are retried only when RETRY_FAILED (the periodic pass).
        """
        summary = {"adopted": 0, "released": 0, "failed": 0}
        if not self.node_name:
            return summary
        async with self._membership_lock:
            self._forget_gone()
            unknown: dict[str, tuple[Pod, str]] = {}
            for pod in list(self.store.pods.values()):
                if pod.node_name != self.node_name or pod.key in self._adding:
                    continue
                if {(pod.key, ""), (pod.key, pod.uid)} & self._deleted:
                    continue  # DELeted by the runtime: on its way out
                membership = decide(
                    pod, self.store.namespaces.get(pod.namespace), self.excluded_namespaces
                )
                records = self._records_of(pod)
                if membership.in_mesh:
                    why = f"adopted into the mesh ({membership.reason})"
                    for capture in records:
                        if capture.discovered and capture.state in (NOT_IN_MESH, FAILED):
                            if capture.state == NOT_IN_MESH or retry_failed:
                                unknown[pod.key] = (pod, why)
                        elif capture.state == NOT_IN_MESH or (
                            retry_failed and capture.state == FAILED
                        ):
                            outcome = await self._recapture(capture, pod, why)
                            summary[outcome] += 1
                    if not records and pod.uid and pod.pod_ips:
                        unknown[pod.key] = (pod, why)
                else:
                    for capture in records:
                        if capture.state in (CAPTURED, FAILED):
                            outcome = await self._release(capture, membership.reason)
                            summary[outcome] += 1
            adopted = await self._adopt_found(list(unknown.values()))
            summary["adopted"] += adopted["adopted"]
            summary["failed"] += adopted["failed"]
            self.metrics.membership_changes.labels("adopted").inc(adopted["adopted"])
            if summary["released"] or summary["adopted"] > adopted["adopted"]:
                await self._sync_probes()
                if self.proxy is not None:
                    problem = await self.proxy.synced(DEL_SYNC_TIMEOUT)
                    if problem:
                        log.warning("membership changes: %s", problem)
        if any(summary.values()):
            log.info("membership reconciled: %s", summary)
        return summary

    def _forget_gone(self) -> None:
        """Drop what only the agent's own view kept: DEL marks of pods the source no longer has
        (or has anew, another uid), and records of pods found in /proc that are gone from the
        source and hold no capture (a pod deleted while the agent was away)."""
        for key, uid in list(self._deleted):
            pod = self.store.pods.get(key)
            if pod is None or (uid and pod.uid and pod.uid != uid):
                self._deleted.discard((key, uid))
        for cid, capture in list(self.registry.pods.items()):
            if not capture.discovered or not self._pod_gone(capture):
                continue
            if capture.state != CAPTURED or not os.path.exists(capture.netns):
                self.registry.pop(cid)
                self.metrics.forget_pod(capture.namespace, capture.name)
                log.info("pod %s is gone: record of %s forgotten", capture.key, cid)

    async def _recapture(self, capture: PodCapture, pod: Pod, why: str) -> str:
        """Capture a pod the agent knows from its CNI ADD, in that sandbox's netns."""
        async with self._locks[capture.container_id]:
            if self.registry.pods.get(capture.container_id) is not capture:
                return "failed"  # deleted or replaced meanwhile
            if not os.path.exists(capture.netns):
                self._settle(capture, NETNS_MISSING, f"network namespace {capture.netns} is gone")
                return "failed"
            capture.ips = capture.ips or list(pod.pod_ips)
            problem = await self._netns_problem(capture)
            if not problem:
                try:
                    spec = self._spec_of(pod.annotations)
                except CaptureSpecError as e:
                    problem = str(e)
                else:
                    capture.spec = spec.to_json()
                    problem = await self._apply(capture, spec)
            if problem:
                self._settle(capture, FAILED, problem)
                return "failed"
            self._settle(capture, CAPTURED, why)
        self.metrics.membership_changes.labels("adopted").inc()
        return "adopted"

    async def _release(self, capture: PodCapture, reason: str) -> str:
        """Take a running pod out of the mesh: its capture goes, its record says why."""
        async with self._locks[capture.container_id]:
            if self.registry.pods.get(capture.container_id) is not capture:
                return "failed"  # deleted or replaced meanwhile
            await self._stop_dns(capture)
            if capture.netns and os.path.exists(capture.netns):  # a failed one may hold rules too
                try:
                    await self._in_thread(
                        self._backend_of(capture).remove, Path(capture.netns), capture.uid
                    )
                except Exception as e:
                    self._settle(
                        capture,
                        FAILED,
                        f"out of the mesh ({reason}), but removing its capture in "
                        f"{capture.netns} failed: {e}",
                    )
                    return "failed"
            capture.spec = None
            self._settle(capture, NOT_IN_MESH, f"released from the mesh: {reason}")
        self.metrics.membership_changes.labels("released").inc()
        return "released"

    # -- helpers ----------------------------------------------------------------------------------

    def _spec_of(self, annotations: Mapping[str, str]) -> CaptureSpec:
        """The pod's capture from its annotations and the mesh's proxyMetadata defaults."""
        return CaptureSpec.from_annotations(
            annotations, self.store.mesh_config.default_proxy_metadata
        )

    def _backend_of(self, capture: PodCapture) -> RedirectBackend:
        """The backend holding a pod's capture (the node's for a record of one gone since)."""
        return self.backends.get(capture.backend, self.backend)

    def _backend_for(self, capture: PodCapture, spec: CaptureSpec) -> RedirectBackend:
        """The backend a pod's capture is to use: its annotation's, where this node runs it."""
        if not spec.mode or spec.mode == self.backend.name:
            return self.backend
        if spec.mode not in self.backends and capture.key not in self._mode_warned:
            self._mode_warned.add(capture.key)
            log.warning(
                "pod %s asks for %s capture (%s); this node runs %s only: using it",
                capture.key,
                spec.mode,
                CAPTURE_MODE,
                self.backend.name,
            )
        return self.backends.get(spec.mode, self.backend)

    async def _apply(self, capture: PodCapture, spec: CaptureSpec) -> str:
        """Apply and verify; returns a problem description, empty when captured."""
        netns = Path(capture.netns)
        backend = self._backend_for(capture, spec)
        held = self.backends.get(capture.backend)
        if capture.state == CAPTURED and held is not None and held is not backend:
            # Another backend held it (the node's --capture-mode changed across a restart).
            try:
                await self._in_thread(held.remove, netns, capture.uid)
            except Exception as e:
                log.warning("pod %s: removing its %s capture failed: %s", capture.key, held.name, e)
        capture.backend = backend.name
        try:
            await self._in_thread(backend.apply, netns, spec, capture.uid)
            check = await self._in_thread(backend.verify, netns, spec, capture.uid)
        except Exception as e:
            return f"{backend.name} capture failed in {capture.netns}: {e}"
        if not check.ok:
            return f"{backend.name} capture did not hold in {capture.netns}: {check.reason}"
        return await self._serve_dns(capture, spec)

    async def _serve_dns(self, capture: PodCapture, spec: CaptureSpec) -> str:
        """The pod's DNS proxy, when its DNS is captured (a problem description, or "")."""
        if self.dns is None or not spec.dns:
            await self._stop_dns(capture)
            return ""
        pod = self.store.pods.get(capture.key)
        try:
            auto_allocate = flag(
                DNS_AUTO_ALLOCATE,
                self.store.mesh_config.default_proxy_metadata,
                pod.annotations if pod is not None else {},
            )
            await self.dns.serve(
                capture.key,
                capture.namespace,
                Path(capture.netns),
                auto_allocate,
                "" if capture.discovered else capture.container_id,  # the sandbox's id
            )
        except Exception as e:
            return f"DNS proxy for {capture.key} failed in {capture.netns}: {e}"
        return ""

    async def _stop_dns(self, capture: PodCapture) -> None:
        if self.dns is not None:
            await self.dns.stop(capture.key)

    def _settle(self, capture: PodCapture, state: str, reason: str) -> dict[str, Any]:
        capture.state, capture.reason = state, reason
        self.registry.put(capture)
        self.metrics.set_pod_state(capture.namespace, capture.name, state)
        if self.annotate is not None:
            self.annotate(capture.namespace, capture.name, state, reason, capture.backend)
        level = logging.ERROR if state in (FAILED, NETNS_MISSING) else logging.INFO
        log.log(level, "pod %s: %s (%s)", capture.key, state, reason)
        if state == FAILED:
            return _fail(reason)
        return {"ok": True, "state": state, "reason": reason}

    async def _sync_probes(self, whole: bool = False) -> None:
        """Make the node's probe SNAT set hold the captured pods' IPs as the registry has them;
        WHOLE (reconcile passes) also rewrites the table around it, repairing it.

        Callers that queue behind a running sync are served by the next one in one go: it reads
        the registry after all their changes (a burst of ADDs costs a few nft runs, not one each).
        """
        if self.probe_snat is None:
            return
        self._probes_asked += 1
        asked = self._probes_asked
        if whole:
            self._probes_whole_asked = asked
        async with self._probe_lock:
            if self._probes_synced >= asked and (not whole or self._probes_whole_synced >= asked):
                return  # a sync that started after this caller's change covered it
            taking = self._probes_asked
            rewrite = self._probes_whole_asked > self._probes_whole_synced
            ips = sorted(
                {ip for c in self.registry.pods.values() if c.state == CAPTURED for ip in c.ips}
            )
            try:
                await self._in_thread(self.probe_snat.sync, ips, rewrite)
            except Exception as e:
                log.error("updating the node's probe SNAT set failed: %s", e)
            self._probes_synced = taking
            if rewrite:
                self._probes_whole_synced = taking

    # -- final removal (uninstall) ----------------------------------------------------------------

    async def remove_all(self) -> dict[str, int]:
        """Take capture out of every pod in the registry, then the probe SNAT table and the
        registry file: the pods' traffic then flows directly, outside the mesh.

        Only when nodeagent leaves the node for good (nodeagent.uninstall): a running agent would
        capture the next pod again. A pod whose capture could not be removed stays in the
        registry, and the file with it, so that another ``nodeagent uninstall`` retries it.
        """
        summary = {"removed": 0, "not_captured": 0, "netns_missing": 0, "failed": 0}
        for capture in list(self.registry.pods.values()):
            async with self._locks[capture.container_id]:
                if capture.container_id not in self.registry.pods:
                    continue  # deleted meanwhile
                outcome = await self._remove_one(capture)
                summary[outcome] += 1
                if outcome != "failed":
                    self.registry.pop(capture.container_id)
                    self.metrics.forget_pod(capture.namespace, capture.name)
            self._locks.pop(capture.container_id, None)
        if self.probe_snat is not None:
            async with self._probe_lock:
                try:
                    await self._in_thread(self.probe_snat.remove)
                except Exception as e:
                    log.error("removing the node's probe SNAT table failed: %s", e)
                    summary["failed"] += 1
        if not self.registry.pods:
            self.registry.remove()
        level = logging.ERROR if summary["failed"] else logging.INFO
        log.log(level, "capture removed from the node: %s", summary)
        return summary

    async def _remove_one(self, capture: PodCapture) -> str:
        await self._stop_dns(capture)
        if capture.state == NOT_IN_MESH:
            return "not_captured"
        if not capture.netns or not os.path.exists(capture.netns):
            return "netns_missing"
        try:
            await self._in_thread(
                self._backend_of(capture).remove, Path(capture.netns), capture.uid
            )
        except Exception as e:
            log.error("pod %s: removing capture in %s failed: %s", capture.key, capture.netns, e)
            return "failed"
        log.info("pod %s: capture removed (%s)", capture.key, capture.netns)
        return "removed"


def _fail(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason}
