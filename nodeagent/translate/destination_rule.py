"""A DestinationRule's traffic policy as Envoy cluster and route fields (pure).

Follows what istiod builds for a sidecar's outbound cluster (istio/istio
``pilot/pkg/networking/core/cluster_traffic_policy.go`` applyTrafficPolicy and its helpers,
``cluster_builder.go``, ``pilot/pkg/networking/util/util.go`` MergeSubsetTrafficPolicy,
``pilot/pkg/model/destination_rule.go`` MergeTrafficPolicy, ``route/route.go``
consistentHashToHashPolicy / hashForHTTPDestination, ``networkfilter.go`` for tcp_proxy) and the
reference page istio.io/latest/docs/reference/config/networking/destination-rule/.

``loadBalancer.localityLbSetting`` sets the cluster's ``locality_weighted_lb_config`` here
(applyLocalityLoadBalancer); the priorities and weights it implies are EDS's (locality.py).

Not here: ``tls`` (DISABLE / ISTIO_MUTUAL are applied by the originate path, see tls.py and
mesh/policy.py; SIMPLE / MUTUAL by originate-tls, see client_tls.py),
``loadBalancer.zoneAwareLbSetting`` / ``backendUtilization``, ``proxyProtocol``, ``tunnel``,
``retryBudget``, ``outlierDetection.outlierDetectionHttpErrorCodes``: see NOT_TRANSLATED.
Mesh-wide settings are Istio's defaults (pkg/config/mesh/mesh.go
DefaultMeshConfig: connectTimeout 10s, no tcpKeepalive, h2UpgradePolicy DO_NOT_UPGRADE).

Inputs are DestinationRule specs that passed schema validation (camelCase, as written); outputs
are proto3 JSON dicts. Input that cannot be translated raises ValueError naming the field path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

from nodeagent.mesh import locality
from nodeagent.translate import client_tls
from nodeagent.translate.envoy import typed
from nodeagent.translate.protocol import HTTP2

CONNECT_TIMEOUT = "10s"  # MeshConfig.connectTimeout default (pkg/config/mesh/mesh.go)
UNLIMITED = 4294967295  # math.MaxUint32: Istio's circuit breaker thresholds when unset
MIN_RING_SIZE = 1024  # Envoy's (and Istio's) ring hash default
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# The policy parts a subset or a port inherits as a whole (MergeTrafficPolicy).
_PARTS = ("connectionPool", "loadBalancer", "outlierDetection", "tls")
# Taken from a subset only when it sets them; never from portLevelSettings (which lack them).
_EXTRA_PARTS = ("tunnel", "proxyProtocol", "retryBudget")

# Traffic policy fields this module does not translate (paths inside a trafficPolicy or a
# portLevelSettings entry). ``tls`` is not among them: mesh/policy.py applies its modes.
NOT_TRANSLATED = (
    "loadBalancer.zoneAwareLbSetting",
    "loadBalancer.backendUtilization",
    "outlierDetection.outlierDetectionHttpErrorCodes",
    "outlierDetection.consecutiveErrors",
    "proxyProtocol",
    "tunnel",
    "retryBudget",
)


# -- which policy applies -------------------------------------------------------------------------


def subset_labels(dr_spec: Mapping[str, Any], subset: str) -> Mapping[str, str] | None:
    """The labels that select SUBSET's endpoints ({} selects them all), or None when the rule
    has no such subset: Istio then builds no cluster for it, so a route to it answers 503 NC."""
    for entry in _list(dr_spec.get("subsets"), "subsets"):
        if entry.get("name") == subset:
            return dict(entry.get("labels") or {})
    return None


def traffic_policy(dr_spec: Mapping[str, Any], port: int, subset: str = "") -> Mapping[str, Any]:
    """The traffic policy of the cluster for service port PORT (and SUBSET), as Istio merges it
    (util.MergeSubsetTrafficPolicy over model.MergeTrafficPolicy):

    1. the rule's ``trafficPolicy``; a ``portLevelSettings`` entry for PORT (the first) replaces
       it *as a whole*: connectionPool, loadBalancer, outlierDetection and tls all come from
       the entry, a part the entry omits falls back to Istio's default, not to the rule's
       (the reference page: "Traffic settings specified at the destination-level will not be
       inherited when overridden by port-level settings");
    2. the subset's ``trafficPolicy`` over that, part by part: each of the four parts the
       subset sets replaces the rule's part whole (no field-level merge inside a part);
       tunnel/proxyProtocol/retryBudget too, when the subset sets them;
    3. a subset ``portLevelSettings`` entry for PORT replaces all four parts, unset ones
       included (they fall back to the defaults).

    The result has no ``portLevelSettings``. ValueError when SUBSET is not in the rule."""
    policy, _ = _port_policy(dr_spec.get("trafficPolicy"), port, "trafficPolicy")
    if not subset:
        return policy or {}
    for i, entry in enumerate(_list(dr_spec.get("subsets"), "subsets")):
        if entry.get("name") == subset:
            at = f"subsets[{i}].trafficPolicy"
            break
    else:
        raise ValueError(f"subsets: no subset named {subset!r}")
    own, port_level = _port_policy(entry.get("trafficPolicy"), port, at)
    if own is None:
        return policy or {}
    if policy is None:
        return own
    merged = dict(policy)
    for part in _PARTS:
        if port_level or own.get(part) is not None:
            _put(merged, part, own.get(part))
    for part in _EXTRA_PARTS:
        if own.get(part) is not None:
            merged[part] = own[part]
    return merged


def is_passthrough(dr_spec: Mapping[str, Any], port: int, subset: str = "") -> bool:
    """Whether Istio makes the cluster of service port PORT (and SUBSET) an ORIGINAL_DST one:
    its merged policy says ``loadBalancer.simple: PASSTHROUGH`` (applyLoadBalancer,
    istio/istio pilot/pkg/networking/core/cluster_traffic_policy.go), or, for a subset, the
    port's own cluster does: buildSubsetCluster (cluster_builder.go) starts a subset's cluster
    from that type, and applyLoadBalancer keeps an ORIGINAL_DST cluster so whatever the
    subset's own loadBalancer says."""
    if _simple(traffic_policy(dr_spec, port)) == "PASSTHROUGH":
        return True
    return bool(subset) and _simple(traffic_policy(dr_spec, port, subset)) == "PASSTHROUGH"


def checks_endpoints(dr_spec: Mapping[str, Any], subset: str = "") -> bool:
    """Whether Istio looks at the service's endpoints to decide a PASSTHROUGH cluster's auto
    mTLS: BestEffortInferServiceMTLSMode (pilot/pkg/model/push_context.go) does only when the
    policy it is given says PASSTHROUGH at its top level: the rule's ``trafficPolicy`` for the
    port's cluster (applyDestinationRule), the subset's own ``trafficPolicy`` for a subset's
    (buildSubsetCluster); a portLevelSettings PASSTHROUGH is not looked at there."""
    if subset:
        for entry in _list(dr_spec.get("subsets"), "subsets"):
            if entry.get("name") == subset:
                return _simple(_map(entry.get("trafficPolicy"), "subsets")) == "PASSTHROUGH"
        return False
    return _simple(_map(dr_spec.get("trafficPolicy"), "trafficPolicy")) == "PASSTHROUGH"


def _simple(policy: Mapping[str, Any]) -> str:
    balancer = policy.get("loadBalancer")
    return str(balancer.get("simple") or "") if isinstance(balancer, Mapping) else ""


def _port_policy(
    policy: Mapping[str, Any] | None, port: int, at: str
) -> tuple[dict[str, Any] | None, bool]:
    """POLICY without its portLevelSettings, or its entry for PORT in its place (and whether
    one was found): util.GetPortLevelTrafficPolicy."""
    if policy is None:
        return None, False
    settings = _list(policy.get("portLevelSettings"), f"{at}.portLevelSettings")
    for entry in settings:
        number = (entry.get("port") or {}).get("number")
        if number is not None and number == port:
            return {part: entry[part] for part in _PARTS if entry.get(part) is not None}, True
    return {k: v for k, v in policy.items() if k != "portLevelSettings" and v is not None}, False


def _put(policy: dict[str, Any], part: str, value: Any) -> None:
    if value is None:
        policy.pop(part, None)
    else:
        policy[part] = value


# -- cluster fields -------------------------------------------------------------------------------


def cluster_fields(
    policy: Mapping[str, Any],
    protocol: str,
    at: str = "trafficPolicy",
    mesh_locality: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Envoy Cluster fields (proto3 JSON) to merge over a service port's EDS cluster
    (clusters.py _eds_cluster) for the merged POLICY (traffic_policy) on a PROTOCOL port.

    With an empty policy this is what istiod sets on every outbound sidecar cluster: connect
    timeout 10s, LEAST_REQUEST (Istio's default since 1.14, defaultLBAlgorithm), circuit
    breaker thresholds all 2^32-1 with track_remaining, no outlier detection, HTTP/1 upstream
    (HTTP/2 for HTTP2/gRPC ports). A value of None means "remove this field" (json_format
    clears it): loadBalancer.simple PASSTHROUGH turns the cluster into Istio's ORIGINAL_DST /
    CLUSTER_PROVIDED one, which connects to the address the caller dialled, without EDS.

    AT is the policy's path in the rule, for errors. MESH_LOCALITY: the mesh config's
    localityLbSetting, which applies when the policy sets none."""
    pool = _map(policy.get("connectionPool"), f"{at}.connectionPool")
    fields: dict[str, Any] = {}
    fields.update(_connection_pool(pool, protocol, f"{at}.connectionPool"))
    outlier = policy.get("outlierDetection")
    if outlier is not None:
        fields.update(
            _outlier_detection(_map(outlier, f"{at}.outlierDetection"), f"{at}.outlierDetection")
        )
    balancer = _map(policy.get("loadBalancer"), f"{at}.loadBalancer")
    fields.update(_load_balancer(balancer, f"{at}.loadBalancer"))
    own = balancer.get("localityLbSetting")
    if own is not None:
        locality.check(
            _map(own, f"{at}.loadBalancer.localityLbSetting"),
            f"{at}.loadBalancer.localityLbSetting",
        )
    if locality_weighted(locality.effective(mesh_locality, own), outlier is not None):
        common = dict(fields.get("common_lb_config") or {})
        fields["common_lb_config"] = common | {"locality_weighted_lb_config": {}}
    return fields


def locality_weighted(setting: Mapping[str, Any] | None, outlier: bool) -> bool:
    """The cluster needs Envoy's locality weighted balancing (applyLocalityLoadBalancer): for
    ``distribute``, or for failover with outlierDetection (OUTLIER). Istio leaves it off
    otherwise: it would change how LEAST_REQUEST and the others pick among localities."""
    if setting is None:
        return False
    failover = setting.get("failover") is not None or setting.get("failoverPriority") is not None
    return bool(setting.get("distribute")) or (outlier and failover)


def _connection_pool(pool: Mapping[str, Any], protocol: str, at: str) -> dict[str, Any]:
    """applyH2Upgrade + applyConnectionPool: connect timeout, circuit breakers, TCP keepalive
    and the HTTP protocol options. Zero counts mean unset (Istio cannot tell them apart)."""
    http = _map(pool.get("http"), f"{at}.http")
    tcp = _map(pool.get("tcp"), f"{at}.tcp")
    thresholds: dict[str, Any] = {
        "max_connections": _count(tcp, "maxConnections", f"{at}.tcp") or UNLIMITED,
        "max_pending_requests": _count(http, "http1MaxPendingRequests", f"{at}.http") or UNLIMITED,
        "max_requests": _count(http, "http2MaxRequests", f"{at}.http") or UNLIMITED,
        "max_retries": _count(http, "maxRetries", f"{at}.http") or UNLIMITED,
        "track_remaining": True,
    }
    fields: dict[str, Any] = {
        "connect_timeout": _duration(tcp.get("connectTimeout"), f"{at}.tcp.connectTimeout")
        or CONNECT_TIMEOUT,
        "circuit_breakers": {"thresholds": [thresholds]},
    }
    keepalive = _tcp_keepalive(tcp.get("tcpKeepalive"), f"{at}.tcp.tcpKeepalive")
    if keepalive is not None:
        fields["upstream_connection_options"] = {"tcp_keepalive": keepalive}

    common: dict[str, Any] = {}
    idle = _duration(http.get("idleTimeout"), f"{at}.http.idleTimeout") or _duration(
        tcp.get("idleTimeout"), f"{at}.tcp.idleTimeout"
    )
    if idle is not None:
        common["idle_timeout"] = idle
    per_connection = _count(http, "maxRequestsPerConnection", f"{at}.http")
    if per_connection:
        common["max_requests_per_connection"] = per_connection
    lifetime = _duration(tcp.get("maxConnectionDuration"), f"{at}.tcp.maxConnectionDuration")
    if lifetime is not None:
        common["max_connection_duration"] = lifetime
    streams = _count(http, "maxConcurrentStreams", f"{at}.http")

    options: dict[str, Any] = {}
    ping = _http2_keepalive(http.get("http2KeepAlive"), f"{at}.http.http2KeepAlive")
    if protocol == HTTP2 or _h2_upgrade(http, protocol, f"{at}.http"):
        h2: dict[str, Any] = {"max_concurrent_streams": streams} if streams else {}
        if ping:
            h2["connection_keepalive"] = ping
        options["explicit_http_config"] = {"http2_protocol_options": h2}
    if common or streams:
        options["common_http_protocol_options"] = common
        options.setdefault("explicit_http_config", {"http_protocol_options": {}})
    if _flag(http, "useClientProtocol", f"{at}.http"):
        # setUseDownstreamProtocol: replaces any explicit protocol, HTTP2 ports' included.
        options.pop("explicit_http_config", None)
        options["use_downstream_protocol_config"] = {
            "http_protocol_options": {},
            "http2_protocol_options": {"connection_keepalive": ping} if ping else {},
        }
    if options:
        fields["typed_extension_protocol_options"] = {HTTP_OPTIONS: typed(HTTP_OPTIONS, **options)}
    return fields


def _h2_upgrade(http: Mapping[str, Any], protocol: str, at: str) -> bool:
    """shouldH2Upgrade: UPGRADE upgrades any port (the user says it is HTTP), DO_NOT_UPGRADE
    and useClientProtocol never; otherwise the mesh default (DO_NOT_UPGRADE) decides, and only
    HTTP ports are ever considered."""
    if _flag(http, "useClientProtocol", at):
        return False
    policy = http.get("h2UpgradePolicy", "DEFAULT")
    if policy not in ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"):
        raise ValueError(f"{at}.h2UpgradePolicy: unknown policy {policy!r}")
    return bool(policy == "UPGRADE")


def _http2_keepalive(keepalive: Any, at: str) -> dict[str, Any] | None:
    """HTTP/2 PING frames on upstream connections (the DestinationRule reference page,
    ConnectionPoolSettings.HTTPSettings.http2KeepAlive): Envoy's KeepaliveSettings ``interval``
    and ``timeout``, used only where the cluster speaks HTTP/2. Envoy requires the timeout."""
    if keepalive is None:
        return None
    keepalive = _map(keepalive, at)
    timeout = _duration(keepalive.get("timeout"), f"{at}.timeout")
    if timeout is None:
        raise ValueError(f"{at}.timeout: required (how long to wait for a PING's answer)")
    out: dict[str, Any] = {"timeout": timeout}
    interval = _duration(keepalive.get("interval"), f"{at}.interval")
    if interval is not None:
        out["interval"] = interval
    return out


def _tcp_keepalive(keepalive: Any, at: str) -> dict[str, Any] | None:
    """setKeepAliveSettings: SO_KEEPALIVE with the OS defaults, time and interval in whole
    seconds (Istio truncates), probes when > 0."""
    if keepalive is None:
        return None
    keepalive = _map(keepalive, at)
    out: dict[str, Any] = {}
    probes = _count(keepalive, "probes", at)
    if probes:
        out["keepalive_probes"] = probes
    for field, key in (("time", "keepalive_time"), ("interval", "keepalive_interval")):
        value = _nanoseconds(keepalive.get(field), f"{at}.{field}")
        if value is not None:
            out[key] = value // 1_000_000_000
    return out


def _outlier_detection(outlier: Mapping[str, Any], at: str) -> dict[str, Any]:
    """applyOutlierDetection: success-rate ejection off (enforcing_success_rate 0); 5xx and
    gateway-error counts only when set (0 disables them, any other count enforces 100%);
    local-origin failures only with splitExternalLocalOriginErrors. Fields left out keep
    Envoy's defaults (5 consecutive 5xx, interval 10s, base ejection 30s, at most 10% of hosts
    ejected). The panic threshold becomes minHealthPercent (0 when unset: Istio disables it)."""
    out: dict[str, Any] = {"enforcing_success_rate": 0}
    for field, count, enforcing in (
        ("consecutive5xxErrors", "consecutive_5xx", "enforcing_consecutive_5xx"),
        (
            "consecutiveGatewayErrors",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
        ),
    ):
        if outlier.get(field) is not None:
            value = _count(outlier, field, at)
            out[count] = value
            out[enforcing] = 100 if value else 0
    for field, key in (("interval", "interval"), ("baseEjectionTime", "base_ejection_time")):
        duration = _duration(outlier.get(field), f"{at}.{field}")
        if duration is not None:
            out[key] = duration
    ejection = _percent(outlier, "maxEjectionPercent", at)
    if ejection:
        out["max_ejection_percent"] = ejection
    if _flag(outlier, "splitExternalLocalOriginErrors", at):
        out["split_external_local_origin_errors"] = True
        local = _count(outlier, "consecutiveLocalOriginFailures", at)
        if local:
            out["consecutive_local_origin_failure"] = local
            out["enforcing_consecutive_local_origin_failure"] = 100
        out["enforcing_local_origin_success_rate"] = 0
    return {
        "outlier_detection": out,
        "common_lb_config": {
            "healthy_panic_threshold": {"value": _percent(outlier, "minHealthPercent", at)}
        },
    }


_SIMPLE = {
    "": "LEAST_REQUEST",  # unset / UNSPECIFIED: defaultLBAlgorithm
    "UNSPECIFIED": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # deprecated alias
    "LEAST_REQUEST": "LEAST_REQUEST",
    "ROUND_ROBIN": "ROUND_ROBIN",
    "RANDOM": "RANDOM",
    "PASSTHROUGH": "CLUSTER_PROVIDED",
}


def _load_balancer(balancer: Mapping[str, Any], at: str) -> dict[str, Any]:
    """applyLoadBalancer + ApplyRingHashLoadBalancer. ``simple`` picks the policy (warmup as a
    slow start window for ROUND_ROBIN and LEAST_REQUEST); ``consistentHash`` then wins: MAGLEV
    with its table size, RING_HASH with its minimum ring size (1024 when neither ``ringHash``
    nor ``maglev`` is given: the legacy minimumRingSize or Envoy's default)."""
    simple = balancer.get("simple") or ""
    if simple not in _SIMPLE:
        raise ValueError(f"{at}.simple: unknown load balancer {simple!r}")
    policy = _SIMPLE[simple]
    fields: dict[str, Any] = {"lb_policy": policy}
    if simple == "PASSTHROUGH":
        return passthrough_fields(fields)
    slow_start = _slow_start(balancer, at)
    if slow_start is not None and policy in ("ROUND_ROBIN", "LEAST_REQUEST"):
        config = "round_robin_lb_config" if policy == "ROUND_ROBIN" else "least_request_lb_config"
        fields[config] = {"slow_start_config": slow_start}
    hashing = balancer.get("consistentHash")
    if hashing is None:
        return fields
    hashing = _map(hashing, f"{at}.consistentHash")
    fields.pop("round_robin_lb_config", None)
    fields.pop("least_request_lb_config", None)
    if hashing.get("maglev") is not None:
        maglev = _map(hashing["maglev"], f"{at}.consistentHash.maglev")
        size = _count(maglev, "tableSize", f"{at}.consistentHash.maglev")
        fields["lb_policy"] = "MAGLEV"
        if size:
            if not _is_prime(size):
                raise ValueError(
                    f"{at}.consistentHash.maglev.tableSize: {size} is not a prime number"
                )
            fields["maglev_lb_config"] = {"table_size": size}
    elif hashing.get("ringHash") is not None:
        ring = _map(hashing["ringHash"], f"{at}.consistentHash.ringHash")
        size = _count(ring, "minimumRingSize", f"{at}.consistentHash.ringHash")
        fields["lb_policy"] = "RING_HASH"
        if size:
            fields["ring_hash_lb_config"] = {"minimum_ring_size": size}
    else:
        size = _count(hashing, "minimumRingSize", f"{at}.consistentHash") or MIN_RING_SIZE
        fields["lb_policy"] = "RING_HASH"
        fields["ring_hash_lb_config"] = {"minimum_ring_size": size}
    return fields


def passthrough_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """FIELDS of an ORIGINAL_DST cluster: CLUSTER_PROVIDED, no EDS and no balancer settings
    (applyLoadBalancer returns before any for such a cluster)."""
    kept = {k: v for k, v in fields.items() if k not in _BALANCER_FIELDS}
    return kept | {
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "eds_cluster_config": None,
    }


_BALANCER_FIELDS = frozenset(
    {
        "lb_policy",
        "round_robin_lb_config",
        "least_request_lb_config",
        "maglev_lb_config",
        "ring_hash_lb_config",
    }
)


def _slow_start(balancer: Mapping[str, Any], at: str) -> dict[str, Any] | None:
    """setWarmup (``warmup``: aggression 1 and minimumPercent 10 when unset; Istio fixes the
    runtime key to "(", which no runtime sets) or the deprecated ``warmupDurationSecs``."""
    warmup = balancer.get("warmup")
    if warmup is not None:
        warmup = _map(warmup, f"{at}.warmup")
        aggression = warmup.get("aggression", 1)
        minimum = warmup.get("minimumPercent", 10)
        if not isinstance(aggression, int | float) or aggression < 0:
            raise ValueError(f"{at}.warmup.aggression: must be a number >= 0")
        if not isinstance(minimum, int | float) or not 0 <= minimum <= 100:
            raise ValueError(f"{at}.warmup.minimumPercent: must be a number in [0, 100]")
        return {
            "slow_start_window": _duration(warmup.get("duration"), f"{at}.warmup.duration") or "0s",
            "aggression": {"default_value": float(aggression), "runtime_key": "("},
            "min_weight_percent": {"value": float(minimum)},
        }
    window = _duration(balancer.get("warmupDurationSecs"), f"{at}.warmupDurationSecs")
    return None if window is None else {"slow_start_window": window}


# -- route and tcp_proxy fields -------------------------------------------------------------------


def hash_policy(policy: Mapping[str, Any], at: str = "trafficPolicy") -> list[dict[str, Any]]:
    """The route ``hash_policy`` for POLICY's ``loadBalancer.consistentHash`` (route.go
    consistentHashToHashPolicy): a header, a cookie (name, path, ttl, attributes: Envoy makes
    the cookie when the request has none and a ttl is set), the source IP, or a query
    parameter. [] without consistent hashing or without a hash key."""
    balancer = _map(policy.get("loadBalancer"), f"{at}.loadBalancer")
    hashing = balancer.get("consistentHash")
    if hashing is None:
        return []
    hashing = _map(hashing, f"{at}.loadBalancer.consistentHash")
    where = f"{at}.loadBalancer.consistentHash"
    if hashing.get("httpHeaderName") is not None:
        return [{"header": {"header_name": _text(hashing, "httpHeaderName", where)}}]
    if hashing.get("httpCookie") is not None:
        where = f"{where}.httpCookie"
        cookie = _map(hashing["httpCookie"], where)
        out: dict[str, Any] = {"name": _text(cookie, "name", where)}
        if cookie.get("path"):
            out["path"] = _text(cookie, "path", where)
        ttl = _duration(cookie.get("ttl"), f"{where}.ttl")
        if ttl is not None:
            out["ttl"] = ttl
        attributes = _list(cookie.get("attributes"), f"{where}.attributes")
        if attributes:
            out["attributes"] = [
                {"name": a.get("name", ""), **({"value": a["value"]} if a.get("value") else {})}
                for a in attributes
            ]
        return [{"cookie": out}]
    if hashing.get("useSourceIp") is not None:
        use = _flag(hashing, "useSourceIp", where)
        return [{"connection_properties": {"source_ip": use}}]
    if hashing.get("httpQueryParameterName") is not None:
        return [{"query_parameter": {"name": _text(hashing, "httpQueryParameterName", where)}}]
    return []


def route_hash_policy(
    dr_spec: Mapping[str, Any], port: int | None, subset: str = ""
) -> list[dict[str, Any]]:
    """The hash_policy of a route to PORT (None: the route's destination names no port) and
    SUBSET, chosen as hashForHTTPDestination does, which differs from the cluster's merge:
    the first consistentHash found among the subset's port-level settings, the subset's
    policy, the rule's port-level settings, then the rule's policy (port-level settings count
    only when the destination names a port). With no SUBSET this is also hashForService, the
    default route's hash when no VirtualService routes the port."""
    top = _map(dr_spec.get("trafficPolicy"), "trafficPolicy")
    candidates: list[tuple[Mapping[str, Any], str]] = []
    for i, entry in enumerate(_list(dr_spec.get("subsets"), "subsets")):
        if entry.get("name") == subset and subset:
            own = _map(entry.get("trafficPolicy"), f"subsets[{i}].trafficPolicy")
            at = f"subsets[{i}].trafficPolicy"
            candidates += [*_port_entries(own, port, at), (own, at)]
            break
    candidates += [*_port_entries(top, port, "trafficPolicy"), (top, "trafficPolicy")]
    for policy, at in candidates:
        if (policy.get("loadBalancer") or {}).get("consistentHash") is not None:
            return hash_policy(policy, at)
    return []


def _port_entries(
    policy: Mapping[str, Any], port: int | None, at: str
) -> Iterator[tuple[Mapping[str, Any], str]]:
    if port is None:
        return
    for i, entry in enumerate(_list(policy.get("portLevelSettings"), f"{at}.portLevelSettings")):
        if (entry.get("port") or {}).get("number") == port:
            yield entry, f"{at}.portLevelSettings[{i}]"
            return


def tcp_proxy_fields(dr_spec: Mapping[str, Any], subset: str = "") -> dict[str, Any]:
    """tcp_proxy fields a TCP port's outbound filter takes from the rule (networkfilter.go):
    idle_timeout and max_downstream_connection_duration from the rule's top-level
    ``connectionPool.tcp`` only (not port-level, not subsets: Istio reads just those; unset,
    Envoy's 1h idle timeout stays), and a source-IP hash when ``consistentHash.useSourceIp``
    applies (a subset's loadBalancer overrides the rule's, maybeSetHashPolicy)."""
    top = _map(dr_spec.get("trafficPolicy"), "trafficPolicy")
    tcp = _map(
        _map(top.get("connectionPool"), "trafficPolicy.connectionPool").get("tcp"),
        "trafficPolicy.connectionPool.tcp",
    )
    at = "trafficPolicy.connectionPool.tcp"
    fields: dict[str, Any] = {}
    idle = _duration(tcp.get("idleTimeout"), f"{at}.idleTimeout")
    if idle is not None:
        fields["idle_timeout"] = idle
    lifetime = _duration(tcp.get("maxConnectionDuration"), f"{at}.maxConnectionDuration")
    if lifetime is not None:
        fields["max_downstream_connection_duration"] = lifetime
    source_ip = bool(
        ((top.get("loadBalancer") or {}).get("consistentHash") or {}).get("useSourceIp")
    )
    for entry in _list(dr_spec.get("subsets"), "subsets"):
        if subset and entry.get("name") == subset:
            balancer = (entry.get("trafficPolicy") or {}).get("loadBalancer")
            if balancer is not None:
                source_ip = bool((balancer.get("consistentHash") or {}).get("useSourceIp"))
            break
    if source_ip:
        fields["hash_policy"] = [{"source_ip": {}}]
    return fields


def check(dr_spec: Mapping[str, Any]) -> None:
    """Translate every policy of the rule once (top level, each port-level entry, each subset's
    and its port-level entries): ValueError naming the first field path that cannot be."""
    top = _map(dr_spec.get("trafficPolicy"), "trafficPolicy")
    policies: list[tuple[Mapping[str, Any], str]] = [(top, "trafficPolicy")]
    policies += _levels(top, "trafficPolicy")
    for i, entry in enumerate(_list(dr_spec.get("subsets"), "subsets")):
        own = _map(entry.get("trafficPolicy"), f"subsets[{i}].trafficPolicy")
        policies += [(own, f"subsets[{i}].trafficPolicy")]
        policies += _levels(own, f"subsets[{i}].trafficPolicy")
    for policy, at in policies:
        cluster_fields(policy, HTTP2, at)
        hash_policy(policy, at)
        client_tls.resolved(policy.get("tls"), "host.invalid", False, f"{at}.tls")
    tcp_proxy_fields(dr_spec)


def _levels(policy: Mapping[str, Any], at: str) -> list[tuple[Mapping[str, Any], str]]:
    entries = _list(policy.get("portLevelSettings"), f"{at}.portLevelSettings")
    return [(e, f"{at}.portLevelSettings[{i}]") for i, e in enumerate(entries)]


# -- values ---------------------------------------------------------------------------------------


def _map(value: Any, at: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{at}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, at: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ValueError(f"{at}: expected a list of objects")
    return value


def _count(fields: Mapping[str, Any], name: str, at: str) -> int:
    """A non-negative integer field (0 when unset)."""
    value = fields.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UNLIMITED:
        raise ValueError(f"{at}.{name}: must be an integer in [0, {UNLIMITED}], got {value!r}")
    return int(value)


def _percent(fields: Mapping[str, Any], name: str, at: str) -> int:
    value = _count(fields, name, at)
    if value > 100:
        raise ValueError(f"{at}.{name}: must be in [0, 100], got {value}")
    return value


def _flag(fields: Mapping[str, Any], name: str, at: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{at}.{name}: must be true or false, got {value!r}")
    return value


def _text(fields: Mapping[str, Any], name: str, at: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{at}.{name}: must be a non-empty string")
    return value


_UNITS = {
    "ns": Fraction(1),
    "us": Fraction(1_000),
    "µs": Fraction(1_000),
    "μs": Fraction(1_000),
    "ms": Fraction(1_000_000),
    "s": Fraction(1_000_000_000),
    "m": Fraction(60_000_000_000),
    "h": Fraction(3_600_000_000_000),
}
_TERM = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_SECONDS = 315_576_000_000  # google.protobuf.Duration's range


def _nanoseconds(value: Any, at: str) -> int | None:
    """A duration as Istio's CRDs take it (Go syntax: "10s", "0.5s", "1m30s", "100ms"), in
    nanoseconds; None when unset."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{at}: expected a duration such as '10s', got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"{at}: duration {value!r} must not be negative")
    text = text.removeprefix("+")
    if text == "0":
        return 0
    total, pos = Fraction(0), 0
    for term in _TERM.finditer(text):
        if term.start() != pos:
            break
        total += Fraction(term.group(1)) * _UNITS[term.group(2)]
        pos = term.end()
    if pos != len(text) or not text:
        raise ValueError(f"{at}: {value!r} is not a duration (e.g. '10s', '1m30s', '100ms')")
    if total > _MAX_SECONDS * 1_000_000_000:
        raise ValueError(f"{at}: duration {value!r} is too long")
    return int(total)


def _duration(value: Any, at: str) -> str | None:
    """The duration as proto3 JSON ("1.500s"); None when unset."""
    ns = _nanoseconds(value, at)
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{seconds}.{fraction:09d}".rstrip("0").rstrip(".") + "s"


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))
