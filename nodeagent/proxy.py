"""NodeProxy: the node's one Envoy and what it is told.

Owns the xDS server, the Envoy supervisor and the push loop: whenever the MeshStore or the set of
captured pods changes, it translates and hands the node's snapshot to the xDS cache (coalescing
bursts). CNI ADD waits on ``synced`` so a pod starts only once Envoy holds its listeners; DEL waits
the same way so a pod's listeners are gone before its network namespace is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.envoy.admin import EnvoyAdmin
from nodeagent.envoy.bootstrap import (
    admin_socket_path,
    bootstrap,
    bootstrap_path,
    write_bootstrap,
)
from nodeagent.envoy.supervisor import MANAGED, EnvoySupervisor
from nodeagent.identity.manager import IdentityManager
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.redirect.registry import CAPTURED, PodRegistry
from nodeagent.supervise import TaskSupervisor
from nodeagent.translate import LocalPod, translate
from nodeagent.xds import types
from nodeagent.xds.cache import InconsistentSnapshot, Snapshot, SnapshotCache
from nodeagent.xds.server import XdsServer

log = logging.getLogger("nodeagent.proxy")

COALESCE = 0.02  # seconds: a burst of changes (20 pods at once) becomes one push


@dataclass(frozen=True)
class ProxySettings:
    node_name: str
    run_dir: Path  # xDS socket, Envoy's bootstrap, admin socket and pidfile
    envoy_binary: Path
    envoy_log: Path
    stats_host: str = "0.0.0.0"  # Envoy's :15090 (Prometheus stats, /ready) binds this address
    stats_port: int = 15090
    # "managed": the agent starts and restarts Envoy; "external": Envoy runs in its own container
    # (``nodeagent envoy``) and the agent only writes its bootstrap, configures and watches it.
    envoy_mode: str = MANAGED
    # "node": one Envoy for the node (this class); "sidecar": one Envoy inside each captured
    # pod, as Istio's sidecars (nodeagent.sidecar, the benchmarks' baseline).
    proxy_model: str = "node"
    sidecar_dir: Path | None = None  # sidecar model: xDS socket + per-pod dirs; run_dir/sidecars
    sidecar_log_dir: Path = Path("/var/log/nodeagent-sidecars")  # <ns>.<pod>.envoy.log

    @property
    def node_id(self) -> str:
        return f"nodeagent~{self.node_name}"

    @property
    def xds_socket(self) -> Path:
        return self.run_dir / "xds.sock"

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin: a root-only UNIX socket, never a TCP port (#12)."""
        return admin_socket_path(self.run_dir)


