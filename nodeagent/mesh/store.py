"""MeshStore: the agent's view of the cluster, fed by a source (directory or Kubernetes API).

Single-threaded (asyncio). Sources put and delete records; consumers either read the collections
directly or wait on ``changed`` (a generation counter and an event) to recompute the node's
configuration. Waiters can ask for a pod that a source has not delivered yet: a CNI ADD may
arrive before the watch event of the pod it is for.

``pods`` holds the pods of every node (remote endpoints need their identity and membership):
node-local logic (capture, adoption, pod annotations) must look only at pods whose
``node_name`` is this node's (``on_this_node``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from nodeagent.mesh import enforcement
from nodeagent.mesh.model import (
    EndpointSlice,
    IstioResource,
    MeshConfig,
    Namespace,
    Pod,
    Service,
    ServiceAccount,
)

log = logging.getLogger("nodeagent.mesh.store")


class MeshStore:
    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name  # this agent's node ("": not known, every pod counts as local)
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[str, Pod] = {}  # namespace/name
        self.services: dict[str, Service] = {}  # namespace/name
        self.endpoint_slices: dict[str, EndpointSlice] = {}  # namespace/name of the slice
        self.service_accounts: dict[str, ServiceAccount] = {}  # namespace/name
        self.istio: dict[str, IstioResource] = {}  # Kind/namespace/name
        self.mesh_config = MeshConfig()
        self.generation = 0  # bumped on every change
        self.changed = asyncio.Event()  # set on every change; consumers clear it
        self.synced = asyncio.Event()  # set once the source delivered its first full view
        self._pod_waiters: defaultdict[str, list[asyncio.Future[Pod]]] = defaultdict(list)

    def _bump(self) -> None:
        self.generation += 1
        self.changed.set()

    # -- writes (sources) -------------------------------------------------------------------------

    def put_namespace(self, ns: Namespace) -> None:
        self.namespaces[ns.name] = ns
        self._bump()

    def delete_namespace(self, name: str) -> None:
        if self.namespaces.pop(name, None) is not None:
            self._bump()

    def put_pod(self, pod: Pod) -> None:
        self.pods[pod.key] = pod
        self._bump()
        if not self.on_this_node(pod):
            return
        for waiter in self._pod_waiters.pop(pod.key, []):
            if not waiter.done():
                waiter.set_result(pod)

    def delete_pod(self, key: str) -> None:
        if self.pods.pop(key, None) is not None:
            self._bump()

    def put_service(self, svc: Service) -> None:
        self.services[svc.key] = svc
        self._bump()

    def delete_service(self, key: str) -> None:
        if self.services.pop(key, None) is not None:
            self._bump()

    def put_endpoint_slice(self, eps: EndpointSlice) -> None:
        self.endpoint_slices[eps.key] = eps
        self._bump()

    def delete_endpoint_slice(self, key: str) -> None:
        if self.endpoint_slices.pop(key, None) is not None:
            self._bump()

    def put_service_account(self, sa: ServiceAccount) -> None:
        self.service_accounts[f"{sa.namespace}/{sa.name}"] = sa
        self._bump()

    def delete_service_account(self, key: str) -> None:
        if self.service_accounts.pop(key, None) is not None:
            self._bump()

    def put_istio(self, res: IstioResource) -> None:
        # Once per resource and content (never per push): what of it has no effect yet.
        if self.istio.get(res.key) != res and (warning := enforcement.warning(res)):
            log.warning("%s", warning)
        self.istio[res.key] = res
        self._bump()

    def delete_istio(self, key: str) -> None:
        if self.istio.pop(key, None) is not None:
            self._bump()

    def set_mesh_config(self, config: MeshConfig) -> None:
        if config != self.mesh_config:
            self.mesh_config = config
            self._bump()

    # -- reads ------------------------------------------------------------------------------------

    def slices_of(self, service: Service) -> list[EndpointSlice]:
        return [
            s
            for s in self.endpoint_slices.values()
            if s.namespace == service.namespace and s.service == service.name
        ]

    def istio_of_kind(self, kind: str) -> list[IstioResource]:
        return [r for r in self.istio.values() if r.kind == kind]

    def on_this_node(self, pod: Pod) -> bool:
        """POD runs on this agent's node (a pod without a node, as a bare YAML file may give,
        counts as local)."""
        return not (self.node_name and pod.node_name and pod.node_name != self.node_name)

    async def wait_for_pod(self, namespace: str, name: str, timeout: float) -> Pod | None:
        """The pod on this node, waiting up to TIMEOUT seconds for a source to deliver it (None:
        never came). A record of the same name on another node is a pod that ran there (say, a
        StatefulSet's pod rescheduled here, whose deletion the watch has not brought yet): it
        is not the one a CNI ADD on this node is for, so wait for the new one."""
        key = f"{namespace}/{name}"
        known = self.pods.get(key)
        if known is not None and self.on_this_node(known):
            return known
        waiter: asyncio.Future[Pod] = asyncio.get_running_loop().create_future()
        self._pod_waiters[key].append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._pod_waiters.get(key)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._pod_waiters[key]
