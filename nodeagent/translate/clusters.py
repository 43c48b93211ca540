"""Clusters: a service port's cluster, the original-destination, passthrough and black hole
clusters (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.mesh.model import EntryEndpoint
from nodeagent.ports import INBOUND_PASSTHROUGH_SOURCE, MESH_MARK
from nodeagent.translate import client_tls, internal, istio_stats, tls
from nodeagent.translate.client_tls import Origination
from nodeagent.translate.envoy import Cluster, message, typed
from nodeagent.translate.protocol import HTTP2
from nodeagent.translate.services import BLACKHOLE, ServiceTarget

CONNECT_TIMEOUT = "10s"  # Istio's default connectTimeout


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


def _eds_cluster(target: ServiceTarget, name: str = "") -> dict[str, Any]:
    """What every form's cluster of a service port has: its endpoints over EDS, round robin,
    HTTP/2 upstream for gRPC/HTTP2 ports. NAME: a subset's cluster (default: the port's)."""
    name = name or target.cluster
    fields: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "resource_api_version": "V3"},
            "service_name": name,
        },
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
    }
    if target.protocol == HTTP2:
        fields["typed_extension_protocol_options"] = _http2_options()
    return fields


def _with_policy(fields: dict[str, Any], policy: Mapping[str, Any] | None) -> dict[str, Any]:
    """FIELDS with a DestinationRule's POLICY fields over them (None in POLICY: removed)."""
    merged = fields | dict(policy or {})
    return {key: value for key, value in merged.items() if value is not None}


def service_cluster(
    target: ServiceTarget,
    tls_modes: Mapping[str, str] | None = None,
    name: str = "",
    policy: Mapping[str, Any] | None = None,
    origination: Origination | None = None,
    assignment: Mapping[str, Any] | None = None,
) -> Cluster:
    """A service port's cluster on the node: the same for every local pod (no identity in it).

    Its endpoints are internal addresses of ``originate`` (EDS, see endpoints.py): the endpoint's
    address and identity, and this service's SNI and name, cross to it as metadata, and the
    caller's netns and identity as filter state; originate-mtls then picks the caller's
    certificate and the TLS mode (auto mTLS, or a DestinationRule's) per connection.

    TLS_MODES: client namespace -> the DestinationRule tls.mode that binds it here. They are
    applied in originate-mtls, but written here too: a change of them changes this cluster, so
    Envoy drains its pooled connections, made under the old mode, as it would for Istio's
    per-sidecar cluster.

    NAME: a DestinationRule subset's cluster of the port (its endpoints under the same name);
    its own TLS mode (the subset's tls, else the rule's). POLICY: cluster fields a
    DestinationRule's traffic policy sets (destination_rule.cluster_fields), over the defaults.
    ORIGINATION: the policy's tls is SIMPLE/MUTUAL (client_tls.py): its endpoints are
    ``originate-tls``'s, which reads the socket name and the SNI from this cluster's metadata.
    ASSIGNMENT: a PASSTHROUGH cluster's one endpoint (passthrough.node_assignment) in place of
    EDS: the cluster is STATIC; its one host needs no balancing (locality weights included)."""
    fields = _with_policy(_eds_cluster(target, name), policy)
    if assignment is not None:
        fields = {k: v for k, v in fields.items() if k != "common_lb_config"}
        fields |= {"type": "STATIC", "lb_policy": "ROUND_ROBIN", "load_assignment": assignment}
    meta: dict[str, Any] = {
        # What originate-mtls picks a DestinationRule's TLS mode by: a subset's (or a
        # DestinationRule variant's) cluster may have its own.
        "name": name or target.cluster,
        "sni": tls.outbound_sni(target.port.port, target.host),
        **({"tls_modes": dict(sorted(tls_modes.items()))} if tls_modes else {}),
    }
    if origination is not None:
        meta["tls_socket"] = origination.socket or internal.PLAINTEXT
        if origination.sni:
            meta["tls_sni"] = origination.sni
    service = target.service
    stats = istio_stats.cluster_metadata(target.host, service.name, service.namespace)
    fields |= {
        "metadata": {"filter_metadata": {internal.CLUSTER_META: meta, istio_stats.META: stats}},
        "transport_socket": internal.internal_upstream(
            (internal.ORIGINAL_DST_META, internal.ENDPOINT_META, tls.TLS_MODE_KEY),
            (internal.CLUSTER_META,),
        ),
    }
    return message(Cluster, fields)


