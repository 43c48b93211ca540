"""What the node's Envoy holds for one pod, from its admin config dump (pure; like istioctl's).

A pod owns its two listeners; it uses every cluster and route those listeners reach (shared with
the node's other pods). Tables follow ``istioctl proxy-config``'s columns.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from nodeagent.translate.internal import endpoint_where

LISTENERS = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
CLUSTERS = "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
ROUTES = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def _section(dump: dict[str, Any], type_url: str) -> dict[str, Any]:
    for config in dump.get("configs", []):
        if config.get("@type") == type_url:
            section: dict[str, Any] = config
            return section
    return {}


def pod_listeners(dump: dict[str, Any], namespace: str, pod: str) -> list[dict[str, Any]]:
    """The pod's own listeners, each followed by the node's internal listener it hands its
    connections to (outbound-internal: the service chains), shown at the pod's address."""
    suffix = f"/{namespace}/{pod}"
    listeners = [
        listener
        for entry in _section(dump, LISTENERS).get("dynamic_listeners", [])
        if (listener := (entry.get("active_state") or {}).get("listener"))
    ]
    internal = {str(x.get("name")): x for x in listeners if "internal_listener" in x}
    out = []
    for listener in listeners:
        if not str(listener.get("name", "")).endswith(suffix):
            continue
        out.append(listener)
        for chain in _chains(listener):
            kind, target = _terminal(chain)
            if kind == "Cluster" and target in internal:
                out.append({**internal.pop(target), "address": listener.get("address", {})})
    return out


