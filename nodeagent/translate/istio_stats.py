"""Istio's standard metrics from the node Envoy (pure).

Istio's sidecars count every request and connection with its own stats filter, which upstream
Envoy lacks (istio.io/latest/docs/reference/config/metrics/). Upstream Envoy 1.40 has the stats
access logger (``envoy.access_loggers.stats``, api-v3/extensions/access_loggers/stats/v3): an
access log that adds to counters and histograms whose tags are formatter strings. The node Envoy
knows which local pod each listener and each stamped connection belongs to, so every label is a
formatter on what the node already holds; no peer metadata exchange is needed on one node:

- source side (``reporter="source"``, in the shared ``outbound-internal`` chains): the caller from
  the filter state its pod listener stamped (``stamp``); the destination from the chosen
  endpoint's metadata (``endpoint_metadata``) and the service from its cluster's
  (``cluster_metadata``); none when there is none (no route, no healthy host, an address
  outside the mesh).
- destination side (``reporter="destination"``, in each local pod's inbound chains): the pod
  itself, written into its chains; the caller from the same stamp on the same-node fast path
  (inherited across the internal hops), from headers its node's source side added on the
  mTLS path (HTTP only: ``peer_headers``, copied to filter state before the route drops them);
  none for a caller outside the mesh (plaintext).

A label a formatter finds no value for is empty here, and the agent's merged endpoint shows it
as Istio does, ``unknown`` (metrics.py): a stat tag renders a missing value as "", and Envoy
1.40's formatters have no default (COALESCE takes formatter commands only), so a default here
would cost a long formatter per label in every chain's config, which grows with services. Where
a chain knows no value at all, it says ``unknown`` itself (a tag's format cannot be empty).

Names: the logger's stat prefix ``istiocustom`` (Istio's own) makes Envoy print
``envoy_istiocustom_istio_requests_total``; the agent's merged ``:15020/stats/prometheus`` drops
``envoy_istiocustom_`` so users see Istio's names. Buckets: Istio sets none, so its histograms
have Envoy's default buckets, as these do. Bytes: Istio's filter records the downstream wire
bytes (headers and body). TCP bytes are counted when the connection closes: the logger has no
per-interval delta (Istio reports every 15 s), so a long-lived connection's bytes show at its end.

Labels never carry a pod IP or a path: their values are workloads, services, codes and flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeagent.mesh.model import Pod
from nodeagent.mesh.telemetry import REPORTED, MetricsSpec
from nodeagent.mesh.workload import UNKNOWN, Peer, peer
from nodeagent.translate.envoy import typed

PREFIX = "istiocustom"  # Envoy prints envoy_istiocustom_<stat>; :15020 drops the prefix
META = "istio"  # metadata namespace (listener, cluster, endpoint) the labels read
CLUSTER_ID = "Kubernetes"  # Istio's default cluster ID (one cluster here)
PEER_FIELDS = (
    "workload",
    "namespace",
    "app",
    "version",
    "canonical_service",
    "canonical_revision",
    "cluster",
)
# The caller's fields, stamped by its pod listener (TRANSITIVE: they reach the fast path's
# inbound chain); on the mTLS path copied from PEER_HEADERS. The principal is CALLER_KEY.
PEER_KEY = {f: f"io.nodeagent.peer.{f}" for f in PEER_FIELDS}
PEER_HEADERS = {f: f"x-nodeagent-peer-{f.replace('_', '-')}" for f in PEER_FIELDS}
# The name of the HTTP filter that copies them (Envoy finds a filter by its config's type).
PEER_FILTER = "nodeagent.peer_headers"

# What Istio's labels are named for each field of a side (istio_requests_total's labels).
_SIDE_LABELS = (
    ("workload", "workload"),
    ("canonical_service", "canonical_service"),
    ("canonical_revision", "canonical_revision"),
    ("workload_namespace", "namespace"),
    ("principal", "principal"),
    ("app", "app"),
    ("version", "version"),
    ("cluster", "cluster"),
)
_HTTP_PROTOCOL = (
    "%CEL('content-type' in request.headers && "
    "request.headers['content-type'].startsWith('application/grpc') ? 'grpc' : 'http')%"
)


def _state(key: str) -> str:
    return f"%FILTER_STATE({key}:PLAIN)%"


def pod_peer(pod: Pod, principal: str) -> Peer:
    return peer(pod.namespace, pod.workload_name, pod.labels, principal, CLUSTER_ID)


def stamp(pod: Pod) -> dict[str, str]:
    """The filter state a pod's outbound listener stamps: its side of every request (key ->
    value). The principal is stamped already (internal.CALLER_KEY)."""
    fields = pod_peer(pod, "").fields()
    return {PEER_KEY[f]: fields[f] for f in PEER_FIELDS}


def endpoint_metadata(pod: Pod, principal: str) -> dict[str, Any]:
    """An endpoint's metadata under META: the destination side a source reporter reads."""
    fields = pod_peer(pod, principal).fields()
    fields.pop("principal")  # the endpoint's SANs say it (internal.ENDPOINT_META)
    return fields


