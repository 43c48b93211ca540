"""Endpoints: a service port's ready endpoints, cluster-wide, as one ClusterLoadAssignment
(pure)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from nodeagent.mesh.model import EndpointSlice, Locality, Pod, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import internal, istio_stats, tls
from nodeagent.translate.envoy import ClusterLoadAssignment, message
from nodeagent.translate.locality import Balancing, Group, locality_endpoints, topology_labels
from nodeagent.translate.services import ServiceTarget


def slice_port(slice_: EndpointSlice, port: ServicePort) -> int | None:
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
    store: MeshStore,
    target: ServiceTarget,
    speaks_mtls: Callable[[str, int], bool],
    via_originate: bool = True,
    fast: Mapping[str, Collection[int]] | None = None,
    cluster: str = "",
    labels: Mapping[str, str] | None = None,
    balancing: Balancing | None = None,
    originate: str = internal.ORIGINATE,
) -> ClusterLoadAssignment:
    """Every ready endpoint of the service, cluster-wide.

    SPEAKS_MTLS(pod, port) tells which endpoints are mesh pods accepting mTLS on that port; they
    are marked ``tlsMode: istio`` (Istio's auto mTLS) and carry their pod's SPIFFE ID, the only
    server identity accepted there (secure naming). VIA_ORIGINATE (the node form): each endpoint
    is an internal address of ``originate`` with its own ``ip:port`` in the metadata the
    original_dst filter reads there; otherwise (the sidecar form) the endpoint's socket address.
    FAST: this node's pods (keys) -> the ports of theirs that take the same-node fast path
    instead (their ``inboundInternal`` listener, internal.py), when they speak mTLS.
    CLUSTER: the assignment's name (default: the service port's cluster). LABELS: a
    DestinationRule subset's, which only endpoints whose pod carries them all are in (an
    endpoint naming no pod has no labels: it is in no subset, as in Istio).

    Endpoints are grouped by locality, their node's (the slice's ``nodeName``, else their
    pod's; unknown: the empty locality), with priorities and weights relative to the proxy
    as BALANCING says (translate/locality.py; None: no locality load balancing). ORIGINATE: the
    internal listener the endpoints are addresses of (``originate-tls`` for a DestinationRule's
    own TLS).
    """
    trust_domain = store.mesh_config.trust_domain
    how = balancing or Balancing()
    # Endpoint labels are compared only by failoverPriority: not gathered otherwise.
    by_labels = bool(how.setting and how.setting.get("failoverPriority"))
    found: dict[tuple[str, int], str | None] = {}  # (ip, port) -> SPIFFE ID if it speaks mTLS
    local: dict[tuple[str, int], str] = {}  # (ip, port) -> its fast-path listener
    where: dict[tuple[str, int], tuple[Locality, Mapping[str, str]]] = {}  # and its labels
    weights: dict[tuple[str, int], int] = {}  # a ServiceEntry endpoint's weight, when set
    pods: dict[tuple[str, int], Pod] = {}  # the pod an endpoint is, for Istio's metrics
    for slice_ in ip_slices(store, target.service):
        port = slice_port(slice_, target.port)
        if port is None:
            continue
        for endpoint in slice_.endpoints:
            if not endpoint.ready:
                continue
            pod = store.pods.get(endpoint.pod) if endpoint.pod else None
            # A ServiceEntry endpoint naming no pod carries its own labels.
            own = pod.labels if pod is not None else endpoint.labels
            if labels is not None and (
                (pod is None and not endpoint.labels)
                or any(own.get(k) != v for k, v in labels.items())
            ):
                continue
            spiffe = None
            if pod is not None and speaks_mtls(endpoint.pod, port):
                spiffe = tls.spiffe_id(trust_domain, pod.namespace, pod.service_account)
            elif pod is None and endpoint.service_account:
                # envoy.network.upstream_subject_alt_names takes a comma-separated list.
                spiffe = ",".join(entry_sans(trust_domain, target, endpoint.service_account))
            found.update({(address, port): spiffe for address in endpoint.addresses})
            if pod is not None:
                pods.update({(address, port): pod for address in endpoint.addresses})
            node = endpoint.node_name or (pod.node_name if pod is not None else "")
            locality = store.locality_of(node)
            if endpoint.locality:  # a ServiceEntry endpoint's own (region/zone/subzone)
                locality = Locality(*[*endpoint.locality.split("/"), "", ""][:3])
            endpoint_labels: Mapping[str, str] = {}
            if endpoint.weight:
                weights.update({(address, port): endpoint.weight for address in endpoint.addresses})
            if by_labels:
                pod_labels = dict(own)
                endpoint_labels = pod_labels | topology_labels(locality)
            placed = (locality, endpoint_labels)
            where.update({(address, port): placed for address in endpoint.addresses})
            if spiffe and pod is not None and fast and port in fast.get(endpoint.pod, ()):
                listener = internal.fast_name(pod.namespace, pod.name)
                local.update({(address, port): listener for address in endpoint.addresses})
    groups: dict[Locality, Group] = {}
    for ip, port in sorted(found):
        locality, endpoint_labels = where[(ip, port)]
        group = groups.setdefault(locality, Group(locality))
        lb = _lb_endpoint(
            ip, port, found[(ip, port)], via_originate, local.get((ip, port)), originate
        )
        if via_originate and (pod := pods.get((ip, port))) is not None:
            # The destination side of the source reporter's labels (istio_stats.py).
            metadata = istio_stats.endpoint_metadata(pod, found[(ip, port)] or "")
            lb["metadata"]["filter_metadata"][istio_stats.META] = metadata
        if (ip, port) in weights:
            lb["load_balancing_weight"] = weights[(ip, port)]
        group.endpoints.append(lb)
        group.labels.append(endpoint_labels)
    endpoints = locality_endpoints(
        list(groups.values()), how.proxy, how.proxy_labels, how.setting, how.enable_failover
    )
    return message(
        ClusterLoadAssignment,
        {"cluster_name": cluster or target.cluster, "endpoints": endpoints},
    )


def entry_sans(trust_domain: str, target: ServiceTarget, service_account: str) -> tuple[str, ...]:
    """The server identities a MESH_INTERNAL ServiceEntry endpoint (a VM's proxy) is verified
    against: its service account's SPIFFE ID in the entry's namespace and the entry's
    subjectAltNames, which Istio adds to the service's accounts (serviceentry/conversion.go
    convertServices, ServiceAccounts)."""
    own = tls.spiffe_id(trust_domain, target.service.namespace, service_account)
    extra = target.service.entry.subject_alt_names if target.service.entry else ()
    return tuple(dict.fromkeys((own, *extra)))


def _lb_endpoint(
    ip: str,
    port: int,
    spiffe: str | None,
    via_originate: bool,
    fast: str | None,
    originate: str = internal.ORIGINATE,
) -> dict[str, Any]:
    """FAST: the endpoint's fast-path listener, if it has one."""
    metadata: dict[str, Any] = {tls.TLS_MODE_KEY: {"tlsMode": "istio" if spiffe else "disabled"}}
    address: dict[str, Any] = {"socket_address": {"address": ip, "port_value": port}}
    if via_originate:
        where = f"{_host(ip)}:{port}"
        address = internal.internal_address(fast or originate, internal.endpoint_id(where, spiffe))
        metadata[internal.ORIGINAL_DST_META] = {"local": where}
        if spiffe:
            metadata[internal.ENDPOINT_META] = {"sans": spiffe}
    return {
        "endpoint": {"address": address},
        "health_status": "HEALTHY",
        "metadata": {"filter_metadata": metadata},
    }


def _host(ip: str) -> str:
    """IPv6 addresses in brackets, as an "address:port" is written."""
    return f"[{ip}]" if ":" in ip else ip
