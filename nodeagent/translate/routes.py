"""Routes: a service port's outbound route table, and a local port's inbound one (pure).
VirtualService routing will build on these."""

from __future__ import annotations

from typing import Any

from nodeagent.translate.envoy import RouteConfiguration, message, typed
from nodeagent.translate.services import ServiceTarget, inbound_cluster


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


def outbound_route(target: ServiceTarget) -> RouteConfiguration:
    """The service port's routes: every request to its cluster (VirtualService routing later)."""
    cluster = target.cluster
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
