"""Mirrored requests (VirtualService ``mirror``/``mirrors``) on the node Envoy (pure).

Envoy sends a mirror copy from an async client, whose stream does not carry the calling
connection's filter state: the copy would leave from the node's netns with no caller
certificate, and a mesh server refuses it. So a mirror policy names the ``mirror`` cluster
instead of the real one, and its header mutations (applied to the copy only, from the calling
stream's filter state) tell the internal listener ``mirror`` the real cluster and the caller:
netns, SPIFFE ID, pod name and IP. That listener stamps them back into filter state, drops the
headers, and routes the copy to the real cluster, from where it takes the same path as the
caller's own requests (``originate`` with the caller's certificate, or the callee's fast path).

The headers cannot be forged: only this Envoy's ``mirror`` cluster reaches the listener, and the
mutations overwrite whatever the app sent. Envoy appends ``-shadow`` to the copy's authority, as
for Istio's sidecars (istio.io/latest/docs/tasks/traffic-management/mirroring/).
"""

from __future__ import annotations

from typing import Any

from nodeagent.translate import internal
from nodeagent.translate.envoy import Listener, message, typed
from nodeagent.translate.filters import NETNS_FACTORY, NETNS_KEY, access_log, state_value

MIRROR = "mirror"  # internal listener and cluster
CLUSTER_HEADER = "x-nodeagent-mirror-cluster"
# filter state key -> (header, factory)
_CALLER = {
    NETNS_KEY: ("x-nodeagent-mirror-netns", NETNS_FACTORY),
    internal.CALLER_KEY: ("x-nodeagent-mirror-caller", NETNS_FACTORY),
    internal.POD_KEY: ("x-nodeagent-mirror-pod", internal.STRING),
    internal.SOURCE_KEY: ("x-nodeagent-mirror-source", internal.STRING),
}
HEADERS = (CLUSTER_HEADER, *(header for header, _ in _CALLER.values()))


def _set(header: str, value: str) -> dict[str, Any]:
    return {
        "append": {
            "header": {"key": header, "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    }


def via_mirror_listener(policy: dict[str, Any]) -> dict[str, Any]:
    """A route's request_mirror_policies entry, sent through the ``mirror`` listener."""
    mutations = [_set(CLUSTER_HEADER, policy["cluster"])]
    mutations += [
        _set(header, f"%FILTER_STATE({key}:PLAIN)%") for key, (header, _) in _CALLER.items()
    ]
    return {**policy, "cluster": MIRROR, "request_headers_mutations": mutations}


def mirror_listener() -> Listener:
    """Restores the caller from the copy's headers and routes it to the cluster they name."""
    restore = {
        "name": "envoy.filters.http.set_filter_state",
        "typed_config": typed(
            "envoy.extensions.filters.http.set_filter_state.v3.Config",
            on_request_headers=[
                state_value(key, f"%REQ({header})%", "TRANSITIVE", factory)
                for key, (header, factory) in _CALLER.items()
            ],
        ),
    }
    route = {
        "name": MIRROR,
        "match": {"prefix": "/"},
        "route": {"cluster_header": CLUSTER_HEADER, "timeout": "0s"},
    }
    manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=MIRROR,
            route_config={
                "name": MIRROR,
                "request_headers_to_remove": list(HEADERS),
                "virtual_hosts": [{"name": MIRROR, "domains": ["*"], "routes": [route]}],
            },
            http_filters=[
                restore,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
                },
            ],
            access_log=access_log("mirror", internal.POD_FORMAT),
        ),
    }
    return message(
        Listener,
        {
            "name": MIRROR,
            "internal_listener": {},
            "filter_chains": [{"name": MIRROR, "filters": [manager]}],
            "traffic_direction": "OUTBOUND",
        },
    )
