"""Services to clusters, endpoints and routes, shared by the local pods of one identity (pure).

Names follow Istio: ``outbound|<port>||<host>`` names a service port's endpoints (EDS); its
clusters and HTTP routes add the source identity, ``outbound|<port>||<host>~<ns>~<sa>``, because
mTLS presents the calling pod's certificate. ``PassthroughCluster`` / ``BlackHoleCluster`` serve
destinations outside the registry, ``inbound|<port>||`` delivers to a local app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh.model import EndpointSlice, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.ports import INBOUND_PASSTHROUGH_SOURCE, MESH_MARK
from nodeagent.translate import tls
from nodeagent.translate.envoy import (
    Cluster,
    ClusterLoadAssignment,
    RouteConfiguration,
    message,
    typed,
)
from nodeagent.translate.protocol import HTTP2, is_http, port_protocol

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
CONNECT_TIMEOUT = "10s"  # Istio's default connectTimeout


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
        """The service port's endpoints (EDS name), shared by every identity's cluster."""
        return outbound_cluster(self.port.port, self.host)

    def cluster_for(self, identity: Identity) -> str:
        return f"{self.cluster}~{identity[0]}~{identity[1]}"


def outbound_cluster(port: int, host: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def targets(store: MeshStore) -> Iterator[ServiceTarget]:
    domain = store.mesh_config.cluster_domain
    for svc in sorted(store.services.values(), key=lambda s: s.key):
        for port in svc.ports:
            if port.protocol.upper() != "TCP":
                continue
            yield ServiceTarget(
                svc, port, svc.hostname(domain), port_protocol(port.name, port.app_protocol)
            )


def upstream_bind() -> dict[str, Any]:
    """Every upstream socket: marked so in-pod capture skips it, created in the caller's netns."""
    return {
        "source_address": {"address": "0.0.0.0", "port_value": 0},
        "socket_options": [{"level": 1, "name": 36, "int_value": MESH_MARK}],  # SO_MARK
        "local_address_selector": {
            "name": "envoy.upstream.local_address_selector.filter_state_override",
            "typed_config": typed(
                "envoy.extensions.local_address_selectors.filter_state_override.v3.Config"
            ),
        },
    }


def sidecar_inbound_bind() -> dict[str, Any]:
    """Sidecar form: Envoy reaches its own app from 127.0.0.6 (Istio's inbound passthrough
    source), which istio-init's rules let through instead of capturing it again."""
    return {"source_address": {"address": INBOUND_PASSTHROUGH_SOURCE, "port_value": 0}}


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}},
        )
    }


def service_cluster(
    target: ServiceTarget,
    identity: Identity,
    trust_domain: str,
    server_sans: list[str],
    tls_mode: str | None,
    sidecar: bool = False,
) -> Cluster:
    """The cluster pods of IDENTITY use for a service port.

    TLS_MODE is a DestinationRule's ``tls.mode`` when one applies: DISABLE is plaintext,
    ISTIO_MUTUAL always mTLS; without one, Istio's auto mTLS picks per endpoint. SIDECAR: the
    sidecar form, an Envoy inside the pod whose sockets need no netns or mark.
    """
    me = tls.spiffe_id(trust_domain, *identity)
    sni = tls.outbound_sni(target.port.port, target.host)
    fields: dict[str, Any] = {
        "name": target.cluster_for(identity),
        # Stats by service, as Istio's: a stat name must not tell the caller's identity (#12).
        "alt_stat_name": target.cluster,
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "resource_api_version": "V3"},
            "service_name": target.cluster,
        },
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
    }
    if not sidecar:
        fields["upstream_bind_config"] = upstream_bind()
    if target.protocol == HTTP2:
        fields["typed_extension_protocol_options"] = _http2_options()
    if tls_mode == "ISTIO_MUTUAL":
        fields["transport_socket"] = tls.upstream_mtls(me, server_sans, sni)
    elif tls_mode != "DISABLE":
        fields["transport_socket_matches"] = tls.auto_mtls_matches(me, server_sans, sni)
    return message(Cluster, fields)


def original_dst_cluster(
    name: str, http2: bool = False, sidecar: bool = False, inbound: bool = False
) -> Cluster:
    """Connects to where the caller was going (the original destination), from its netns.

    SIDECAR (the sidecar form): from the Envoy's own netns; INBOUND ones from 127.0.0.6."""
    fields: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
    }
    if not sidecar:
        fields["upstream_bind_config"] = upstream_bind()
    elif inbound:
        fields["upstream_bind_config"] = sidecar_inbound_bind()
    if http2:
        fields["typed_extension_protocol_options"] = _http2_options()
    return message(Cluster, fields)


def blackhole_cluster() -> Cluster:
    return message(
        Cluster, {"name": BLACKHOLE, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT}
    )


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


def default_retry_policy() -> dict[str, Any]:
    """Istio's default for every outbound HTTP route: 2 retries on connection-level failures,
    each on another host when there is one."""
    return {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retriable_status_codes": [503],
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }


def outbound_route(target: ServiceTarget, identity: Identity) -> RouteConfiguration:
    """The service port's routes: every request to its cluster (VirtualService routing later)."""
    cluster = target.cluster_for(identity)
    return message(
        RouteConfiguration,
        {
            "name": cluster,
            "validate_clusters": False,
            "virtual_hosts": [
                {
                    "name": f"{target.host}:{target.port.port}",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "default",
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": cluster,
                                "timeout": "0s",
                                "retry_policy": default_retry_policy(),
                            },
                        }
                    ],
                }
            ],
        },
    )


def inbound_route(port: int) -> RouteConfiguration:
    return message(
        RouteConfiguration,
        {
            "name": inbound_cluster(port),
            "validate_clusters": False,
            "virtual_hosts": [
                {
                    "name": "inbound|http|" + str(port),
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "default",
                            "match": {"prefix": "/"},
                            "route": {"cluster": inbound_cluster(port), "timeout": "0s"},
                        }
                    ],
                }
            ],
        },
    )


def inbound_ports_of(store: MeshStore, labels: dict[str, str], namespace: str) -> dict[int, str]:
    """Target ports (and protocols) of the service ports that select a pod."""
    ports: dict[int, str] = {}
    for target in targets(store):
        svc = target.service
        selected = (
            svc.namespace == namespace
            and bool(svc.selector)
            and all(labels.get(k) == v for k, v in svc.selector.items())
        )
        target_port = target.port.target_port or target.port.port
        # HTTP wins when two services disagree on one container port.
        if (
            selected
            and isinstance(target_port, int)
            and (target_port not in ports or is_http(target.protocol))
        ):
            ports[target_port] = target.protocol
    return ports
