"""Which Istio resources and fields the agent enforces today, and which it accepts but ignores.

The one place that knows it (pure functions; the collector reads at scrape time): the store's log
warning, ``nodeagent proxy-status`` and the
metric ``nodeagent_istio_resources_not_enforced{kind}`` all ask ``not_enforced``, and README's
support table says the same in words. A resource is accepted when it passes Istio's schema; it is
*not enforced* when a field it sets has no effect yet. Update ENFORCED when an issue lands.

Enforced today (see nodeagent.mesh.policy, nodeagent.translate.destination_rule,
nodeagent.translate.virtual_service):
- PeerAuthentication: every field (selector, mtls.mode, portLevelMtls).
- RequestAuthentication (nodeagent.translate.jwt, keys by URI: nodeagent.mesh.jwks): selector,
  targetRef(s) (ignored by captured pods, as Istio's sidecars do), every jwtRules field.
- DestinationRule: host, exportTo, workloadSelector, subsets, and traffic policies (connection
  pool, load balancer (PASSTHROUGH too), locality load balancing, outlier detection, TLS: DISABLE,
  ISTIO_MUTUAL, SIMPLE and MUTUAL with files, sni, subjectAltNames, insecureSkipVerify) for the
  rule, a port or a subset; tls.credentialName in a rule with a workloadSelector (Istio reads it
  only there), over SDS. localityLbSetting.failoverPriority
  compares the node's labels with the endpoints': a label other than the node's topology labels
  (region, zone, subzone) without a "=value" would need the calling pod's labels, which a shared
  endpoint assignment cannot have.
- VirtualService: hosts, gateways (mesh, and the gateways `nodeagent gateway` serves), exportTo,
  every http, tcp and tls field.
- Gateway (nodeagent.translate.gateway, served by `nodeagent gateway`): selector, servers with
  port number/protocol/name, hosts (``ns/`` prefixes), tls modes SIMPLE, MUTUAL (credentialName),
  PASSTHROUGH, ISTIO_MUTUAL, httpsRedirect, subjectAltNames, minProtocolVersion. Not yet:
  AUTO_PASSTHROUGH and OPTIONAL_MUTUAL, certificates from files, bind, defaultEndpoint,
  targetPort, maxProtocolVersion, cipherSuites.
- AuthorizationPolicy (nodeagent.translate.authz): selector, action ALLOW/DENY/AUDIT and CUSTOM
  with provider (ext_authz to a MeshConfig extensionProviders entry: translate/extauthz.py), rules
  (from.source, to.operation, when on every documented key; request.auth.* and
  requestPrincipals read RequestAuthentication's JWT payload), dry-run.
- Sidecar: workloadSelector, egress hosts and port, outboundTrafficPolicy.mode
  (nodeagent.mesh.sidecar_scope).
- ServiceEntry (mesh/service_entries.py): hosts, addresses, ports, location, resolution (NONE,
  STATIC, DNS, DNS_ROUND_ROBIN), endpoints (address, ports, labels, weight, locality,
  network, serviceAccount), workloadSelector (pods and WorkloadEntries), subjectAltNames,
  exportTo (per client namespace: a local namespace it is not exported to does not see it).
  WorkloadEntry: address, ports, labels, weight, locality, network, serviceAccount, as a
  selecting ServiceEntry's endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from nodeagent.mesh import locality
from nodeagent.mesh.model import LOCALITY_LABELS, IstioResource

METRIC = "nodeagent_istio_resources_not_enforced"

ALL: Any = object()  # a field enforced with everything below it
# DestinationRule tls modes that are enforced (SIMPLE/MUTUAL: translate/client_tls.py).
_TLS_MODES = frozenset({"DISABLE", "ISTIO_MUTUAL", "SIMPLE", "MUTUAL"})

_NODE_LABELS = frozenset(LOCALITY_LABELS)


def _node_priority_label(label: Any) -> bool:
    """A failoverPriority entry the node can rank by: its own topology label, or any label
    with its value given ("label=value")."""
    return isinstance(label, str) and ("=" in label or label in _NODE_LABELS)


# PASSTHROUGH: the caller's dialled address, reached from its netns (translate/passthrough.py).
_SIMPLE_LB = frozenset(
    {"UNSPECIFIED", "LEAST_CONN", "LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "PASSTHROUGH"}
)
# A DestinationRule traffic policy (translate/destination_rule.py), at the top level, per port
# and per subset.
_POLICY_PARTS: Mapping[str, Any] = {
    "connectionPool": {
        "tcp": ALL,
        "http": {
            "http1MaxPendingRequests": ALL,
            "http2MaxRequests": ALL,
            "maxRequestsPerConnection": ALL,
            "maxRetries": ALL,
            "idleTimeout": ALL,
            "h2UpgradePolicy": ALL,
            "useClientProtocol": ALL,
            "maxConcurrentStreams": ALL,
        },
    },
    "loadBalancer": {
        "simple": _SIMPLE_LB,
        "consistentHash": ALL,
        "warmupDurationSecs": ALL,
        "warmup": ALL,
        "localityLbSetting": {
            "enabled": ALL,
            "distribute": ALL,
            "failover": ALL,
            "failoverPriority": [_node_priority_label],
        },
    },
    "outlierDetection": {
        "consecutive5xxErrors": ALL,
        "consecutiveGatewayErrors": ALL,
        "consecutiveLocalOriginFailures": ALL,
        "splitExternalLocalOriginErrors": ALL,
        "interval": ALL,
        "baseEjectionTime": ALL,
        "maxEjectionPercent": ALL,
        "minHealthPercent": ALL,
    },
    # credentialName: Istio uses it at sidecars only in a rule with a workloadSelector (over SDS,
    # client_tls.py); elsewhere it ignores it, as the node does (logged). The files fields are
    # paths on the node, served over SDS and watched (identity/tls_files.py).
    "tls": {
        "credentialName": ALL,
        "mode": _TLS_MODES,
        "sni": ALL,
        "subjectAltNames": ALL,
        "caCertificates": ALL,
        "caCrl": ALL,
        "clientCertificate": ALL,
        "privateKey": ALL,
        "insecureSkipVerify": ALL,
    },
}
_POLICY: Mapping[str, Any] = {
    **_POLICY_PARTS,
    "portLevelSettings": [{"port": {"number": ALL}, **_POLICY_PARTS}],
}

# A Gateway server (translate/gateway.py).
_GATEWAY_SERVER: Mapping[str, Any] = {
    "port": {
        "number": ALL,
        "name": ALL,
        "protocol": frozenset({"HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS"}),
    },
    "hosts": ALL,
    "name": ALL,
    "tls": {
        "mode": frozenset({"SIMPLE", "MUTUAL", "PASSTHROUGH", "ISTIO_MUTUAL"}),
        "httpsRedirect": ALL,
        "credentialName": ALL,
        "subjectAltNames": ALL,
        "minProtocolVersion": ALL,
    },
}

# A ServiceEntry endpoint, or a WorkloadEntry (mesh/service_entries.py): network labels it
# topology.istio.io/network (every network reached directly: no multi-network gateways, as
# Istio without meshNetworks); serviceAccount is the identity a MESH_INTERNAL entry's endpoint
# is sent mTLS to (with resolution STATIC; see _dns_accounts for DNS).
_ENTRY_ENDPOINT: Mapping[str, Any] = {
    "address": ALL,
    "ports": ALL,
    "labels": ALL,
    "weight": ALL,
    "locality": ALL,
    "network": ALL,
    "serviceAccount": ALL,
}

_AUTHZ_SOURCE = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
)
# istio.io/latest/docs/reference/config/security/conditions/
_AUTHZ_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)


def _authz_key(key: Any) -> bool:
    """A condition key the node judges: every one Istio documents."""
    return isinstance(key, str) and (
        key in _AUTHZ_KEYS
        or (key.startswith(("request.headers[", "request.auth.claims[")) and key.endswith("]"))
    )


def _trace_tags(tags: Any) -> bool:
    """Telemetry customTags of the kinds translate/tracing.py builds (not ``formatter``)."""
    return isinstance(tags, Mapping) and all(
        isinstance(t, Mapping)
        and len(t) == 1
        and next(iter(t)) in ("literal", "environment", "header")
        for t in tags.values()
    )


# Per kind, the fields that take effect: a nested mapping mirrors the spec, a frozenset lists the
# enforced values of a scalar field, and a one-element list applies its rule to every item.
ENFORCED: Mapping[str, Mapping[str, Any]] = {
    "PeerAuthentication": {"selector": ALL, "mtls": ALL, "portLevelMtls": ALL},
    # translate/jwt.py, mesh/jwks.py. targetRef(s) are Istio's too: a captured pod ignores them.
    "RequestAuthentication": {
        "selector": ALL,
        "targetRef": ALL,
        "targetRefs": ALL,
        "jwtRules": [
            {
                "issuer": ALL,
                "audiences": ALL,
                "jwks": ALL,
                "jwksUri": ALL,
                "fromHeaders": ALL,
                "fromParams": ALL,
                "fromCookies": ALL,
                "outputPayloadToHeader": ALL,
                "outputClaimToHeaders": ALL,
                "forwardOriginalToken": ALL,
                "spaceDelimitedClaims": ALL,
                "timeout": ALL,  # bounds the agent's fetch of the keys (mesh/jwks.py)
            }
        ],
    },
    "DestinationRule": {
        "host": ALL,
        "exportTo": ALL,
        "workloadSelector": ALL,
        "trafficPolicy": _POLICY,
        "subsets": [{"name": ALL, "labels": ALL, "trafficPolicy": _POLICY}],
    },
    "VirtualService": {
        "hosts": ALL,
        "gateways": ALL,
        "exportTo": ALL,
        "http": ALL,
        # The caller and the SNI decide per connection (translate/l4_routes.py).
        "tcp": ALL,
        "tls": ALL,
    },
    # Per client scope on the node (mesh/sidecar_scope.py). egress port trims what a listener
    # imports to that port; not yet: bind and captureMode (the node captures every outbound
    # connection into the pod's one listener; a bind address or no-capture listener would be
    # a listener per pod in its netns), ingress[] and inboundConnectionPool (the inbound side
    # is the pod's shared inbound listener), outboundTrafficPolicy.egressProxy.
    "Sidecar": {
        "workloadSelector": ALL,
        "egress": [{"port": ALL, "hosts": ALL}],
        "outboundTrafficPolicy": {"mode": ALL},
    },
    "Gateway": {"selector": ALL, "servers": [_GATEWAY_SERVER]},
    # RBAC filters on every inbound path of the pods a policy selects (translate/authz.py);
    # CUSTOM: ext_authz after RBAC shadow rules (translate/extauthz.py).
    "AuthorizationPolicy": {
        "selector": ALL,
        "action": frozenset({"ALLOW", "DENY", "AUDIT", "CUSTOM"}),
        "provider": {"name": ALL},
        "rules": [
            {
                "from": [{"source": {key: ALL for key in _AUTHZ_SOURCE}}],
                "to": ALL,
                "when": [{"key": _authz_key, "values": ALL, "notValues": ALL}],
            }
        ],
    },
    # mesh/telemetry.py (which Telemetry applies, istiod's merge), translate/access_logs.py
    # (envoyFileAccessLog providers; other access log provider kinds are not built),
    # translate/tracing.py, translate/istio_stats.py (metrics: Prometheus providers, overrides
    # per metric and mode; not custom metrics, not reportingInterval). targetRef(s) attach to
    # gateways and waypoints only: a captured pod ignores them, as Istio's sidecars.
    "Telemetry": {
        "selector": ALL,
        "targetRef": ALL,
        "targetRefs": ALL,
        "accessLogging": [{"providers": ALL, "filter": ALL, "match": ALL, "disabled": ALL}],
        "tracing": [
            {
                "match": ALL,
                "providers": ALL,
                "randomSamplingPercentage": ALL,
                "disableSpanReporting": ALL,
                "customTags": _trace_tags,
                "useRequestIdForTraceSampling": ALL,
            }
        ],
        "metrics": [
            {
                "providers": ALL,
                "overrides": [
                    {
                        "match": {"metric": ALL, "mode": ALL},
                        "disabled": ALL,
                        "tagOverrides": ALL,
                    }
                ],
            }
        ],
    },
    # Each host a registry service (mesh/service_entries.py, translate/cache.py).
    "ServiceEntry": {
        "hosts": ALL,
        "addresses": ALL,
        "ports": ALL,
        "location": ALL,
        "resolution": frozenset({"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"}),
        "endpoints": [_ENTRY_ENDPOINT],
        "workloadSelector": ALL,
        "subjectAltNames": ALL,
        # Per client namespace: a local namespace it is not exported to gets a scope without
        # it (translate/cache.py _scopes_of, mesh/sidecar_scope.py).
        "exportTo": ALL,
    },
    # As endpoints of the ServiceEntries whose workloadSelector selects them.
    "WorkloadEntry": _ENTRY_ENDPOINT,
}

# The issue that will make each kind (or the rest of it) take effect, or why not yet.
PLANNED: Mapping[str, str] = {
    "DestinationRule": "#15 traffic management",
    "VirtualService": "#15 traffic management",
    "ServiceEntry": (
        "not yet: an endpoint's serviceAccount with resolution DNS or DNS_ROUND_ROBIN"
        " (Envoy resolves those names and connects from the node, with no caller identity"
        " to present)"
    ),
    "Sidecar": (
        "not yet: egress bind and captureMode (the node captures every outbound connection"
        " into the pod's one listener: a bind address or a listener without capture would be"
        " a listener per pod in its netns), ingress[] and inboundConnectionPool (the pod's"
        " inbound listener is not per Sidecar), outboundTrafficPolicy.egressProxy"
    ),
    "Gateway": (
        "not yet: tls.mode AUTO_PASSTHROUGH (it needs the SNI-DNAT clusters of every service,"
        " Istio's east-west gateway), OPTIONAL_MUTUAL (not built), certificates from files"
        " (the gateway reads Secrets only: use credentialName), bind, defaultEndpoint,"
        " port.targetPort, maxProtocolVersion, cipherSuites"
    ),
    "WorkloadEntry": (
        "not yet: a WorkloadEntry is an endpoint of the ServiceEntries selecting it only, not"
        " of Kubernetes Services selecting its labels"
    ),
    "WorkloadGroup": (
        "not yet: WorkloadGroup (the template of auto-registered VM WorkloadEntries and their"
        " health checks: the node serves no VM proxies and runs no registration endpoint)"
    ),
    "AuthorizationPolicy": (
        "not yet: targetRef(s) (Istio applies them to waypoints and gateways only, never to a"
        " sidecar's workload)"
    ),
    "Telemetry": "#19 observability (tracing, metrics)",
}

NOT_PLANNED = "not planned"  # EnvoyFilter, ProxyConfig, WasmPlugin, TrafficExtension


@dataclass(frozen=True)
class NotEnforced:
    """An accepted resource that sets fields with no effect yet."""

    kind: str
    namespace: str
    name: str
    fields: tuple[str, ...]  # spec paths, e.g. "subsets", "trafficPolicy.tls.mode=SIMPLE"
    planned: str  # the issue that implements them, or NOT_PLANNED

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "fields": list(self.fields),
            "planned": self.planned,
        }

    def describe(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name} is accepted but not enforced:"
            f" {', '.join(self.fields)} ({self.planned})"
        )


def _unenforced(value: Any, rule: Any, path: str) -> list[str]:
    if rule is ALL:
        return []
    if callable(rule):  # a predicate over the value
        return [] if rule(value) else [f"{path}={value}"]
    if isinstance(rule, frozenset):
        return [] if value in rule else [f"{path}={value}"]
    if isinstance(rule, list):
        items = value if isinstance(value, list) else []
        return [
            f for i, item in enumerate(items) for f in _unenforced(item, rule[0], f"{path}[{i}]")
        ]
    fields = []
    for key, item in value.items() if isinstance(value, Mapping) else ():
        where = f"{path}.{key}" if path else str(key)
        fields += _unenforced(item, rule[key], where) if key in rule else [where]
    return fields


def not_enforced(resource: IstioResource) -> NotEnforced | None:
    """What RESOURCE sets that has no effect today; None when all of it is enforced."""
    rule = ENFORCED.get(resource.kind)
    if rule is None:  # a kind not enforced at all: name what it sets
        fields = [str(key) for key in resource.spec] or ["spec"]
    else:
        fields = _unenforced(resource.spec, rule, "")
    if resource.kind == "ServiceEntry":
        fields += _dns_accounts(resource.spec)
    if not fields:
        return None
    return NotEnforced(
        resource.kind,
        resource.namespace,
        resource.name,
        tuple(fields),
        PLANNED.get(resource.kind, NOT_PLANNED),
    )


def _dns_accounts(spec: Mapping[str, Any]) -> list[str]:
    """A MESH_INTERNAL entry's endpoint serviceAccounts that have no effect: with resolution DNS
    or DNS_ROUND_ROBIN the node Envoy connects to the names itself (translate/clusters.py
    dns_cluster), with no caller's certificate, where Istio's sidecar would send mTLS."""
    if spec.get("location") != "MESH_INTERNAL" or spec.get("resolution") not in (
        "DNS",
        "DNS_ROUND_ROBIN",
    ):
        return []
    return [
        f"endpoints[{i}].serviceAccount"
        for i, endpoint in enumerate(spec.get("endpoints") or [])
        if isinstance(endpoint, Mapping) and endpoint.get("serviceAccount")
    ]


def report(resources: Iterable[IstioResource]) -> list[NotEnforced]:
    """The not-enforced ones among RESOURCES, by kind, namespace and name."""
    found = [n for n in map(not_enforced, resources) if n is not None]
    return sorted(found, key=lambda n: (n.kind, n.namespace, n.name))


def counts(resources: Iterable[IstioResource]) -> dict[str, int]:
    """Not-enforced resources per kind."""
    out: dict[str, int] = {}
    for item in report(resources):
        out[item.kind] = out.get(item.kind, 0) + 1
    return out


def warning(resource: IstioResource) -> str:
    """The log warning for RESOURCE ("" when all of it is enforced and Istio would not warn
    about it either)."""
    item = not_enforced(resource)
    notes = [item.describe()] if item is not None else []
    if resource.kind == "DestinationRule":
        notes += [
            f"DestinationRule {resource.namespace}/{resource.name}: {at}: {note}"
            for at, policy in _policies(resource.spec)
            for note in locality.warnings(
                locality.of_policy(policy), policy.get("outlierDetection")
            )
        ]
    return "; ".join(notes)


def _policies(spec: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Each traffic policy of a DestinationRule (top, per port, per subset) and its path."""
    found: list[tuple[str, Mapping[str, Any]]] = []
    levels = [("trafficPolicy", spec.get("trafficPolicy"))]
    levels += [
        (f"subsets[{i}].trafficPolicy", s.get("trafficPolicy"))
        for i, s in enumerate(spec.get("subsets") or [])
        if isinstance(s, Mapping)
    ]
    for at, policy in levels:
        if not isinstance(policy, Mapping):
            continue
        found.append((at, policy))
        for j, entry in enumerate(policy.get("portLevelSettings") or []):
            if isinstance(entry, Mapping):
                found.append((f"{at}.portLevelSettings[{j}]", entry))
    return found


class NotEnforcedCollector:
    """``nodeagent_istio_resources_not_enforced{kind}``, counted from the store at each scrape
    (every kind that is not fully enforced has a series, 0 when none is present)."""

    def __init__(self, resources: Callable[[], Iterable[IstioResource]]) -> None:
        self.resources = resources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            METRIC,
            "Istio resources accepted (schema-valid) that set fields the agent does not enforce"
            " yet, by kind.",
            labels=["kind"],
        )
        found = counts(self.resources())
        for kind in sorted(set(PLANNED) | set(found)):
            family.add_metric([kind], found.get(kind, 0))
        yield family


__all__ = [
    "ENFORCED",
    "METRIC",
    "NotEnforced",
    "NotEnforcedCollector",
    "counts",
    "not_enforced",
    "report",
    "warning",
]
