"""The two listeners of each local captured pod, bound inside the pod's network namespace, and
the shared ``outbound-internal`` listener (pure).

- ``virtualOutbound``: 127.0.0.1:15001, where in-pod capture redirects the pod's outbound TCP. It
  stamps who calls and hands the connection to ``outbound-internal`` (internal.py), where the
  original destination (VIP:port) selects a filter chain per service port; anything else goes to
  the passthrough cluster (ALLOW_ANY) or the black hole (REGISTRY_ONLY). In the sidecar form the
  pod's own Envoy holds those chains in this listener itself.
- ``virtualInbound``: 0.0.0.0:15006, where capture redirects inbound TCP; delivers to the app at
  the original destination (the pod's IP and port), from inside the pod.

Loop guards, as Istio's sidecar listeners have them (istio/istio
pilot/pkg/networking/core/listener_builder.go, ``virtualOutbound-blackhole`` and
``virtualInbound-blackhole``): a connection whose original destination is the capture port itself
(an app dialling 127.0.0.1:15001 or its own IP:15006, which loopback capture lets through, or a
peer dialling the pod's IP:15006) would otherwise be passed through to that same listener again
and again; it goes to ``BlackHoleCluster`` instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from nodeagent.mesh.model import REGISTRY_ONLY, Pod
from nodeagent.mesh.telemetry import REPORTED, MetricsSpec
from nodeagent.ports import INBOUND_PORT, OUTBOUND_PORT
from nodeagent.translate import access_logs, denials, internal, istio_stats, tls
from nodeagent.translate.authz import PodAuthz, chain_filters
from nodeagent.translate.envoy import (
    FilterChain,
    Listener,
    RouteConfiguration,
    VirtualHost,
    message,
    typed,
)
from nodeagent.translate.filters import (
    ORIGINAL_DST_FILTER,
    http_connection_manager,
    stamp_netns,
    tcp_proxy,
)
from nodeagent.translate.protocol import is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    ServiceTarget,
    fast_route,
    inbound_cluster,
)

STRICT, DISABLE = "STRICT", "DISABLE"
OUTBOUND_BLACKHOLE = "virtualOutbound-blackhole"
INBOUND_BLACKHOLE = "virtualInbound-blackhole"

TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
}


def _source_stats(who: str, tcp: bool) -> list[dict[str, Any]]:
    """Istio's source-reporter metrics of a chain in the node's shared outbound listener (WHO
    is the stamped pod there); none in the sidecar form's (a bench baseline)."""
    if who != internal.POD_FORMAT:
        return []
    plan = access_logs.active()
    if plan is None or not plan.node.metrics:
        return istio_stats.source_loggers(internal.CALLER_KEY, tcp)
    groups = plan.node.metric_classes()
    if len(groups) == 1:  # the usual case: every local pod reports alike, no class filter
        return istio_stats.source_loggers(internal.CALLER_KEY, tcp, groups[0][0])
    # Local pods whose Telemetry differs: each config for the callers of its classes (their
    # outbound listeners stamp the class, as for access logs).
    return [
        logger
        for spec, names in groups
        for logger in istio_stats.source_loggers(
            internal.CALLER_KEY, tcp, spec, access_logs.client_filter(names)
        )
    ]


def _served(pod: Pod) -> MetricsSpec:
    """What POD reports of its inbound traffic (its SERVER metrics in the build's plan)."""
    plan = access_logs.active()
    known = plan.metrics.get(pod.key) if plan is not None else None
    return known[1] if known is not None else REPORTED


def _blackhole(who: str) -> dict[str, Any]:
    # RBAC is not a terminal filter; nothing ever reaches this one.
    return tcp_proxy(BLACKHOLE, BLACKHOLE, "inbound", who)


def outbound_name(pod: Pod) -> str:
    return f"virtualOutbound/{pod.namespace}/{pod.name}"


def inbound_name(pod: Pod) -> str:
    return f"virtualInbound/{pod.namespace}/{pod.name}"