class NodeProxy:
    def __init__(
        self,
        settings: ProxySettings,
        store: MeshStore,
        registry: PodRegistry,
        metrics: CollectorRegistry,
        identities: IdentityManager,
        excluded_namespaces: tuple[str, ...] = (),
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks or TaskSupervisor()  # the agent's, for its metrics and readiness
        self.store = store
        self.registry = registry
        self.identities = identities
        self.excluded_namespaces = excluded_namespaces
        self.cache = SnapshotCache()
        self.xds = XdsServer(self.cache, metrics)
        self.admin = EnvoyAdmin(settings.admin_socket)
        self.changed = asyncio.Event()
        self.version = 0
        self.last_error = ""
        self.envoy_restarts = Counter(
            "nodeagent_envoy_restarts",
            "Times the node's Envoy died and was restarted (external mode: came back after its"
            " admin API stopped answering).",
            registry=metrics,
        )
        self.supervisor = EnvoySupervisor(
            settings.envoy_binary,
            bootstrap_path(settings.run_dir),
            settings.run_dir,
            settings.envoy_log,
            self.admin,
            on_restart=self.envoy_restarts.inc,
            mode=settings.envoy_mode,
            tasks=self.tasks,
        )
        Gauge(
            "nodeagent_envoy_ready",
            "1 while the node's Envoy can serve (managed: its process runs; external: its admin"
            " /ready says LIVE), else 0.",
            registry=metrics,
        ).set_function(lambda: 0.0 if self.problem() else 1.0)

    def problem(self) -> str:
        """Empty while the node's proxy can serve; otherwise why not (readiness)."""
        return self.supervisor.problem()

    async def wait_ready(self, timeout: float) -> bool:
        return await self.supervisor.wait_ready(timeout)

    async def start(self) -> None:
        """xDS first (Envoy connects to it), a first snapshot, the bootstrap, then Envoy (started
        or adopted; in external mode only watched: its own container waits for the bootstrap)."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.xds.start(self.settings.xds_socket)
        self.push()
        write_bootstrap(
            bootstrap_path(self.settings.run_dir),
            bootstrap(
                self.settings.node_id,
                self.settings.node_name,
                self.settings.xds_socket,
                admin_socket=self.settings.admin_socket,
                stats_host=self.settings.stats_host,
                stats_port=self.settings.stats_port,
            ),
        )
        await self.supervisor.start()

    async def stop(self) -> None:
        """Leaves Envoy running: an agent restart must not interrupt traffic."""
        await self.supervisor.stop(kill_envoy=False)
        await self.xds.stop()

    def local_pods(self) -> list[LocalPod]:
        out = []
        for capture in self.registry.pods.values():
            if capture.state != CAPTURED:
                continue
            pod = self.store.pods.get(capture.key) or Pod(capture.namespace, capture.name)
            out.append(LocalPod(pod, capture.netns))
        return out

    def push(self) -> str:
        """Translate the current view and hand it to the xDS cache; returns the version."""
        self.version += 1
        version = str(self.version)
        local = self.local_pods()
        # A certificate exists exactly while a pod of its identity runs on this node.
        secrets = self.identities.sds_secrets({lp.identity for lp in local})
        try:
            resources = translate(self.store, local, secrets, self.excluded_namespaces)
            snapshot = Snapshot(version, resources)
            self.cache.set_snapshot(self.settings.node_id, snapshot)
        except (InconsistentSnapshot, ValueError) as e:
            self.last_error = f"snapshot {version} not pushed: {e}"
            log.error("%s", self.last_error)
        return version

    async def run(self, stop: asyncio.Event) -> None:
        """Push whenever the store, the captured pods or a certificate change."""
        rotation = self.tasks.spawn("cert-rotation", lambda: self.identities.run(stop), stop=stop)
        try:
            await self._push_loop(stop)
        finally:
            rotation.cancel()

    async def _push_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            store_changed = asyncio.create_task(self.store.changed.wait())
            pods_changed = asyncio.create_task(self.changed.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait(
                {store_changed, pods_changed, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (store_changed, pods_changed, stopping):
                task.cancel()
            if stop.is_set():
                return
            await asyncio.sleep(COALESCE)
            self.store.changed.clear()
            self.changed.clear()
            await self.apply()

    async def apply(self) -> None:
        """One round of the push loop: translate and hand the snapshot over."""
        self.push()

    async def synced(
        self, timeout: float, types_: tuple[str, ...] = (types.LISTENER,), pod: str = ""
    ) -> str:
        """Wait until Envoy holds the latest snapshot for TYPES_; "" or why it does not.

        POD (namespace/name) names the pod whose change this is; one node Envoy serves them all.
        """
        self.changed.set()
        await asyncio.sleep(COALESCE * 2)  # let the push loop take the change
        deadline = time.monotonic() + timeout
        while True:
            status = self.xds.status(self.settings.node_id)
            states = {t: status.get(t) for t in types_}
            if all(s is not None and s.state == "SYNCED" for s in states.values()):
                return ""
            for type_url, s in states.items():
                if s is not None and s.state == "NACKED":
                    return f"Envoy rejected {types.short_name(type_url)}: {s.last_nack}"
            if time.monotonic() > deadline:
                seen = {
                    types.short_name(t): (s.state if s else "not connected")
                    for t, s in states.items()
                }
                why = f"Envoy did not confirm its configuration within {timeout:.0f}s ({seen})"
                envoy = self.supervisor.problem()
                return f"{why}; {envoy}" if envoy else why
            await asyncio.sleep(0.02)

    def status_table(self) -> dict[str, object]:
        status = self.xds.status(self.settings.node_id)
        return {
            "node": self.settings.node_name,
            "envoy_mode": self.supervisor.mode,
            "envoy_pid": self.supervisor.pid,
            "envoy_state": self.supervisor.state,
            "envoy_problem": self.supervisor.problem(),
            "envoy_restarts": self.supervisor.restarts,
            "version": str(self.version),
            "error": self.last_error,
            "types": {
                types.short_name(t): {
                    "state": s.state,
                    "version_sent": s.version_sent,
                    "version_acked": s.version_acked,
                    "last_nack": s.last_nack,
                    "connected": s.connected,
                }
                for t, s in status.items()
            },
        }
