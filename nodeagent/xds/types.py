"""xDS v3 type URLs and the order in which ADS pushes them (make before break)."""

from __future__ import annotations

from typing import Final

_PREFIX: Final = "type.googleapis.com/"

CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Additions and updates: what a resource refers to reaches Envoy before the resource itself
# (the xDS protocol's "eventual consistency considerations").
ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
# Removals come after every addition of the snapshot, users before what they use: a cluster is
# withdrawn only once no listener or route of the new snapshot points at it.
REMOVAL_ORDER: Final[tuple[str, ...]] = (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)

# Envoy subscribes to these with a wildcard; the others are requested by name.
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS"}


def short_name(type_url: str) -> str:
    """The name operators know a type by (CDS, EDS, …), for logs and metric labels."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def message_name(type_url: str) -> str:
    """The protobuf full name a type URL stands for."""
    return type_url.removeprefix(_PREFIX)
