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
from nodeagent.translate.envoy import Listener, message, typed
from nodeagent.translate.filters import http_connection_manager, stamp_netns, tcp_proxy
from nodeagent.translate.protocol import is_http
from nodeagent.translate.services import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    ServiceTarget,
    inbound_cluster,
)

ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
}


def outbound_name(pod: Pod) -> str:
    return f"virtualOutbound/{pod.namespace}/{pod.name}"


def inbound_name(pod: Pod) -> str:
    return f"virtualInbound/{pod.namespace}/{pod.name}"


def _address(ip: str, port: int, netns: str) -> dict[str, Any]:
    return {
        "socket_address": {"address": ip, "port_value": port, "network_namespace_filepath": netns}
    }


def outbound_listener(
    pod: Pod, netns: str, targets: Sequence[ServiceTarget], outbound_policy: str
) -> Listener:
    who = pod.key
    chains = []
    for target in targets:
        if not target.service.cluster_ip or target.service.cluster_ip == "None":
            continue  # headless: callers dial pod IPs, which pass through
        if is_http(target.protocol):
            last = http_connection_manager(target.cluster, target.cluster, "outbound", who)
        else:
            last = tcp_proxy(target.cluster, target.cluster, "outbound", who)
        chains.append(
            {
                "name": target.cluster,
                "filter_chain_match": {
                    "prefix_ranges": [
                        {"address_prefix": target.service.cluster_ip, "prefix_len": 32}
                    ],
                    "destination_port": target.port.port,
                },
                "filters": [stamp_netns(netns), last],
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
                "filters": [stamp_netns(netns), tcp_proxy(fallback, fallback, "outbound", who)],
            },
            "traffic_direction": "OUTBOUND",
        },
    )


def inbound_listener(pod: Pod, netns: str, http_ports: dict[int, str]) -> Listener:
    who = pod.key
    chains = [
        {
            "name": inbound_cluster(port),
            "filter_chain_match": {"destination_port": port},
            "filters": [
                stamp_netns(netns),
                http_connection_manager(
                    inbound_cluster(port), inbound_cluster(port), "inbound", who
                ),
            ],
        }
        for port in sorted(http_ports)
    ]
    return message(
        Listener,
        {
            "name": inbound_name(pod),
            "address": _address("0.0.0.0", INBOUND_PORT, netns),
            "listener_filters": [ORIGINAL_DST_FILTER],
            "filter_chains": chains,
            "default_filter_chain": {
                "name": INBOUND_PASSTHROUGH,
                "filters": [
                    stamp_netns(netns),
                    tcp_proxy(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH, "inbound", who),
                ],
            },
            "traffic_direction": "INBOUND",
        },
    )
