"""Envoy resource construction helpers: readable dicts in, protobuf messages out.

Importing the extension modules registers their types, so ``typed_config`` blocks written as
``{"@type": ...}`` dicts resolve when parsed.
"""

from __future__ import annotations

from typing import Any, TypeVar

# Registers every extension type this package writes into typed_config.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import (  # noqa: F401
    ext_authz_pb2 as http_ext_authz_pb2,
)
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2 as http_set_filter_state_pb2,
)
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.local_address_selectors.filter_state_override.v3 import (  # noqa: F401
    config_pb2,
)
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2  # noqa: F401
from envoy.extensions.matching.common_inputs.transport_socket.v3 import (  # noqa: F401
    transport_socket_inputs_pb2,
)
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2  # noqa: F401
from envoy.extensions.request_id.uuid.v3 import uuid_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.internal_upstream.v3 import (  # noqa: F401
    internal_upstream_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format, wrappers_pb2  # noqa: F401  (StringValue actions)
from google.protobuf.message import Message

Listener = listener_pb2.Listener
FilterChain = listener_components_pb2.FilterChain
Cluster = cluster_pb2.Cluster
ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment
RouteConfiguration = route_pb2.RouteConfiguration
Route = route_components_pb2.Route
VirtualHost = route_components_pb2.VirtualHost

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
Secret = secret_pb2.Secret

M = TypeVar("M", bound=Message)


def message(cls: type[M], fields: dict[str, Any]) -> M:
    """Build a message from its proto3 JSON form; unknown fields are a programming error."""
    built: M = json_format.ParseDict(fields, cls())
    return built


def typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}
