"""The two listeners of each local captured pod, bound inside the pod's network namespace (pure).

- ``virtualOutbound``: 127.0.0.1:15001, where in-pod capture redirects the pod's outbound TCP. The
  original destination (VIP:port) selects a filter chain per service port; anything else goes to
  the passthrough cluster (ALLOW_ANY) or the black hole (REGISTRY_ONLY).
- ``virtualInbound``: 0.0.0.0:15006, where capture redirects inbound TCP; delivers to the app at
  the original destination (the pod's IP and port), from inside the pod.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nodeagent.mesh.model import REGISTRY_ONLY, Pod
from nodeagent.redirect.capture import INBOUND_PORT, OUTBOUND_PORT
from nodeagent.translate import tls
from nodeagent.translate.envoy import Listener, message, typed
from nodeagent.translate.filters import http_connection_manager, stamp_netns, tcp_proxy
from nodeagent.translate.protocol import is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    Identity,
    ServiceTarget,
    inbound_cluster,
)

STRICT, DISABLE = "STRICT", "DISABLE"

TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
}
ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
}


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


def _stamped(netns: str, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    """FILTERS, behind the filter that makes upstream sockets in NETNS (none in sidecar form)."""
    return [stamp_netns(netns), *filters] if netns else list(filters)


def outbound_listener(
    pod: Pod,
    netns: str,
    targets: Sequence[ServiceTarget],
    outbound_policy: str,
    identity: Identity,
) -> Listener:
    who = pod.key
    chains = []
    for target in targets:
        if not target.service.cluster_ip or target.service.cluster_ip == "None":
            continue  # headless: callers dial pod IPs, which pass through
        name = target.cluster_for(identity)
        # Stats under the service's name: no identity in a stat name (#12).
        if is_http(target.protocol):
            last = http_connection_manager(target.cluster, name, "outbound", who)
        else:
            last = tcp_proxy(target.cluster, name, "outbound", who)
        chains.append(
            {
                "name": name,
                "filter_chain_match": {
                    "prefix_ranges": [
                        {"address_prefix": target.service.cluster_ip, "prefix_len": 32}
                    ],
                    "destination_port": target.port.port,
                },
                "filters": _stamped(netns, last),
            }
        )
    fallback = BLACKHOLE if outbound_policy == REGISTRY_ONLY else PASSTHROUGH
    return message(
        Listener,
        {
            "name": outbound_name(pod),
            "address": _address("127.0.0.1", OUTBOUND_PORT, netns),
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": chains,
            "default_filter_chain": {
                "name": fallback,
                "filters": _stamped(netns, tcp_proxy(fallback, fallback, "outbound", who)),
            },
            "traffic_direction": "OUTBOUND",
        },
    )


def inbound_listener(
    pod: Pod,
    netns: str,
    ports: dict[int, tuple[str, str]],
    default_mode: str,
    identity: str,
) -> Listener:
    """PORTS: container port -> (protocol, PeerAuthentication mode); DEFAULT_MODE for the rest.

    STRICT: mTLS only (plaintext is refused); PERMISSIVE: mTLS and plaintext; DISABLE: plaintext.
    IDENTITY is the SPIFFE ID this pod's server side presents.
    """
    who = pod.key
    chains: list[dict[str, Any]] = []

    def terminal(port: int | None, protocol: str, mtls: bool) -> dict[str, Any]:
        if port is not None and is_http(protocol):
            name = inbound_cluster(port)
            return http_connection_manager(name, name, "inbound", who, mtls=mtls)
        return tcp_proxy(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH, "inbound", who)

    for port in sorted(ports):
        protocol, mode = ports[port]
        name = inbound_cluster(port)
        if mode != DISABLE:
            chains.append(
                {
                    "name": f"{name}-mtls",
                    "filter_chain_match": {"destination_port": port, "transport_protocol": "tls"},
                    "transport_socket": tls.downstream_mtls(identity),
                    "filters": _stamped(netns, terminal(port, protocol, True)),
                }
            )
        plain = (
            [tls.deny_all(f"{name}-strict"), _blackhole(who)]
            if mode == STRICT
            else _stamped(netns, terminal(port, protocol, False))
        )
        chains.append(
            {"name": name, "filter_chain_match": {"destination_port": port}, "filters": plain}
        )
    if default_mode != DISABLE:
        chains.append(
            {
                "name": f"{INBOUND_PASSTHROUGH}-mtls",
                "filter_chain_match": {"transport_protocol": "tls"},
                "transport_socket": tls.downstream_mtls(identity),
                "filters": _stamped(netns, terminal(None, "TCP", True)),
            }
        )
    default = (
        [tls.deny_all("inbound-strict"), _blackhole(who)]
        if default_mode == STRICT
        else _stamped(netns, terminal(None, "TCP", False))
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