def _address(ip: str, port: int, netns: str) -> dict[str, Any]:
    """NETNS "": the sidecar form, a listener of an Envoy that runs in the pod's netns itself."""
    address: dict[str, Any] = {"address": ip, "port_value": port}
    if netns:
        address["network_namespace_filepath"] = netns
    return {"socket_address": address}


def has_vip(target: ServiceTarget) -> bool:
    """A service with a virtual IP (a ServiceEntry host: addresses) gets an outbound chain;
    callers of a headless one dial pod IPs, which pass through."""
    entry = target.service.entry
    return target.service.cluster_ip not in ("", "None") or bool(entry and entry.addresses)


def port_only(target: ServiceTarget) -> bool:
    """A ServiceEntry host without addresses: its traffic is told by the port alone (Istio's
    0.0.0.0:<port> listener; HTTP by the Host header among the port's hosts, see
    ``host_routing_chain``; TCP: the port is the host's, first come first served)."""
    return target.service.entry is not None and not has_vip(target)


def host_prefix(ip: str) -> dict[str, Any]:
    """The filter chain prefix matching exactly IP: /32 for IPv4, /128 for IPv6; a CIDR (a
    ServiceEntry's addresses may be one) as the network it names."""
    network = ipaddress.ip_network(ip, strict=False)
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


def target_prefixes(target: ServiceTarget) -> list[dict[str, Any]]:
    """The destination prefixes of a target's chain: its VIP, or its ServiceEntry's addresses;
    none for a port-only one."""
    entry = target.service.entry
    if entry is not None and entry.addresses:
        return [host_prefix(address) for address in entry.addresses]
    if target.service.cluster_ip in ("", "None"):
        return []
    return [host_prefix(target.service.cluster_ip)]


def _loop_guard(name: str, port: int, direction: str, who: str) -> dict[str, Any]:
    """Connections whose original destination is the capture listener's own port."""
    return {
        "name": name,
        "filter_chain_match": {"destination_port": port},
        "filters": [tcp_proxy(BLACKHOLE, BLACKHOLE, direction, who)],
    }


