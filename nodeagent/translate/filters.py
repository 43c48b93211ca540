"""Network filters shared by the outbound and inbound listeners (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nodeagent.translate import istio_stats
from nodeagent.translate.envoy import typed

# Upstream sockets are created in the network namespace this connection's pod lives in: the
# listener stamps the pod's netns into filter state and every cluster's local address selector
# reads it. So clusters are shared by all local pods, and config grows with services, not pods.
NETNS_KEY = "envoy.network.upstream_bind_override.network_namespace"

# Istio's default access log format, prefixed with the direction and the local pod.
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] {direction} {pod} "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% '
    '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% '
    '%CONNECTION_TERMINATION_DETAILS% "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% '
    '%BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" '
    '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" '
    "%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% "
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)
TCP_ACCESS_LOG_FORMAT = (
    "[%START_TIME%] {direction} {pod} TCP %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% "
    '%DURATION% "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %DOWNSTREAM_LOCAL_ADDRESS% '
    "%DOWNSTREAM_REMOTE_ADDRESS%\n"
)


# The stamp must be hashable: Envoy folds the hash of every filter state object shared with
# the upstream connection into the connection-pool key, but only for objects that are
# Envoy::Hashable (source/common/network/transport_socket_options_impl.cc, hashKey). The plain
# "envoy.string" factory is not, so two pods of one service account calling one service shared
# the per-identity cluster's pooled connections, and the second pod's requests left from the
# first pod's netns with its IP. "envoy.hashable_string" (set_filter_state's factory_key, docs:
# configuration/listeners/network_filters/set_filter_state "Understanding Object and Factory
# Keys"; source/extensions/filters/common/set_filter_state/filter_config.cc) keeps pools per netns.
NETNS_FACTORY = "envoy.hashable_string"


ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
}


def state_value(key: str, value: str, shared: str, factory: str = "") -> dict[str, Any]:
    """One set_filter_state entry: KEY = VALUE (a formatter string), SHARED with upstreams.
    FACTORY makes the object; Envoy's well-known keys have their own (an address, a SAN
    list), so only our keys name one."""
    entry = {
        "object_key": key,
        "format_string": {"text_format_source": {"inline_string": value}},
        "shared_with_upstream": shared,
    }
    if factory:
        entry["factory_key"] = factory
    return entry


def set_filter_state(*values: dict[str, Any]) -> dict[str, Any]:
    """The network filter that sets VALUES (``state_value``s) on each new connection."""
    return {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": typed(
            "envoy.extensions.filters.network.set_filter_state.v3.Config",
            on_new_connection=list(values),
        ),
    }


def stamp_netns(netns: str) -> dict[str, Any]:
    """The filter that makes this connection's upstream sockets, and their pool, NETNS's."""
    return set_filter_state(state_value(NETNS_KEY, netns, "ONCE", NETNS_FACTORY))


def dry_run_fields(tcp: bool) -> str:
    """The dry-run (``istio.io/dry-run``) verdicts of an inbound request or connection, from the
    dynamic metadata the RBAC filters leave under Istio's shadow prefixes (translate/authz.py):
    ``dry_run_deny=<rule>`` names the dry-run DENY rule that matched (it would have been denied),
    ``dry_run_allow=denied`` says no dry-run ALLOW rule matched; ``-`` where no such policy
    applies or nothing matched. Istio reports the same two results (its dry-run task,
    istio.io/latest/docs/tasks/security/authorization/authz-dry-run/: ``deny_policy.name``,
    ``allow_policy.result``); Envoy's keys (RBAC filter docs, "Dynamic Metadata"): the shadow
    rules' stat prefix, then ``shadow_effective_policy_id`` / ``shadow_engine_result``."""
    rbac = "envoy.filters.network.rbac" if tcp else "envoy.filters.http.rbac"
    deny = f"%DYNAMIC_METADATA({rbac}:istio_dry_run_deny_shadow_effective_policy_id)%"
    allow = f"%DYNAMIC_METADATA({rbac}:istio_dry_run_allow_shadow_engine_result)%"
    return f" dry_run_deny={deny} dry_run_allow={allow}"


