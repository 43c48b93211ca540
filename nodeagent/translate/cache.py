"""The node's translation, kept between pushes: a resource is recomputed only when one of its
inputs changed, and otherwise is the very same message object as before (the xDS snapshot then
reuses its encoding, and the push skips it).

Resources are cached per origin:

- a Service: per port its endpoints (one ClusterLoadAssignment), its cluster, its HTTP route and
  its filter chain in ``outbound-internal``, none of them per identity; and the DestinationRule
  TLS modes that bind the local pods' namespaces for it (they go into ``originate-mtls``'s
  matcher). Inputs: the Service, its EndpointSlices, the pods its endpoints name (identity for
  the SANs; membership and PeerAuthentication for ``tlsMode``) and their namespaces, the
  DestinationRules its clients in the local identities' namespaces see, the Nodes its
  endpoints run on and this node (their localities rank the endpoints: locality.py).
- a local pod: its two listeners and the inbound clusters and routes of its HTTP ports. Their
  inputs are cheap to gather (services selecting the pod through the store's selector index,
  its PeerAuthentication), so a pod's part is memoised on their values rather than on changes.
  On the node a pod's outbound listener names no service: it is O(1) (internal.py).
- shared ones: passthrough, black hole, the internal listeners and their clusters; the
  ``outbound-internal`` listener is reassembled from the services' cached chains when one
  changes, ``originate-mtls`` when the local identities or the DestinationRule modes change.

Which services a change touches comes from the store's change log (``changes_since``) and
reverse indexes kept here (pod -> services whose endpoints name it, namespace -> services with
an endpoint pod there, node -> services with an endpoint there, slice -> its service). A change
of this node's labels re-ranks every service (no full recompute). A new set of local namespaces
recomputes only the DestinationRule modes (the sidecar form, one pod, recomputes everything). A
mesh config change (or other settings), or a change log that no longer reaches back, recomputes
everything; a PeerAuthentication in the root namespace or a DestinationRule where local clients
or the root namespace see it recompute every service (in doubt, all). Kinds translation does
not read yet (ServiceAccount, VirtualService, AuthorizationPolicy, ...) recompute nothing: a
builder that starts reading one must add its dependency in ``_dirty_services``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from google.protobuf.message import Message

from nodeagent.mesh import (
    credentials,
    locality,
    policy,
    secret_access,
    service_entries,
    sidecar_scope,
    tls_files,
    traffic,
)
from nodeagent.mesh.hosts import host_match
from nodeagent.mesh.membership import DEFAULT_EXCLUDED_NAMESPACES, decide
from nodeagent.mesh.model import EntryPolicy, IstioResource, MeshConfig, Service
from nodeagent.mesh.store import ENDPOINT_SLICE, MESH_CONFIG, NAMESPACE, NODE, MeshStore
from nodeagent.mesh.store import POD as POD_KIND
from nodeagent.mesh.store import SERVICE as SERVICE_KIND
from nodeagent.translate import (
    access_logs,
    authz,
    client_tls,
    envoy,
    extauthz,
    internal,
    istio_stats,
    jwt,
    l4_routes,
    mirror,
    passthrough,
    service_views,
    tls,
    tracing,
)
from nodeagent.translate.clusters import (
    blackhole_cluster,
    dns_cluster,
    original_dst_cluster,
    service_cluster,
    sidecar_service_cluster,
    upstream_bind,
)
from nodeagent.translate.destination_rule import cluster_fields, passthrough_fields
from nodeagent.translate.endpoints import ip_slices, load_assignment
from nodeagent.translate.listeners import (
    allocated_chain,
    blackhole_chain,
    fast_inbound_listener,
    fast_ports,
    has_vip,
    host_routing_chain,
    host_routing_table,
    inbound_listener,
    outbound_chain,
    outbound_internal_listener,
    outbound_listener,
    pod_outbound_listener,
    port_only,
)
from nodeagent.translate.locality import Balancing, topology_labels
from nodeagent.translate.protocol import HTTP2, is_http
from nodeagent.translate.routes import inbound_route
from nodeagent.translate.services import (
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    Identity,
    ServiceTarget,
    inbound_cluster,
    inbound_ports_of,
    inbound_services_of,
    outbound_cluster,
    service_targets,
)
from nodeagent.translate.translation import POD, SERVICE, LocalPod, Origin, Resources, Translation

log = logging.getLogger("nodeagent.translate")

PEER_AUTHENTICATION, DESTINATION_RULE = "PeerAuthentication", "DestinationRule"
VIRTUAL_SERVICE = traffic.VIRTUAL_SERVICE
Made = list[tuple[str, Message]]
HostRoute = tuple[int, str, envoy.RouteConfiguration]  # port, host, the host's own routes
TYPES = (envoy.CLUSTER, envoy.ENDPOINT, envoy.LISTENER, envoy.ROUTE, envoy.SECRET)


@dataclass
class _ServiceEntry:
    """One Service's cached part. MADE is None when it was not built (excluded or failed)."""

    origin: Origin
    targets: list[ServiceTarget]
    made: list[tuple[str, str, Message]] | None = None  # (type URL, name, resource)
    problem: str = ""
    chain_names: list[str] = field(default_factory=list)  # its filter chains, per target
    # Its parts (kept when only the set of local identities changes): the endpoints of each
    # target, clusters and routes, the outbound-internal filter chains (one per VIP:port).
    endpoints: Made = field(default_factory=list)
    clusters: Made = field(default_factory=list)
    routes: Made = field(default_factory=list)
    # Routes listeners (and their clusters) of TCP/TLS ports the caller or the SNI routes.
    listeners: Made = field(default_factory=list)
    chains: list[envoy.FilterChain] = field(default_factory=list)
    # DestinationRule tls modes binding local clients: namespace -> cluster -> mode.
    modes: dict[str, dict[str, str]] = field(default_factory=dict)
    # Transport sockets of originate-tls its clusters name (DestinationRule SIMPLE/MUTUAL).
    tls_sockets: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: frozenset[str] = frozenset()  # pods its endpoints name (namespace/name)
    nodes: frozenset[str] = frozenset()  # the nodes of its endpoints (their locality)
    # What the outbound listener(s) take from it: one filter chain per VIP:port.
    chain_keys: tuple[tuple[str, int, str, bool, str], ...] = ()
    # Its clusters per port (DestinationRule subsets and policies, per view), reused with the
    # endpoints when only the local namespaces changed and these did not.
    subsets: tuple[tuple[service_views.SubsetCluster, ...], ...] = ()
    # What its routes read besides itself: VirtualService keys, and destination hostnames.
    virtual_services: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    # A ServiceEntry host without addresses, per HTTP port: (port, host, its route table),
    # which the port's Host-routing table takes (listeners.host_routing_table).
    host_routes: list[HostRoute] = field(default_factory=list)


@dataclass
class _Memo:
    """A value computed from INPUTS, kept while they compare equal."""

    inputs: tuple[Any, ...]
    made: Made | None
    problem: str = ""


@dataclass
class _Settings:
    store: MeshStore
    mesh_config: MeshConfig
    identities: list[Identity]
    excluded_namespaces: tuple[str, ...]
    sidecar: bool
    # The local pods' client classes (namespace, and what DestinationRule selectors read).
    classes: list[service_views.ClientClass] = field(default_factory=list)
    # The sidecar form for a gateway (nodeagent.gateway), which keeps only the upstream side:
    # ServiceEntry hosts get their clusters, and no Sidecar scope applies (Istio's Sidecar
    # selects sidecars, never gateways).
    gateway: bool = False
    # The node-wide part of the access log plan (access_logs.py): a change rebuilds everything,
    # as a MeshConfig change does.
    logs: access_logs.NodeLogs = field(default_factory=access_logs.NodeLogs)


