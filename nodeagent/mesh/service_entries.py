"""ServiceEntry (and WorkloadEntry) as services of the registry (pure).

Istio converts each host of a ServiceEntry into a service of its registry, with the entry's ports,
addresses and endpoints (istio/istio pilot/pkg/serviceregistry/serviceentry/conversion.go,
``convertServices`` and ``convertEndpoint``; istio.io/latest/docs/reference/config/networking/
service-entry/). The node agent does the same: one ``Service`` per host, its ``host`` set and its
``entry`` saying what the ServiceEntry adds (location, resolution, addresses, subjectAltNames,
exportTo, and for DNS resolution the names to resolve), and for STATIC resolution an
EndpointSlice of its endpoints (its ``endpoints``, or the pods and WorkloadEntries its
``workloadSelector`` selects in its namespace). The store keeps them next to the Kubernetes
Services (under keys no Kubernetes object can have: ``<namespace>/<entry>~<host>``), so
VirtualServices and DestinationRules apply to them as to any service, and the translation's
incremental machinery rebuilds only an entry's own hosts when it changes. Which entry holds a
host two name (the oldest) and that a Kubernetes Service's hostname is never an entry's is the
store's to keep (MeshStore._derive).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nodeagent.mesh.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    EntryEndpoint,
    EntryPolicy,
    IstioResource,
    Pod,
    Service,
    ServicePort,
)

SERVICE_ENTRY, WORKLOAD_ENTRY = "ServiceEntry", "WorkloadEntry"
SEPARATOR = "~"  # never in a Kubernetes name: derived keys cannot meet a Service's
MESH_EXTERNAL, MESH_INTERNAL = "MESH_EXTERNAL", "MESH_INTERNAL"
NONE, STATIC, DNS, DNS_ROUND_ROBIN = "NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"
NETWORK_LABEL = "topology.istio.io/network"
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def derived_name(entry: str, host: str) -> str:
    """The name of the service a host of ServiceEntry ENTRY (its name) becomes."""
    return f"{entry}{SEPARATOR}{host}"


def host_of(name: str) -> str | None:
    """The host of a derived service's NAME; None for a Kubernetes Service's name."""
    _, sep, host = name.partition(SEPARATOR)
    return host if sep else None


def _ports(spec: Mapping[str, Any]) -> tuple[ServicePort, ...]:
    ports = []
    for raw in spec.get("ports") or []:
        number = int(raw["number"])
        ports.append(
            ServicePort(
                port=number,
                name=str(raw.get("name", "")),
                target_port=int(raw.get("targetPort") or 0),
                # protocol decides HTTP or TCP as appProtocol does (translate/protocol.py);
                # unset, Istio takes the port name's prefix, as here with no appProtocol.
                app_protocol=str(raw.get("protocol", "")).lower(),
            )
        )
    return tuple(ports)


def _endpoint(raw: Mapping[str, Any], namespace: str = "", name: str = "") -> EntryEndpoint:
    return EntryEndpoint(
        address=str(raw.get("address", "")),
        ports=tuple(sorted((str(k), int(v)) for k, v in (raw.get("ports") or {}).items())),
        labels=tuple(sorted((str(k), str(v)) for k, v in (raw.get("labels") or {}).items())),
        network=str(raw.get("network", "")),
        locality=str(raw.get("locality", "")),
        weight=int(raw.get("weight") or 0),
        workload=f"{namespace}/{name}" if name else "",
        service_account=str(raw.get("serviceAccount", "")),
    )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected_endpoints(
    entry: IstioResource, pods: Iterable[Pod], workload_entries: Iterable[IstioResource]
) -> tuple[EntryEndpoint, ...]:
    """What ENTRY's workloadSelector selects in its namespace: pods with an IP (by key) and
    WorkloadEntries (istio/istio pilot/pkg/serviceregistry/serviceentry/controller.go)."""
    selector = (entry.spec.get("workloadSelector") or {}).get("labels") or {}
    found = []
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.namespace == entry.namespace and pod.pod_ips and _selects(selector, pod.labels):
            found.append(
                EntryEndpoint(
                    address=pod.pod_ips[0], labels=tuple(sorted(pod.labels.items())), pod=pod.key
                )
            )
    for we in sorted(workload_entries, key=lambda w: w.key):
        labels = {str(k): str(v) for k, v in (we.spec.get("labels") or {}).items()}
        if (
            we.namespace == entry.namespace
            and we.spec.get("address")
            and _selects(selector, labels)
        ):
            found.append(_endpoint(we.spec, we.namespace, we.name))
    return tuple(found)


def derive(
    entry: IstioResource,
    selected: tuple[EntryEndpoint, ...] = (),
    allocated: Callable[[str], str] = lambda host: "",
) -> tuple[list[Service], list[EndpointSlice]]:
    """ENTRY's services (one per host) and, for STATIC resolution, their EndpointSlices.
    SELECTED: what its workloadSelector selects (``selected_endpoints``), in place of
    ``endpoints`` when it has a selector. ALLOCATED: a host's auto-allocated address ("" for
    none; mesh/autoallocate.py)."""
    spec = entry.spec
    ports = _ports(spec)
    resolution = str(spec.get("resolution", NONE))
    if spec.get("workloadSelector"):
        endpoints = selected
    else:
        endpoints = tuple(_endpoint(raw) for raw in spec.get("endpoints") or [])
    addresses = tuple(str(a) for a in spec.get("addresses") or [])
    policy = EntryPolicy(
        entry=entry.key,
        location=str(spec.get("location", MESH_EXTERNAL)),
        resolution=resolution,
        addresses=addresses,
        subject_alt_names=tuple(str(s) for s in spec.get("subjectAltNames") or []),
        export_to=tuple(str(n) for n in spec.get("exportTo") or []),
        endpoints=endpoints,
        created=entry.created,
    )
    # One plain address is the host's virtual IP; CIDRs and more addresses match as prefixes
    # (EntryPolicy.prefixes).
    vip = addresses[0] if len(addresses) == 1 and _is_ip(addresses[0]) else ""
    services, slices = [], []
    for host in spec.get("hosts") or []:
        name = derived_name(entry.name, str(host))
        services.append(
            Service(
                entry.namespace,
                name,
                cluster_ip=vip,
                ports=ports,
                host=str(host),
                entry=policy,
                allocated_ip=allocated(str(host)),
                export_to=policy.export_to,
            )
        )
        if resolution == STATIC:
            slices += _slices(entry.namespace, name, ports, endpoints, policy.external)
    return services, slices


def _slices(
    namespace: str,
    service: str,
    ports: tuple[ServicePort, ...],
    endpoints: Iterable[EntryEndpoint],
    external: bool = True,
) -> list[EndpointSlice]:
    """One slice per distinct port mapping (a slice's ports are all its endpoints').
    EXTERNAL: the entry is MESH_EXTERNAL (its endpoints never speak mTLS)."""
    groups: dict[tuple[EndpointPort, ...], list[Endpoint]] = {}
    for ep in endpoints:
        if not _is_ip(ep.address):
            continue  # a STATIC endpoint must be an IP (Istio's validation says so too)
        mapping = dict(ep.ports)
        key = tuple(
            # An entry's targetPort is a number (_ports): 0 when unset.
            EndpointPort(mapping.get(p.name) or int(p.target_port or 0) or p.port, p.name)
            for p in ports
        )
        groups.setdefault(key, []).append(
            Endpoint(
                (ep.address,),
                pod=ep.pod,
                labels=endpoint_labels(ep),
                weight=ep.weight,
                locality=ep.locality,
                service_account="" if external else mtls_account(ep),
            )
        )
    return [
        EndpointSlice(namespace, f"{service}{SEPARATOR}{i}", service, tuple(eps), key)
        for i, (key, eps) in enumerate(groups.items())
    ]


def endpoint_labels(ep: EntryEndpoint) -> dict[str, str]:
    """EP's labels as Istio augments them (pilot/pkg/serviceregistry/util/label/label.go
    AugmentLabels, from serviceentry/conversion.go convertEndpoint): its ``network`` becomes
    ``topology.istio.io/network`` unless its labels set that already, so a DestinationRule
    subset or a failoverPriority can select by network. Its locality is added where endpoints
    are ranked (translate/endpoints.py).

    The network changes nothing else here: with no multi-network gateways configured (the node
    takes no meshNetworks), Istio's EndpointsByNetworkFilter (pilot/pkg/xds/endpoints/
    ep_filters.go) returns every endpoint, reached directly; so does the node."""
    labels = dict(ep.labels)
    if ep.network and not labels.get(NETWORK_LABEL):
        labels[NETWORK_LABEL] = ep.network
    return labels


def mtls_account(ep: EntryEndpoint) -> str:
    """The service account a MESH_INTERNAL entry's endpoint EP (no pod) speaks mTLS as, "" for
    plaintext. Istio (conversion.go getTLSModeFromWorkloadEntry): the label
    ``security.istio.io/tlsMode`` decides, else a ``serviceAccount`` means mTLS; the client
    verifies the SPIFFE ID of that account in the service's namespace (convertEndpoint, and
    cluster_tls.go buildIstioMutualTLS with the service's accounts). The node verifies each
    endpoint's own identity, as for pods, so an endpoint needs its serviceAccount for mTLS: one
    whose label alone says ``istio`` stays plaintext (not yet: nothing to verify it by)."""
    if ep.pod or dict(ep.labels).get(TLS_MODE_LABEL, "istio") != "istio":
        return ""
    return ep.service_account


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
