"""AuthorizationPolicy CUSTOM: Envoy ext_authz on a local pod's inbound side (pure).

Istio is the specification: istio.io/latest/docs/reference/config/security/authorization-policy/
(CUSTOM, ``provider``), istio.io/latest/docs/tasks/security/authorization/authz-custom/,
istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/ (``extensionProviders``) and istiod's
builder (istio/istio pilot/pkg/security/authz/builder/builder.go and extauthz.go):

- The CUSTOM rules go into an RBAC filter in shadow mode (``shadow_rules``, action DENY so that a
  TCP chain drops a rule's HTTP-only parts and checks more, never less; stat prefix
  ``istio_ext_authz_``), each named ``istio-ext-authz-ns[<ns>]-policy[<name>]-rule[<i>]``; a
  policy without rules never matches. The ext_authz filter right after it runs only when that
  filter's shadow verdict names such a policy (``filter_enabled_metadata`` on
  ``istio_ext_authz_shadow_effective_policy_id``, prefix ``istio-ext-authz``): a request no
  CUSTOM rule matches is never checked. CUSTOM comes before DENY and ALLOW (authz.py): an
  allow by the provider still meets the DENY policies.
- Dry-run CUSTOM policies are left out (istiod builds only the enforced ones into the filter).
- One provider per workload. Policies naming different providers, a provider the mesh does not
  define, or one whose service is not in the registry: istiod reports it and generates, instead,
  an RBAC filter that DENIES what the CUSTOM rules match (``getBadCustomDenyRules``); so does
  the node (fail closed, never open).
- HTTP chains: ``envoy.filters.http.ext_authz`` with the provider's http_service or grpc_service.
  TCP chains: ``envoy.filters.network.ext_authz`` for a gRPC provider; an HTTP provider has none
  on TCP and istiod leaves the CUSTOM rules out there (they do not apply to TCP traffic).
- The provider's fields map as extauthz.go maps them: timeout (default 600s), failOpen
  (``failure_mode_allow``), statusOnError, clearRouteCache, pathPrefix, includeRequestHeadersInCheck
  (else the deprecated includeHeadersInCheck) and headersTo* as case-insensitive exact/prefix/
  suffix matchers, includeAdditionalHeadersInCheck (``headers_to_add``), includeRequestBodyInCheck
  (``with_request_body``); the gRPC authority is the cluster name with "|" as "_.".

How the check reaches the provider (the design). At Istio the protected pod's sidecar calls the
provider through its own outbound cluster ``outbound|<port>||<host>`` (extauthz.go
``LookupCluster``): mTLS with the pod's own certificate when the provider is in the mesh,
plaintext otherwise, from the pod's network. Here the ext_authz filter runs in the node Envoy, in
the pod's inbound chains, and a service's cluster is shared by every local pod: which netns and
certificate a connection uses comes from the filter state the caller's outbound listener stamps
(internal.py). An ext_authz check is a request of Envoy's own async client, which carries none
of the downstream connection's filter state. So each pod with a CUSTOM provider gets its own
check cluster, ``extAuthz/<ns>/<pod>``, whose one endpoint is an internal listener of the same
name. That listener stamps what the pod's outbound listener stamps (its netns, SPIFFE ID, name,
IP, labels) and proxies the bytes to ``outbound|<port>||<host>``, the very cluster the pod's own
calls to the provider take: its endpoints are ``originate`` (mTLS with the pod's certificate,
from its netns, plaintext to a provider outside the mesh) or, for a provider pod on this node,
that pod's fast path, which sees the protected pod as the caller. No VirtualService applies to
the check, as none does at Istio (ext_authz names the cluster, not a route). The cost is one
listener and one cluster per local pod with a CUSTOM policy (pods without one pay nothing). A
provider cluster that is missing (a Sidecar that hides it) fails the check, and the request
gets statusOnError (403) unless failOpen, as at Istio. The sidecar form (an Envoy in the pod's
netns) calls the service's cluster directly, as Istio's sidecar does; so does a gateway served by
``nodeagent gateway``, a proxy of its own (translate/gateway_policies.py, which denies instead
when the gateway has no cluster for the provider).

Each ext_authz filter's stat prefix carries the chain's denial key (translate/denials.py): the
node's metrics count the provider's denials per pod and path with action ``custom``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh.extension_providers import ExtAuthzProvider
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import internal
from nodeagent.translate.envoy import Cluster, Listener, message, typed
from nodeagent.translate.filters import (
    NETNS_FACTORY,
    NETNS_KEY,
    set_filter_state,
    state_value,
    tcp_proxy,
)
from nodeagent.translate.services import outbound_cluster

HTTP_FILTER = "envoy.filters.http.ext_authz"
NETWORK_FILTER = "envoy.filters.network.ext_authz"
MATCH_PREFIX = "istio-ext-authz"  # of CUSTOM rule names; the ext_authz filter matches it
SHADOW_PREFIX = "istio_ext_authz_"  # the RBAC shadow stats' and metadata keys' prefix
BAD_SUFFIX = "-bad-custom-action"  # a CUSTOM rule denied for its provider's error
CHECK_PREFIX = "extAuthz"  # a pod's check listener and cluster: extAuthz/<ns>/<pod>
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class Custom:
    """The CUSTOM part of one pod's policies: the provider and the cluster the ext_authz filter
    calls (VIA), or ERROR (then the CUSTOM rules deny, as istiod's bad-provider config)."""

    provider: ExtAuthzProvider | None
    host: str = ""  # the provider service's hostname
    target: str = ""  # outbound|<port>||<host>: the pod's own cluster for it
    via: str = ""  # what ext_authz names: the pod's check cluster, or TARGET (sidecar form)
    error: str = ""


def rule_name(namespace: str, name: str, index: int) -> str:
    return f"{MATCH_PREFIX}-ns[{namespace}]-policy[{name}]-rule[{index}]"


def check_name(pod: Pod) -> str:
    return f"{CHECK_PREFIX}/{pod.namespace}/{pod.name}"


def resolve(store: MeshStore, pod: Pod, providers: Sequence[str], sidecar: bool) -> Custom:
    """The provider the CUSTOM policies of POD name (PROVIDERS, one per policy), as istiod's
    getExtAuthz and LookupCluster resolve it; an error is a Custom without provider."""
    names = sorted(set(providers))
    if len(names) != 1:
        return Custom(None, error=f"only 1 provider can be used per workload, found {names}")
    defined = store.mesh_config.extension_providers
    provider = defined.find(names[0])
    if provider is None:
        return Custom(
            None,
            error=f'extension provider "{names[0]}" is not an ext_authz provider of the mesh '
            f"config (available: {defined.names()})",
        )
    host, error = _lookup(store, provider.service)
    if error:
        return Custom(None, error=f'extension provider "{provider.name}": {error}')
    target = outbound_cluster(provider.port, host)
    return Custom(provider, host, target, target if sidecar else check_name(pod))


def _lookup(store: MeshStore, service: str) -> tuple[str, str]:
    """(hostname, error) of SERVICE, "<host>" or "<namespace>/<host>" (extensionproviders
    LookupCluster: a bare host must be in one namespace only)."""
    namespace, _, host = service.rpartition("/")
    domain = store.mesh_config.cluster_domain
    found = sorted(
        {
            svc.namespace
            for svc in store.services.values()
            if svc.hostname(domain) == host and (not namespace or svc.namespace == namespace)
        }
    )
    if not found:
        return "", f"could not find service {service} in the service registry"
    if len(found) > 1:
        return "", (
            f"found {service} in multiple namespaces {found}, specify the namespace "
            "explicitly in the format of <Namespace>/<Hostname>"
        )
    return host, ""


# -- the filters ---------------------------------------------------------------------------------


def _headers(names: Sequence[str]) -> dict[str, Any]:
    """A ListStringMatcher of header names (extauthz.go generateHeaders: "*x" suffix, "x*"
    prefix, else exact; case-insensitive)."""
    patterns = []
    for name in names:
        if name.startswith("*"):
            pattern = {"suffix": name[1:]}
        elif name.endswith("*"):
            pattern = {"prefix": name[:-1]}
        else:
            pattern = {"exact": name}
        patterns.append({**pattern, "ignore_case": True})
    return {"patterns": patterns}


def _enabled_by(rbac_filter: str) -> dict[str, Any]:
    """Run only when FILTER's CUSTOM shadow rules matched (extauthz.go generateFilterMatcher)."""
    return {
        "filter": rbac_filter,
        "path": [{"key": f"{SHADOW_PREFIX}shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": MATCH_PREFIX}},
    }


def _grpc_service(custom: Custom) -> dict[str, Any]:
    assert custom.provider is not None
    return {
        "envoy_grpc": {
            "cluster_name": custom.via,
            # "|" is invalid in an authority (extauthz.go generateGRPCConfig); the target's
            # name, as Istio's sidecar sends it.
            "authority": custom.target.replace("|", "_."),
        },
        "timeout": custom.provider.timeout,
    }


def _common(provider: ExtAuthzProvider) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "transport_api_version": "V3",
        "failure_mode_allow": provider.fail_open,
    }
    if provider.status_on_error:
        fields["status_on_error"] = {"code": provider.status_on_error}
    if provider.clear_route_cache:
        fields["clear_route_cache"] = True
    body = provider.include_request_body
    if body is not None:
        fields["with_request_body"] = {
            "max_request_bytes": body.max_request_bytes,
            "allow_partial_message": body.allow_partial_message,
            "pack_as_bytes": body.pack_as_bytes,
        }
    return fields