@dataclass
class TranslationCache:
    """Keeps the last translation of one node and brings it up to date on ``build``."""

    _settings: _Settings | None = None
    _generation: int = -1
    _services: dict[str, _ServiceEntry] = field(default_factory=dict)
    _order: list[str] = field(default_factory=list)  # service keys, sorted
    _excluded: frozenset[Origin] = frozenset()
    _by_pod: dict[str, set[str]] = field(default_factory=dict)  # pod -> service keys
    _by_namespace: dict[str, set[str]] = field(default_factory=dict)  # pod namespace -> services
    _by_node: dict[str, set[str]] = field(default_factory=dict)  # endpoint node -> services
    _slice_service: dict[str, str] = field(default_factory=dict)  # slice key -> service key
    _shared: Made = field(default_factory=list)
    _outbound: dict[str, _Memo] = field(default_factory=dict)  # pod key -> its outbound listener
    _inbound: dict[str, _Memo] = field(default_factory=dict)  # pod key -> its inbound side
    # The served services' part of the output, kept up to date service by service.
    _base: dict[str, dict[str, Message]] = field(default_factory=dict)
    _base_origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    _base_chains: dict[str, Origin] = field(default_factory=dict)
    _served: set[str] = field(default_factory=set)  # keys of the services in _base
    _dropped: dict[str, list[ServiceTarget]] = field(default_factory=dict)  # left out or failed
    _problems: dict[Origin, str] = field(default_factory=dict)
    # What local pods' outbound listeners are made of: served targets (by service key) and
    # black-holed VIP:ports; rebuilt when a served service's chains or the dropped ones change.
    _chains_changed: bool = True
    _served_targets: list[ServiceTarget] = field(default_factory=list)
    _closed: list[tuple[str, int]] = field(default_factory=list)
    _chains: tuple[Any, ...] = ()
    _chains_token: object = field(default_factory=object)  # changes when _chains does
    _modes: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # served services'
    # Served services' originate-tls transport sockets (only those with any): a change reads
    # these few, not every service.
    _tls_sockets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _internal: _Memo | None = None  # the outbound-internal listener
    _tracer: tracing.Tracer | None = None  # the shared outbound side's, this build's
    _collectors: dict[str, tracing.Tracer] = field(default_factory=dict)  # by cluster name
    _tracing_problem: str = ""
    # Sidecar scopes' internal listeners (and clusters), by listener name.
    _scoped: dict[str, _Memo] = field(default_factory=dict)
    # Services no local pod's Sidecar scope reaches while every local pod has one: built, not
    # served (Istio's Sidecar trims clusters too). Kept up to date service by service:
    # _admitted: the services some scope admits -> the services their routes name; _needed:
    # both together; _scopes_seen: the scopes they were computed for (None: nothing trimmed);
    # _rebuilt: services whose entry was rebuilt (or dropped) since.
    _unneeded: set[str] = field(default_factory=set)
    _admitted: dict[str, frozenset[str]] = field(default_factory=dict)
    _needed: set[str] = field(default_factory=set)
    _scopes_seen: frozenset[sidecar_scope.Scope] | None = None
    _rebuilt: set[str] = field(default_factory=set)
    _scope_memo: sidecar_scope.Memo = field(default_factory=dict)  # see _scopes_of
    # Served services exported to some namespaces only (ServiceEntry hosts, Services with the
    # exportTo annotation): service key -> (namespace, host, exportTo). A local namespace they
    # are not exported to gets a scope without them (_scopes_of).
    _restricted: dict[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    _originate: _Memo | None = None  # the originate-mtls cluster
    _originate_tls: _Memo | None = None  # the originate-tls cluster
    # originate-tls's sockets: those the served clusters name now (_wanted_sockets) and those
    # clusters Envoy may still hold name (make before break, see release_sockets).
    _kept_sockets: dict[str, dict[str, Any]] = field(default_factory=dict)
    _wanted_sockets: frozenset[str] = frozenset()
    _fast: dict[str, frozenset[int]] = field(default_factory=dict)  # local pod -> fast ports
    # The served entries' Host-routed hosts (namespace, route), for the chains token they hold.
    _host_routes_memo: tuple[object, tuple[tuple[str, HostRoute], ...]] = (None, ())
    _vs_index: traffic.VirtualServiceIndex | None = None
    _by_vs: dict[str, set[str]] = field(default_factory=dict)  # VirtualService -> services
    _by_host: dict[str, set[str]] = field(default_factory=dict)  # destination host -> services
    _owners: dict[str, set[str]] = field(default_factory=dict)  # a target's host -> services
    # Route tables whose content this build changed, and the tables before a full recompute.
    _routes_changed: set[str] = field(default_factory=set)
    _prior_routes: dict[str, Message] = field(default_factory=dict)
    # Local namespace -> the tables its joining changed (Translation.route_guards).
    _guards: dict[str, frozenset[str]] = field(default_factory=dict)
    # What this build changed in _base (type URL -> names; None: everything was recomputed),
    # and the last translation's resources with the names _assemble added on top of _base:
    # what Translation.changed is told against.
    _touched: dict[str, set[str]] | None = None
    _last_out: Resources | None = None
    _last_extra: set[tuple[str, str]] = field(default_factory=set)
    # The last translation's origins and chains, handed out again (not copied) while
    # _base_origins and _base_chains did not change and neither did what is added on top.
    _origins_moved: bool = True
    _chains_moved: bool = True
    _last_origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    _last_extra_origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    _last_added: dict[str, dict[str, Message]] = field(default_factory=dict)
    _last_chains: dict[str, Origin] = field(default_factory=dict)
    full_recomputes: int = 0  # how often everything was recomputed (for tests and benchmarks)

    def build(
        self,
        store: MeshStore,
        local_pods: Sequence[LocalPod],
        secrets: Sequence[Message] = (),
        excluded_namespaces: Sequence[str] = DEFAULT_EXCLUDED_NAMESPACES,
        sidecar: bool = False,
        excluded: Collection[Origin] = (),
        gateway: bool = False,
    ) -> Translation:
        """GATEWAY: the sidecar form of a gateway's pod, whose listeners the caller replaces
        (its clusters, endpoints and secrets are the gateway's upstream side)."""
        sidecar = sidecar or gateway
        if sidecar and len(local_pods) != 1:
            raise ValueError(f"the sidecar form is one pod's config, not {len(local_pods)} pods'")
        logs = access_logs.plan(
            store, [(local.pod.key, local.pod.namespace, local.pod.labels) for local in local_pods]
        )
        settings = _Settings(
            store,
            store.mesh_config,
            sorted({local.identity for local in local_pods}),
            tuple(excluded_namespaces),
            sidecar,
            client_classes(store, local_pods),
            gateway,
            logs.node,
        )
        with access_logs.planned(logs):
            return self._build(store, local_pods, secrets, sidecar, excluded, settings)

    def _build(
        self,
        store: MeshStore,
        local_pods: Sequence[LocalPod],
        secrets: Sequence[Message],
        sidecar: bool,
        excluded: Collection[Origin],
        settings: _Settings,
    ) -> Translation:
        excluded_now = frozenset(excluded)
        # The tracers (translate/tracing.py): the shared outbound side's, each pod's inbound
        # side's; none in the sidecar form (it has no collector cluster).
        traced = not sidecar
        tracer, why = tracing.client_tracer(store, [local.pod for local in local_pods])
        self._tracer = tracer if traced else None
        inbound = {
            local.pod.key: _inbound_inputs(store, local, sidecar, traced) for local in local_pods
        }
        self._collectors = {
            t.cluster: t
            for t in (self._tracer, *(_server_tracer(inputs) for inputs in inbound.values()))
            if t is not None
        }
        if traced and why and why != self._tracing_problem:
            log.warning("%s: no tracing", why)
        self._tracing_problem = why
        fast: dict[str, frozenset[int]] = {}  # the pods' ports on the same-node fast path
        for local in local_pods if not sidecar else ():
            pod = local.pod
            _, port_modes, _, _, _, pod_authz, *_ = inbound[pod.key]
            ports = fast_ports(port_modes, pod_authz)
            if ports and Origin(POD, pod.namespace, pod.name) not in excluded_now:
                fast[pod.key] = ports
        fast_changed = {
            k for k in fast.keys() | self._fast.keys() if fast.get(k) != self._fast.get(k)
        }
        self._fast = fast
        changes = store.changes_since(self._generation)
        previous = self._settings
        self._routes_changed = set()
        self._touched = {}
        try:
            if (
                previous is None
                or changes is None
                or replace(previous, identities=settings.identities, classes=settings.classes)
                != settings
                or (sidecar and previous.identities != settings.identities)
                or (sidecar and previous.classes != settings.classes)
            ):
                self._recompute_all(settings, excluded_now)
            else:
                self._settings = settings
                dirty = self._dirty_services(changes, settings)
                dirty |= {o.key for o in self._excluded ^ excluded_now if o.kind == SERVICE}
                for key in fast_changed:  # the services it is an endpoint of: fast path or not
                    dirty |= self._by_pod.get(key, set())
                self._excluded = excluded_now
                if (
                    _namespaces(previous.identities) != _namespaces(settings.identities)
                    or previous.classes != settings.classes
                ):
                    # A pod of a new namespace or client class came (a pod's labels may move it
                    # to another class), or the last one left: every service's views, reusing
                    # the endpoints and clusters where its DestinationRules did not change.
                    self._update(set(self._services) - dirty, reuse=True)
                self._update(dirty)
            self._generation = store.generation
            scoped = self._scopes_of(store, local_pods, settings.gateway)
            self._follow_scopes(scoped)
            self._follow_guards(previous, settings)
            return self._assemble(local_pods, secrets, excluded_now, inbound, scoped)
        except BaseException:
            # Half an update: hand the next translation out whole (fresh maps, changes unknown).
            self._last_out = None
            self._origins_moved = self._chains_moved = True
            raise

    def _scopes_of(
        self, store: MeshStore, local_pods: Sequence[LocalPod], gateway: bool
    ) -> dict[str, sidecar_scope.Scope | None]:
        """Each local pod's Sidecar scope (None: none applies; never for a GATEWAY: Istio's
        Sidecar selects sidecars only). A scope is computed once per client namespace and
        Sidecar, and kept while the Sidecar and the VirtualServices (the index, replaced on any
        VirtualService change) stay the same. A scope leaves out the hosts not exported to its
        namespace; a namespace without a Sidecar that cannot see some served host gets a scope
        of its own for that (sidecar_scope.visibility_scope): O(namespaces that differ)."""
        if gateway:
            return {local.pod.key: None for local in local_pods}
        scopes = sidecar_scope.Scopes(store, self._scope_memo, self._vs_index)
        hidden = {ns: self._hidden_from(ns) for ns in {lp.pod.namespace for lp in local_pods}}
        scoped: dict[str, sidecar_scope.Scope | None] = {}
        for local in local_pods:
            namespace = local.pod.namespace
            scope = scopes.of_pod(namespace, local.pod.labels)
            if hidden[namespace]:
                scope = (
                    sidecar_scope.visibility_scope(namespace, hidden[namespace])
                    if scope is None
                    else replace(scope, hidden=hidden[namespace])
                )
            scoped[local.pod.key] = scope
        self._scope_memo = scopes.memo_used()
        return scoped

    def _hidden_from(self, namespace: str) -> frozenset[tuple[str, str]]:
        """The served hosts not exported to NAMESPACE, as (their namespace, host)."""
        return frozenset(
            (owner, host)
            for owner, host, export in self._restricted.values()
            if not sidecar_scope.exported_to(export, owner, namespace)
        )

    def _follow_scopes(self, scoped: Mapping[str, sidecar_scope.Scope | None]) -> None:
        """Serve only the services some local pod reaches while every local pod is under a
        Sidecar (SCOPED: each pod's scope): those a scope admits and those their routes name (a
        VirtualService destination: its cluster is needed, not its chain). Istio's Sidecar
        trims a sidecar's clusters the same way (pilot/pkg/model/sidecar.go: only the scope's
        services and the VirtualService destinations get clusters). Incremental: only rebuilt
        services are looked at again, unless the scopes changed."""
        assert self._settings is not None
        settings = self._settings
        scopes = frozenset(scope for scope in scoped.values() if scope is not None)
        rebuilt, self._rebuilt = self._rebuilt, set()
        if settings.sidecar or not scopes or None in scoped.values():
            self._scopes_seen = None
            self._admitted.clear()
            self._needed.clear()
            self._reneed(set(self._unneeded), set())
            return
        full = scopes != self._scopes_seen
        if full:
            self._scopes_seen = scopes
            self._admitted.clear()
            rebuilt = set(self._services)
        moved = False
        for key in rebuilt:
            entry = self._services.get(key)
            named: frozenset[str] | None = None
            if entry is not None and any(
                _admits(scope, t) for scope in scopes for t in entry.targets
            ):
                owners = self._owners
                named = frozenset(k for h in entry.hosts for k in owners.get(h, ()))
            if named is None:
                moved |= self._admitted.pop(key, None) is not None
            elif self._admitted.get(key) != named:
                self._admitted[key] = named
                moved = True
        if moved or full:
            self._needed = set(self._admitted).union(*self._admitted.values())
            unneeded = self._services.keys() - self._needed
            self._reneed(unneeded ^ self._unneeded, unneeded)
        else:
            news = {k for k in rebuilt if k in self._services and k not in self._needed}
            gone = {k for k in rebuilt & self._unneeded if k not in self._services}
            self._reneed((news - self._unneeded) | gone, (self._unneeded | news) - gone)

    def _reneed(self, flipped: Collection[str], unneeded: set[str]) -> None:
        """UNNEEDED is the new set; FLIPPED, the services whose membership changed: placed
        again (served or not)."""
        self._unneeded = unneeded
        for key in flipped:
            if (entry := self._services.get(key)) is not None:
                self._place(key, entry, entry)

    def _follow_guards(self, previous: _Settings | None, settings: _Settings) -> None:
        """A namespace that joined in this build depends on the tables the build changed (its
        view was added to them; with other changes of the same build, in doubt, too)."""
        now = _namespaces(settings.identities)
        for gone in self._guards.keys() - now:
            del self._guards[gone]
        joined = now - (_namespaces(previous.identities) if previous is not None else set())
        changed = frozenset(self._routes_changed)
        for namespace in joined:
            self._guards[namespace] = changed

    # -- what changed -----------------------------------------------------------------------------

    def _recompute_all(self, settings: _Settings, excluded: frozenset[Origin]) -> None:
        self.full_recomputes += 1
        self._touched = None
        self._settings = settings
        self._excluded = excluded
        self._services.clear()
        self._by_pod.clear()
        self._by_namespace.clear()
        self._by_node.clear()
        self._by_vs.clear()
        self._by_host.clear()
        self._owners.clear()
        self._vs_index = traffic.virtual_service_index(settings.store)
        self._outbound.clear()
        self._inbound.clear()
        self._internal = self._originate = self._originate_tls = None
        self._scoped.clear()
        self._restricted.clear()
        self._scopes_seen = None  # every service is looked at again (_follow_scopes)
        self._admitted.clear()
        self._modes.clear()
        self._tls_sockets.clear()
        self._prior_routes = dict(self._base.get(envoy.ROUTE, {}))
        self._base = {type_url: {} for type_url in TYPES}
        self._base_origins.clear()
        self._base_chains.clear()
        self._origins_moved = self._chains_moved = True
        self._served.clear()
        self._dropped.clear()
        self._problems.clear()
        self._chains_changed = True
        store = settings.store
        self._slice_service = {
            key: f"{s.namespace}/{s.service}" for key, s in store.endpoint_slices.items()
        }
        self._shared = [
            (envoy.CLUSTER, original_dst_cluster(PASSTHROUGH, sidecar=settings.sidecar)),
            (
                envoy.CLUSTER,
                original_dst_cluster(INBOUND_PASSTHROUGH, sidecar=settings.sidecar, inbound=True),
            ),
            (envoy.CLUSTER, blackhole_cluster()),
        ]
        if not settings.sidecar:
            self._shared += [
                (envoy.LISTENER, internal.originate_listener()),
                (envoy.LISTENER, internal.originate_tls_listener()),
                (envoy.CLUSTER, internal.internal_cluster(mirror.MIRROR)),
                (envoy.LISTENER, mirror.mirror_listener()),
            ]
        self._order = []
        self._update(set(store.services))
        self._prior_routes = {}

    def _dirty_services(self, changes: set[tuple[str, str]], settings: _Settings) -> set[str]:
        store = settings.store
        root = settings.mesh_config.root_namespace
        client_namespaces = {ns for ns, _ in settings.identities}
        dirty: set[str] = set()
        everything = False  # still walk every change: the slice index must follow them all
        rebuild_index = False
        for kind, key in changes:
            if kind == SERVICE_KIND:
                dirty.add(key)
            elif kind == ENDPOINT_SLICE:
                before = self._slice_service.pop(key, None)
                if before is not None:
                    dirty.add(before)
                if (eps := store.endpoint_slices.get(key)) is not None:
                    self._slice_service[key] = f"{eps.namespace}/{eps.service}"
                    dirty.add(self._slice_service[key])
            elif kind == POD_KIND:
                dirty |= self._by_pod.get(key, set())
            elif kind == NAMESPACE:
                dirty |= self._by_namespace.get(key, set())
            elif kind == NODE:
                # This node's locality ranks every endpoint; another node's, its endpoints.
                everything |= key == store.node_name
                dirty |= self._by_node.get(key, set())
            elif kind == PEER_AUTHENTICATION:  # key: Kind/namespace/name
                namespace = key.split("/")[1]
                everything |= namespace == root
                dirty |= self._by_namespace.get(namespace, set())
            elif kind == DESTINATION_RULE:
                namespace = key.split("/")[1]
                everything |= namespace == root or namespace in client_namespaces
                dirty |= {svc.key for svc in store.services_in(namespace)}
            elif kind == VIRTUAL_SERVICE:
                rebuild_index = True
                dirty |= self._by_vs.get(key, set())  # the services it bound or was named in
                vs = store.istio.get(key)
                if vs is not None:
                    dirty |= _bound_services(store, vs)
            elif kind == MESH_CONFIG:  # the settings differ too: not reached
                everything = True
        if rebuild_index:
            self._vs_index = traffic.virtual_service_index(store)
        if everything:
            return set(store.services) | set(self._services)
        # Routes name other services' clusters (their ports, their DestinationRule's subsets
        # and variants): a changed service changes the routes naming it.
        domain = settings.mesh_config.cluster_domain
        for key in list(dirty):
            namespace, _, name = key.partition("/")
            host = service_entries.host_of(name) or f"{name}.{namespace}.svc.{domain}"
            dirty |= self._by_host.get(host, set())
        return dirty

    def _update(self, dirty: set[str], reuse: bool = False) -> None:
        """Rebuild the DIRTY services' entries (and forget deleted ones), and their part of the
        output. REUSE: only the set of local identities changed for them."""
        assert self._settings is not None
        store = self._settings.store
        added_or_removed = False
        self._rebuilt |= dirty
        for key in dirty:
            old = self._services.pop(key, None)
            if old is not None:
                self._unlink(key, old)
            self._restricted.pop(key, None)
            svc = store.services.get(key)
            before = self._prior_routes if old is None else {_name(*r): r[1] for r in old.routes}
            entry = (
                None if svc is None else self._service_entry(svc, old if reuse else None, before)
            )
            added_or_removed |= (old is None) != (entry is None)
            if old is not None and old.made is not None and entry is not None:
                _keep_equal(entry, old.made)
            self._place(key, old, entry)
            if entry is None:
                continue
            assert svc is not None
            export = svc.export_to
            if entry.targets and export and "*" not in export:  # (none: everywhere)
                host = svc.hostname(self._settings.mesh_config.cluster_domain)
                self._restricted[key] = (svc.namespace, host, export)
            self._services[key] = entry
            for pod in entry.pods:
                self._by_pod.setdefault(pod, set()).add(key)
                self._by_namespace.setdefault(pod.split("/")[0], set()).add(key)
            for node in entry.nodes:
                self._by_node.setdefault(node, set()).add(key)
            for vs in entry.virtual_services:
                self._by_vs.setdefault(vs, set()).add(key)
            for host in entry.hosts:
                self._by_host.setdefault(host, set()).add(key)
            for host in {t.host for t in entry.targets}:
                self._owners.setdefault(host, set()).add(key)
        if added_or_removed or not self._order:
            self._order = sorted(self._services)

    def _place(self, key: str, old: _ServiceEntry | None, new: _ServiceEntry | None) -> None:
        """Swap a service's part of the output: OLD's out, NEW's in (served or dropped). Only
        the names whose object differs are touched (a change costs what it changed)."""
        was_served = key in self._served
        self._modes.pop(key, None)
        self._tls_sockets.pop(key, None)
        touched = self._touched
        built = new is not None and new.made is not None and new.origin not in self._excluded
        served = built and key not in self._unneeded
        before: dict[tuple[str, str], Message] = {}
        chains_before: list[str] = []
        if old is not None:
            if was_served:
                self._served.discard(key)
                assert old.made is not None
                before = {(type_url, name): r for type_url, name, r in old.made}
                chains_before = old.chain_names
            self._problems.pop(old.origin, None)
            if self._dropped.pop(key, None) is not None:
                self._chains_changed = True
        after: dict[tuple[str, str], Message] = {}
        if new is not None and served:
            assert new.made is not None
            after = {(type_url, name): r for type_url, name, r in new.made}
        for type_url, name in before.keys() - after.keys():
            if touched is not None:
                touched.setdefault(type_url, set()).add(name)
            self._base[type_url].pop(name, None)
            if self._base_origins.pop((type_url, name), None) is not None:
                self._origins_moved = True
        for chain in set(chains_before) - set(
            new.chain_names if new is not None and served else ()
        ):
            self._base_chains.pop(chain, None)
            self._chains_moved = True
        if new is not None and served:
            self._served.add(key)
            for (type_url, name), resource in after.items():
                if before.get((type_url, name)) is not resource:
                    if touched is not None:
                        touched.setdefault(type_url, set()).add(name)
                    self._base[type_url][name] = resource
                if self._base_origins.get((type_url, name)) != new.origin:
                    self._base_origins[(type_url, name)] = new.origin
                    self._origins_moved = True
            for chain in new.chain_names:
                if self._base_chains.get(chain) != new.origin:
                    self._base_chains[chain] = new.origin
                    self._chains_moved = True
            if new.modes:
                self._modes[key] = new.modes
            if new.tls_sockets:
                self._tls_sockets[key] = new.tls_sockets
        elif new is not None and not built:
            self._dropped[key] = new.targets
            self._chains_changed = True
            if new.origin not in self._excluded:
                self._problems[new.origin] = new.problem
        was = old.chain_keys if old is not None and was_served else None
        if was != (new.chain_keys if new is not None and served else None):
            self._chains_changed = True

    def _unlink(self, key: str, entry: _ServiceEntry) -> None:
        links = [(self._by_pod, pod) for pod in entry.pods]
        links += [(self._by_namespace, pod.split("/")[0]) for pod in entry.pods]
        links += [(self._by_node, node) for node in entry.nodes]
        links += [(self._by_vs, vs) for vs in entry.virtual_services]
        links += [(self._by_host, host) for host in entry.hosts]
        links += [(self._owners, host) for host in {t.host for t in entry.targets}]
        for index, at in links:
            keys = index.get(at)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[at]

    # -- builders ---------------------------------------------------------------------------------

    def _service_entry(
        self,
        svc: Service,
        reuse: _ServiceEntry | None = None,
        before: Mapping[str, Message] | None = None,
    ) -> _ServiceEntry:
        """SVC's part. REUSE: only the local namespaces changed; keep all but the modes.
        BEFORE: its route tables as they were (by name), kept where their content is equal."""
        assert self._settings is not None
        settings = self._settings
        store = settings.store
        origin = Origin(SERVICE, svc.namespace, svc.name)
        entry = _ServiceEntry(origin, service_targets(svc, settings.mesh_config.cluster_domain))
        endpoints = [endpoint for slice_ in ip_slices(store, svc) for endpoint in slice_.endpoints]
        entry.pods = frozenset(endpoint.pod for endpoint in endpoints if endpoint.pod)
        entry.nodes = frozenset(
            node
            for endpoint in endpoints
            if (node := endpoint.node_name or _pod_node(store, endpoint.pod))
        )
        if origin in self._excluded:
            return entry
        if not self._exported(svc):
            entry.targets, entry.made = [], []  # no local client sees it: nothing to serve
            return entry
        if svc.entry is not None and settings.sidecar and not settings.gateway:
            entry.problem = f"{svc.entry.entry}: not yet translated for proxyModel sidecar"
            return entry
        if (
            svc.entry is not None
            and settings.gateway
            and svc.entry.resolution == service_entries.NONE
        ):
            # A gateway's caller dialled the gateway: there is no original destination.
            entry.problem = f"{svc.entry.entry}: resolution NONE is not served by gateways yet"
            return entry
        try:
            self._service_views(entry)
            self._keep_unchanged_routes(entry, before or {})
            if entry.host_routes:
                # Their tables live on in the port's Host-routing table only: no listener
                # names them, so Envoy would never ask for them.
                own = {_name(envoy.ROUTE, table) for _, _, table in entry.host_routes}
                entry.routes = [r for r in entry.routes if _name(*r) not in own]
            if (
                reuse is not None
                and reuse.made is not None
                and (reuse.modes, reuse.subsets) == (entry.modes, entry.subsets)
            ):
                entry.endpoints, entry.clusters = reuse.endpoints, reuse.clusters
                entry.tls_sockets = reuse.tls_sockets
            else:
                self._service_parts(entry)
        except Exception as e:  # one bad Service must not take the node's config down
            entry.problem = _failed(origin, e)
            return entry
        made = [*entry.endpoints, *entry.clusters, *entry.routes, *entry.listeners]
        entry.made = [(t, _name(t, r), r) for t, r in made]
        entry.chain_names = [t.cluster for t in entry.targets]
        return entry

    def _exported(self, svc: Service) -> bool:
        """A service (ServiceEntry host, or Service with the exportTo annotation) is served
        when its exportTo (default: every namespace, "." its own) reaches a namespace with a
        local pod. The local namespaces it is not exported to get scopes without it
        (_scopes_of)."""
        assert self._settings is not None
        export = svc.export_to
        if not export or "*" in export:
            return True  # (most services: no set of namespaces gathered)
        return any(
            sidecar_scope.exported_to(export, svc.namespace, ns)
            for ns in {ns for ns, _ in self._settings.identities}
        )

    def _service_views(self, entry: _ServiceEntry) -> None:
        """What the service's callers see: DestinationRule modes and subsets, route tables
        and the outbound chains (which carry its VirtualService's TCP routes)."""
        assert self._settings is not None and self._vs_index is not None
        settings = self._settings
        store = settings.store
        clients = settings.classes
        if not settings.sidecar:
            entry.modes = _destination_modes(store, entry.targets, clients)
        entry.subsets = tuple(
            tuple(service_views.port_clusters(store, t, clients)) for t in entry.targets
        )
        used: set[str] = set()
        hosts: set[str] = set()
        keys = []
        for target in entry.targets:
            tcp = None
            named: service_views.PortRoutes | service_views.PortTcpRoute
            if is_http(target.protocol):
                named = service_views.port_routes(
                    store, self._vs_index, target, clients, node=not settings.sidecar
                )
                entry.routes.append((envoy.ROUTE, named.table))
            else:
                named = service_views.port_tcp_route(store, self._vs_index, target, clients)
                tcp = named.route
            used.update(named.virtual_services)
            hosts |= named.hosts
            if port_only(target) and is_http(target.protocol):
                # Reached by its Host header on the port's shared chain (_node_internals).
                if not settings.sidecar:
                    table = entry.routes[-1][1]
                    entry.host_routes.append((target.port.port, target.host, table))
                continue
            if has_vip(target) or port_only(target):
                rules = named.rules if isinstance(named, service_views.PortTcpRoute) else ()
                keys.append((target, (tcp, rules)))
                # The node's chain names the calling pod from filter state; the sidecar's
                # listener makes its own (the same shape, its pod's name).
                if rules and not settings.sidecar:
                    # The caller or the SNI decides: the port's own routes listener does.
                    chain = l4_routes.hop_chain(target)
                    entry.listeners.append(
                        (envoy.LISTENER, l4_routes.routes_listener(target, rules))
                    )
                    entry.listeners.append((envoy.CLUSTER, l4_routes.routes_cluster(target)))
                else:
                    chain = outbound_chain(target, internal.POD_FORMAT, tcp)
                entry.chains.append(envoy.message(envoy.FilterChain, chain))
                if port_only(target) and target.service.allocated_ip:
                    allocated = allocated_chain(chain, target.service.allocated_ip)
                    entry.chains.append(envoy.message(envoy.FilterChain, allocated))
        entry.virtual_services, entry.hosts = frozenset(used), frozenset(hosts)
        entry.chain_keys = tuple(
            (
                t.service.cluster_ip or t.service.allocated_ip,
                t.port.port,
                t.host,
                is_http(t.protocol),
                repr(tcp),
            )
            for t, tcp in keys
        ) + tuple(
            # The table's content too: a VirtualService change of it changes the port's table.
            ("", port, host, True, _digest(table))
            for port, host, table in entry.host_routes
        )

    def _keep_unchanged_routes(self, entry: _ServiceEntry, before: Mapping[str, Message]) -> None:
        """A table equal to the one it replaces stays the very same message (its push is
        skipped); one that differs is noted in ``_routes_changed``."""
        kept: Made = []
        for type_url, table in entry.routes:
            name = _name(type_url, table)
            prior = before.get(name)
            if prior is not None and prior == table:
                table = prior
            elif prior is not None:
                self._routes_changed.add(name)
            kept.append((type_url, table))
        entry.routes = kept

    def _service_parts(self, entry: _ServiceEntry) -> None:
        """Per target: the endpoints and cluster of each of its subsets."""
        assert self._settings is not None
        settings = self._settings
        store = settings.store
        speaks_mtls = _mtls_speaker(store, settings.excluded_namespaces)
        in_mesh = _mesh_member(store, settings.excluded_namespaces)
        # A local caller that a DestinationRule makes send plaintext to this service must not
        # reach its local endpoints with an identity: they keep the normal path (a STRICT one
        # refuses it there, as Istio's sidecar would).
        disabled = any("DISABLE" in modes.values() for modes in entry.modes.values())
        fast = None if disabled else self._fast
        # The proxy is the node: its locality ranks the endpoints for every local pod.
        proxy = store.locality_of(store.node_name)
        proxy_labels = topology_labels(proxy)
        mesh_locality = settings.mesh_config.locality_lb
        for target, subsets in zip(entry.targets, entry.subsets, strict=True):
            # A ServiceEntry host: MESH_EXTERNAL is never sent mTLS nor the fast path.
            se = target.service.entry
            external = se is not None and se.external
            for subset in subsets:
                modes = {ns: m[subset.name] for ns, m in entry.modes.items() if subset.name in m}
                outlier = subset.policy.get("outlierDetection") is not None
                setting = locality.effective(mesh_locality, locality.of_policy(subset.policy))
                balancing = Balancing(proxy, proxy_labels, setting, outlier)
                origination = client_tls.origination(
                    _entry_sans(subset.policy.get("tls"), se),
                    target.host,
                    target.protocol == HTTP2,
                    f"DestinationRule of {subset.name}: tls",
                    workload_selector=bool(subset.credentials_namespace),
                    namespace=subset.credentials_namespace,
                    denied=subset.credentials_denied,
                )
                policy_fields = cluster_fields(
                    subset.policy, target.protocol, mesh_locality=mesh_locality
                )
                if se is not None and se.resolution in (
                    service_entries.DNS,
                    service_entries.DNS_ROUND_ROBIN,
                ):
                    # Envoy resolves the names: no EDS, its TLS socket its own (clusters.py).
                    cluster = dns_cluster(target, subset.name, policy_fields, origination)
                    entry.clusters.append((envoy.CLUSTER, cluster))
                    continue
                if origination is not None and origination.socket is not None:
                    # Its files or Secret come over SDS: a missing one fails only its calls.
                    entry.tls_sockets[str(origination.socket)] = client_tls.transport_socket(
                        origination.setting
                    )
                originate = internal.ORIGINATE if origination is None else internal.ORIGINATE_TLS
                if se is not None and se.resolution == service_entries.NONE:
                    # Where the caller dialled, as a PASSTHROUGH cluster (Istio: ORIGINAL_DST).
                    policy_fields = passthrough_fields(policy_fields)
                    dialled = passthrough.node_assignment(subset.name, False, [], originate)
                    cluster = service_cluster(
                        target, modes, subset.name, policy_fields, origination, dialled
                    )
                    entry.clusters.append((envoy.CLUSTER, cluster))
                    continue
                # PASSTHROUGH: no endpoints, where the caller dialled (passthrough.py), with
                # Istio's all-or-nothing auto mTLS; one inline endpoint on the node.
                passthrough_mtls: bool | None = None
                inline: dict[str, Any] | None = None
                if subset.passthrough:
                    policy_fields = passthrough_fields(policy_fields)
                    passthrough_mtls = passthrough.sends_mtls(store, target, subset, in_mesh)
                    if not settings.sidecar:
                        sans = passthrough.server_sans(store, target)
                        inline = passthrough.node_assignment(
                            subset.name, passthrough_mtls, sans, originate
                        )
                else:
                    # The app terminates TLS: no fast path (it would skip the TLS the rule asks).
                    assignment = load_assignment(
                        store,
                        target,
                        _never if external else speaks_mtls,
                        not settings.sidecar,
                        None if origination is not None or external else fast,
                        cluster=subset.name,
                        labels=subset.labels,
                        balancing=balancing,
                        originate=originate,
                    )
                    entry.endpoints.append((envoy.ENDPOINT, assignment))
                if settings.sidecar:
                    cluster = _sidecar_cluster(
                        store,
                        target,
                        settings.classes[0],
                        settings.identities[0],
                        subset,
                        policy_fields,
                        origination,
                        passthrough_mtls,
                    )
                else:
                    cluster = service_cluster(
                        target, modes, subset.name, policy_fields, origination, inline
                    )
                entry.clusters.append((envoy.CLUSTER, cluster))

    def _pod_part(
        self,
        memos: dict[str, _Memo],
        local: LocalPod,
        inputs: tuple[Any, ...],
        make: Callable[[], Made],
    ) -> _Memo:
        memo = memos.get(local.pod.key)
        if memo is not None and memo.inputs == inputs:
            return memo
        origin = Origin(POD, local.pod.namespace, local.pod.name)
        try:
            memo = _Memo(inputs, make())
        except Exception as e:  # one bad pod must not take the others' listeners down
            memo = _Memo(inputs, None, _failed(origin, e))
        memos[local.pod.key] = memo
        return memo

    # -- the whole --------------------------------------------------------------------------------

    def _assemble(
        self,
        local_pods: Sequence[LocalPod],
        secrets: Sequence[Message],
        excluded: frozenset[Origin],
        inbound_inputs: dict[str, tuple[Any, ...]],
        scoped: Mapping[str, sidecar_scope.Scope | None],
    ) -> Translation:
        """INBOUND_INPUTS: each local pod's ``_inbound_inputs``; SCOPED: its Sidecar scope."""
        assert self._settings is not None
        settings = self._settings
        base = self._base
        # What is added on top of _base (O(pods)): collected first, so that a type whose
        # base and additions did not change is handed out again as the very same map.
        added: dict[str, dict[str, Message]] = {type_url: {} for type_url in base}
        added_origins: dict[tuple[str, str], Origin] = {}
        problems = dict(self._problems)

        def add(type_url: str, resource: Message, origin: Origin | None = None) -> None:
            name = _name(type_url, resource)
            added[type_url][name] = resource
            if origin is not None:
                added_origins[(type_url, name)] = origin

        def holds(type_url: str, name: str) -> bool:
            return name in base[type_url] or name in added[type_url]

        for type_url, resource in self._shared:
            add(type_url, resource)
        if self._chains_changed:
            self._chains_changed = False
            self._served_targets = [
                t for key in self._order if key in self._served for t in self._services[key].targets
            ]
            closed: set[tuple[str, int]] = set()
            if self._dropped:
                served_vips = {(t.service.cluster_ip, t.port.port) for t in self._served_targets}
                closed = {
                    (t.service.cluster_ip, t.port.port)
                    for targets in self._dropped.values()
                    for t in targets
                    if _is_ip(t.service.cluster_ip)
                } - served_vips
            self._closed = sorted(closed)
            chains = (
                tuple(self._services[key].chain_keys for key in self._order if key in self._served),
                tuple(self._closed),
            )
            if chains != self._chains:
                self._chains, self._chains_token = chains, object()
        served, closed_vips = self._served_targets, self._closed
        outbound_policy = settings.mesh_config.outbound_traffic_policy
        if not settings.sidecar:
            made = self._node_internals(local_pods, outbound_policy, scoped)
            for type_url, resource in made:
                add(type_url, resource)

        sidecar = settings.sidecar
        current = {local.pod.key for local in local_pods}
        for memos in (self._outbound, self._inbound):
            for gone in memos.keys() - current:
                del memos[gone]
        for local in sorted(local_pods, key=lambda p: p.pod.key):
            pod = local.pod
            origin = Origin(POD, pod.namespace, pod.name)
            if origin in excluded:
                continue
            scope = scoped.get(pod.key)
            if sidecar:
                policy_now = scope.policy(outbound_policy) if scope else outbound_policy
                outbound = self._pod_part(
                    self._outbound,
                    local,
                    (local, self._chains_token, policy_now, scope, _logs_of(pod.key)),
                    partial(_sidecar_outbound, local, served, closed_vips, policy_now, scope),
                )
            else:
                spiffe = tls.spiffe_id(settings.mesh_config.trust_domain, *local.identity)
                to = scope.name if scope is not None else internal.OUTBOUND_INTERNAL
                traced = self._tracer is not None
                outbound = self._pod_part(
                    self._outbound,
                    local,
                    (local, spiffe, to, _logs_of(pod.key), traced),
                    partial(_pod_outbound, local, spiffe, to, traced),
                )
            inputs = inbound_inputs[pod.key]
            inbound = self._pod_part(
                self._inbound,
                local,
                (*inputs, _logs_of(pod.key)),
                partial(_inbound_resources, *inputs),
            )
            if outbound.made is None or inbound.made is None:
                problems[origin] = outbound.problem or inbound.problem
                continue
            for type_url, resource in [*outbound.made, *inbound.made]:
                name = str(getattr(resource, "name", ""))
                if type_url == envoy.LISTENER:
                    add(type_url, resource, origin)
                elif not holds(type_url, name):  # inbound|<port>||: shared by the pods using it
                    add(type_url, resource)
        trust_domain = settings.mesh_config.trust_domain
        mine = {tls.spiffe_id(trust_domain, *local.identity) for local in local_pods}
        for secret in secrets:
            name = str(getattr(secret, "name", ""))
            own = (
                name == tls.ROOTCA
                or name in mine
                or name.startswith(credentials.SDS_PREFIX)
                or tls_files.is_file_secret(name)
            )
            if sidecar and not own:
                continue  # a sidecar holds its own pod's identity only (and tls material)
            add(envoy.SECRET, secret)
        return self._hand_out(added, added_origins, problems)

    def _hand_out(
        self,
        added: dict[str, dict[str, Message]],
        added_origins: dict[tuple[str, str], Origin],
        problems: dict[Origin, str],
    ) -> Translation:
        """The translation: _base with ADDED on top. A translation handed out is never changed
        afterwards, so a type (or the origins, the chains) that did not change since the last
        one is that one's very map; the others are copies (C speed) of the base."""
        last, touched = self._last_out, self._touched
        last_added = self._last_added
        out: dict[str, dict[str, Message]] = {}
        for type_url, by_name in self._base.items():
            mine = added[type_url]
            previous = last.get(type_url) if last is not None and touched is not None else None
            if (
                previous is not None
                and not (touched or {}).get(type_url)
                and mine.keys() == last_added.get(type_url, {}).keys()
                and all(last_added[type_url][n] is r for n, r in mine.items())
            ):
                out[type_url] = previous
            else:
                out[type_url] = dict(by_name)
                out[type_url].update(mine)
        if self._origins_moved or added_origins != self._last_extra_origins:
            self._last_origins = dict(self._base_origins)
            self._last_origins.update(added_origins)
            self._origins_moved = False
        if self._chains_moved:
            self._last_chains = dict(self._base_chains)
            self._chains_moved = False
        self._last_extra_origins = added_origins
        result = Translation(
            out, self._last_origins, self._last_chains, problems, dict(self._guards)
        )
        if self._settings is not None and not self._settings.sidecar:
            result.tls_sockets = self._wanted_sockets  # what originate-tls must keep for them
        extra = {(type_url, name) for type_url, names in added.items() for name in names}
        self._last_added = added
        self._tell_changes(result, extra)
        return result

    def _tell_changes(self, result: Translation, extra: set[tuple[str, str]]) -> None:
        """RESULT's changes against the translation before: the names _place touched in
        _base, and those added on top of it now or last time whose object differs."""
        before, touched = self._last_out, self._touched
        self._last_out, self._last_extra, last_extra = result.resources, extra, self._last_extra
        if before is None or touched is None:
            return
        changed = {type_url: set(names) for type_url, names in touched.items()}
        out = result.resources
        for type_url, name in extra | last_extra:
            if before.get(type_url, {}).get(name) is not out.get(type_url, {}).get(name):
                changed.setdefault(type_url, set()).add(name)
        result.base, result.changed = before, changed

    def release_sockets(self, held: Collection[str]) -> bool:
        """Envoy holds every cluster of a translation whose service clusters name the
        originate-tls sockets HELD (its ``tls_sockets``): a socket neither they nor the
        clusters of the last build name is dropped from originate-tls at the next build. True
        when one is (push again).

        Make before break: a DestinationRule's tls change renames a service cluster's socket.
        The new originate-tls, which needs no warming, is active at once, while Envoy keeps the
        old service cluster (naming the old socket) until the new one has warmed (its EDS
        response): without the old socket its calls would meet the refusing one."""
        gone = self._kept_sockets.keys() - self._wanted_sockets - set(held)
        for name in gone:
            del self._kept_sockets[name]
        return bool(gone)

    def _host_routes(self, scope: sidecar_scope.Scope | None) -> tuple[HostRoute, ...]:
        """The served ServiceEntry hosts without addresses on HTTP ports (those SCOPE admits):
        gathered again only when the served chains changed (their chain keys carry them), and
        few, so their inputs are compared by value."""
        token, found = self._host_routes_memo
        if token is not self._chains_token:
            found = tuple(
                (key.partition("/")[0], route)
                for key in self._order
                if key in self._served
                for route in self._services[key].host_routes
            )
            self._host_routes_memo = (self._chains_token, found)
        return tuple(
            route
            for namespace, route in found
            if scope is None or scope.admits(namespace, route[1], route[0])
        )

    def _black_holes(self) -> list[envoy.FilterChain]:
        return [
            envoy.message(envoy.FilterChain, blackhole_chain(ip, port, internal.POD_FORMAT))
            for ip, port in self._closed
        ]

    def _scope_internals(
        self, scopes: Collection[sidecar_scope.Scope], outbound_policy: str
    ) -> Made:
        """Each Sidecar scope's internal listener (the served chains it admits, black holes,
        its own fallback) and the cluster pods' listeners reach it by: rebuilt only when the
        served chains or the scope itself change."""
        made: Made = []
        wanted = {scope.name: scope for scope in scopes}
        for gone in self._scoped.keys() - wanted.keys():
            del self._scoped[gone]
        for name, scope in sorted(wanted.items()):
            policy_now = scope.policy(outbound_policy)
            host_routes = self._host_routes(scope)
            inputs: tuple[Any, ...] = (
                self._chains_token,
                scope,
                policy_now,
                host_routes,
                self._tracer,
            )
            memo = self._scoped.get(name)
            if memo is None or memo.inputs != inputs:
                chains = [
                    chain
                    for key in self._order
                    if key in self._served
                    for target, chain in _target_chains(self._services[key])
                    if _admits(scope, target)
                ]
                by_host, tables = _host_routing(host_routes, policy_now, name)
                chains = _distinct(chains + by_host) + self._black_holes()
                listener = outbound_internal_listener(chains, policy_now, name)
                if self._tracer is not None:
                    tracing.trace_outbound(listener, self._tracer)
                # The cluster depends on the name alone: kept (not pushed again).
                cluster = memo.made[1][1] if memo is not None and memo.made else None
                if cluster is None:
                    cluster = internal.internal_cluster(name)
                memo = _Memo(
                    inputs, [(envoy.LISTENER, listener), (envoy.CLUSTER, cluster), *tables]
                )
                self._scoped[name] = memo
            assert memo.made is not None
            made += memo.made
        return made

    def _node_internals(
        self,
        local_pods: Sequence[LocalPod],
        outbound_policy: str,
        scoped: Mapping[str, sidecar_scope.Scope | None],
    ) -> Made:
        """outbound-internal (every served chain, black holes for the closed VIP:ports), only
        while a local pod (or none at all) is outside every Sidecar scope, the scopes' own, and
        originate-mtls (the local identities, and the DestinationRule modes binding them)."""
        assert self._settings is not None
        made: Made = []
        scopes = {scope for scope in scoped.values() if scope is not None}
        if not local_pods or any(scoped.get(local.pod.key) is None for local in local_pods):
            host_routes = self._host_routes(None)
            inputs: tuple[Any, ...] = (
                self._chains_token,
                outbound_policy,
                host_routes,
                self._tracer,
            )
            if self._internal is None or self._internal.inputs != inputs:
                chains = [
                    c
                    for key in self._order
                    if key in self._served
                    for c in self._services[key].chains
                ]
                by_host, tables = _host_routing(host_routes, outbound_policy, "")
                listener = outbound_internal_listener(
                    _distinct(chains + by_host) + self._black_holes(), outbound_policy
                )
                if self._tracer is not None:
                    tracing.trace_outbound(listener, self._tracer)
                cluster = internal.internal_cluster(internal.OUTBOUND_INTERNAL)
                self._internal = _Memo(
                    inputs, [(envoy.LISTENER, listener), (envoy.CLUSTER, cluster), *tables]
                )
            assert self._internal.made is not None
            made += self._internal.made
        made += self._scope_internals(scopes, outbound_policy)
        for name in sorted(self._collectors):
            collector = tracing.collector_cluster(self._settings.store, self._collectors[name])
            made.append((envoy.CLUSTER, collector))
        trust_domain = self._settings.mesh_config.trust_domain
        identities = sorted({local.identity for local in local_pods})
        overrides = {
            tls.spiffe_id(trust_domain, *identity): {
                cluster: mode
                for modes in self._modes.values()
                for cluster, mode in modes.get(identity[0], {}).items()
            }
            for identity in identities
        }
        frozen = tuple(sorted((who, tuple(sorted(m.items()))) for who, m in overrides.items()))
        if self._originate is None or self._originate.inputs != (frozen, trust_domain):
            cluster = internal.originate_cluster(
                sorted(overrides), overrides, trust_domain, upstream_bind()
            )
            self._originate = _Memo((frozen, trust_domain), [(envoy.CLUSTER, cluster)])
        # Sockets are named by their content: the same names are the same cluster.
        sockets = {
            name: socket
            for by_name in self._tls_sockets.values()
            for name, socket in by_name.items()
        }
        self._wanted_sockets = frozenset(sockets)
        self._kept_sockets.update(sockets)
        names = tuple(sorted(self._kept_sockets))
        if self._originate_tls is None or self._originate_tls.inputs != names:
            tls_cluster = internal.originate_tls_cluster(self._kept_sockets, upstream_bind())
            self._originate_tls = _Memo(names, [(envoy.CLUSTER, tls_cluster)])
        assert self._originate.made is not None and self._originate_tls.made is not None
        return [*made, *self._originate.made, *self._originate_tls.made]


def _keep_equal(entry: _ServiceEntry, before: list[tuple[str, str, Message]]) -> None:
    """ENTRY's endpoints, clusters and listeners that equal what it replaces (BEFORE, by type
    and name) stay the very same messages: a change of its routes alone (a VirtualService)
    then changes nothing else, and the push, the snapshot and its check skip the rest."""
    prior = {(type_url, name): resource for type_url, name, resource in before}
    if not prior or entry.made is None:
        return

    def kept(parts: Made) -> Made:
        out: Made = []
        for type_url, resource in parts:
            old = prior.get((type_url, _name(type_url, resource)))
            out.append((type_url, old if old is not None and old == resource else resource))
        return out

    entry.endpoints = kept(entry.endpoints)
    entry.clusters = kept(entry.clusters)
    entry.listeners = kept(entry.listeners)
    made = [*entry.endpoints, *entry.clusters, *entry.routes, *entry.listeners]
    entry.made = [(t, _name(t, r), r) for t, r in made]


def _bound_services(store: MeshStore, vs: IstioResource) -> set[str]:
    """Keys of the services whose hostname one of VS's hosts names (a wildcard: scanned)."""
    domain = store.mesh_config.cluster_domain
    found: set[str] = set()
    for host in traffic.vs_hosts(vs, domain):
        if host.startswith("*"):
            found |= {
                key for key, svc in store.services.items() if host_match(host, svc.hostname(domain))
            }
        elif (svc := service_views.service_of_host(store, host)) is not None:
            found.add(svc.key)
    return found


def _pod_node(store: MeshStore, pod_key: str) -> str:
    pod = store.pods.get(pod_key) if pod_key else None
    return pod.node_name if pod is not None else ""


def _namespaces(identities: Sequence[Identity]) -> set[str]:
    return {namespace for namespace, _ in identities}


def client_classes(
    store: MeshStore, local_pods: Sequence[LocalPod]
) -> list[service_views.ClientClass]:
    """The local pods' client classes: groups, never one per pod (docs/o1-config.md)."""
    return sorted(
        {
            service_views.ClientClass(
                local.pod.namespace,
                policy.selector_labels(store, local.pod.namespace, local.pod.labels),
                secret_access.unauthorized(store, local.pod),
            )
            for local in local_pods
        }
    )


def _destination_modes(
    store: MeshStore,
    targets: Sequence[ServiceTarget],
    clients: Sequence[service_views.ClientClass],
) -> dict[str, dict[str, str]]:
    """Local client namespace -> cluster (a subset's, a variant's) -> the DestinationRule
    tls.mode that binds it there (DISABLE or ISTIO_MUTUAL; nothing where Istio's auto mTLS
    decides). A cluster's name says its rule and subset, so one mode per name: the classes of
    a namespace share its map, each naming only its own variant's clusters."""
    modes: dict[str, dict[str, str]] = {}
    for client in clients:
        for target in targets:
            suffix, rule = service_views.rule_variant(store, client, target.service)
            spec = rule.spec if rule is not None else {}
            port = target.port.port
            names = {"": target.cluster + suffix}
            for subset in spec.get("subsets") or []:
                name = str(subset.get("name", ""))
                names[name] = outbound_cluster(port, target.host, name) + suffix
            for subset, cluster in names.items():
                mode = policy.rule_tls_mode(spec, port, subset)
                if mode in ("DISABLE", "ISTIO_MUTUAL"):
                    modes.setdefault(client.namespace, {})[cluster] = mode
    return modes


def _name(type_url: str, resource: Message) -> str:
    # ClusterLoadAssignments are named by their cluster; the other types have a name.
    return str(getattr(resource, "cluster_name" if type_url == envoy.ENDPOINT else "name"))


def _failed(origin: Origin, error: Exception) -> str:
    why = f"{type(error).__name__}: {error}"
    log.error("%s left out of the node's Envoy config: %s", origin, why)
    return why


def _digest(table: Message) -> str:
    return hashlib.sha256(table.SerializeToString(deterministic=True)).hexdigest()[:16]


def _distinct(chains: list[envoy.FilterChain]) -> list[envoy.FilterChain]:
    """CHAINS without the port-only ones whose port an earlier one has (Envoy refuses a
    listener with two equal matches): two ServiceEntry hosts without addresses on one TCP port,
    which Istio says "must not be shared"; the first, in service key order, keeps it. Chains
    with prefixes stay as they are: two services on one VIP:port is a clash Envoy rejects, and
    the later service is left out and reported (proxy.py)."""
    seen: set[int] = set()
    kept = []
    for chain in chains:
        match = chain.filter_chain_match
        if not match.prefix_ranges:
            port = match.destination_port.value
            if port in seen:
                continue
            seen.add(port)
        kept.append(chain)
    return kept


def _never(pod_key: str, port: int) -> bool:
    """A MESH_EXTERNAL ServiceEntry's endpoints speak no mTLS, whatever they are."""
    return False


def _entry_sans(tls_policy: Any, se: EntryPolicy | None) -> Any:
    """A DestinationRule's SIMPLE/MUTUAL TLS to a ServiceEntry host checks the entry's
    subjectAltNames when the rule names none ("the proxy will verify that the server
    certificate's subject alternate name matches one of the specified values",
    istio.io/latest/docs/reference/config/networking/service-entry/)."""
    if (
        se is None
        or not se.subject_alt_names
        or not isinstance(tls_policy, Mapping)
        or tls_policy.get("subjectAltNames")
    ):
        return tls_policy
    return {**tls_policy, "subjectAltNames": list(se.subject_alt_names)}


def _mesh_member(store: MeshStore, excluded_namespaces: Sequence[str]) -> Callable[[str], bool]:
    def in_mesh(pod_key: str) -> bool:
        """A pod of the mesh (Istio: one with a sidecar, labelled tlsMode istio)."""
        pod = store.pods.get(pod_key)
        if pod is None:
            return False
        namespace = store.namespaces.get(pod.namespace)
        return decide(pod, namespace, excluded_namespaces).in_mesh

    return in_mesh


def _mtls_speaker(
    store: MeshStore, excluded_namespaces: Sequence[str]
) -> Callable[[str, int], bool]:
    def speaks_mtls(pod_key: str, port: int) -> bool:
        """A mesh pod whose peer authentication accepts mTLS on PORT."""
        pod = store.pods.get(pod_key)
        if pod is None:
            return False
        namespace = store.namespaces.get(pod.namespace)
        if not decide(pod, namespace, excluded_namespaces).in_mesh:
            return False
        return policy.effective_mtls(store, pod.namespace, pod.labels, port) != "DISABLE"

    return speaks_mtls


def _sidecar_cluster(
    store: MeshStore,
    target: ServiceTarget,
    client: service_views.ClientClass,
    identity: Identity,
    subset: service_views.SubsetCluster,
    policy_fields: dict[str, Any] | None = None,
    origination: client_tls.Origination | None = None,
    passthrough_mtls: bool | None = None,
) -> envoy.Cluster:
    """The sidecar form's cluster: its pod presents its identity itself, to the SANs of the
    service's pods, in the TLS mode the DestinationRule its pod (CLIENT) sees may set for the
    SUBSET (ORIGINATION: SIMPLE/MUTUAL, see client_tls.py). PASSTHROUGH_MTLS: a PASSTHROUGH
    cluster's auto mTLS (passthrough.sends_mtls), all or nothing, when no rule sets a mode."""
    trust_domain = store.mesh_config.trust_domain
    sans = passthrough.server_sans(store, target)
    mode = policy.destination_tls_mode(
        store,
        client.namespace,
        target.service,
        target.port.port,
        subset.subset,
        dict(client.selected),
    )
    if mode is None and passthrough_mtls is not None:
        mode = "ISTIO_MUTUAL" if passthrough_mtls else "DISABLE"
    me = tls.spiffe_id(trust_domain, *identity)
    return sidecar_service_cluster(target, me, sans, mode, subset.name, policy_fields, origination)


def _logs_of(pod_key: str) -> tuple[Any, ...]:
    """What a local pod's own listeners log (access_logs.py): part of their memo's inputs."""
    plan = access_logs.active()
    if plan is None:
        return ()
    return (plan.pods.get(pod_key), plan.metrics.get(pod_key), plan.stamp(pod_key))


def _pod_outbound(local: LocalPod, spiffe: str, to: str, traced: bool = False) -> Made:
    """TRACED: the pod's listener stamps its span tags too (translate/tracing.py)."""
    plan = access_logs.active()
    log_class = plan.stamp(local.pod.key) if plan is not None else ""
    stamp = tracing.stamp(local.pod) if traced else []
    listener = pod_outbound_listener(
        local.pod, local.netns, spiffe, to, log_class=log_class, stamp=stamp
    )
    return [(envoy.LISTENER, listener)]


def _admits(scope: sidecar_scope.Scope, target: ServiceTarget) -> bool:
    return scope.admits(target.service.namespace, target.host, target.port.port)


def _target_chains(entry: _ServiceEntry) -> list[tuple[ServiceTarget, envoy.FilterChain]]:
    """ENTRY's outbound chains with the target each is for (one per target with a VIP, or a
    ServiceEntry host's TCP port without addresses)."""
    with_chain = [
        t for t in entry.targets if has_vip(t) or (port_only(t) and not is_http(t.protocol))
    ]
    return list(zip(with_chain, entry.chains, strict=True))


def _host_routing(
    host_routes: Sequence[HostRoute], outbound_policy: str, scope: str
) -> tuple[list[envoy.FilterChain], Made]:
    """The Host-routing chain and route table of each port of HOST_ROUTES (listeners.py
    host_routing_chain), named ``<port>`` (``<port>~<scope>`` for a Sidecar scope's)."""
    by_port: dict[int, list[tuple[str, envoy.RouteConfiguration]]] = {}
    for port, host, table in host_routes:
        by_port.setdefault(port, []).append((host, table))
    suffix = f"~{scope}" if scope else ""
    chains = [
        envoy.message(
            envoy.FilterChain, host_routing_chain(port, internal.POD_FORMAT, f"{port}{suffix}")
        )
        for port in sorted(by_port)
    ]
    tables: Made = [
        (envoy.ROUTE, host_routing_table(port, hosts, outbound_policy, f"{port}{suffix}"))
        for port, hosts in sorted(by_port.items())
    ]
    return chains, tables


def _sidecar_outbound(
    local: LocalPod,
    served: Sequence[ServiceTarget],
    closed: Sequence[tuple[str, int]],
    outbound_policy: str,
    scope: sidecar_scope.Scope | None = None,
) -> Made:
    """The sidecar's outbound listener: a chain per served VIP:port in its SCOPE, black holes
    for closed."""
    pod = local.pod
    extra = [blackhole_chain(ip, port, pod.key) for ip, port in closed]
    if scope is not None:
        served = [target for target in served if _admits(scope, target)]
    return [(envoy.LISTENER, outbound_listener(pod, served, outbound_policy, extra))]


def _server_tracer(inputs: tuple[Any, ...]) -> tracing.Tracer | None:
    """The tracer among a pod's ``_inbound_inputs`` (their last but one)."""
    tracer: tracing.Tracer | None = inputs[-2]
    return tracer


def _inbound_inputs(
    store: MeshStore, local: LocalPod, sidecar: bool, traced: bool = False
) -> tuple[Any, ...]:
    """What a local pod's inbound side is made of (compared to tell whether to rebuild it)."""
    pod = local.pod
    protocols = inbound_ports_of(store, dict(pod.labels), pod.namespace)
    peer = policy.peer_policy(store, pod.namespace, pod.labels)
    ports = {port: (protocols[port], peer.mode_for(port)) for port in protocols}
    me = tls.spiffe_id(store.mesh_config.trust_domain, *local.identity)
    # Compared, not hashed: JSON is the cheap exact form of the filters' config.
    authn = json.dumps(jwt.inbound_filters(store, pod), sort_keys=True)
    pod_authz = authz.policies_for(store, pod, sidecar)
    services = tuple(sorted(inbound_services_of(store, dict(pod.labels), pod.namespace).items()))
    tracer = tracing.server_tracer(store, pod)[0] if traced else None
    hosts = tuple(sorted(tracing.inbound_hosts(store, pod).items())) if tracer else ()
    return (local, ports, peer.mode, me, sidecar, pod_authz, authn, services, tracer, hosts)


def _inbound_resources(
    local: LocalPod,
    ports: dict[int, tuple[str, str]],
    default_mode: str,
    me: str,
    sidecar: bool,
    pod_authz: authz.PodAuthz,
    authn_json: str = "[]",
    services: tuple[tuple[int, tuple[str, str, str]], ...] = (),
    tracer: tracing.Tracer | None = None,
    hosts: tuple[tuple[int, str], ...] = (),
) -> Made:
    """A local pod's inbound listener, on the node its fast-path listener too, and the inbound
    clusters and routes of its HTTP ports. POD_AUTHZ: its AuthorizationPolicies; AUTHN_JSON: its
    RequestAuthentication HTTP filters (JSON list); SERVICES: port -> the service Istio's metrics
    name for it (services.inbound_services_of), none in the sidecar form."""
    netns = "" if sidecar else local.netns
    pod = local.pod
    authn = json.loads(authn_json)
    named = (
        None
        if sidecar
        else {port: istio_stats.cluster_metadata(*service) for port, service in services}
    )
    inbound = inbound_listener(pod, netns, ports, default_mode, me, pod_authz, authn, named)
    fast = (
        None if sidecar else fast_inbound_listener(pod, netns, ports, me, pod_authz, authn, named)
    )
    if tracer is not None:  # its spans, named and tagged as its own (translate/tracing.py)
        for listener in (inbound, fast):
            if listener is not None:
                tracing.trace_inbound(listener, tracer, pod, dict(hosts))
    made: Made = [(envoy.LISTENER, inbound)]
    if fast is not None:
        made.append((envoy.LISTENER, fast))
    custom = pod_authz.custom
    if not sidecar and custom is not None and custom.provider is not None:
        # The cluster its ext_authz filter calls, and the listener behind it (extauthz.py).
        listener, cluster = extauthz.check_resources(pod, netns, me, pod.labels, custom)
        made += [(envoy.LISTENER, listener), (envoy.CLUSTER, cluster)]
    for port, (protocol, _) in ports.items():
        if is_http(protocol):
            cluster = original_dst_cluster(
                inbound_cluster(port), protocol == HTTP2, sidecar=sidecar, inbound=True
            )
            made.append((envoy.CLUSTER, cluster))
            made.append((envoy.ROUTE, inbound_route(port)))
            if fast is not None:
                made.append((envoy.ROUTE, inbound_route(port, fast=True)))
    return made


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
