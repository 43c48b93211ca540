"""MeshStore: the agent's view of the cluster, fed by a source (directory or Kubernetes API).

Single-threaded (asyncio). Sources put and delete records; consumers either read the collections
directly or wait on ``changed`` (a generation counter and an event) to recompute the node's
configuration. Waiters can ask for a pod that a source has not delivered yet: a CNI ADD may
arrive before the watch event of the pod it is for.

``pods`` holds the pods of every node (remote endpoints need their identity and membership):
node-local logic (capture, adoption, pod annotations) must look only at pods whose
``node_name`` is this node's (``on_this_node``).

The collections are read-only for consumers (writes go through put/delete, which keep the
indexes: slices by service, pods by node, namespace, IP and the slices naming them, services by
namespace and by selector label, Istio resources by kind and namespace), so no read scans every
object. Every real change (a put of a record equal to the stored one is none) bumps
``generation`` and is logged as (kind, key): ``changes_since`` tells a consumer what changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Mapping
from typing import TypeVar

from nodeagent.mesh import autoallocate, enforcement, service_entries, telemetry
from nodeagent.mesh.model import (
    Credential,
    EndpointSlice,
    EntryEndpoint,
    IstioResource,
    Locality,
    MeshConfig,
    Namespace,
    Node,
    Pod,
    Service,
    ServiceAccount,
)

log = logging.getLogger("nodeagent.mesh.store")

# Kinds in the change log (Istio resources are logged under their own kind).
NAMESPACE, POD, SERVICE, ENDPOINT_SLICE = "Namespace", "Pod", "Service", "EndpointSlice"
SERVICE_ACCOUNT, MESH_CONFIG, NODE = "ServiceAccount", "MeshConfig", "Node"
SECRET = "Secret"  # a Credential: translation never reads it (only SDS does)
SECRET_ACCESS = "SecretAccess"  # may a service account have its namespace's Secrets
JWKS = "Jwks"  # the keys the agent fetched for a RequestAuthentication (mesh/jwks.py)
CHANGE_LOG_SIZE = 50_000  # changes remembered; a consumer further behind recomputes everything

_K = TypeVar("_K")
_R = TypeVar("_R")


class MeshStore:
    def __init__(self, node_name: str = "", log_size: int = CHANGE_LOG_SIZE) -> None:
        self.node_name = node_name  # this agent's node ("": not known, every pod counts as local)
        self.namespaces: dict[str, Namespace] = {}
        self.nodes: dict[str, Node] = {}  # by name: their locality labels only
        self.pods: dict[str, Pod] = {}  # namespace/name
        self.services: dict[str, Service] = {}  # namespace/name
        self.endpoint_slices: dict[str, EndpointSlice] = {}  # namespace/name of the slice
        self.service_accounts: dict[str, ServiceAccount] = {}  # namespace/name
        self.istio: dict[str, IstioResource] = {}  # Kind/namespace/name
        self.credentials: dict[str, Credential] = {}  # namespace/name: TLS Secrets referenced
        # namespace/name of the Secrets the source has answered for (read, or said not to
        # exist or to be forbidden): one named but not answered yet is PENDING (its SDS
        # secrets wait, identity/credentials.py). None: the source holds every Secret it has
        # at once (a directory), so none is ever pending.
        self.credential_answers: set[str] | None = None
        # namespace/serviceaccount -> may it list the namespace's Secrets (a SubjectAccessReview,
        # mesh/secret_access.py). Not enforced (a source without RBAC): every one may.
        self.secret_access: dict[str, bool] = {}
        self.secret_access_enforced = False
        self.mesh_config = MeshConfig()
        # RequestAuthentication keys the agent fetched (mesh/jwks.py): source (a jwksUri, or
        # "oidc:<issuer>") -> the JWKS text last fetched; kept while the source is unreachable.
        self.jwks: dict[str, str] = {}
        self.generation = 0  # bumped on every change
        self.changed = asyncio.Event()  # set on every change; consumers clear it
        self.synced = asyncio.Event()  # set once the source delivered its first full view
        self._pod_waiters: defaultdict[str, list[asyncio.Future[Pod]]] = defaultdict(list)
        # Change log: (generation, kind, key), oldest first; complete after _log_floor.
        self._log: deque[tuple[int, str, str]] = deque()
        self._log_size = log_size
        self._log_floor = 0
        # Indexes (key -> record dicts keep insertion order, as the collections do).
        self._slices_by_service: defaultdict[tuple[str, str], dict[str, EndpointSlice]] = (
            defaultdict(dict)
        )
        self._slices_naming_pod: defaultdict[str, set[str]] = defaultdict(set)
        self._pods_by_node: defaultdict[str, dict[str, Pod]] = defaultdict(dict)
        self._pods_by_namespace: defaultdict[str, dict[str, Pod]] = defaultdict(dict)
        self._pods_by_ip: defaultdict[str, dict[str, Pod]] = defaultdict(dict)
        self._services_by_namespace: defaultdict[str, dict[str, Service]] = defaultdict(dict)
        # (namespace, label, value) -> keys of the services whose selector has that label.
        self._selecting: defaultdict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._istio_by_kind: defaultdict[str, dict[str, IstioResource]] = defaultdict(dict)
        self._istio_by_kind_ns: defaultdict[tuple[str, str], dict[str, IstioResource]] = (
            defaultdict(dict)
        )
        # ServiceEntry hosts as services (mesh/service_entries.py): per entry the keys of the
        # services and slices derived from it; who holds each host (the first entry to claim
        # it, a Kubernetes Service's hostname never); entries that lost a host to another.
        self._derived: dict[str, tuple[list[str], list[str]]] = {}
        self._host_owner: dict[str, str] = {}  # host -> derived service key
        self._contested: set[str] = set()
        # Addresses of ServiceEntry hosts without addresses (mesh/autoallocate.py).
        self.allocator = autoallocate.AddressAllocator()

    def _bump(self, kind: str, key: str) -> None:
        self.generation += 1
        self._log.append((self.generation, kind, key))
        while len(self._log) > self._log_size:
            self._log_floor = self._log.popleft()[0]
        self.changed.set()

    def changes_since(self, generation: int) -> set[tuple[str, str]] | None:
        """The (kind, key) of every object changed after GENERATION (kind MESH_CONFIG, key "",
        for the mesh config); None when the log no longer reaches back that far (recompute
        everything)."""
        if generation < self._log_floor or generation > self.generation:
            return None
        changed: set[tuple[str, str]] = set()
        for gen, kind, key in reversed(self._log):
            if gen <= generation:
                break
            changed.add((kind, key))
        return changed

    # -- index upkeep -----------------------------------------------------------------------------

    @staticmethod
    def _unindex(index: defaultdict[_K, dict[str, _R]], at: _K, key: str) -> None:
        entries = index.get(at)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del index[at]

    def _index_pod(self, pod: Pod, add: bool) -> None:
        places = [(self._pods_by_node, pod.node_name), (self._pods_by_namespace, pod.namespace)]
        places += [(self._pods_by_ip, ip) for ip in pod.pod_ips]
        for index, at in places:
            if add:
                index[at][pod.key] = pod
            else:
                self._unindex(index, at, pod.key)

    def _index_slice(self, eps: EndpointSlice, add: bool) -> None:
        if add:
            self._slices_by_service[(eps.namespace, eps.service)][eps.key] = eps
        else:
            self._unindex(self._slices_by_service, (eps.namespace, eps.service), eps.key)
        for endpoint in eps.endpoints:
            if not endpoint.pod:
                continue
            if add:
                self._slices_naming_pod[endpoint.pod].add(eps.key)
            elif (keys := self._slices_naming_pod.get(endpoint.pod)) is not None:
                keys.discard(eps.key)
                if not keys:
                    del self._slices_naming_pod[endpoint.pod]

    def _index_service(self, svc: Service, add: bool) -> None:
        if add:
            self._services_by_namespace[svc.namespace][svc.key] = svc
        else:
            self._unindex(self._services_by_namespace, svc.namespace, svc.key)
        for label, value in svc.selector.items():
            at = (svc.namespace, label, value)
            if add:
                self._selecting[at].add(svc.key)
            elif (keys := self._selecting.get(at)) is not None:
                keys.discard(svc.key)
                if not keys:
                    del self._selecting[at]

    def _index_istio(self, res: IstioResource, add: bool) -> None:
        if add:
            self._istio_by_kind[res.kind][res.key] = res
            self._istio_by_kind_ns[(res.kind, res.namespace)][res.key] = res
        else:
            self._unindex(self._istio_by_kind, res.kind, res.key)
            self._unindex(self._istio_by_kind_ns, (res.kind, res.namespace), res.key)

    # -- writes (sources) -------------------------------------------------------------------------

    def put_namespace(self, ns: Namespace) -> None:
        if self.namespaces.get(ns.name) == ns:
            return
        self.namespaces[ns.name] = ns
        self._bump(NAMESPACE, ns.name)

    def delete_namespace(self, name: str) -> None:
        if self.namespaces.pop(name, None) is not None:
            self._bump(NAMESPACE, name)

    def put_node(self, node: Node) -> None:
        if self.nodes.get(node.name) == node:
            return
        self.nodes[node.name] = node
        self._bump(NODE, node.name)

    def delete_node(self, name: str) -> None:
        if self.nodes.pop(name, None) is not None:
            self._bump(NODE, name)

    def put_pod(self, pod: Pod) -> None:
        old = self.pods.get(pod.key)
        if old != pod:
            if old is not None:
                self._index_pod(old, add=False)
            self.pods[pod.key] = pod
            self._index_pod(pod, add=True)
            self._bump(POD, pod.key)
            self._selected_changed(pod.namespace)
        if not self.on_this_node(pod):
            return
        for waiter in self._pod_waiters.pop(pod.key, []):
            if not waiter.done():
                waiter.set_result(pod)

    def delete_pod(self, key: str) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            self._index_pod(old, add=False)
            self._bump(POD, key)
            self._selected_changed(old.namespace)

    def put_service(self, svc: Service) -> None:
        old = self.services.get(svc.key)
        if old == svc:
            return
        if old is not None:
            self._index_service(old, add=False)
        self.services[svc.key] = svc
        self._index_service(svc, add=True)
        self._bump(SERVICE, svc.key)
        if svc.entry is None and old is None:
            # A Kubernetes Service's name wins over an entry's host naming it (Istio's).
            owner = self._host_owner.get(svc.hostname(self.mesh_config.cluster_domain))
            if owner is not None and (taken := self.services.get(owner)) is not None:
                assert taken.entry is not None
                self._derive(taken.entry.entry)

    def delete_service(self, key: str) -> None:
        old = self.services.pop(key, None)
        if old is not None:
            self._index_service(old, add=False)
            self._bump(SERVICE, key)
            if old.entry is None and self._contested:
                for entry in sorted(self._contested):  # a host it held may be free now
                    self._derive(entry)

    def put_endpoint_slice(self, eps: EndpointSlice) -> None:
        old = self.endpoint_slices.get(eps.key)
        if old == eps:
            return
        if old is not None:
            self._index_slice(old, add=False)
        self.endpoint_slices[eps.key] = eps
        self._index_slice(eps, add=True)
        self._bump(ENDPOINT_SLICE, eps.key)

    def delete_endpoint_slice(self, key: str) -> None:
        old = self.endpoint_slices.pop(key, None)
        if old is not None:
            self._index_slice(old, add=False)
            self._bump(ENDPOINT_SLICE, key)

    def put_service_account(self, sa: ServiceAccount) -> None:
        key = f"{sa.namespace}/{sa.name}"
        if self.service_accounts.get(key) == sa:
            return
        self.service_accounts[key] = sa
        self._bump(SERVICE_ACCOUNT, key)

    def delete_service_account(self, key: str) -> None:
        if self.service_accounts.pop(key, None) is not None:
            self._bump(SERVICE_ACCOUNT, key)

    def put_credential(self, credential: Credential) -> None:
        key = credential.key_name
        if self.credentials.get(key) == credential:
            return
        self.credentials[key] = credential
        self._bump(SECRET, key)

    def delete_credential(self, key: str) -> None:
        if self.credentials.pop(key, None) is not None:
            self._bump(SECRET, key)

    def answer_credential(self, key: str) -> None:
        """The source has an answer for Secret KEY (namespace/name): found or not, it is no
        longer pending."""
        if self.credential_answers is not None and key not in self.credential_answers:
            self.credential_answers.add(key)
            self._bump(SECRET, key)

    def forget_credential_answer(self, key: str) -> None:
        """The source stopped following Secret KEY: named again, it is pending again."""
        if self.credential_answers is not None:
            self.credential_answers.discard(key)

    def credential_pending(self, key: str) -> bool:
        """Secret KEY is not in the store and the source has not answered for it yet."""
        return (
            self.credential_answers is not None
            and key not in self.credential_answers
            and key not in self.credentials
        )

    def may_read_secrets(self, namespace: str, service_account: str) -> bool:
        """Istio's credentialName authorization of a service account (mesh/secret_access.py);
        enforced and not answered yet: no (fail closed, as istiod on an error)."""
        if not self.secret_access_enforced:
            return True
        return self.secret_access.get(f"{namespace}/{service_account}", False)

    def put_secret_access(self, namespace: str, service_account: str, allowed: bool) -> None:
        key = f"{namespace}/{service_account}"
        if self.secret_access.get(key) == allowed:
            return
        self.secret_access[key] = allowed
        self._bump(SECRET_ACCESS, key)

    def delete_secret_access(self, key: str) -> None:
        if self.secret_access.pop(key, None) is not None:
            self._bump(SECRET_ACCESS, key)

    def put_istio(self, res: IstioResource) -> None:
        old = self.istio.get(res.key)
        if old == res:
            return
        # Once per resource and content (never per push): what of it has no effect yet.
        if warning := enforcement.warning(res):
            log.warning("%s", warning)
        mesh = self.mesh_config
        for problem in telemetry.problems(res, mesh.extension_providers, mesh.root_namespace):
            log.warning("%s", problem)
        if old is not None:
            self._index_istio(old, add=False)
        self.istio[res.key] = res
        self._index_istio(res, add=True)
        self._bump(res.kind, res.key)
        self._entries_changed(res)

    def put_jwks(self, source: str, text: str) -> None:
        if self.jwks.get(source) != text:
            self.jwks[source] = text
            self._bump(JWKS, source)

    def delete_jwks(self, source: str) -> None:
        if self.jwks.pop(source, None) is not None:
            self._bump(JWKS, source)

    def delete_istio(self, key: str) -> None:
        old = self.istio.pop(key, None)
        if old is not None:
            self._index_istio(old, add=False)
            self._bump(old.kind, key)
            self._entries_changed(old)

    # -- ServiceEntry hosts as services (mesh/service_entries.py) ---------------------------------

    def _entries_changed(self, res: IstioResource) -> None:
        if res.kind == service_entries.SERVICE_ENTRY:
            self._derive(res.key)
            if res.key not in self.istio and self._contested:
                for key in sorted(self._contested):  # a host it held may be free now
                    self._derive(key)
        elif res.kind == service_entries.WORKLOAD_ENTRY:
            self._selected_changed(res.namespace)

    def _selected_changed(self, namespace: str) -> None:
        """Pods or WorkloadEntries of NAMESPACE changed: its selecting entries' endpoints."""
        for entry in self.istio_in(service_entries.SERVICE_ENTRY, namespace):
            if entry.spec.get("workloadSelector"):
                self._derive(entry.key)

    def _derive(self, key: str) -> None:
        """Bring the services and slices derived from ServiceEntry KEY up to date (none once
        it is gone). Unchanged ones are not written (no change is logged for them)."""
        entry = self.istio.get(key)
        services: list[Service] = []
        slices: list[EndpointSlice] = []
        if entry is not None:
            selected: tuple[EntryEndpoint, ...] = ()
            if entry.spec.get("workloadSelector"):
                selected = service_entries.selected_endpoints(
                    entry,
                    self.pods_in(entry.namespace),
                    self.istio_in(service_entries.WORKLOAD_ENTRY, entry.namespace),
                )
            self.allocator.update(key, autoallocate.wants_address(entry))
            services, slices = service_entries.derive(entry, selected, self.allocator.address)
        else:
            self.allocator.update(key, [])
        old_services, old_slices = self._derived.pop(key, ([], []))
        for svc_key in old_services:
            svc = self.services.get(svc_key)
            if svc is not None and self._host_owner.get(svc.host) == svc_key:
                del self._host_owner[svc.host]
        kept: list[Service] = []
        evicted: set[str] = set()
        self._contested.discard(key)
        for svc in services:
            owner = self._host_owner.get(svc.host)
            holder = self.services.get(owner) if owner is not None else None
            if self._kubernetes_host(svc.host):
                holder_key = "a Kubernetes Service"
            elif holder is not None and holder.entry is not None and owner != svc.key:
                holder_key = holder.entry.entry
                if self._age(key) < self._age(holder_key):
                    evicted.add(holder_key)  # the oldest entry holds a host (as Istio)
                    holder_key = ""
            else:
                holder_key = ""
            if holder_key:
                self._contested.add(key)  # the host is another's: it keeps it
                log.warning("%s: host %s is already %s's; ignored", key, svc.host, holder_key)
                continue
            self._host_owner[svc.host] = svc.key
            kept.append(svc)
        kept_names = {svc.name for svc in kept}
        slices = [s for s in slices if s.service in kept_names]
        for gone in set(old_slices) - {s.key for s in slices}:
            self.delete_endpoint_slice(gone)
        for gone in set(old_services) - {svc.key for svc in kept}:
            self.delete_service(gone)
        for svc in kept:
            self.put_service(svc)
        for slice_ in slices:
            self.put_endpoint_slice(slice_)
        if kept or slices:
            self._derived[key] = ([svc.key for svc in kept], [s.key for s in slices])
        for younger in sorted(evicted):
            self._derive(younger)

    def _age(self, entry_key: str) -> tuple[str, str]:
        """Older first: creationTimestamp (RFC 3339 sorts as text), then the key."""
        entry = self.istio.get(entry_key)
        return ((entry.created if entry is not None else "") or "~", entry_key)

    def _kubernetes_host(self, host: str) -> bool:
        """HOST is a Kubernetes Service's hostname (<name>.<ns>.svc.<domain>)."""
        suffix = ".svc." + self.mesh_config.cluster_domain
        if not host.endswith(suffix):
            return False
        name, _, namespace = host[: -len(suffix)].partition(".")
        svc = self.services.get(f"{namespace}/{name}")
        return svc is not None and svc.entry is None

    def service_of_entry_host(self, host: str) -> Service | None:
        """The service a ServiceEntry host became (None: no entry holds HOST)."""
        key = self._host_owner.get(host)
        return self.services.get(key) if key is not None else None

    def set_mesh_config(self, config: MeshConfig) -> None:
        if config != self.mesh_config:
            self.mesh_config = config
            self._bump(MESH_CONFIG, "")

    # -- reads ------------------------------------------------------------------------------------

    def locality_of(self, node_name: str) -> Locality:
        """The locality of node NODE_NAME (empty when the node or its labels are unknown)."""
        node = self.nodes.get(node_name)
        return node.locality if node is not None else Locality()

    def slices_of(self, service: Service) -> list[EndpointSlice]:
        return list(self._slices_by_service.get((service.namespace, service.name), {}).values())

    def slices_naming(self, pod_key: str) -> list[EndpointSlice]:
        """The EndpointSlices with an endpoint whose target is the pod POD_KEY (namespace/name)."""
        return [self.endpoint_slices[k] for k in sorted(self._slices_naming_pod.get(pod_key, ()))]

    def pods_on_node(self, node_name: str) -> list[Pod]:
        return list(self._pods_by_node.get(node_name, {}).values())

    def pods_in(self, namespace: str) -> list[Pod]:
        return list(self._pods_by_namespace.get(namespace, {}).values())

    def pods_with_ip(self, ip: str) -> list[Pod]:
        return list(self._pods_by_ip.get(ip, {}).values())

    def services_in(self, namespace: str) -> list[Service]:
        return list(self._services_by_namespace.get(namespace, {}).values())

    def services_selecting(self, namespace: str, labels: Mapping[str, str]) -> list[Service]:
        """The services of NAMESPACE whose (non-empty) selector matches LABELS, by key."""
        candidates: set[str] = set()
        for label, value in labels.items():
            candidates |= self._selecting.get((namespace, label, value), set())
        selecting = (self.services[key] for key in sorted(candidates))
        return [
            svc for svc in selecting if all(labels.get(k) == v for k, v in svc.selector.items())
        ]

    def istio_of_kind(self, kind: str) -> list[IstioResource]:
        return list(self._istio_by_kind.get(kind, {}).values())

    def istio_in(self, kind: str, namespace: str) -> list[IstioResource]:
        return list(self._istio_by_kind_ns.get((kind, namespace), {}).values())

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
