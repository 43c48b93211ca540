"""Which VirtualService a calling pod's namespace uses for a service (pure).

As Istio builds a sidecar's outbound routes (istio/istio pilot/pkg/networking/core/
route/route.go ``BuildSidecarOutboundVirtualHosts``; reference page
istio.io/latest/docs/reference/config/networking/virtual-service/):

- a VirtualService applies to sidecars when its ``gateways`` is empty or names ``mesh``;
- it is visible to a namespace by ``exportTo`` (absent: everywhere, MeshConfig's default
  ``defaultVirtualServiceExportTo: ["*"]``; ``.``: its own namespace; ``~``: nowhere);
- a short host is qualified with the VirtualService's namespace (``reviews`` in ``default`` is
  ``reviews.default.svc.cluster.local``); a name with a dot, an IP, and ``*`` are taken as they
  are (pilot/pkg/model/config.go ``ResolveShortnameToFQDN``);
- a service's hostname is bound by an exact host, else by the most specific wildcard
  (``*.default.svc.cluster.local`` over ``*``), as Envoy picks the virtual host by the most
  specific domain;
- several VirtualServices binding one host: the oldest wins (by creation time, then name, then
  namespace), the others are dropped for that host, as ``BuildSidecarOutboundVirtualHosts``
  drops a duplicate virtual host (the sidecar does not merge them; only gateways do).

A delegate VirtualService (no ``hosts``) binds nothing by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeagent.mesh.hosts import host_match, qualify
from nodeagent.mesh.model import IstioResource, Service
from nodeagent.mesh.policy import creation_order
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.mesh.traffic")

VIRTUAL_SERVICE = "VirtualService"
MESH_GATEWAY = "mesh"


def for_mesh(vs: IstioResource) -> bool:
    """Whether VS applies to sidecars (and so to the node's pods)."""
    gateways = vs.spec.get("gateways") or []
    return not gateways or MESH_GATEWAY in gateways


def export_to(res: IstioResource) -> frozenset[str]:
    raw = res.spec.get("exportTo")
    return frozenset(str(ns) for ns in raw) if isinstance(raw, list) and raw else frozenset("*")


def visible(res: IstioResource, client_namespace: str) -> bool:
    """Whether RES is exported to CLIENT_NAMESPACE."""
    to = export_to(res)
    if "~" in to and len(to) == 1:
        return False
    return "*" in to or client_namespace in to or ("." in to and client_namespace == res.namespace)


def vs_hosts(vs: IstioResource, domain: str) -> list[str]:
    return [qualify(str(h), vs.namespace, domain) for h in vs.spec.get("hosts") or []]


@dataclass
class VirtualServiceIndex:
    """The mesh's VirtualServices that apply to sidecars, by the hosts they name, oldest first.

    Built once per set of VirtualServices (``of``), then asked per service and client
    namespace; the lookup does not scan every VirtualService for an exact host."""

    domain: str
    exact: dict[str, list[IstioResource]] = field(default_factory=dict)
    wildcard: list[tuple[str, IstioResource]] = field(default_factory=list)
    by_key: dict[str, IstioResource] = field(default_factory=dict)

    @classmethod
    def of(cls, resources: Iterable[IstioResource], domain: str) -> VirtualServiceIndex:
        index = cls(domain)
        for vs in sorted(resources, key=creation_order):
            index.by_key[vs.key] = vs
            if not for_mesh(vs):
                continue
            for host in dict.fromkeys(vs_hosts(vs, domain)):
                if host.startswith("*"):
                    index.wildcard.append((host, vs))
                else:
                    index.exact.setdefault(host, []).append(vs)
        return index

    def binding(self, hostname: str, client_namespace: str) -> IstioResource | None:
        """The VirtualService a client in CLIENT_NAMESPACE uses for HOSTNAME, or None."""
        for vs in self.exact.get(hostname, ()):
            if visible(vs, client_namespace):
                return vs
        best: tuple[tuple[int, int], IstioResource] | None = None
        for pattern, vs in self.wildcard:  # oldest first: a tie keeps the older one
            score = host_match(pattern, hostname)
            if score is None or not visible(vs, client_namespace):
                continue
            if best is None or score > best[0]:
                best = (score, vs)
        return best[1] if best is not None else None

    def all_binding(self, hostname: str) -> list[IstioResource]:
        """Every VirtualService naming HOSTNAME (any namespace's view), oldest first."""
        found = list(self.exact.get(hostname, ()))
        found += [vs for pattern, vs in self.wildcard if host_match(pattern, hostname)]
        return sorted(found, key=creation_order)

    def delegate(self, name: str, namespace: str) -> IstioResource | None:
        return self.by_key.get(f"{VIRTUAL_SERVICE}/{namespace}/{name}")


def virtual_service_index(store: MeshStore) -> VirtualServiceIndex:
    return VirtualServiceIndex.of(
        store.istio_of_kind(VIRTUAL_SERVICE), store.mesh_config.cluster_domain
    )


def virtual_service_for(
    store: MeshStore, client_namespace: str, service: Service
) -> IstioResource | None:
    """The VirtualService a client in CLIENT_NAMESPACE uses for SERVICE (one-off lookups; the
    translation keeps a ``VirtualServiceIndex``)."""
    index = virtual_service_index(store)
    return index.binding(service.hostname(index.domain), client_namespace)


def destination_host(destination: Mapping[str, Any], vs: IstioResource, domain: str) -> str:
    """A route destination's host, qualified in the VirtualService's namespace."""
    return qualify(str(destination.get("host", "")), vs.namespace, domain)


def conflicts(index: VirtualServiceIndex, hostname: str) -> Sequence[IstioResource]:
    """VirtualServices naming HOSTNAME exactly beyond the oldest one (dropped for sidecars
    that see them all)."""
    return index.exact.get(hostname, [])[1:]