def access_log(direction: str, pod: str, tcp: bool = False) -> list[dict[str, Any]]:
    """Istio's format; inbound lines end with the dry-run verdicts (``dry_run_fields``), after
    every field other tools read by position. Within a translation, what MeshConfig and the
    Telemetry API say (access_logs.py); outside one, always to stdout."""
    from nodeagent.translate import access_logs  # it builds on this module's formats

    fmt = TCP_ACCESS_LOG_FORMAT if tcp else ACCESS_LOG_FORMAT
    dry_run = dry_run_fields(tcp) if direction == "inbound" else ""
    if (plan := access_logs.active()) is not None:
        text = fmt.replace("{direction}", direction).replace("{pod}", pod)
        return access_logs.loggers(plan, direction, pod, tcp, text, dry_run)
    if dry_run:
        fmt = fmt.rstrip("\n") + dry_run + "\n"
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                log_format={
                    "text_format_source": {
                        "inline_string": fmt.replace("{direction}", direction).replace("{pod}", pod)
                    }
                },
            ),
        }
    ]


# HTTP filters a VirtualService's route configures per route (typed_per_filter_config, see
# translate/virtual_service.py); empty here, so a route without fault or corsPolicy passes
# through. In the order Istio's sidecar outbound HCM has them, before the router (fault, then
# cors: pilot/pkg/networking/core/listener_builder.go, buildHTTPConnectionManager).
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
VIRTUAL_SERVICE_FILTERS = [
    {
        "name": FAULT_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.fault.v3.HTTPFault"),
    },
    {
        "name": CORS_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.cors.v3.Cors"),
    },
]


def http_connection_manager(
    stat_prefix: str,
    route_config_name: str,
    direction: str,
    pod: str,
    mtls: bool = False,
    fast: bool = False,
    inbound_filters: Sequence[dict[str, Any]] = (),
    stats: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """MTLS: an inbound chain behind mTLS, which tells the app its caller's identity in
    x-forwarded-client-cert (Istio's format); elsewhere a caller-supplied one is dropped. FAST:
    an inbound chain of the same-node fast path, whose route states the caller instead (its
    downstream is an internal connection, with no address to forward). INBOUND_FILTERS: HTTP
    filters first (authentication, then authorization: translate/authz.py), before the
    VirtualService filters of an outbound HCM (a gateway's: Istio's order) and the router.
    STATS: the loggers of Istio's standard metrics (translate/istio_stats.py)."""
    inbound = direction == "inbound" and not fast
    xfcc: dict[str, Any] = {"forward_client_cert_details": "SANITIZE"}
    if inbound and mtls:
        xfcc = {
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True, "subject": True, "dns": True},
        }
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=stat_prefix,
            rds={
                "route_config_name": route_config_name,
                "config_source": {"ads": {}, "resource_api_version": "V3"},
            },
            http_filters=[
                *inbound_filters,
                *(VIRTUAL_SERVICE_FILTERS if direction == "outbound" else []),
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
                },
            ],
            access_log=[*access_log(direction, pod), *stats],
            # Inbound: the caller's pod address goes to the app in x-forwarded-for. Envoy then
            # sees every caller as external; keep its request id so a trace spans every hop.
            use_remote_address=inbound,
            preserve_external_request_id=True,
            normalize_path=True,
            merge_slashes=True,
            path_with_escaped_slashes_action="KEEP_UNCHANGED",
            request_id_extension={
                "typed_config": typed(
                    "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                    use_request_id_for_trace_sampling=True,
                )
            },
            stream_idle_timeout="0s",
            upgrade_configs=[{"upgrade_type": "websocket"}],
            **xfcc,
        ),
    }


def tcp_proxy(
    stat_prefix: str,
    cluster: str,
    direction: str,
    pod: str,
    route: dict[str, Any] | None = None,
    stats: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """ROUTE: tcp_proxy's ``cluster`` or ``weighted_clusters``, instead of CLUSTER. STATS: the
    loggers of Istio's TCP metrics (translate/istio_stats.py), which log when connected too."""
    options: dict[str, Any] = {}
    logs = access_log(direction, pod, tcp=True)
    if stats:
        options["access_log_options"] = istio_stats.TCP_LOG_OPTIONS
        at_end = {"log_type_filter": {"types": ["TcpConnectionEnd"]}}
        for log in logs:  # one line per connection still, at its end
            own = log.get("filter")  # a Telemetry's (access_logs.py): both must hold
            log["filter"] = {"and_filter": {"filters": [own, at_end]}} if own else at_end
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=stat_prefix,
            **(route or {"cluster": cluster}),
            access_log=[*logs, *stats],
            **options,
        ),
    }
