"""Endpoints: a service port's ready endpoints, cluster-wide, as one ClusterLoadAssignment
(pure)."""

from __future__ import annotations

from collections.abc import Callable

from nodeagent.mesh.model import EndpointSlice, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import tls
from nodeagent.translate.envoy import ClusterLoadAssignment, message
from nodeagent.translate.services import ServiceTarget


def _slice_port(slice_: EndpointSlice, port: ServicePort) -> int | None:
    """The endpoint port a slice publishes for a service port (matched by name, as kube does)."""
    for ep_port in slice_.ports:
        if ep_port.name == port.name:
            return ep_port.port
    if len(slice_.ports) == 1 and not port.name:
        return slice_.ports[0].port
    return None


def ip_slices(store: MeshStore, service: Service) -> list[EndpointSlice]:
    """A service's EndpointSlices whose addresses are IPs. ``addressType: FQDN`` slices name
    hosts, not addresses: Envoy would reject them as endpoints, and Istio ignores them too
    (istio/istio pilot/pkg/serviceregistry/kube/controller/endpointslice.go)."""
    return [s for s in store.slices_of(service) if s.address_type != "FQDN"]


def endpoint_pods(store: MeshStore, target: ServiceTarget) -> set[str]:
    """namespace/name of the pods behind a service port's ready endpoints."""
    return {
        endpoint.pod
        for slice_ in ip_slices(store, target.service)
        for endpoint in slice_.endpoints
        if endpoint.ready and endpoint.pod
    }


def load_assignment(
    store: MeshStore, target: ServiceTarget, speaks_mtls: Callable[[str, int], bool]
) -> ClusterLoadAssignment:
    """Every ready endpoint of the service, cluster-wide (nothing here is per local pod).

    SPEAKS_MTLS(pod, port) tells which endpoints are mesh pods accepting mTLS on that port; they
    are marked ``tlsMode: istio`` for the clients' auto mTLS.
    """
    addresses: dict[tuple[str, int], bool] = {}
    for slice_ in ip_slices(store, target.service):
        port = _slice_port(slice_, target.port)
        if port is None:
            continue
        for endpoint in slice_.endpoints:
            if endpoint.ready:
                mtls = bool(endpoint.pod) and speaks_mtls(endpoint.pod, port)
                addresses.update({(address, port): mtls for address in endpoint.addresses})
    return message(
        ClusterLoadAssignment,
        {
            "cluster_name": target.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": ip, "port_value": port}}
                            },
                            "health_status": "HEALTHY",
                            "metadata": {
                                "filter_metadata": {
                                    tls.TLS_MODE_KEY: {
                                        "tlsMode": "istio" if addresses[(ip, port)] else "disabled"
                                    }
                                }
                            },
                        }
                        for ip, port in sorted(addresses)
                    ]
                }
            ]
            if addresses
            else [],
        },
    )