def sidecar_service_cluster(
    target: ServiceTarget,
    identity: str,
    server_sans: list[str],
    tls_mode: str | None,
    name: str = "",
    policy: Mapping[str, Any] | None = None,
    origination: Origination | None = None,
) -> Cluster:
    """The sidecar form's cluster for a service port: the pod's own Envoy presents its pod's
    IDENTITY itself. TLS_MODE is a DestinationRule's ``tls.mode`` when one applies: DISABLE is
    plaintext, ISTIO_MUTUAL always mTLS; without one, Istio's auto mTLS picks per endpoint.
    NAME and POLICY as for ``service_cluster``; ORIGINATION: the policy's SIMPLE/MUTUAL."""
    sni = tls.outbound_sni(target.port.port, target.host)
    fields = _with_policy(_eds_cluster(target, name), policy)
    if origination is not None:
        if origination.socket is None:
            fields["transport_socket"] = tls.plaintext()
        else:
            socket = client_tls.transport_socket(origination.setting, origination.sni)
            fields["transport_socket"] = socket
    elif tls_mode == "ISTIO_MUTUAL":
        fields["transport_socket"] = tls.upstream_mtls(identity, server_sans, sni)
    elif tls_mode != "DISABLE":
        fields["transport_socket_matches"] = tls.auto_mtls_matches(identity, server_sans, sni)
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


def dns_cluster(
    target: ServiceTarget,
    name: str = "",
    policy: Mapping[str, Any] | None = None,
    origination: Origination | None = None,
) -> Cluster:
    """A ServiceEntry host with resolution DNS (STRICT_DNS: every address each name resolves to
    is an endpoint) or DNS_ROUND_ROBIN (LOGICAL_DNS: the first address, re-resolved per new
    connection), as istiod builds it (pilot/pkg/networking/core/cluster_builder.go
    buildCluster; conversion.go): its endpoints' addresses, or the host itself when it lists
    none, at each endpoint's port for this service port (its ``ports`` by port name, else the
    port's targetPort, else its number); their locality and weight.

    Envoy resolves the names itself (the node's resolver) and connects from the node, not from
    the caller's netns: no original destination to restore, no mesh identity (a MESH_EXTERNAL
    host is never sent mTLS). ORIGINATION: a DestinationRule's SIMPLE/MUTUAL, whose TLS socket
    is this cluster's own (client_tls.py; its files and Secrets come over SDS as for
    originate-tls)."""
    entry = target.service.entry
    assert entry is not None
    name = name or target.cluster
    logical = entry.resolution == "DNS_ROUND_ROBIN"
    endpoints = entry.endpoints or (EntryEndpoint(address=target.host),)
    if logical:
        endpoints = endpoints[:1]  # LOGICAL_DNS takes exactly one (Istio: the first)
    default_port = int(target.port.target_port or 0) or target.port.port
    by_locality: dict[str, list[dict[str, Any]]] = {}
    for endpoint in endpoints:
        if endpoint.address.startswith("*"):
            raise ValueError(f"{entry.entry}: host {target.host!r}: a wildcard cannot be resolved")
        port = dict(endpoint.ports).get(target.port.name) or default_port
        lb: dict[str, Any] = {
            "endpoint": {
                "address": {"socket_address": {"address": endpoint.address, "port_value": port}}
            }
        }
        if endpoint.weight:
            lb["load_balancing_weight"] = endpoint.weight
        by_locality.setdefault(endpoint.locality, []).append(lb)
    groups = []
    for where, lbs in sorted(by_locality.items()):
        group: dict[str, Any] = {"lb_endpoints": lbs}
        if where:
            region, zone, sub_zone = ([*where.split("/"), "", ""])[:3]
            group["locality"] = {"region": region, "zone": zone, "sub_zone": sub_zone}
        groups.append(group)
    fields: dict[str, Any] = {
        "name": name,
        "type": "LOGICAL_DNS" if logical else "STRICT_DNS",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
        "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": name, "endpoints": groups},
    }
    if target.protocol == HTTP2:
        fields["typed_extension_protocol_options"] = _http2_options()
    fields = _with_policy(fields, policy)
    fields.pop("eds_cluster_config", None)
    if origination is not None and origination.socket is not None:
        fields["transport_socket"] = client_tls.transport_socket(
            origination.setting, origination.sni
        )
    return message(Cluster, fields)