def http_filter(custom: Custom, rbac_filter: str, stat_prefix: str = "") -> dict[str, Any]:
    """The HTTP ext_authz filter of a resolved CUSTOM, after RBAC_FILTER's shadow rules;
    STAT_PREFIX: its stats' (the pod's denial key, translate/denials.py)."""
    provider = custom.provider
    assert provider is not None
    fields = _common(provider)
    fields["filter_enabled_metadata"] = _enabled_by(rbac_filter)
    if stat_prefix:
        fields["stat_prefix"] = stat_prefix
    if provider.grpc:
        fields["grpc_service"] = _grpc_service(custom)
    else:
        service: dict[str, Any] = {
            "server_uri": {
                "uri": f"http://{custom.host}",  # required, unused: the cluster decides
                "cluster": custom.via,
                "timeout": provider.timeout,
            },
        }
        if provider.path_prefix:
            service["path_prefix"] = provider.path_prefix
        request: dict[str, Any] = {}
        if provider.include_request_headers:
            request["allowed_headers"] = _headers(provider.include_request_headers)
        if provider.include_additional_headers:
            request["headers_to_add"] = [
                {"key": k, "value": v} for k, v in provider.include_additional_headers
            ]
        if request:
            service["authorization_request"] = request
        response: dict[str, Any] = {}
        for field, names in (
            ("allowed_upstream_headers", provider.headers_to_upstream_on_allow),
            ("allowed_client_headers", provider.headers_to_downstream_on_deny),
            ("allowed_client_headers_on_success", provider.headers_to_downstream_on_allow),
        ):
            if names:
                response[field] = _headers(names)
        if response:
            service["authorization_response"] = response
        fields["http_service"] = service
    return {
        "name": HTTP_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", **fields),
    }


