"""VirtualService → Envoy routes, as a caller of one service port sees them (pure).

Istio is the specification: the reference page
https://istio.io/latest/docs/reference/config/networking/virtual-service/ for every field, and
istio/istio pilot/pkg/networking/core/route/route.go (BuildHTTPRoutesForVirtualService,
translateRoute, TranslateRouteMatch, applyHTTPRouteDestination, ApplyRedirect, TranslateFault,
TranslateCORSPolicy) and route/retry/retry.go (ConvertPolicy) for how a sidecar turns them into
Envoy config. Delegation (rules of another VirtualService) is translate/delegation.py.

The node Envoy is shared by every local pod, so what Istio decides per proxy (a match's
sourceLabels and sourceNamespace) is decided per request here: a ``RouteMatch.filter_state``
matcher on what the caller's outbound listener stamped (internal.LABELS_KEY, internal.CALLER_KEY).
The routes stay one set per service port, whatever the number of callers (docs/o1-config.md).

Bad input that passed schema validation but cannot be translated raises ValueError naming the
VirtualService (kind/namespace/name) and the field (http[2].match[0].uri).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import re2

from nodeagent.mesh.model import IstioResource
from nodeagent.ports import RE2_MAX_PROGRAM_SIZE
from nodeagent.translate import internal
from nodeagent.translate.delegation import DelegateOf, Rule, rules
from nodeagent.translate.duration import nanoseconds, proto_duration
from nodeagent.translate.envoy import typed
from nodeagent.translate.filters import CORS_FILTER, FAULT_FILTER
from nodeagent.translate.routes import default_retry_policy

Destination = Callable[[Mapping[str, Any]], str]
HashPolicyOf = Callable[[str], list[dict[str, Any]]]

MESH_GATEWAY = "mesh"  # a match's gateways naming the sidecars (here: the node's pods)


def _no_hash(cluster: str) -> list[dict[str, Any]]:
    return []


def http_routes(
    vs: IstioResource,
    port: int,
    cluster_of: Destination,
    hash_policy_of: HashPolicyOf = _no_hash,
    delegate_of: DelegateOf | None = None,
    gateways: Collection[str] = (MESH_GATEWAY,),
) -> list[dict[str, Any]]:
    """The Envoy routes (proto3 JSON dicts of ``envoy.config.route.v3.Route``) of VS's http[]
    for a caller of service port PORT, in rule order (first match wins), one route per match[]
    entry; no catch-all is added (an unmatched request gets Envoy's 404 NR).

    GATEWAYS: the names (as VS spells them) of the proxy the routes are for: "mesh" for the
    node's pods; an ingress gateway's ``ns/name`` (and ``name`` in its own namespace), so a
    match naming other gateways is left out (Istio's sourceMatchHTTP).

    CLUSTER_OF(destination) names a destination's cluster; HASH_POLICY_OF(cluster) is the
    route hash_policy its DestinationRule's consistentHash asks for; DELEGATE_OF(name,
    namespace) finds a delegate VirtualService. Like Istio, routes after a catch-all route are
    not generated (BuildHTTPRoutesForVirtualService).
    """
    out: list[dict[str, Any]] = []
    for rule in rules(vs, delegate_of):
        matches = rule.spec.get("match") or [None]
        for j, match in enumerate(matches):
            where = f"{rule.where}.match[{j}]"
            if match is not None and (not _applies(match, port, gateways) or _claims(match)):
                continue
            route = _route(vs, rule, match, where, port, cluster_of, hash_policy_of)
            out.append(route)
            if _catch_all(route["match"]):
                return out
        if not rule.spec.get("match"):
            return out
    return out


# --- matching ---


def _applies(match: Mapping[str, Any], port: int, proxy: Collection[str] = (MESH_GATEWAY,)) -> bool:
    """What Istio decides per proxy before translating a match (translateRoute,
    sourceMatchHTTP): its port, and its gateways (a match naming gateways applies only to the
    PROXY they name: sidecars if they include "mesh", where Istio then ignores its
    sourceLabels, and so does this)."""
    if match.get("port") and int(match["port"]) != port:
        return False
    gateways = match.get("gateways") or []
    return not gateways or any(g in proxy for g in gateways)


def _regex(pattern: str, where: str) -> dict[str, Any]:
    """A safe_regex RegexMatcher; ValueError at WHERE if RE2 (as Envoy runs it) refuses it."""
    try:
        compiled = re2.compile(pattern)
    except re2.error as err:
        raise ValueError(f"{where}: {pattern!r} is not an RE2 regex: {err}") from None
    if compiled.programsize > RE2_MAX_PROGRAM_SIZE:
        raise ValueError(
            f"{where}: regex {pattern!r} is too complex for Envoy (RE2 program size "
            f"{compiled.programsize} > {RE2_MAX_PROGRAM_SIZE})"
        )
    return {"regex": pattern}


def _present(match: Mapping[str, Any] | None) -> bool:
    """canBeConvertedToPresentMatch: ``{}`` (or regex "*", which Istio reads as "present")."""
    if not match:
        return True
    return not ({"exact", "prefix", "regex"} & match.keys()) or match.get("regex") == "*"


def _string_matcher(match: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ConvertToEnvoyMatch: an Istio StringMatch as a type.matcher.v3.StringMatcher."""
    if "exact" in match:
        return {"exact": match["exact"]}
    if "prefix" in match:
        return {"prefix": match["prefix"]}
    return {"safe_regex": _regex(match["regex"], f"{where}.regex")}


# A header match on "@request.auth.claims..." is, in Istio, a matcher on the JWT filter's
# dynamic metadata (TranslateRouteMatch, translateMetadataMatch). A sidecar's outbound side runs
# no JWT filter ("claim based routing" is for ingress gateways: istio.io docs/tasks/security/
# authentication/jwt-route), so there it never matches, and inverted (withoutHeaders) always
# does: the same here, without a matcher.
JWT_CLAIM = "@request.auth.claims"


def _claims(match: Mapping[str, Any]) -> bool:
    """MATCH needs a JWT claim, which the outbound side never has."""
    return any(name.startswith(JWT_CLAIM) for name in match.get("headers") or {})


def _header(name: str, match: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    if _present(match):
        return {"name": name, "present_match": True}
    assert match is not None
    return {"name": name, "string_match": _string_matcher(match, where)}


def _source_matchers(match: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """An HTTP match's sourceNamespace and sourceLabels (``_caller_matchers``); Istio ignores
    them when the match names gateways (sourceMatchHTTP)."""
    if match.get("gateways"):
        return []
    return _caller_matchers(match, where)


def labels_matcher(labels: Mapping[str, str], where: str) -> dict[str, Any]:
    """A filter-state matcher: the caller carries every pair of LABELS (``_caller_matchers``)."""
    return _caller_matchers({"sourceLabels": labels}, where)[0]


def _caller_matchers(match: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """sourceNamespace and sourceLabels, per request or connection: filter-state matchers on
    the caller's SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>) and on its labels
    (internal.labels_value, keys sorted: one regex requires every selector pair in order)."""
    out = []
    namespace = match.get("sourceNamespace")
    if namespace:
        pattern = f"spiffe://[^/]+/ns/{re2.escape(namespace)}/sa/[^/]+"
        out.append(
            {
                "key": internal.CALLER_KEY,
                "string_match": {"safe_regex": _regex(pattern, f"{where}.sourceNamespace")},
            }
        )
    labels = match.get("sourceLabels") or {}
    if labels:
        pairs = ",(.*,)?".join(re2.escape(f"{k}={v}") for k, v in sorted(labels.items()))
        out.append(
            {
                "key": internal.LABELS_KEY,
                "string_match": {"safe_regex": _regex(f".*,{pairs},.*", f"{where}.sourceLabels")},
            }
        )
    return out


def route_match(match: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """TranslateRouteMatch: an HTTPMatchRequest as a RouteMatch (None: every request)."""
    out: dict[str, Any] = {"prefix": "/"}
    if match is None:
        return out
    headers = [
        _header(name, m, f"{where}.headers.{name}")
        for name, m in (match.get("headers") or {}).items()
    ]
    for name, m in (match.get("withoutHeaders") or {}).items():
        if name.startswith(JWT_CLAIM):
            continue
        matcher = _header(name, m, f"{where}.withoutHeaders.{name}")
        matcher["invert_match"] = True
        if not _present(m):  # treat_missing_header_as_empty conflicts with present_match
            matcher["treat_missing_header_as_empty"] = True
        headers.append(matcher)
    headers.sort(key=lambda h: str(h["name"]))
    uri = match.get("uri")
    if uri:
        if "exact" in uri:
            out = {"path": uri["exact"]}
        elif "prefix" in uri:
            out = {"prefix": uri["prefix"]}
        elif "regex" in uri:
            out = {"safe_regex": _regex(uri["regex"], f"{where}.uri.regex")}
    out["case_sensitive"] = not match.get("ignoreUriCase", False)
    for field, pseudo in (
        ("method", ":method"),
        ("authority", ":authority"),
        ("scheme", ":scheme"),
    ):
        if match.get(field) is not None:
            headers.append(_header(pseudo, match[field], f"{where}.{field}"))
    if headers:
        out["headers"] = headers
    params = []
    for name, m in sorted((match.get("queryParams") or {}).items()):
        if _present(m):
            params.append({"name": name, "present_match": True})
        else:
            params.append(
                {"name": name, "string_match": _string_matcher(m, f"{where}.queryParams.{name}")}
            )
    if params:
        out["query_parameters"] = params
    source = _source_matchers(match, where)
    if source:
        out["filter_state"] = source
    return out


def _catch_all(match: Mapping[str, Any]) -> bool:
    """IsCatchAllRoute: every request matches (prefix "/" or regex ".*", nothing else)."""
    path = match.get("prefix") == "/" or match.get("safe_regex", {}).get("regex") == ".*"
    return path and not any(
        match.get(k) for k in ("headers", "query_parameters", "dynamic_metadata", "filter_state")
    )


# --- actions ---


def _route(
    vs: IstioResource,
    rule: Rule,
    match: Mapping[str, Any] | None,
    where: str,
    port: int,
    cluster_of: Destination,
    hash_policy_of: HashPolicyOf,
) -> dict[str, Any]:
    """translateRoute: one rule under one of its matches."""
    spec = rule.spec
    out: dict[str, Any] = {"match": route_match(match, where)}
    name = spec.get("name", "")
    if match is not None and match.get("name"):
        name = f"{name}.{match['name']}"
    if name:
        out["name"] = name
    out["metadata"] = {
        "filter_metadata": {
            "istio": {
                "config": f"/apis/networking.istio.io/v1/namespaces/{vs.namespace}"
                f"/virtual-service/{vs.name}"
            }
        }
    }
    if match is not None and match.get("statPrefix"):
        out["stat_prefix"] = match["statPrefix"]
    authority = ""
    if spec.get("headers"):
        ops = _header_operations(spec["headers"])
        authority = ops.pop("authority")
        out.update(ops)
    if spec.get("redirect"):
        out["redirect"] = _redirect(spec["redirect"], port, f"{rule.where}.redirect")
    elif spec.get("directResponse"):
        out["direct_response"] = _direct_response(spec["directResponse"])
    else:
        out["route"] = _action(spec, rule.where, port, authority, out, cluster_of, hash_policy_of)
    per_filter = {}
    if spec.get("fault"):
        fault = _fault(spec["fault"], f"{rule.where}.fault")
        if fault:
            per_filter[FAULT_FILTER] = fault
    if spec.get("corsPolicy"):
        per_filter[CORS_FILTER] = _cors(spec["corsPolicy"], f"{rule.where}.corsPolicy")
    if per_filter:
        out["typed_per_filter_config"] = per_filter
    return out


def _header_list(headers: Mapping[str, str] | None, append: bool) -> tuple[list[Any], str]:
    """translateAppendHeaders: header options sorted by name, without the ones Envoy will not
    touch (":..." and host); the authority one of them asked for, if any."""
    action = "APPEND_IF_EXISTS_OR_ADD" if append else "OVERWRITE_IF_EXISTS_OR_ADD"
    authority, out = "", []
    for key, value in sorted((headers or {}).items()):
        if key.lower() in (":authority", "host"):
            authority = str(value)
        if key.startswith(":") or key.lower() == "host":
            continue
        out.append({"header": {"key": key, "value": str(value)}, "append_action": action})
    return out, authority


def _header_operations(headers: Mapping[str, Any]) -> dict[str, Any]:
    """TranslateHeadersOperations: Route/ClusterWeight header fields, plus "authority" (a host
    or :authority header to set, which Envoy does with host_rewrite_literal)."""
    request, response = headers.get("request") or {}, headers.get("response") or {}
    req_set, set_authority = _header_list(request.get("set"), False)
    req_add, add_authority = _header_list(request.get("add"), True)
    resp_set, _ = _header_list(response.get("set"), False)
    resp_add, _ = _header_list(response.get("add"), True)

    def kept(names: list[str] | None) -> list[str]:
        return [n for n in names or [] if not n.startswith(":") and n.lower() != "host"]

    out: dict[str, Any] = {
        "request_headers_to_add": req_set + req_add,
        "request_headers_to_remove": kept(request.get("remove")),
        "response_headers_to_add": resp_set + resp_add,
        "response_headers_to_remove": kept(response.get("remove")),
    }
    out = {k: v for k, v in out.items() if v}
    out["authority"] = set_authority or add_authority
    return out


_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


def _redirect(redirect: Mapping[str, Any], port: int, where: str) -> dict[str, Any]:
    """ApplyRedirect (sidecar: plain HTTP listeners, so the default scheme is http)."""
    out: dict[str, Any] = {}
    if redirect.get("uri"):
        out["path_redirect"] = redirect["uri"]
    elif redirect.get("prefixRewrite"):
        # The newer field (replace the matched prefix); Envoy holds one path rewrite, uri wins.
        out["prefix_rewrite"] = redirect["prefixRewrite"]
    if redirect.get("authority"):
        out["host_redirect"] = redirect["authority"]
    scheme = redirect.get("scheme", "")
    if scheme:
        out["scheme_redirect"] = scheme
    redirect_port = 0
    if "port" in redirect:
        redirect_port = int(redirect["port"])
    elif redirect.get("derivePort") == "FROM_REQUEST_PORT":
        # Envoy cannot derive it; the route is built for one port, the request's (as Istio does).
        redirect_port = port
    # No explicit :80 for http (the default scheme here) nor :443 for https.
    default_port = {"": 80, "http": 80, "https": 443}.get(scheme)
    if redirect_port and redirect_port != default_port:
        out["port_redirect"] = redirect_port
    code = int(redirect.get("redirectCode") or 301)
    if code not in _REDIRECT_CODES:
        raise ValueError(f"{where}.redirectCode: {code} is not one of {sorted(_REDIRECT_CODES)}")
    out["response_code"] = _REDIRECT_CODES[code]
    return out


def _direct_response(response: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": int(response["status"])}
    body = response.get("body") or {}
    if "string" in body:
        out["body"] = {"inline_string": body["string"]}
    elif "bytes" in body:
        out["body"] = {"inline_bytes": body["bytes"]}  # base64 in YAML and in proto3 JSON alike
    return out


def _percent(value: Any) -> dict[str, Any]:
    """translatePercentToFractionalPercent: Istio's Percent (a double) in millionths."""
    return {"numerator": int(float(value) * 10000), "denominator": "MILLION"}


def _hundredths(value: int) -> dict[str, Any]:
    return {"numerator": int(value), "denominator": "HUNDRED"}


def _mirror_fraction(percentage: Mapping[str, Any] | None, percent: Any = None) -> Any:
    """MirrorPercent: 100% unless a percentage says otherwise; 0 means no mirroring (None)."""
    if percentage is not None:
        value = float(percentage.get("value", 0))
        return {"default_value": _percent(value)} if value > 0 else None
    if percent is not None:
        return {"default_value": _hundredths(percent)} if int(percent) > 0 else None
    return {"default_value": _hundredths(100)}


def _mirror(cluster: str, fraction: Mapping[str, Any]) -> dict[str, Any]:
    return {"cluster": cluster, "runtime_fraction": fraction, "trace_sampled": False}


def _action(
    spec: Mapping[str, Any],
    where: str,
    port: int,
    authority: str,
    out: dict[str, Any],
    cluster_of: Destination,
    hash_policy_of: HashPolicyOf,
) -> dict[str, Any]:
    """applyHTTPRouteDestination: the RouteAction (OUT, the Route, gets a single destination's
    header operations)."""
    timeout = proto_duration(spec["timeout"], f"{where}.timeout") if "timeout" in spec else "0s"
    # Istio's setTimeout: a gRPC request follows its grpc-timeout header, capped by the route's
    # timeout (0: no cap), with Envoy's deprecated max_grpc_timeout. Not its replacement
    # max_stream_duration: a route that has one uses Envoy's "new timeouts", which ignore
    # ``timeout`` for every request (router FilterUtility::finalTimeout, usingNewTimeouts), so
    # no VirtualService timeout would fire (Istio: "MaxStreamDuration has some regressions").
    action: dict[str, Any] = {"timeout": timeout, "max_grpc_timeout": timeout}
    rewrite = spec.get("rewrite") or {}
    if rewrite.get("uriRegexRewrite"):
        regex = rewrite["uriRegexRewrite"]
        action["regex_rewrite"] = {
            "pattern": _regex(regex.get("match", ""), f"{where}.rewrite.uriRegexRewrite.match"),
            "substitution": regex.get("rewrite", ""),
        }
    elif rewrite.get("uri"):
        action["prefix_rewrite"] = rewrite["uri"]
    authority = rewrite.get("authority") or authority
    if authority:
        action["host_rewrite_literal"] = authority

    mirrors = []
    if spec.get("mirror"):
        fraction = _mirror_fraction(spec.get("mirrorPercentage"), spec.get("mirrorPercent"))
        if fraction:
            mirrors.append(_mirror(cluster_of(spec["mirror"]), fraction))
    for policy in spec.get("mirrors") or []:
        fraction = _mirror_fraction(policy.get("percentage"))
        if fraction and policy.get("destination"):
            mirrors.append(_mirror(cluster_of(policy["destination"]), fraction))
    if mirrors:
        action["request_mirror_policies"] = mirrors

    destinations = spec.get("route") or []
    if not destinations:
        raise ValueError(f"{where}: needs route, redirect, directResponse or delegate")
    hashes: list[dict[str, Any]] = []
    consistent_hash = False
    if len(destinations) == 1:
        dest = destinations[0]
        cluster = cluster_of(dest["destination"])
        action["cluster"] = cluster
        if dest.get("headers"):
            ops = _header_operations(dest["headers"])
            dest_authority = ops.pop("authority")
            for key, values in ops.items():
                out[key] = [*out.get(key, []), *values]
            if dest_authority and "host_rewrite_literal" not in action:
                action["host_rewrite_literal"] = dest_authority
        hashes = hash_policy_of(cluster)
        consistent_hash = bool(hashes)
    else:
        weighted = []
        for dest in destinations:
            if not dest.get("weight"):
                continue  # a 0-weight destination among others gets nothing (Istio skips it)
            cluster = cluster_of(dest["destination"])
            weight: dict[str, Any] = {"name": cluster, "weight": int(dest["weight"])}
            if dest.get("headers"):
                ops = _header_operations(dest["headers"])
                dest_authority = ops.pop("authority")
                weight.update(ops)
                if dest_authority:
                    weight["host_rewrite_literal"] = dest_authority
            weighted.append(weight)
            hashes += hash_policy_of(cluster)
        if not weighted:
            raise ValueError(f"{where}.route: every destination has weight 0")
        action["weighted_clusters"] = {"clusters": weighted}
    if hashes:
        action["hash_policy"] = hashes
    retry = retry_policy(spec.get("retries"), consistent_hash, f"{where}.retries")
    if retry is not None:
        action["retry_policy"] = retry
    return action


def retry_policy(
    retries: Mapping[str, Any] | None, consistent_hash: bool, where: str
) -> dict[str, Any] | None:
    """ConvertPolicy (route/retry/retry.go): Istio's default policy (without the previous-hosts
    predicate when the destination hashes consistently), the VirtualService's overrides on top;
    attempts 0 turns retries off (None)."""
    out = default_retry_policy()
    if consistent_hash:
        del out["retry_host_predicate"]
    if retries is None:
        return out
    attempts = int(retries.get("attempts") or 0)
    if attempts <= 0:
        return None
    out["num_retries"] = attempts
    if retries.get("retryOn"):
        on, codes = [], []
        for part in str(retries["retryOn"]).split(","):
            part = part.strip()
            if part.isdigit() and int(part) in _HTTP_CODES:
                codes.append(int(part))
            elif part:
                on.append(part)
        out["retry_on"] = ",".join(on)
        out["retriable_status_codes"] = codes
        if codes and "retriable-status-codes" not in out["retry_on"]:
            out["retry_on"] += ",retriable-status-codes"
        if not codes:
            del out["retriable_status_codes"]
    if retries.get("perTryTimeout"):
        out["per_try_timeout"] = proto_duration(retries["perTryTimeout"], f"{where}.perTryTimeout")
    if "retryIgnorePreviousHosts" in retries:
        if retries["retryIgnorePreviousHosts"]:
            out["retry_host_predicate"] = default_retry_policy()["retry_host_predicate"]
        else:
            out.pop("retry_host_predicate", None)
    if retries.get("retryRemoteLocalities"):
        out["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": typed(
                "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                update_frequency=2,
            ),
        }
    if retries.get("backoff"):
        out["retry_back_off"] = {
            "base_interval": proto_duration(retries["backoff"], f"{where}.backoff")
        }
    return out


_HTTP_CODES = {s.value for s in HTTPStatus}

# gRPC status names Istio's abort.grpcStatus accepts (istio/istio pkg/config/validation grpc
# codes; https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
_GRPC_CODES = {
    name: code
    for code, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


def _fault(fault: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """TranslateFault: the fault filter's per-route HTTPFault; None when nothing is left
    (Istio drops exponentialDelay and unknown aborts)."""
    out: dict[str, Any] = {}
    delay = fault.get("delay")
    if delay and delay.get("fixedDelay") is not None:
        out["delay"] = {
            "fixed_delay": proto_duration(delay["fixedDelay"], f"{where}.delay.fixedDelay"),
            "percentage": _percent(delay["percentage"].get("value", 0))
            if delay.get("percentage") is not None
            else _hundredths(delay.get("percent", 0)),
        }
    abort = fault.get("abort")
    if abort:
        body: dict[str, Any] = {}
        if abort.get("percentage") is not None:
            body["percentage"] = _percent(abort["percentage"].get("value", 0))
        if abort.get("httpStatus") is not None:
            out["abort"] = {**body, "http_status": int(abort["httpStatus"])}
        elif abort.get("grpcStatus") is not None:
            status = str(abort["grpcStatus"])
            if status not in _GRPC_CODES:
                raise ValueError(f"{where}.abort.grpcStatus: {status!r} is not a gRPC status")
            out["abort"] = {**body, "grpc_status": _GRPC_CODES[status]}
    if not out:
        return None
    return typed("envoy.extensions.filters.http.fault.v3.HTTPFault", **out)


def _cors(cors: Mapping[str, Any], where: str) -> dict[str, Any]:
    """TranslateCORSPolicy: the CORS filter's per-route CorsPolicy."""
    out: dict[str, Any] = {
        "forward_not_matching_preflights": cors.get("unmatchedPreflights") != "IGNORE",
        "filter_enabled": {"default_value": _hundredths(100)},
    }
    if cors.get("allowOrigins") is not None:
        out["allow_origin_string_match"] = [
            _string_matcher(m, f"{where}.allowOrigins[{i}]")
            for i, m in enumerate(cors["allowOrigins"])
            if {"exact", "prefix", "regex"} & m.keys()
        ]
    elif cors.get("allowOrigin") is not None:
        out["allow_origin_string_match"] = [{"exact": o} for o in cors["allowOrigin"]]
    if cors.get("allowCredentials") is not None:
        out["allow_credentials"] = bool(cors["allowCredentials"])
    for field, envoy_field in (
        ("allowHeaders", "allow_headers"),
        ("allowMethods", "allow_methods"),
        ("exposeHeaders", "expose_headers"),
    ):
        if cors.get(field):
            out[envoy_field] = ",".join(cors[field])
    if cors.get("maxAge") is not None:
        seconds = nanoseconds(cors["maxAge"], f"{where}.maxAge") // 1_000_000_000
        out["max_age"] = str(seconds)
    return typed("envoy.extensions.filters.http.cors.v3.CorsPolicy", **out)


# --- tcp and tls ---
#
# Istio decides a tcp[] or tls[] match's port, gateways and source (sourceLabels,
# sourceNamespace) per sidecar, and its destinationSubnets and sniHosts per connection
# (pilot/pkg/networking/core/tls.go: matchTCP, matchTLS, buildSidecarOutboundTCPFilterChainOpts,
# buildSidecarOutboundTLSFilterChainOpts). Here the port and the destination (the service's VIP)
# are known when translating; the caller and the SNI are read per connection by the matcher of
# the port's routes listener (translate/l4_routes.py). References:
# istio.io/latest/docs/reference/config/networking/virtual-service/#TCPRoute, #TLSRoute,
# #L4MatchAttributes, #TLSMatchAttributes.

SNI = "sni"  # a Condition's input: the server name the client's TLS ClientHello asks for


@dataclass(frozen=True)
class Condition:
    """What one connection must show: INPUT (SNI, or a filter-state key the caller's listener
    stamped) meeting any of MATCHERS (type.matcher.v3.StringMatcher dicts)."""

    input: str
    matchers: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class L4Rule:
    """One rule as a port's routes listener applies it: WHEN any of its alternatives (one per
    match, each every one of its conditions) holds, or always when WHEN is (); ROUTE: the
    tcp_proxy fields (``cluster`` or ``weighted_clusters``), None to close the connection."""

    when: tuple[tuple[Condition, ...], ...]
    route: dict[str, Any] | None


def _l4_route(rule: Mapping[str, Any], where: str, cluster_of: Destination) -> dict[str, Any]:
    """A tcp[] or tls[] rule's destinations as tcp_proxy fields (0-weight ones dropped)."""
    destinations = rule.get("route") or []
    if not destinations:
        raise ValueError(f"{where}.route: needs a destination")
    if len(destinations) == 1:
        return {"cluster": cluster_of(destinations[0]["destination"])}
    weighted = [
        {"name": cluster_of(d["destination"]), "weight": int(d["weight"])}
        for d in destinations
        if d.get("weight")
    ]
    if not weighted:
        raise ValueError(f"{where}.route: every destination has weight 0")
    if len(weighted) == 1:
        return {"cluster": weighted[0]["name"]}
    return {"weighted_clusters": {"clusters": weighted}}


def _caller_conditions(match: Mapping[str, Any], where: str) -> tuple[Condition, ...]:
    """An L4 match's sourceNamespace and sourceLabels: unlike an HTTP match's, Istio checks them
    even when the match names gateways (matchTCP, matchTLS)."""
    return tuple(Condition(m["key"], (m["string_match"],)) for m in _caller_matchers(match, where))


def tcp_rules(vs: IstioResource, port: int, cluster_of: Destination, vip: str = "") -> list[L4Rule]:
    """VS's tcp[] rules for service port PORT at address VIP, in order, up to the first that
    applies to every caller: a rule applies when one of its matches does (match port, gateways
    including "mesh", destinationSubnets holding VIP; sourceLabels and sourceNamespace are
    conditions on the caller). A rule without matches applies to everyone. Connections no rule
    takes go to the port's own cluster (Istio's default chain)."""
    out: list[L4Rule] = []
    for i, rule in enumerate(vs.spec.get("tcp") or []):
        where = f"{vs.key} tcp[{i}]"
        matches = rule.get("match") or []
        alternatives = [
            _caller_conditions(m, f"{where}.match[{j}]")
            for j, m in enumerate(matches)
            if _tcp_applies(m, port, vip, f"{where}.match[{j}]")
        ]
        if matches and not alternatives:
            continue
        always = not matches or any(not a for a in alternatives)
        out.append(
            L4Rule(() if always else tuple(alternatives), _l4_route(rule, where, cluster_of))
        )
        if always:
            break
    return out


def _sni(hosts: list[str], where: str) -> Condition:
    """sniHosts as one condition: exact names, and "*.example.com" for any name ending in
    ".example.com" (the reference: "*.com will match foo.example.com as well as example.com";
    Envoy's server_names wildcards alike), case-insensitive as DNS names are."""
    if not hosts:
        raise ValueError(f"{where}.sniHosts: needs at least one host")
    matchers: list[dict[str, Any]] = []
    for host in hosts:
        if host == "*":
            matchers.append({"safe_regex": {"regex": ".+"}})
        elif host.startswith("*."):
            matchers.append({"suffix": host[1:], "ignore_case": True})
        else:
            matchers.append({"exact": host, "ignore_case": True})
    return Condition(SNI, tuple(matchers))


def tls_rules(vs: IstioResource, port: int, cluster_of: Destination, vip: str = "") -> list[L4Rule]:
    """VS's tls[] rules for TLS (or HTTPS) service port PORT at VIP, in order: each applies
    when one of its matches that applies to the port (port, gateways, destinationSubnets as for
    tcp) sees its sniHosts and, if it names them, its caller's labels and namespace. Empty when
    none applies: then the port's connections go to its own cluster, whatever their SNI."""
    out: list[L4Rule] = []
    for i, rule in enumerate(vs.spec.get("tls") or []):
        where = f"{vs.key} tls[{i}]"
        alternatives = [
            (
                _sni(m.get("sniHosts") or [], f"{where}.match[{j}]"),
                *_caller_conditions(m, f"{where}.match[{j}]"),
            )
            for j, m in enumerate(rule.get("match") or [])
            if _tcp_applies(m, port, vip, f"{where}.match[{j}]")
        ]
        if alternatives:
            out.append(L4Rule(tuple(alternatives), _l4_route(rule, where, cluster_of)))
    return out


def _tcp_applies(match: Mapping[str, Any], port: int, vip: str, where: str) -> bool:
    """A match's parts known when translating: port, gateways, destinationSubnets (VIP)."""
    if not _applies(match, port):
        return False
    subnets = match.get("destinationSubnets") or []
    if not subnets:
        return True
    if not vip:
        return False
    address = ipaddress.ip_address(vip)
    for subnet in subnets:
        try:
            network = ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            raise ValueError(
                f"{where}.destinationSubnets: {subnet!r} is not an IP or CIDR"
            ) from None
        if address.version == network.version and address in network:
            return True
    return False
