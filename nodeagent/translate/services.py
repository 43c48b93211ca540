"""Service ports as the node's Envoy sees them: targets of outbound filter chains (pure).

Names follow Istio: ``outbound|<port>||<host>`` names a service port's cluster, its endpoints
(EDS) and its HTTP routes; no identity is in them (the caller's certificate is chosen per
connection, see internal.py). ``PassthroughCluster`` / ``BlackHoleCluster`` serve
destinations outside the registry, ``inbound|<port>||`` delivers to a local app.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from nodeagent.mesh.model import Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.translate.protocol import is_http, port_protocol

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"


Identity = tuple[str, str]  # (namespace, service account) of local pods


@dataclass(frozen=True)
class ServiceTarget:
    """One port of one service with a virtual IP: what an outbound filter chain matches."""

    service: Service
    port: ServicePort
    host: str
    protocol: str

    @property
    def cluster(self) -> str:
        """The service port's cluster, its endpoints (EDS name) and its routes."""
        return outbound_cluster(self.port.port, self.host)


def outbound_cluster(port: int, host: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def fast_route(port: int) -> str:
    """The route of an HTTP port on the same-node fast path (shared by the pods using it)."""
    return f"inboundInternal|{port}||"


def targets(store: MeshStore) -> Iterator[ServiceTarget]:
    """Every service's targets, services by key."""
    for svc in sorted(store.services.values(), key=lambda s: s.key):
        yield from service_targets(svc, store.mesh_config.cluster_domain)


def service_targets(svc: Service, domain: str) -> list[ServiceTarget]:
    """A service's TCP ports, in the order the Service lists them."""
    host = svc.hostname(domain)
    return [
        ServiceTarget(svc, port, host, port_protocol(port.name, port.app_protocol))
        for port in svc.ports
        if port.protocol.upper() == "TCP"
    ]


def inbound_ports_of(store: MeshStore, labels: dict[str, str], namespace: str) -> dict[int, str]:
    """Target ports (and protocols) of the service ports that select a pod."""
    ports: dict[int, str] = {}
    domain = store.mesh_config.cluster_domain
    for svc in store.services_selecting(namespace, labels):  # by key, as targets() goes
        for target in service_targets(svc, domain):
            target_port = target.port.target_port or target.port.port
            # HTTP wins when two services disagree on one container port.
            if isinstance(target_port, int) and (
                target_port not in ports or is_http(target.protocol)
            ):
                ports[target_port] = target.protocol
    return ports


def inbound_services_of(
    store: MeshStore, labels: dict[str, str], namespace: str
) -> dict[int, tuple[str, str, str]]:
    """Target port -> (host, name, namespace) of the first service (by key) whose port targets
    it: the ``destination_service`` a pod's inbound metrics name for that port, as Istio's
    inbound cluster names its first service (translate/istio_stats.py)."""
    found: dict[int, tuple[str, str, str]] = {}
    domain = store.mesh_config.cluster_domain
    for svc in store.services_selecting(namespace, labels):
        for target in service_targets(svc, domain):
            target_port = target.port.target_port or target.port.port
            if isinstance(target_port, int):
                found.setdefault(target_port, (target.host, svc.name, svc.namespace))
    return found
