"""Routes: Istio's default retry policy, and a local port's inbound route table (pure). A service
port's outbound table is service_views.py's (VirtualService routing)."""

from __future__ import annotations

from typing import Any

from nodeagent.translate import internal, istio_stats
from nodeagent.translate.envoy import RouteConfiguration, message, typed
from nodeagent.translate.services import fast_route, inbound_cluster


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


def _state(key: str) -> str:
    return f"%FILTER_STATE({key}:PLAIN)%"


# On the fast path there is no certificate: the app is told its caller's identity (URI=) and
# its own (By=) from the filter state the caller's and the callee's listeners stamped, and the
# caller's address as the mTLS path's use_remote_address would have told it. No Hash= or
# Subject= (they describe a certificate).
FAST_HEADERS = [
    {
        "header": {
            "key": "x-forwarded-client-cert",
            "value": f"By={_state(internal.CALLEE_KEY)};URI={_state(internal.CALLER_KEY)}",
        },
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    },
    {
        "header": {"key": "x-forwarded-for", "value": _state(internal.SOURCE_KEY)},
        "append_action": "APPEND_IF_EXISTS_OR_ADD",
    },
]


def inbound_route(port: int, fast: bool = False) -> RouteConfiguration:
    """Every request to the local app on PORT. FAST: the same-node fast path's route."""
    extra = {"request_headers_to_add": FAST_HEADERS} if fast else {}
    return message(
        RouteConfiguration,
        {
            "name": fast_route(port) if fast else inbound_cluster(port),
            "validate_clusters": False,
            **extra,
            # The caller's side for Istio's metrics, read before routing (istio_stats.py).
            "request_headers_to_remove": istio_stats.peer_headers_to_remove(),
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
