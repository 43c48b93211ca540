"""The node Envoy's bootstrap: everything it needs before the agent's ADS stream delivers the rest.

Static parts only: the ADS cluster (a UNIX socket to the agent), the admin endpoint (a UNIX
socket, mode 0600, next to it: nothing on the node's network reaches admin), Istio's :15090
Prometheus listener, the stats that must not leave the node unauthenticated, the mark on Envoy's
own upstream sockets and the overload limit. Listeners, routes, clusters and secrets for pods
all arrive over ADS.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodeagent.ports import MESH_MARK, RE2_MAX_PROGRAM_SIZE

ADS_CLUSTER = "xds-grpc"  # Istio's name for the control-plane cluster
STATS_CLUSTER = "prometheus_stats"  # the stats listener's way back into the admin endpoint
STATS_LISTENER = "prometheus"
STATS_PATH = "/stats/prometheus"
# Envoy's own readiness (admin /ready: 200 "LIVE"), also answered on the stats port: a probe
# from outside the node's loopback (the DaemonSet's envoy container) reaches it there.
READY_PATH = "/ready"
BOOTSTRAP_FILE = "envoy-bootstrap.json"  # in the run dir, next to the xDS socket
ADMIN_SOCKET = "envoy-admin.sock"  # in the run dir too: root only (0600 in a 0700 directory)
ADMIN_SOCKET_MODE = 0o600
# Envoy's own stats whose names carry a workload identity or a pod are never created: :15090
# answers anyone on the node's network. Clusters and routes are named by service, never by
# identity; SDS secrets and originate-mtls's transport sockets are named by SPIFFE ID, hence the
# patterns. What Envoy holds per pod stays visible to root through the admin socket
# (proxy-config). Istio's standard metrics (the scope ``istiocustom``, translate/istio_stats.py)
# are the exception, as at Istio, whose every sidecar exports them: their principal labels are
# SPIFFE IDs. The matcher sees a stat's flat name (tag values included), and RE2 has no
# lookahead, so "spiffe:// in a name not starting with istiocustom." is spelled out by prefix.
_ISTIO_SCOPE = "istiocustom."
_NOT_ISTIO = "|".join(
    re.escape(_ISTIO_SCOPE[:i]) + f"[^{re.escape(c)}]" for i, c in enumerate(_ISTIO_SCOPE)
)
PRIVATE_STAT_PATTERNS: tuple[dict[str, Any], ...] = (
    {"contains": "~"},
    # A StringMatcher's regex must match the whole name.
    {"safe_regex": {"regex": f"(?:{_NOT_ISTIO}).*spiffe://.*"}},
)
MAX_DOWNSTREAM_CONNECTIONS = 100_000  # generous: it only exists so Envoy does not warn

# Without ADS, Envoy waits this long per xDS type (CDS, then LDS) before going LIVE with the
# static config alone; it keeps the stream open and applies the agent's config when it comes.
# Envoy's default is 15 s per type, and 0 (Istio's choice for sidecars) waits forever: a node
# proxy must serve its stats and admin even while the agent is briefly absent.
INITIAL_FETCH_TIMEOUT = 5.0
# The agent restarts in seconds: reconnect to it quickly (Envoy's default backs off to 30 s).
ADS_RETRY_BASE = 0.25
ADS_RETRY_MAX = 3.0

# Internal listeners (outbound-internal, originate: nodeagent/translate/internal.py) exist only
# with this bootstrap extension (docs configuration/other_features/internal_listener).
INTERNAL_LISTENERS: dict[str, Any] = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
    },
}

# ADS variants (config.core.v3.ApiConfigSource.ApiType): the node's Envoy uses delta (incremental)
# xDS, so a change sends only the resources it touched and removals name what goes
# (https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol#incremental-xds); the
# sidecar model keeps state-of-the-world, which the xDS server serves as well.
DELTA_ADS, SOTW_ADS = "DELTA_GRPC", "GRPC"

# A user-space (internal listener) socket closed after an HTTP/1 "Connection: close" response
# reaches its peer as a reset, which tcp_proxy passes on as an RST to the app: the app lost the
# response it was reading (ECONNRESET). Internal connections close gracefully instead; real TCP
# resets still propagate. Runtime key of Envoy 1.40 (source/common/runtime/runtime_features.cc).
STATIC_RUNTIME = {
    "envoy.reloadable_features.enable_send_rst_on_user_space_socket": False,
    "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
}

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_SOL_SOCKET = 1
_SO_MARK = 36


def bootstrap(
    node_id: str,
    cluster: str,
    ads_socket: Path,
    admin_socket: Path | None = None,
    admin_port: int = 15000,
    stats_port: int = 15090,
    stats_host: str = "0.0.0.0",
    node_metadata: Mapping[str, str] | None = None,
    *,
    initial_fetch_timeout: float = INITIAL_FETCH_TIMEOUT,
    socket_mark: int | None = MESH_MARK,
    api_type: str = DELTA_ADS,
) -> dict[str, Any]:
    """An Envoy v3 Bootstrap as JSON-able data. Admin listens on ADMIN_SOCKET (mode 0600), or,
    without one, on 127.0.0.1:ADMIN_PORT (the sidecar model: Istio's in-pod admin). The stats
    listener binds STATS_HOST:STATS_PORT. ``socket_mark=None`` leaves sockets unmarked (setting
    SO_MARK needs CAP_NET_ADMIN). API_TYPE: DELTA_ADS (default) or SOTW_ADS."""
    if api_type not in (DELTA_ADS, SOTW_ADS):
        raise ValueError(f"ADS api_type must be {DELTA_ADS} or {SOTW_ADS}, not {api_type!r}")
    admin = (
        {"pipe": {"path": str(admin_socket), "mode": ADMIN_SOCKET_MODE}}
        if admin_socket is not None
        else _socket_address("127.0.0.1", admin_port)
    )
    ads: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if initial_fetch_timeout > 0:
        ads["initial_fetch_timeout"] = _duration(initial_fetch_timeout)
    config: dict[str, Any] = {
        "node": {"id": node_id, "cluster": cluster, "metadata": dict(node_metadata or {})},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": ADS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": _duration(ADS_RETRY_BASE),
                                    "max_interval": _duration(ADS_RETRY_MAX),
                                }
                            },
                        }
                    }
                ],
            },
            "cds_config": dict(ads),
            "lds_config": dict(ads),
        },
        "static_resources": {
            "clusters": [_ads_cluster(ads_socket), _stats_cluster(admin)],
            "listeners": [_stats_listener(stats_host, stats_port)],
        },
        "admin": {"address": admin},
        "bootstrap_extensions": [INTERNAL_LISTENERS],
        "stats_config": {
            "stats_matcher": {"exclusion_list": {"patterns": list(PRIVATE_STAT_PATTERNS)}}
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                        ".downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        # An admin layer lets an operator flip runtime keys through /runtime_modify.
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": dict(STATIC_RUNTIME)},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    if socket_mark is not None:
        # Applies to every cluster without its own bind config: capture skips marked packets.
        config["cluster_manager"] = {
            "upstream_bind_config": {
                "socket_options": [
                    {"level": _SOL_SOCKET, "name": _SO_MARK, "int_value": socket_mark}
                ]
            }
        }
    return config


def bootstrap_path(run_dir: Path) -> Path:
    """Where the agent writes the bootstrap, and where the envoy container looks for it."""
    return run_dir / BOOTSTRAP_FILE


def admin_socket_path(run_dir: Path) -> Path:
    """The node Envoy's admin socket, in the run dir the agent and the envoy container share."""
    return run_dir / ADMIN_SOCKET


def write_bootstrap(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write a bootstrap (from ``bootstrap()``) to ``path`` atomically, mode 0600 (the node's
    metadata is private); an Envoy starting concurrently reads the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return config


def _ads_cluster(ads_socket: Path) -> dict[str, Any]:
    return {
        "name": ADS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",  # a local socket: anything slower means the agent is not there
        "load_assignment": {
            "cluster_name": ADS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(ads_socket)}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            HTTP_PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},  # gRPC needs HTTP/2
            }
        },
    }


def _stats_cluster(admin: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": STATS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": STATS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": admin}}]}],
        },
    }


def _stats_listener(host: str, port: int) -> dict[str, Any]:
    """HOST:PORT answers only /stats/prometheus and /ready, so scrapers and probes never reach
    the rest of the admin API."""
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "stats",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": STATS_PATH}, "route": {"cluster": STATS_CLUSTER}},
                        {"match": {"path": READY_PATH}, "route": {"cluster": STATS_CLUSTER}},
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": STATS_LISTENER,
        "address": _socket_address(host, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    """Protobuf JSON Duration ("0.25s"), never in exponent notation."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