def cluster_metadata(host: str, name: str, namespace: str) -> dict[str, Any]:
    """A service cluster's metadata under META: destination_service{,_name,_namespace}."""
    return {"service": host, "service_name": name, "service_namespace": namespace}


def peer_headers() -> list[dict[str, Any]]:
    """``request_headers_to_add`` of a mesh service's outbound route table: the caller's side,
    for the destination node's reporter. Overwritten, never appended: an app cannot speak
    for another workload (the destination trusts them on mTLS chains only)."""
    return [
        {
            "header": {"key": PEER_HEADERS[f], "value": _state(PEER_KEY[f])},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
        for f in PEER_FIELDS
    ]


def peer_headers_to_remove() -> list[str]:
    """Dropped by every inbound route: the app never sees them."""
    return [PEER_HEADERS[f] for f in PEER_FIELDS]


def copy_peer_headers() -> dict[str, Any]:
    """The HTTP filter of an inbound mTLS chain that takes the caller's side from the headers
    its node added (a route's removal would hide them from the access log)."""
    return {
        "name": PEER_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.set_filter_state.v3.Config",
            on_request_headers=[
                {
                    "object_key": PEER_KEY[f],
                    "factory_key": "envoy.string",
                    # No header (a caller's sidecar, not a node): no value, so "unknown".
                    "format_string": {
                        "text_format_source": {"inline_string": f"%REQ({PEER_HEADERS[f]})%"},
                        "omit_empty_values": True,
                    },
                    "skip_if_empty": True,
                }
                for f in PEER_FIELDS
            ],
        ),
    }


def _side(prefix: str, values: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(f"{prefix}_{label}", values[field]) for label, field in _SIDE_LABELS]


def _stamped_source(principal: str) -> dict[str, str]:
    """The caller from the stamp (or the copied headers)."""
    values = {f: _state(PEER_KEY[f]) for f in PEER_FIELDS}
    values["principal"] = principal
    return values


def _unknown_side() -> dict[str, str]:
    """A caller no chain knows anything of (a stat tag cannot be empty)."""
    return {f: UNKNOWN for f in (*PEER_FIELDS, "principal")}