def _stamped(netns: str, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    """FILTERS, behind the filter that makes upstream sockets in NETNS (none in sidecar form)."""
    return [stamp_netns(netns), *filters] if netns else list(filters)


def outbound_chain(
    target: ServiceTarget, who: str, tcp_route: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The filter chain of one service port (its VIP:port). WHO names the calling pod in access
    logs (a formatter in the shared outbound-internal listener). TCP_ROUTE: where a
    VirtualService's ``tcp`` rules send a TCP port's connections (tcp_proxy ``cluster`` or
    ``weighted_clusters``), instead of the port's own cluster."""
    name = target.cluster
    if is_http(target.protocol):
        last = http_connection_manager(
            name, name, "outbound", who, stats=_source_stats(who, tcp=False)
        )
    else:
        last = tcp_proxy(name, name, "outbound", who, tcp_route, _source_stats(who, tcp=True))
    match: dict[str, Any] = {"destination_port": target.port.port}
    if prefixes := target_prefixes(target):
        match["prefix_ranges"] = prefixes
    return {"name": name, "filter_chain_match": match, "filters": [last]}


def allocated_chain(chain: dict[str, Any], address: str) -> dict[str, Any]:
    """A port-only chain (a ServiceEntry host without addresses) again, for the host's
    auto-allocated ADDRESS alone (mesh/autoallocate.py): pods whose DNS proxy answers with it
    reach their host even where several such hosts share a TCP port, as Istio's listener on
    the allocated address (istio.io/latest/docs/ops/configuration/traffic-management/
    dns-proxy/#address-auto-allocation); the port-only chain stays for the others."""
    match = {**chain["filter_chain_match"], "prefix_ranges": [host_prefix(address)]}
    return {**chain, "name": f"{chain['name']}~{address}", "filter_chain_match": match}


PASSTHROUGH_ROUTE, BLACKHOLE_ROUTE = "allow_any", "block_all"


def host_routing_chain(port: int, who: str, table: str = "") -> dict[str, Any]:
    """The chain of an HTTP port that ServiceEntry hosts without addresses use: any destination
    on PORT, routed by the Host header (route TABLE, default ``<port>``: ``host_routing_table``),
    as Istio's 0.0.0.0_<port> listener (pilot/pkg/networking/core/listener.go)."""
    name = table or str(port)
    return {
        "name": f"0.0.0.0_{port}",
        "filter_chain_match": {"destination_port": port},
        "filters": [
            http_connection_manager(
                f"0.0.0.0_{port}", name, "outbound", who, stats=_source_stats(who, tcp=False)
            )
        ],
    }


def host_routing_table(
    port: int,
    hosts: Sequence[tuple[str, RouteConfiguration]],
    outbound_policy: str,
    name: str = "",
) -> RouteConfiguration:
    """Route table ``<port>``: a virtual host per ServiceEntry host on PORT (HOSTS: host and its
    own route table, whose routes it takes: VirtualServices apply), then Istio's catch-all
    (pilot/pkg/networking/core/route/route.go BuildCatchAllVirtualHost): ``allow_any`` to
    PassthroughCluster under ALLOW_ANY, ``block_all`` answering 502 under REGISTRY_ONLY."""
    table = message(RouteConfiguration, {"name": name or str(port), "validate_clusters": False})
    for host, own in hosts:
        vhost = table.virtual_hosts.add()
        vhost.CopyFrom(own.virtual_hosts[0])
        vhost.name = f"{host}:{port}"
        del vhost.domains[:]
        vhost.domains.extend([host, f"{host}:{port}"])
    if outbound_policy == REGISTRY_ONLY:
        catch_all = {
            "name": BLACKHOLE_ROUTE,
            "match": {"prefix": "/"},
            "direct_response": {"status": 502},
        }
    else:
        catch_all = {
            "name": PASSTHROUGH_ROUTE,
            "match": {"prefix": "/"},
            "route": {"cluster": PASSTHROUGH, "timeout": "0s"},
        }
    fallback = BLACKHOLE_ROUTE if outbound_policy == REGISTRY_ONLY else PASSTHROUGH_ROUTE
    table.virtual_hosts.append(
        message(VirtualHost, {"name": fallback, "domains": ["*"], "routes": [catch_all]})
    )
    return table


def blackhole_chain(ip: str, port: int, who: str) -> dict[str, Any]:
    """A service VIP:port whose config was left out: refused, never passed through."""
    return {
        "name": f"{BLACKHOLE}|{ip}:{port}",
        "filter_chain_match": {"prefix_ranges": [host_prefix(ip)], "destination_port": port},
        "filters": [tcp_proxy(BLACKHOLE, BLACKHOLE, "outbound", who)],
    }


def _fallback(outbound_policy: str, who: str) -> dict[str, Any]:
    """Destinations no chain matches: passed through (ALLOW_ANY) or refused (REGISTRY_ONLY)."""
    fallback = BLACKHOLE if outbound_policy == REGISTRY_ONLY else PASSTHROUGH
    stats = _source_stats(who, tcp=True)
    return {
        "name": fallback,
        "filters": [tcp_proxy(fallback, fallback, "outbound", who, stats=stats)],
    }


def pod_outbound_listener(
    pod: Pod,
    netns: str,
    spiffe: str,
    to: str = internal.OUTBOUND_INTERNAL,
    log_class: str = "",
    stamp: Sequence[dict[str, Any]] = (),
) -> Listener:
    """A pod's outbound listener on the node: the same few filters whatever the mesh holds. It
    stamps the caller (netns, SPIFFE ID, name, IP, its side of Istio's metrics; LOG_CLASS: its
    access log class, see access_logs.py; STAMP: more, its span tags while the node traces,
    translate/tracing.py) and hands the connection to the internal listener TO:
    outbound-internal, or its Sidecar scope's (mesh/sidecar_scope.py)."""
    who = pod.key
    source = pod.pod_ips[0] if pod.pod_ips else ""
    return message(
        Listener,
        {
            "name": outbound_name(pod),
            "address": _address("127.0.0.1", OUTBOUND_PORT, netns),
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": [_loop_guard(OUTBOUND_BLACKHOLE, OUTBOUND_PORT, "outbound", who)],
            "default_filter_chain": {
                "name": to,
                "filters": [
                    internal.stamp_caller(
                        netns,
                        spiffe,
                        who,
                        source,
                        pod.labels,
                        istio_stats.stamp(pod),
                        log_class,
                        stamp,
                    ),
                    tcp_proxy(internal.OUTBOUND_INTERNAL, to, "outbound", who),
                ],
            },
            "traffic_direction": "OUTBOUND",
        },
    )


def outbound_internal_listener(
    chains: Sequence[FilterChain], outbound_policy: str, name: str = internal.OUTBOUND_INTERNAL
) -> Listener:
    """The listener holding every service port's chain (CHAINS, made by ``outbound_chain``
    with the calling pod's name from filter state), reached only from pods' outbound listeners.
    NAME: outbound-internal, or a Sidecar scope's, which holds only the chains in its scope and
    its own fallback: an out-of-scope service is unknown to its pods, as to Istio's sidecar."""
    listener = message(
        Listener,
        {
            "name": name,
            "internal_listener": {},
            "listener_filters": [ORIGINAL_DST_FILTER],
            "default_filter_chain": _fallback(outbound_policy, internal.POD_FORMAT),
            "traffic_direction": "OUTBOUND",
        },
    )
    listener.filter_chains.extend(chains)
    return listener


def outbound_listener(
    pod: Pod,
    targets: Sequence[ServiceTarget],
    outbound_policy: str,
    extra: Sequence[dict[str, Any]] = (),
) -> Listener:
    """The sidecar form's outbound listener: a chain per service port, in the pod's own Envoy.
    EXTRA: more filter chains (black-holed VIP:ports)."""
    who = pod.key
    chains = [outbound_chain(target, who) for target in targets if has_vip(target)]
    chains.extend(extra)
    chains.append(_loop_guard(OUTBOUND_BLACKHOLE, OUTBOUND_PORT, "outbound", who))
    return message(
        Listener,
        {
            "name": outbound_name(pod),
            "address": _address("127.0.0.1", OUTBOUND_PORT, ""),
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": chains,
            "default_filter_chain": _fallback(outbound_policy, who),
            "traffic_direction": "OUTBOUND",
        },
    )


def inbound_listener(
    pod: Pod,
    netns: str,
    ports: dict[int, tuple[str, str]],
    default_mode: str,
    identity: str,
    authz: PodAuthz | None = None,
    authn: Sequence[dict[str, Any]] = (),
    services: Mapping[int, Mapping[str, str]] | None = None,
) -> Listener:
    """PORTS: container port -> (protocol, PeerAuthentication mode); DEFAULT_MODE for the rest.
    AUTHZ: the AuthorizationPolicies that apply to the pod, enforced on every chain that
    delivers to it (HTTP RBAC in HTTP chains, network RBAC in the others: translate/authz.py).
    AUTHN: its RequestAuthentication HTTP filters (jwt.inbound_filters), before RBAC, as Istio
    orders them (authentication first: RBAC reads the verified JWT payload).

    STRICT: mTLS only (anything else is refused); PERMISSIVE: mTLS, plaintext, and the client's
    own TLS passed through to the app untouched; DISABLE: no mTLS. IDENTITY is the SPIFFE ID
    this pod's server side presents. SERVICES: container port -> the service it is for in
    Istio's metrics (istio_stats.cluster_metadata); None: no metrics (the sidecar form).

    Which TLS is mesh mTLS is told by ALPN, as Istio's inbound filter chain matches do
    (istio/istio pilot/pkg/networking/core/filterchain_options.go: PERMISSIVE matches mTLS on
    ``allIstioMtlsALPNs`` and sends other TLS to a TCP chain; STRICT takes any TLS as mTLS).
    """
    who = pod.key
    chains: list[dict[str, Any]] = [_loop_guard(INBOUND_BLACKHOLE, INBOUND_PORT, "inbound", who)]
    me = istio_stats.pod_peer(pod, identity)

    def stats(port: int | None, tcp: bool, caller: str) -> list[dict[str, Any]]:
        if services is None:
            return []
        service = services.get(port) if port is not None else None
        return istio_stats.destination_loggers(me, service, caller, tcp, spec=_served(pod))

    def terminal(port: int | None, protocol: str, mtls: bool) -> list[dict[str, Any]]:
        # Denials counted per pod and path (translate/denials.py): a caller without mesh mTLS
        # (outside the mesh, or its own TLS) is "plaintext".
        key = denials.stat_key(pod.namespace, pod.name, denials.MTLS if mtls else denials.PLAINTEXT)
        caller = "mtls" if mtls else "plaintext"
        if port is not None and is_http(protocol):
            name = inbound_cluster(port)
            http = [*authn, *chain_filters(authz, tcp=False, key=key)]
            if mtls and services is not None:  # the caller's side, from its node's headers
                http.insert(0, istio_stats.copy_peer_headers())
            return [
                http_connection_manager(
                    name,
                    name,
                    "inbound",
                    who,
                    mtls=mtls,
                    inbound_filters=http,
                    stats=stats(port, False, caller),
                )
            ]
        return [
            *chain_filters(authz, tcp=True, key=key),
            tcp_proxy(
                INBOUND_PASSTHROUGH,
                INBOUND_PASSTHROUGH,
                "inbound",
                who,
                stats=stats(port, True, caller),
            ),
        ]

    def mtls_match(mode: str, match: dict[str, Any]) -> dict[str, Any]:
        match = {**match, "transport_protocol": "tls"}
        if mode != STRICT:  # PERMISSIVE: other TLS is the app's own
            match["application_protocols"] = list(tls.MTLS_ALPNS)
        return match

    for port in sorted(ports):
        if port == INBOUND_PORT:
            continue  # reserved for capture: the loop guard owns it (Istio refuses it too)
        protocol, mode = ports[port]
        name = inbound_cluster(port)
        port_match = {"destination_port": port}
        if mode != DISABLE:
            chains.append(
                {
                    "name": f"{name}-mtls",
                    "filter_chain_match": mtls_match(mode, port_match),
                    "transport_socket": tls.downstream_mtls(identity),
                    "filters": _stamped(netns, *terminal(port, protocol, True)),
                }
            )
        if mode != STRICT and is_http(protocol):
            # The client's own TLS (no Istio ALPN): bytes to the app, not to an HTTP parser.
            chains.append(
                {
                    "name": f"{name}-tls",
                    "filter_chain_match": {**port_match, "transport_protocol": "tls"},
                    "filters": _stamped(netns, *terminal(port, "TCP", False)),
                }
            )
        plain = (
            [tls.deny_all(f"{name}-strict"), _blackhole(who)]
            if mode == STRICT
            else _stamped(netns, *terminal(port, protocol, False))
        )
        chains.append({"name": name, "filter_chain_match": port_match, "filters": plain})
    if default_mode != DISABLE:
        chains.append(
            {
                "name": f"{INBOUND_PASSTHROUGH}-mtls",
                "filter_chain_match": mtls_match(default_mode, {}),
                "transport_socket": tls.downstream_mtls(identity),
                "filters": _stamped(netns, *terminal(None, "TCP", True)),
            }
        )
    default = (
        [tls.deny_all("inbound-strict"), _blackhole(who)]
        if default_mode == STRICT
        else _stamped(netns, *terminal(None, "TCP", False))
    )
    return message(
        Listener,
        {
            "name": inbound_name(pod),
            "address": _address("0.0.0.0", INBOUND_PORT, netns),
            "listener_filters": [ORIGINAL_DST_FILTER, TLS_INSPECTOR],
            "filter_chains": chains,
            "default_filter_chain": {"name": INBOUND_PASSTHROUGH, "filters": default},
            "traffic_direction": "INBOUND",
        },
    )


def fast_ports(ports: dict[int, tuple[str, str]], authz: PodAuthz | None = None) -> frozenset[int]:
    """The ports of PORTS (as for ``inbound_listener``) a local caller reaches over the fast path:
    those a service names, whose PeerAuthentication accepts mTLS (DISABLE: callers send it
    plaintext, the normal way). Others, and ports a service names by name, stay on the mTLS path.
    None when AUTHZ, the pod's AuthorizationPolicies, reads the caller's address on any port
    (authz.py): the fast path has none to give, so its same-node callers come over mTLS from
    their own pod IP, which the inbound listener's RBAC filters see as any other caller's."""
    if authz is not None and authz.reads_caller_ip():
        return frozenset()
    return frozenset(
        port for port, (_, mode) in ports.items() if mode != DISABLE and port != INBOUND_PORT
    )


def fast_inbound_listener(
    pod: Pod,
    netns: str,
    ports: dict[int, tuple[str, str]],
    identity: str,
    authz: PodAuthz | None = None,
    authn: Sequence[dict[str, Any]] = (),
    services: Mapping[int, Mapping[str, str]] | None = None,
) -> Listener | None:
    """A local pod's same-node fast path: ``inboundInternal/<ns>/<pod>``, the internal listener
    its endpoints on ``fast_ports`` are on the node's service clusters (endpoints.py); None when
    it has none. PORTS, IDENTITY, AUTH and SERVICES as for ``inbound_listener``.

    What the pod's inbound listener does once the mTLS handshake is done, without one: the caller
    is a local pod whose identity its own outbound listener stamped, which STRICT and PERMISSIVE
    accept. HTTP ports tell the app who called in x-forwarded-client-cert; delivery is from the
    pod's netns, as on the mTLS path. No loop guard and no default chain: only this Envoy's
    clusters reach an internal listener, and only at the ports they were given.
    """
    who = pod.key
    stamp = internal.stamp_callee(netns, identity)
    key = denials.stat_key(pod.namespace, pod.name, denials.FAST)
    me = istio_stats.pod_peer(pod, identity)

    def stats(port: int, tcp: bool) -> list[dict[str, Any]]:
        if services is None:
            return []
        caller = internal.CALLER_KEY
        spec = _served(pod)
        return istio_stats.destination_loggers(me, services.get(port), "fast", tcp, caller, spec)

    def deliver(port: int, protocol: str) -> list[dict[str, Any]]:
        # The same AuthorizationPolicy filters as the mTLS path: their principal matchers
        # read the caller the node stamped when there is no peer certificate (authz.py).
        if is_http(protocol):
            route = fast_route(port)  # also its stats' prefix: the fast path's own requests
            http = [*authn, *chain_filters(authz, tcp=False, key=key)]
            return [
                http_connection_manager(
                    route,
                    route,
                    "inbound",
                    who,
                    fast=True,
                    inbound_filters=http,
                    stats=stats(port, tcp=False),
                )
            ]
        return [
            *chain_filters(authz, tcp=True, key=key),
            tcp_proxy(
                INBOUND_PASSTHROUGH,
                INBOUND_PASSTHROUGH,
                "inbound",
                who,
                stats=stats(port, tcp=True),
            ),
        ]

    chains = [
        {
            "name": inbound_cluster(port),
            "filter_chain_match": {"destination_port": port},
            "filters": [stamp, *deliver(port, ports[port][0])],
        }
        for port in sorted(fast_ports(ports, authz))
    ]
    if not chains:
        return None
    return message(
        Listener,
        {
            "name": internal.fast_name(pod.namespace, pod.name),
            # Stats of every pod's fast path together: none names a pod (its name would be
            # the listener's address otherwise).
            "stat_prefix": internal.FAST_PREFIX,
            "internal_listener": {},
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": chains,
            "traffic_direction": "INBOUND",
        },
    )