def _chains(listener: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from listener.get("filter_chains", [])
    if listener.get("default_filter_chain"):
        yield listener["default_filter_chain"]


def _terminal(chain: dict[str, Any]) -> tuple[str, str]:
    """("Route", rds name) or ("Cluster", cluster) for a filter chain."""
    for f in chain.get("filters", []):
        config = f.get("typed_config", {})
        if f.get("name") == HCM:
            return "Route", str(config.get("rds", {}).get("route_config_name", ""))
        if f.get("name") == TCP_PROXY:
            return "Cluster", str(config.get("cluster", ""))
    return "", ""


def pod_routes(dump: dict[str, Any], listeners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {
        target
        for listener in listeners
        for chain in _chains(listener)
        for kind, target in [_terminal(chain)]
        if kind == "Route"
    }
    out = []
    for entry in _section(dump, ROUTES).get("dynamic_route_configs", []):
        config = entry.get("route_config", {})
        if config.get("name") in names:
            out.append(config)
    return sorted(out, key=lambda r: str(r.get("name")))


def _route_clusters(route: dict[str, Any]) -> Iterator[str]:
    for vhost in route.get("virtual_hosts", []):
        for r in vhost.get("routes", []):
            action = r.get("route", {})
            if "cluster" in action:
                yield str(action["cluster"])
            for weighted in action.get("weighted_clusters", {}).get("clusters", []):
                yield str(weighted.get("name"))
            for mirror in action.get("request_mirror_policies", []):
                yield str(mirror.get("cluster"))


def pod_clusters(
    dump: dict[str, Any], listeners: list[dict[str, Any]], routes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    names = {
        target
        for listener in listeners
        for chain in _chains(listener)
        for kind, target in [_terminal(chain)]
        if kind == "Cluster"
    }
    names |= {c for route in routes for c in _route_clusters(route)}
    out = []
    section = _section(dump, CLUSTERS)
    for key in ("static_clusters", "dynamic_active_clusters"):
        for entry in section.get(key, []):
            cluster = entry.get("cluster", {})
            if cluster.get("name") in names:
                out.append(cluster)
    return sorted(out, key=lambda c: str(c.get("name")))


def listener_rows(listeners: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("ADDRESS:PORT", "MATCH", "DESTINATION")]
    for listener in listeners:
        sock = listener.get("address", {}).get("socket_address", {})
        where = f"{sock.get('address')}:{sock.get('port_value')}"
        for chain in _chains(listener):
            match = chain.get("filter_chain_match", {})
            prefixes = ",".join(p.get("address_prefix", "") for p in match.get("prefix_ranges", []))
            port = match.get("destination_port")
            if prefixes or port:
                shown = f"{prefixes or '0.0.0.0'}:{port}" if port else prefixes
            else:
                shown = "ALL"
            if match.get("transport_protocol"):
                alpn = ", Istio ALPN" if match.get("application_protocols") else ""
                shown += f" ({match['transport_protocol']}{alpn})"
            kind, target = _terminal(chain)
            if any(f.get("name") == "envoy.filters.network.rbac" for f in chain.get("filters", [])):
                kind, target = "Refused", "plaintext on an mTLS-only port"
            rows.append((where, shown, f"{kind}: {target}" if kind else "-"))
    return rows


def cluster_rows(clusters: list[dict[str, Any]], identity: str = "") -> list[tuple[str, ...]]:
    """istioctl's columns plus the source identity the pod presents through the cluster: its
    own (IDENTITY, a SPIFFE ID), chosen per connection on the node (no cluster names one)."""
    source = identity.split("/ns/", 1)[-1].replace("/sa/", "/") if identity else ""
    rows: list[tuple[str, ...]] = [
        ("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "SOURCE IDENTITY")
    ]
    for cluster in clusters:
        name = str(cluster.get("name", ""))
        parts = name.split("|")
        ctype = str(cluster.get("type", "EDS"))
        if len(parts) == 4:
            outbound = parts[0] == "outbound"
            rows.append(
                (
                    parts[3] or "-",
                    parts[1],
                    parts[2] or "-",
                    parts[0],
                    ctype,
                    (source if outbound else "") or "-",
                )
            )
        else:
            rows.append((name, "-", "-", "-", ctype, "-"))
    return rows


ROUTE_COLUMNS = ("NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE", "DESTINATIONS")


def route_rows(routes: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per route of the route configurations, in Envoy's order (first match wins), as
    ``istioctl proxy-config routes`` lists them, plus what each route does with a request."""
    rows: list[tuple[str, ...]] = [ROUTE_COLUMNS]
    for config in routes:
        for vhost in config.get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                rows.append(
                    (
                        str(config.get("name", "")),
                        str(vhost.get("name", "")),
                        _domains(vhost.get("domains", [])),
                        describe_match(route.get("match", {})),
                        route_virtual_service(route),
                        describe_action(route),
                    )
                )
    return rows


def _domains(domains: list[str]) -> str:
    # istioctl shows two and counts the rest: a service's aliases make a long list.
    shown = ", ".join(domains[:2])
    return f"{shown} +{len(domains) - 2} more" if len(domains) > 2 else shown or "-"


def route_virtual_service(route: dict[str, Any]) -> str:
    """namespace/name of the VirtualService a route came from, from the metadata Istio (and
    translate/virtual_service.py) puts on it: ``filter_metadata.istio.config`` =
    ``/apis/networking.istio.io/<version>/namespaces/<ns>/virtual-service/<name>``."""
    config = str(
        route.get("metadata", {}).get("filter_metadata", {}).get("istio", {}).get("config", "")
    )
    parts = config.strip("/").split("/")
    if len(parts) == 7 and parts[3] == "namespaces" and parts[5] == "virtual-service":
        return f"{parts[4]}/{parts[6]}"
    return "-"


def describe_match(match: dict[str, Any]) -> str:
    """A RouteMatch in one line: the path (``/*``: everything; ``/api*``: a prefix; ``/old``:
    exactly; ``regex:...``), then each further condition: ``header=value`` (``*`` for prefix or
    suffix, ``~`` a regex, a bare name: present, ``!``: inverted), ``?param=value``, the caller
    (``from ns <namespace>[,<namespace>...]``, ``from {label=value,...}``, read from the
    filter-state matchers translate/virtual_service.py and service_views.py write), ``grpc``,
    ``N% of requests``."""
    if "prefix" in match:
        prefix = str(match["prefix"])
        path = "/*" if prefix == "/" else f"{prefix}*"
    elif "path" in match:
        path = str(match["path"])
    elif "safe_regex" in match:
        path = f"regex:{match['safe_regex'].get('regex', '')}"
    elif "path_separated_prefix" in match:
        path = f"{match['path_separated_prefix']}[/*]"
    elif "connect_matcher" in match:
        path = "CONNECT"
    elif "path_match_policy" in match:
        path = "(path template)"
    else:
        path = "*"
    if match.get("case_sensitive") is False:
        path += " (any case)"
    conditions = [path]
    conditions += [_describe_header(h) for h in match.get("headers", [])]
    for param in match.get("query_parameters", []):
        name = f"?{param.get('name', '')}"
        if param.get("present_match"):
            conditions.append(name)
        else:
            conditions.append(name + _describe_string(param.get("string_match", {})))
    conditions += [_describe_state(f) for f in match.get("filter_state", [])]
    if "grpc" in match:
        conditions.append("grpc")
    if "runtime_fraction" in match:
        conditions.append(f"{_percent(match['runtime_fraction'])} of requests")
    return ", ".join(conditions)


def _describe_string(matcher: dict[str, Any]) -> str:
    """A StringMatcher after a name: ``=v``, ``=v*``, ``=*v``, ``=*v*``, ``~regex``."""
    if "exact" in matcher:
        out = f"={matcher['exact']}"
    elif "prefix" in matcher:
        out = f"={matcher['prefix']}*"
    elif "suffix" in matcher:
        out = f"=*{matcher['suffix']}"
    elif "contains" in matcher:
        out = f"=*{matcher['contains']}*"
    elif "safe_regex" in matcher:
        out = f"~{matcher['safe_regex'].get('regex', '')}"
    else:
        out = "=?"
    return out + (" (any case)" if matcher.get("ignore_case") else "")


# HeaderMatcher's older fields, still accepted by Envoy (a dump shows what was sent).
_LEGACY_HEADER = {
    "exact_match": "exact",
    "prefix_match": "prefix",
    "suffix_match": "suffix",
    "contains_match": "contains",
}


def _describe_header(header: dict[str, Any]) -> str:
    name = ("!" if header.get("invert_match") else "") + str(header.get("name", ""))
    if header.get("present_match"):
        return name
    if "string_match" in header:
        return name + _describe_string(header["string_match"])
    for legacy, field in _LEGACY_HEADER.items():
        if legacy in header:
            return name + _describe_string({field: header[legacy]})
    if "safe_regex_match" in header:
        return name + _describe_string({"safe_regex": header["safe_regex_match"]})
    if "range_match" in header:
        bounds = header["range_match"]
        return f"{name} in [{bounds.get('start')}, {bounds.get('end')})"
    return name


# Filter state the caller's outbound listener stamps (translate/internal.py's CALLER_KEY and
# LABELS_KEY, spelled out: importing translate would weigh on the testbed, which imports this):
# its SPIFFE ID and its labels, matched by sourceNamespace and sourceLabels.
CALLER_STATE, LABELS_STATE = "io.nodeagent.caller", "io.nodeagent.labels"
# sourceNamespace (virtual_service.py): spiffe://[^/]+/ns/<ns>/sa/[^/]+; a view's guard
# (service_views.py, several namespaces seeing different routes): ^spiffe://[^/]+/ns/(a|b)/sa/[^/]+$
_NAMESPACE_REGEX = re.compile(
    r"^\^?spiffe://\[\^/\]\+/ns/(?:\((?P<any>[^()]+)\)|(?P<ns>[^()]+))/sa/\[\^/\]\+\$?$"
)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _describe_state(matcher: dict[str, Any]) -> str:
    key = str(matcher.get("key", ""))
    regex = str(matcher.get("string_match", {}).get("safe_regex", {}).get("regex", ""))
    if key == CALLER_STATE and (found := _NAMESPACE_REGEX.match(regex)):
        namespaces = found["any"].split("|") if found["any"] else [found["ns"]]
        return f"from ns {','.join(_unescape(ns) for ns in namespaces)}"
    if key == LABELS_STATE and regex.startswith(".*,") and regex.endswith(",.*"):
        pairs = regex[3:-3].split(",(.*,)?")
        return "from {" + ",".join(_unescape(p) for p in pairs) + "}"
    return f"state {key}{_describe_string(matcher.get('string_match', {}))}"


_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def _percent(fraction: dict[str, Any]) -> str:
    """A RuntimeFractionalPercent's default as a percentage."""
    return _fractional(fraction.get("default_value", {}))


def _fractional(percent: dict[str, Any]) -> str:
    """A FractionalPercent as a percentage (the default denominator is HUNDRED)."""
    denominator = _DENOMINATORS.get(str(percent.get("denominator", "HUNDRED")), 100)
    return f"{int(percent.get('numerator', 0)) * 100 / denominator:g}%"


FAULT_FILTER = "envoy.filters.http.fault"


def _faults(route: dict[str, Any]) -> list[str]:
    """The route's fault injection (a VirtualService's ``fault``): ``fault delay 7s (100%)``,
    ``fault abort 500 (10%)``. Without a percentage Envoy injects into every request."""
    fault = route.get("typed_per_filter_config", {}).get(FAULT_FILTER)
    if not isinstance(fault, dict):
        return []
    out = []
    delay = fault.get("delay")
    if isinstance(delay, dict):
        share = _fractional(delay["percentage"]) if "percentage" in delay else "100%"
        out.append(f"fault delay {delay.get('fixed_delay', '?')} ({share})")
    abort = fault.get("abort")
    if isinstance(abort, dict):
        share = _fractional(abort["percentage"]) if "percentage" in abort else "100%"
        status = abort.get("http_status") or (
            f"grpc {abort['grpc_status']}" if "grpc_status" in abort else "from header"
        )
        out.append(f"fault abort {status} ({share})")
    return out


_REDIRECT_CODES = {
    "MOVED_PERMANENTLY": 301,
    "FOUND": 302,
    "SEE_OTHER": 303,
    "TEMPORARY_REDIRECT": 307,
    "PERMANENT_REDIRECT": 308,
}
_REDIRECT_PARTS = (
    ("scheme_redirect", "scheme"),
    ("host_redirect", "host"),
    ("port_redirect", "port"),
    ("path_redirect", "path"),
    ("prefix_rewrite", "prefix"),
)


def describe_action(route: dict[str, Any]) -> str:
    """Where a route sends a request: its cluster, weighted clusters as ``name:weight``, the
    mirrors (``mirror name (25%)``) and injected faults; or a redirect or a direct response."""
    if "redirect" in route:
        redirect = route["redirect"]
        code = _REDIRECT_CODES.get(str(redirect.get("response_code", "MOVED_PERMANENTLY")), 301)
        parts = [
            f"{label}={redirect[field]}" for field, label in _REDIRECT_PARTS if field in redirect
        ]
        if redirect.get("https_redirect"):
            parts.insert(0, "scheme=https")
        return " ".join([f"redirect {code}", *parts])
    if "direct_response" in route:
        response = route["direct_response"]
        body = response.get("body", {}).get("inline_string")
        shown = f" {body!r}" if isinstance(body, str) and len(body) <= 40 else ""
        return f"direct {response.get('status')}{shown}"
    action = route.get("route")
    if action is None:
        return "-"
    if "cluster" in action:
        out = str(action["cluster"])
    elif "weighted_clusters" in action:
        out = ", ".join(
            f"{w.get('name')}:{w.get('weight', 0)}"
            for w in action["weighted_clusters"].get("clusters", [])
        )
    elif "cluster_header" in action:
        out = f"cluster in header {action['cluster_header']}"
    else:
        out = "-"
    for mirror in action.get("request_mirror_policies", []):
        share = _percent(mirror["runtime_fraction"]) if "runtime_fraction" in mirror else "100%"
        out += f", mirror {mirror.get('cluster')} ({share})"
    return ", ".join([out, *_faults(route)])


def host_address(address: dict[str, Any]) -> str:
    """ "ip:port" of an endpoint in admin output: a socket address, or the destination an
    internal address (``originate``) stands for, its endpoint_id without the identity digest."""
    internal = address.get("envoy_internal_address")
    if internal is not None:
        where = endpoint_where(str(internal.get("endpoint_id", "")))
        return where or str(internal.get("server_listener_name", ""))
    sock = address.get("socket_address", {})
    return f"{sock.get('address')}:{sock.get('port_value')}"


def endpoint_rows(clusters_status: dict[str, Any], names: set[str]) -> list[tuple[str, ...]]:
    """From admin ``/clusters?format=json``: each endpoint of the pod's clusters and its health."""
    rows: list[tuple[str, ...]] = [("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER")]
    for status in clusters_status.get("cluster_statuses", []):
        if status.get("name") not in names:
            continue
        for host in status.get("host_statuses", []):
            health = host.get("health_status", {})
            ejected = health.get("failed_outlier_check", False)
            state = health.get("eds_health_status", "HEALTHY")
            rows.append(
                (
                    host_address(host.get("address", {})),
                    "UNHEALTHY" if ejected else str(state),
                    "FAILED" if ejected else "OK",
                    str(status.get("name")),
                )
            )
    return rows


def pod_identity(listeners: list[dict[str, Any]]) -> str:
    """The SPIFFE ID a pod presents: the SDS secret its inbound mTLS chains name."""
    for listener in listeners:
        for chain in _chains(listener):
            context = (chain.get("transport_socket") or {}).get("typed_config", {})
            common = context.get("common_tls_context", {})
            for sds in common.get("tls_certificate_sds_secret_configs", []):
                return str(sds.get("name", ""))
    return ""


def secret_rows(secrets: list[dict[str, str]], identity: str) -> list[tuple[str, ...]]:
    """The pod's certificate and the mesh root, as Envoy holds them (never key material)."""
    rows: list[tuple[str, ...]] = [
        ("RESOURCE NAME", "IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "ROOT SHA256")
    ]
    for secret in secrets:
        if secret.get("name") in (identity, "ROOTCA"):
            rows.append(
                (
                    secret.get("name", ""),
                    secret.get("identity", "") or "-",
                    secret.get("serial", ""),
                    secret.get("not_before", ""),
                    secret.get("not_after", ""),
                    secret.get("root_fingerprint", "")[:16],
                )
            )
    return rows


# -- authz: the effective authorization chain of a pod's inbound side ----------------------------

JWT_AUTHN = "envoy.filters.http.jwt_authn"
RBAC_FILTERS = ("envoy.filters.http.rbac", "envoy.filters.network.rbac")
EXT_AUTHZ_FILTERS = ("envoy.filters.http.ext_authz", "envoy.filters.network.ext_authz")
# Envoy's RBAC actions as AuthorizationPolicy names them (AUDIT is Envoy's LOG).
_POLICY_ACTION = {"ALLOW": "ALLOW", "DENY": "DENY", "LOG": "AUDIT"}
# Shadow rules under these prefixes: dry-run policies (translate/authz.py); CUSTOM's, which
# istiod puts in shadow mode to trigger ext_authz (builder.go), are enforced by ext_authz.
DRY_RUN_PREFIX, EXT_AUTHZ_PREFIX = "istio_dry_run_", "istio_ext_authz_"
BLACKHOLE = "BlackHoleCluster"  # translate/services.py's: loop guards, STRICT's refusals


def authz_chains(listeners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each inbound filter chain that delivers to the pod, with the authentication and
    authorization steps it takes, in Envoy's order (the filters' order; Istio's CUSTOM, DENY,
    ALLOW, AUDIT): ``path`` mtls (another node), plaintext (no mesh mTLS) or fast (this node's
    pods, ``inboundInternal/<ns>/<pod>``); ``port`` (``ALL``: the default chain); ``steps``:
    jwt_authn (its providers' issuers), then each RBAC filter's action with its rules, enforced
    or dry-run. Chains that deliver nothing (loop guards, plaintext on a STRICT port) are left
    out. Read from the listeners as the node Envoy holds them (its config dump)."""
    out = []
    for listener in listeners:
        name = str(listener.get("name", ""))
        fast = name.startswith("inboundInternal/")
        if not (fast or name.startswith("virtualInbound/")):
            continue
        for chain in _chains(listener):
            kind, target = _terminal(chain)
            if not kind or target == BLACKHOLE:
                continue
            path = "fast" if fast else "mtls" if chain.get("transport_socket") else "plaintext"
            port = chain.get("filter_chain_match", {}).get("destination_port")
            hcm = [f for f in chain.get("filters", []) if f.get("name") == HCM]
            filters = hcm[0]["typed_config"].get("http_filters", []) if hcm else chain["filters"]
            out.append(
                {
                    "listener": name,
                    "chain": chain.get("name", ""),
                    "path": path,
                    "port": str(port) if port else "ALL",
                    "protocol": "http" if hcm else "tcp",
                    "steps": _numbered(_authz_steps(f) for f in filters),
                }
            )
    return out


def _numbered(per_filter: Iterator[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The steps of each authn/authz filter, numbered by filter (Envoy runs one after the other;
    one RBAC filter holds its action's enforced and dry-run rules)."""
    out = []
    number = 0
    for steps in per_filter:
        if steps:
            number += 1
            out += [{"step": number, **step} for step in steps]
    return out


def _authz_steps(f: dict[str, Any]) -> list[dict[str, Any]]:
    name, config = f.get("name"), f.get("typed_config", {})
    if name == JWT_AUTHN:
        providers = config.get("providers", {})
        issuers = sorted({str(p.get("issuer", "")) for p in providers.values()})
        return [{"filter": "jwt_authn", "issuers": issuers}]
    if name in EXT_AUTHZ_FILTERS:
        service = config.get("grpc_service") or config.get("http_service", {}).get("server_uri", {})
        cluster = service.get("envoy_grpc", {}).get("cluster_name") or service.get("cluster", "")
        return [{"filter": "ext_authz", "action": "CUSTOM", "provider": cluster or "-"}]
    if name not in RBAC_FILTERS:
        return []
    steps = []
    if "rules" in config:
        steps.append(_rbac_step(config["rules"], "enforced"))
    if "shadow_rules" in config:
        prefix = str(config.get("shadow_rules_stat_prefix", ""))
        if prefix.startswith(EXT_AUTHZ_PREFIX):
            step = _rbac_step(config["shadow_rules"], "enforced by ext_authz")
            steps.append({**step, "action": "CUSTOM"})
        else:
            steps.append(_rbac_step(config["shadow_rules"], "dry-run"))
    return steps


def _rbac_step(rules: dict[str, Any], mode: str) -> dict[str, Any]:
    action = _POLICY_ACTION.get(str(rules.get("action", "ALLOW")), str(rules.get("action")))
    # Envoy keeps the policies in a sorted map: the first match (by name) is the one reported.
    names = sorted(rules.get("policies", {}))
    return {"filter": "rbac", "action": action, "mode": mode, "rules": names}


AUTHZ_COLUMNS = ("PATH", "PORT", "PROTOCOL", "STEP", "ACTION", "NAME", "MODE")


def authz_rows(chains: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per provider or rule, chain by chain, in evaluation order. An ALLOW step without
    rules allows nothing; a chain without steps allows everything."""
    rows: list[tuple[str, ...]] = [AUTHZ_COLUMNS]
    for chain in chains:
        where = (chain["path"], chain["port"], chain["protocol"])
        if not chain["steps"]:
            rows.append((*where, "-", "-", "no policy: allowed", "-"))
        for step in chain["steps"]:
            number = str(step["step"])
            if step["filter"] == "jwt_authn":
                for issuer in step["issuers"]:
                    rows.append((*where, number, "JWT", f"issuer {issuer}", "enforced"))
            elif step["filter"] == "ext_authz":
                rows.append((*where, number, "CUSTOM", f"ext_authz {step['provider']}", "enforced"))
            else:
                names = step["rules"] or [
                    "no rule: denies all" if step["action"] == "ALLOW" else "no rule"
                ]
                for rule in names:
                    rows.append((*where, number, step["action"], rule, step["mode"]))
    return rows