def source_tags(caller_key: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(source side, destination side) of a source reporter in ``outbound-internal``."""
    source = _stamped_source(_state(caller_key))
    destination = {f: f"%METADATA(UPSTREAM_HOST:{META}:{f})%" for f in PEER_FIELDS}
    destination["principal"] = "%METADATA(UPSTREAM_HOST:nodeagent:sans)%"
    return _side("source", source), _side("destination", destination)


def _service_tags(service: Mapping[str, str] | None, source: bool) -> list[tuple[str, str]]:
    if source:
        return [(label, f"%METADATA(CLUSTER:{META}:{key})%") for label, key in _SERVICE_LABELS]
    service = service or {}
    return [(label, service.get(key) or UNKNOWN) for label, key in _SERVICE_LABELS]


_SERVICE_LABELS = (
    ("destination_service", "service"),
    ("destination_service_name", "service_name"),
    ("destination_service_namespace", "service_namespace"),
)


def _tags(pairs: list[tuple[str, str]], overrides: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    """A stat's tags: PAIRS (label, value format) with a Telemetry's tag OVERRIDES applied
    (label, CEL expression; "" removes the label), as Istio's stats filter applies them."""
    labels = dict(pairs)
    for label, expression in overrides:
        if expression:
            labels[label] = f"%CEL({expression})%"
        else:
            labels.pop(label, None)
    return [{"name": name, "value_format": value} for name, value in labels.items()]


def _logger(
    counters: list[dict[str, Any]], histograms: list[dict[str, Any]], when: dict[str, Any]
) -> list[dict[str, Any]]:
    """One stats logger (none when a Telemetry disabled all its stats); WHEN: its filter."""
    if not counters and not histograms:
        return []
    fields: dict[str, Any] = {"stat_prefix": PREFIX}
    if counters:
        fields["counters"] = counters
    if histograms:
        fields["histograms"] = histograms
    logger = {
        "name": "envoy.access_loggers.stats",
        "typed_config": typed("envoy.extensions.access_loggers.stats.v3.Config", **fields),
    }
    if when:
        logger["filter"] = when
    return [logger]


def _stats(
    labels: list[tuple[str, str]], spec: MetricsSpec, made: list[tuple[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """MADE: (stat name, the rest of its entry), without those SPEC disables."""
    return [
        {"stat": {"name": name, "tags": _tags(labels, spec.tags_of(name))}, **rest}
        for name, rest in made
        if name not in spec.disabled
    ]


def _http_logger(
    labels: list[tuple[str, str]], spec: MetricsSpec, when: dict[str, Any]
) -> list[dict[str, Any]]:
    histograms = [
        (name, {"unit": unit, "value_format": value})
        for name, unit, value in (
            ("istio_request_duration_milliseconds", "Milliseconds", "%DURATION%"),
            ("istio_request_bytes", "Bytes", "%DOWNSTREAM_WIRE_BYTES_RECEIVED%"),
            ("istio_response_bytes", "Bytes", "%DOWNSTREAM_WIRE_BYTES_SENT%"),
        )
    ]
    return _logger(
        _stats(labels, spec, [("istio_requests_total", {"value_fixed": 1})]),
        _stats(labels, spec, histograms),
        when,
    )


# Connections are counted opened when the upstream connected (the access log tcp_proxy writes
# then: TcpProxy.TcpAccessLogOptions.flush_access_log_on_connected), closed at their end.
TCP_LOG_OPTIONS = {"flush_access_log_on_connected": True}


def _tcp_loggers(
    labels: list[tuple[str, str]],
    spec: MetricsSpec,
    when: dict[str, Any],
    opened_at_end: bool = False,
) -> list[dict[str, Any]]:
    """OPENED_AT_END: count the connection opened when it ends (see destination_loggers)."""

    def at(log_type: str) -> dict[str, Any]:
        only = {"log_type_filter": {"types": [log_type]}}
        return {"and_filter": {"filters": [when, only]}} if when else only

    opened = _stats(labels, spec, [("istio_tcp_connections_opened_total", {"value_fixed": 1})])
    closed = _stats(
        labels,
        spec,
        [
            ("istio_tcp_connections_closed_total", {"value_fixed": 1}),
            ("istio_tcp_sent_bytes_total", {"value_format": "%BYTES_SENT%"}),
            ("istio_tcp_received_bytes_total", {"value_format": "%BYTES_RECEIVED%"}),
        ],
    )
    return [
        *_logger(opened, [], at("TcpConnectionEnd" if opened_at_end else "TcpUpstreamConnected")),
        *_logger(closed, [], at("TcpConnectionEnd")),
    ]


def _request_labels(tcp: bool) -> list[tuple[str, str]]:
    if tcp:
        return [("request_protocol", "tcp"), ("response_flags", "%RESPONSE_FLAGS%")]
    return [
        ("request_protocol", _HTTP_PROTOCOL),
        ("response_code", "%RESPONSE_CODE%"),
        ("grpc_response_status", "%GRPC_STATUS_NUMBER%"),
        ("response_flags", "%RESPONSE_FLAGS%"),
    ]


def source_loggers(
    caller_key: str, tcp: bool, spec: MetricsSpec = REPORTED, when: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The source reporter of an outbound-internal chain (CALLER_KEY: the stamped SPIFFE ID),
    as SPEC says; WHEN: the access log filter that picks the callers SPEC is for (none: all)."""
    if not spec.reported:
        return []
    source, destination = source_tags(caller_key)
    labels = [
        ("reporter", "source"),
        *source,
        *destination,
        *_service_tags(None, source=True),
        *_request_labels(tcp),
        # Istio's client side reports no policy: it does not know what the server enforced.
        ("connection_security_policy", UNKNOWN),
    ]
    if tcp:
        return _tcp_loggers(labels, spec, when or {})
    return _http_logger(labels, spec, when or {})


def destination_loggers(
    me: Peer,
    service: Mapping[str, str] | None,
    caller: str,
    tcp: bool,
    caller_key: str = "",
    spec: MetricsSpec = REPORTED,
) -> list[dict[str, Any]]:
    """The destination reporter of a local pod's inbound chain, as its SERVER SPEC says
    (mesh/telemetry.metrics). ME: the pod. SERVICE: the
    ``cluster_metadata`` of the service its port is for (None: unknown). CALLER: ``fast`` (a
    pod of this node, stamped: CALLER_KEY), ``mtls`` (another node's pod: its certificate's
    SAN, its side from the copied headers) or ``plaintext`` (outside the mesh: unknown)."""
    if not spec.reported:
        return []
    if caller == "fast":
        source = _stamped_source(_state(caller_key))
    elif caller == "mtls":
        source = _stamped_source("%DOWNSTREAM_PEER_URI_SAN%")
        if tcp:  # no headers: the certificate tells only who
            source = {**_unknown_side(), "principal": source["principal"]}
    else:
        source = _unknown_side()
    labels = [
        ("reporter", "destination"),
        *_side("source", source),
        *_side("destination", me.fields()),
        *_service_tags(service, source=False),
        *_request_labels(tcp),
        ("connection_security_policy", "none" if caller == "plaintext" else "mutual_tls"),
    ]
    # tcp_proxy connects upstream as the connection is accepted, before the TLS handshake ends,
    # so on an mTLS chain the caller's certificate may be unknown then: its connections are
    # counted opened when they end, with the caller they had.
    if tcp:
        return _tcp_loggers(labels, spec, {}, opened_at_end=caller == "mtls")
    return _http_logger(labels, spec, {})