def network_filter(
    custom: Custom, rbac_filter: str, stat_prefix: str = ""
) -> dict[str, Any] | None:
    """The network ext_authz filter of a resolved CUSTOM; None for an HTTP provider.
    STAT_PREFIX: its stats' (Envoy names them ``ext_authz.<stat_prefix>.``)."""
    provider = custom.provider
    assert provider is not None
    if not provider.grpc:
        return None
    return {
        "name": NETWORK_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
            stat_prefix=stat_prefix or "custom",
            failure_mode_allow=provider.fail_open,
            transport_api_version="V3",
            grpc_service=_grpc_service(custom),
            filter_enabled_metadata=_enabled_by(rbac_filter),
        ),
    }


# -- the check path (node form) ------------------------------------------------------------------


def check_resources(
    pod: Pod, netns: str, spiffe: str, labels: Mapping[str, str], custom: Custom
) -> tuple[Listener, Cluster]:
    """POD's check listener and cluster (module docstring): the cluster its ext_authz filter
    names, whose connections leave as POD's own to the provider's cluster."""
    assert custom.provider is not None
    name = check_name(pod)
    source = pod.pod_ips[0] if pod.pod_ips else ""
    who = [
        # As the pod's outbound listener stamps them (internal.stamp_caller), TRANSITIVE: they
        # must reach originate (or the provider's fast path), two hops away.
        state_value(NETNS_KEY, netns, "TRANSITIVE", NETNS_FACTORY),
        state_value(internal.CALLER_KEY, spiffe, "TRANSITIVE", NETNS_FACTORY),
        state_value(internal.POD_KEY, pod.key, "TRANSITIVE", internal.STRING),
        state_value(
            internal.LABELS_KEY, internal.labels_value(labels), "TRANSITIVE", internal.STRING
        ),
    ]
    if source:
        who.append(state_value(internal.SOURCE_KEY, source, "TRANSITIVE", internal.STRING))
    listener = message(
        Listener,
        {
            "name": name,
            "stat_prefix": CHECK_PREFIX,  # not the pod's name: stats of all pods' checks together
            "internal_listener": {},
            "filter_chains": [
                {
                    "name": name,
                    "filters": [
                        set_filter_state(*who),
                        tcp_proxy(CHECK_PREFIX, custom.target, "outbound", pod.key),
                    ],
                }
            ],
        },
    )
    fields: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": internal.CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": internal.internal_address(name)}}]}
            ],
        },
        "transport_socket": internal.internal_upstream(),
    }
    if custom.provider.grpc:  # gRPC is HTTP/2 end to end, through the TCP proxy
        fields["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: typed(_HTTP_OPTIONS, explicit_http_config={"http2_protocol_options": {}})
        }
    return listener, message(Cluster, fields)


__all__: Sequence[str] = (
    "Custom",
    "check_name",
    "check_resources",
    "http_filter",
    "network_filter",
    "resolve",
    "rule_name",
)
