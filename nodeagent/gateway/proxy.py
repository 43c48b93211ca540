"""The gateway's Envoy and what it is told: translate, hand the snapshot to xDS, run Envoy.

Its listeners enforce the AuthorizationPolicies and RequestAuthentications of the gateway's pod
(translate/gateway_policies.py), with the keys the process's JWKS resolver fetched.

The upstream half is the sidecar form of the node's translation for the gateway pod (clusters
``outbound|port|subset|host`` presenting the gateway's identity to mesh endpoints, EDS, the
root); its listeners and route tables are the Gateways' (translate/gateway.py), not a
sidecar's. SDS holds the gateway's certificate, the root and its servers' credentialName
Secrets: a rotated Secret is a new SDS secret, Envoy swaps it without a restart or a listener
drain. A push happens whenever the store, a certificate or a pending Secret's deadline changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from nodeagent.envoy.admin import EnvoyAdmin
from nodeagent.envoy.bootstrap import admin_socket_path, bootstrap, bootstrap_path, write_bootstrap
from nodeagent.envoy.supervisor import EnvoySupervisor
from nodeagent.identity.certs import spiffe_id
from nodeagent.identity.credentials import CredentialSecrets
from nodeagent.identity.manager import IdentityManager
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.ports import ENVOY_STATS_PORT
from nodeagent.supervise import TaskSupervisor
from nodeagent.translate import (
    LocalPod,
    TranslationCache,
    access_logs,
    gateway,
    gateway_policies,
    service_views,
)
from nodeagent.translate.cache import client_classes
from nodeagent.translate.envoy import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from nodeagent.xds.cache import InconsistentSnapshot, Snapshot, SnapshotCache
from nodeagent.xds.server import Nack, XdsServer

log = logging.getLogger("nodeagent.gateway")

# Of the sidecar form's config, what a gateway keeps: its upstream side and its secrets.
UPSTREAM_TYPES = (CLUSTER, ENDPOINT, SECRET)


@dataclass(frozen=True)
class GatewaySettings:
    namespace: str  # the gateway pod's (credentialName Secrets are read here)
    pod_name: str
    labels: dict[str, str]  # what the Gateways' selectors match (--selector)
    service_account: str  # its identity, when the source does not know the pod yet
    run_dir: Path  # xDS socket, bootstrap, Envoy's admin socket and pidfile
    envoy_binary: Path
    envoy_log: Path
    stats_host: str = "0.0.0.0"
    stats_port: int = ENVOY_STATS_PORT
    excluded_namespaces: tuple[str, ...] = field(default=("kube-system",))

    @property
    def node_id(self) -> str:
        return f"router~{self.namespace}~{self.pod_name}"  # Istio's gateway proxy type

    @property
    def xds_socket(self) -> Path:
        return self.run_dir / "xds.sock"


class GatewayProxy:
    def __init__(
        self,
        settings: GatewaySettings,
        store: MeshStore,
        identities: IdentityManager,
        metrics: CollectorRegistry,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.identities = identities
        self.tasks = tasks or TaskSupervisor()
        self.cache = SnapshotCache()
        self.xds = XdsServer(self.cache, metrics)
        self.xds.on_nack = self._on_nack
        self.admin = EnvoyAdmin(admin_socket_path(settings.run_dir))
        self.supervisor = EnvoySupervisor(
            settings.envoy_binary,
            bootstrap_path(settings.run_dir),
            settings.run_dir,
            settings.envoy_log,
            self.admin,
            tasks=self.tasks,
        )
        self.credential_secrets = CredentialSecrets(owner="Gateway")
        self.changed = asyncio.Event()
        self._translator = TranslationCache()
        self.version = 0
        self.problems: dict[str, list[str]] = {}  # Gateway key -> servers left out and why
        self.last_error = ""
        self.custom_error = ""  # logged once when it changes

    def pod(self) -> Pod:
        """The gateway's pod as the source has it (its service account is its identity)."""
        s = self.settings
        known = self.store.pods.get(f"{s.namespace}/{s.pod_name}")
        if known is not None:
            return known
        return Pod(s.namespace, s.pod_name, service_account=s.service_account, labels=s.labels)

    def workload(self, pod: Pod, clusters: Collection[str] | None = None) -> gateway.Workload:
        """CLUSTERS: the gateway's upstream clusters (a CUSTOM provider's must be one)."""
        trust_domain = self.store.mesh_config.trust_domain
        sid = spiffe_id(trust_domain, pod.namespace, pod.service_account)
        ports = gateway.listen_ports(self.store, pod.namespace, pod.labels or self.settings.labels)
        # Its AuthorizationPolicies and RequestAuthentications are chosen by the pod's own
        # labels and namespace, as a sidecar's (translate/gateway_policies.py).
        policies = gateway_policies.for_gateway(self.store, pod, clusters)
        if policies.custom_error != self.custom_error:
            if policies.custom_error:
                log.error("CUSTOM policies deny what they match: %s", policies.custom_error)
            self.custom_error = policies.custom_error
        return gateway.Workload(
            self.settings.namespace, self.settings.labels, sid, pod.name, ports, policies
        )

    def resources(self) -> dict[str, dict[str, Message]]:
        """The gateway Envoy's config now."""
        pod = self.pod()
        local = LocalPod(pod, "")
        secrets: list[Message] = list(self.identities.sds_secrets({local.identity}))
        upstream = self._translator.build(
            self.store, [local], secrets, self.settings.excluded_namespaces, gateway=True
        )
        # The listeners after the clusters: a CUSTOM provider's cluster must be among them.
        workload = self.workload(pod, upstream.resources.get(CLUSTER, {}).keys())
        # A gateway logs as Istio's do: CLIENT mode of its pod's Telemetry, else the mesh
        # config's access log (translate/access_logs.py).
        labels = pod.labels or self.settings.labels
        logs = access_logs.plan(self.store, [(pod.key, pod.namespace, labels)])
        with access_logs.planned(logs):
            made = gateway.build(self.store, workload, self._cluster_of([local]))
        credentials = self.credential_secrets.sds_secrets(self.store, made.credentials)
        self.credential_secrets.wake_at_deadline(self.changed.set)
        out: dict[str, dict[str, Message]] = {t: {} for t in (LISTENER, ROUTE, *UPSTREAM_TYPES)}
        for type_url in UPSTREAM_TYPES:
            out[type_url].update(upstream.resources.get(type_url, {}))
        out[SECRET].update({s.name: s for s in credentials})
        out[LISTENER] = {str(li.name): li for li in made.listeners}
        out[ROUTE] = {str(r.name): r for r in made.routes}
        if made.problems != self.problems:
            for problems in made.problems.values():
                for problem in problems:
                    log.error("%s", problem)
        self.problems = made.problems
        return out

    def _cluster_of(self, local: list[LocalPod]) -> gateway.ClusterOf:
        client = client_classes(self.store, local)[0]

        def of(destination: object, vs: object, port: int) -> str:
            return service_views.destination_cluster(
                self.store,
                client,
                destination,  # type: ignore[arg-type]
                vs,  # type: ignore[arg-type]
                port,
            )

        return of

    def push(self) -> str:
        self.version += 1
        version = str(self.version)
        try:
            snapshot = Snapshot(
                version,
                self.resources(),
                awaited_secrets=frozenset(self.credential_secrets.pending),
            )
            self.cache.set_snapshot(self.settings.node_id, snapshot)
            self.last_error = ""
        except (InconsistentSnapshot, ValueError) as e:
            self.last_error = f"snapshot {version} not pushed: {e}"
            log.error("%s", self.last_error)
        return version

    def _on_nack(self, node_id: str, nack: Nack) -> None:
        log.error(
            "gateway Envoy rejected %s version %s: %s",
            nack.type_url.rsplit(".", 1)[-1],
            nack.version_sent,
            nack.message.strip(),
        )

    async def start(self) -> None:
        s = self.settings
        s.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.xds.start(s.xds_socket)
        self.push()
        write_bootstrap(
            bootstrap_path(s.run_dir),
            bootstrap(
                s.node_id,
                f"{s.pod_name}.{s.namespace}",
                s.xds_socket,
                admin_socket=admin_socket_path(s.run_dir),
                stats_host=s.stats_host,
                stats_port=s.stats_port,
                # Not captured: nothing to skip, and a gateway container needs no NET_ADMIN.
                socket_mark=None,
            ),
        )
        await self.supervisor.start()

    async def stop(self) -> None:
        """A gateway's Envoy ends with its pod (unlike the node's, which outlives its agent)."""
        await self.supervisor.stop(kill_envoy=True)
        await self.xds.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Push whenever the store or a certificate changed (bursts coalesce)."""
        while not stop.is_set():
            if not (self.store.changed.is_set() or self.changed.is_set()):
                waits = [
                    asyncio.create_task(e.wait()) for e in (self.store.changed, self.changed, stop)
                ]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in waits:
                    task.cancel()
            if stop.is_set():
                return
            self.store.changed.clear()
            self.changed.clear()
            self.push()
