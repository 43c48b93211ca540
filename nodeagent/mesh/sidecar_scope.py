"""Which services a local pod's outbound reaches under Istio's ``Sidecar`` resource (pure).

As istiod builds a ``SidecarScope`` (istio/istio pilot/pkg/model/sidecar.go
``ConvertToSidecarScope``, ``selectServices``, ``matchingService``, ``needsPortMatch``;
reference page istio.io/latest/docs/reference/config/networking/sidecar/):

- Which Sidecar applies to a pod: of its namespace's Sidecars (oldest first), the first whose
  ``workloadSelector`` selects the pod, else the first without a selector, else the first
  Sidecar without a selector in the mesh's root namespace (the mesh-wide default). None: the
  pod sees every service (Istio's default scope, ``*/*``). A root namespace Sidecar with a
  selector applies in the root namespace only.
- ``egress[].hosts`` entries are ``namespace/dnsName``: namespace ``*`` (any), ``.`` (the
  pod's own namespace, also for the root namespace default, which istiod copies per namespace)
  or ``~`` (none); dnsName ``*``, ``*.suffix`` or an exact FQDN. A service of namespace N is
  checked against the entries naming N when there are any, and only otherwise against ``*/``
  entries (selectServices).
- An egress listener with a ``port`` imports only that port of the services it names (an
  ``HTTP_PROXY`` port does not restrict).
- The services a VirtualService in scope (one of its hosts imported, exported to the pod's
  namespace, bound to ``mesh``) routes to are in scope too ("Infer more possible destinations
  from virtual services").
- ``outboundTrafficPolicy.mode`` overrides the mesh config's for the pods it applies to.

A scope also leaves out the hosts not exported to its client namespace (``HIDDEN``: a
ServiceEntry's ``exportTo``, istio.io/latest/docs/reference/config/networking/service-entry/
#ServiceEntry-export_to; istiod's ``SidecarScope`` holds only services visible to the
namespace, pilot/pkg/model/push_context.go ``servicesExportedToNamespace``). A namespace without
a Sidecar that cannot see some host gets a scope of its own too (``visibility_scope``: every
host, ``*/*``, but those), so pods of one namespace share it and namespaces seeing every host
keep the node's ``outbound-internal``.

Not enforced yet (mesh/enforcement.py says so): egress ``bind``, ``captureMode`` and
``port`` as a listener of its own (the node's capture already sends every destination to the
pod's listener; the port only trims imported services), ``ingress[]``,
``inboundConnectionPool``, ``outboundTrafficPolicy.egressProxy``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh import traffic
from nodeagent.mesh.hosts import host_match, qualify
from nodeagent.mesh.model import ALLOW_ANY, REGISTRY_ONLY, IstioResource
from nodeagent.mesh.policy import creation_order
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.mesh.sidecar_scope")

SIDECAR = "Sidecar"
_POLICIES = frozenset({ALLOW_ANY, REGISTRY_ONLY})
_HTTP_PROXY = "HTTP_PROXY"


@dataclass(frozen=True)
class EgressListener:
    """One ``egress[]`` entry: PORT (None: every port) and HOSTS, (namespace, dnsName) pairs
    with ``.`` already resolved to the client namespace."""

    port: int | None
    hosts: tuple[tuple[str, str], ...]

    def imports(self, namespace: str, hostname: str, port: int) -> bool:
        """Whether the service port PORT of HOSTNAME in NAMESPACE is imported."""
        if self.port is not None and self.port != port:
            return False
        mine = [h for ns, h in self.hosts if ns == namespace]
        patterns = mine if mine else [h for ns, h in self.hosts if ns == "*"]
        return any(host_match(pattern, hostname) is not None for pattern in patterns)


@dataclass(frozen=True)
class Scope:
    """What the pods under one Sidecar in one client NAMESPACE reach: the services their EGRESS
    listeners import, those ROUTED_HOSTS names (VirtualService destinations in scope), and, for
    anything else, OUTBOUND_POLICY ("": the mesh config's)."""

    sidecar: str  # namespace/name of the Sidecar
    namespace: str  # the client namespace (a root namespace default applies in many)
    egress: tuple[EgressListener, ...]
    routed_hosts: frozenset[str] = frozenset()
    outbound_policy: str = ""
    # (namespace, hostname) of the services not exported to NAMESPACE: never in scope.
    hidden: frozenset[tuple[str, str]] = frozenset()

    @property
    def name(self) -> str:
        """The scope's internal listener (and cluster): ``outbound-internal/<client ns>/<sidecar
        ns>/<sidecar name>``, or ``outbound-internal/<client ns>`` without a Sidecar."""
        if not self.sidecar:
            return f"outbound-internal/{self.namespace}"
        return f"outbound-internal/{self.namespace}/{self.sidecar}"

    def admits(self, namespace: str, hostname: str, port: int) -> bool:
        """Whether port PORT of the service HOSTNAME of NAMESPACE is in scope."""
        if self.hidden and (namespace, hostname) in self.hidden:
            return False
        if hostname in self.routed_hosts:
            return True
        return any(listener.imports(namespace, hostname, port) for listener in self.egress)

    def admits_host(self, namespace: str, hostname: str, ports: Iterable[int]) -> bool:
        """Whether some port of the service HOSTNAME of NAMESPACE (PORTS; none: any) is in
        scope: istiod's scope holds the service then (what its DNS name table is built from)."""
        if self.hidden and (namespace, hostname) in self.hidden:
            return False
        if hostname in self.routed_hosts:
            return True
        numbers = list(ports)
        return any(
            listener.imports(namespace, hostname, port)
            for listener in self.egress
            for port in (numbers or [listener.port or 0])
        )

    def policy(self, mesh_policy: str) -> str:
        return self.outbound_policy or mesh_policy


EVERY_HOST = (EgressListener(None, (("*", "*"),)),)


def visibility_scope(namespace: str, hidden: frozenset[tuple[str, str]]) -> Scope:
    """The scope of pods of NAMESPACE under no Sidecar that cannot see the HIDDEN services."""
    return Scope("", namespace, EVERY_HOST, hidden=hidden)


def exported_to(export_to: Iterable[str], own: str, client: str) -> bool:
    """Whether a service of namespace OWN with EXPORT_TO (empty: everywhere) is visible to
    CLIENT: ``*`` every namespace, ``.`` its own, ``~`` none, else those named (Istio's
    exportTo, istio.io/latest/docs/reference/config/networking/service-entry/
    #ServiceEntry-export_to)."""
    to = set(export_to)
    if not to or "*" in to:
        return True
    return client in to or ("." in to and client == own)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def selector(sidecar: IstioResource) -> Mapping[str, Any]:
    """SIDECAR's workloadSelector labels (empty: none, the namespace-wide kind)."""
    return _mapping(_mapping(sidecar.spec.get("workloadSelector")).get("labels"))


def selects(sidecar: IstioResource, labels: Mapping[str, str]) -> bool:
    """Whether SIDECAR's workloadSelector selects a pod with LABELS."""
    return all(labels.get(str(k)) == str(v) for k, v in selector(sidecar).items())


def sidecar_for(
    store: MeshStore, namespace: str, labels: Mapping[str, str]
) -> IstioResource | None:
    """The Sidecar that applies to a pod of NAMESPACE with LABELS (see the module docstring)."""
    own = sorted(store.istio_in(SIDECAR, namespace), key=creation_order)
    for sidecar in own:
        if selector(sidecar) and selects(sidecar, labels):
            return sidecar
    for sidecar in own:
        if not selector(sidecar):
            return sidecar
    root = store.mesh_config.root_namespace
    if root != namespace:
        for sidecar in sorted(store.istio_in(SIDECAR, root), key=creation_order):
            if not selector(sidecar):
                return sidecar
    return None


def egress_listeners(sidecar: IstioResource, namespace: str) -> tuple[EgressListener, ...]:
    """SIDECAR's egress listeners as they apply in the client NAMESPACE. No egress at all:
    one catch-all ``*/*`` (istiod's). A host without a ``/`` is skipped (istiod logs it and
    skips it too; Istio's validation refuses it)."""
    where = f"Sidecar {sidecar.namespace}/{sidecar.name}"
    raw = sidecar.spec.get("egress")
    entries = [e for e in raw if isinstance(e, Mapping)] if isinstance(raw, list) else []
    if not entries:
        return EVERY_HOST
    out = []
    for i, entry in enumerate(entries):
        hosts = []
        for j, text in enumerate(entry.get("hosts") or []):
            ns, slash, dns = str(text).partition("/")
            if not slash or not ns or not dns:
                log.warning(
                    "%s: egress[%d].hosts[%d] %r is not namespace/dnsName: skipped",
                    where,
                    i,
                    j,
                    text,
                )
                continue
            hosts.append((namespace if ns == "." else ns, dns))
        port_spec = _mapping(entry.get("port"))
        number = port_spec.get("number")
        proxy = str(port_spec.get("protocol", "")).upper() == _HTTP_PROXY
        port = number if isinstance(number, int) and number > 0 and not proxy else None
        out.append(EgressListener(port, tuple(hosts)))
    return tuple(out)


def _outbound_policy(sidecar: IstioResource) -> str:
    mode = str(_mapping(sidecar.spec.get("outboundTrafficPolicy")).get("mode", "")).upper()
    return mode if mode in _POLICIES else ""


def _routed_hosts(
    store: MeshStore, namespace: str, egress: Iterable[EgressListener]
) -> frozenset[str]:
    """Destination hosts of the VirtualServices in scope: bound to ``mesh``, exported to
    NAMESPACE, one of their hosts imported by an egress listener (by the VirtualService's
    namespace, as istiod's SelectVirtualServices)."""
    domain = store.mesh_config.cluster_domain
    found: set[str] = set()
    for vs in store.istio_of_kind(traffic.VIRTUAL_SERVICE):
        if not traffic.for_mesh(vs) or not traffic.visible(vs, namespace):
            continue
        hosts = traffic.vs_hosts(vs, domain)
        if not any(
            _imports_host(listener, vs.namespace, host) for listener in egress for host in hosts
        ):
            continue
        for kind in ("http", "tcp", "tls"):
            for rule in vs.spec.get(kind) or []:
                for route in _mapping(rule).get("route") or []:
                    destination = _mapping(_mapping(route).get("destination"))
                    if destination.get("host"):
                        found.add(qualify(str(destination["host"]), vs.namespace, domain))
    return frozenset(found)


def _imports_host(listener: EgressListener, namespace: str, host: str) -> bool:
    """A VirtualService host against an egress listener's hosts (either may be a wildcard)."""
    mine = [h for ns, h in listener.hosts if ns == namespace]
    patterns = mine if mine else [h for ns, h in listener.hosts if ns == "*"]
    return any(
        host_match(pattern, host) is not None or host_match(host, pattern) is not None
        for pattern in patterns
    )


def scope_of(store: MeshStore, sidecar: IstioResource, namespace: str) -> Scope:
    """SIDECAR's scope for client pods of NAMESPACE."""
    egress = egress_listeners(sidecar, namespace)
    return Scope(
        f"{sidecar.namespace}/{sidecar.name}",
        namespace,
        egress,
        _routed_hosts(store, namespace, egress),
        _outbound_policy(sidecar),
    )


# (client namespace, Sidecar key) -> (the token it was made under, the Sidecar, its scope)
Memo = dict[tuple[str, str], tuple[object, IstioResource, Scope]]


class Scopes:
    """The scopes of one translation's local pods, each computed once per (client namespace,
    Sidecar), whatever the number of pods. MEMO: scopes made before, reused when made under
    the same TOKEN (an object that changes whenever a VirtualService does) from an equal
    Sidecar."""

    def __init__(self, store: MeshStore, memo: Memo | None = None, token: object = None) -> None:
        self.store = store
        self.memo = memo if memo is not None else {}
        self.token = token
        self._made: dict[tuple[str, str], Scope] = {}
        self._sidecars: dict[tuple[str, str], IstioResource] = {}

    def of_pod(self, namespace: str, labels: Mapping[str, str]) -> Scope | None:
        sidecar = sidecar_for(self.store, namespace, labels)
        if sidecar is None:
            return None
        key = (namespace, sidecar.key)
        scope = self._made.get(key)
        if scope is None:
            hit = self.memo.get(key)
            reusable = hit is not None and self.token is not None and hit[0] is self.token
            if hit is not None and reusable and hit[1] == sidecar:
                scope = hit[2]
            else:
                scope = scope_of(self.store, sidecar, namespace)
            self._made[key], self._sidecars[key] = scope, sidecar
        return scope

    def memo_used(self) -> Memo:
        """The scopes made or reused here, for the next translation's MEMO."""
        return {k: (self.token, self._sidecars[k], scope) for k, scope in self._made.items()}
