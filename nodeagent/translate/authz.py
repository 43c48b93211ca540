"""AuthorizationPolicy as Envoy RBAC filters on a local pod's inbound side (pure).

Istio is the specification: istio.io/latest/docs/reference/config/security/authorization-policy/,
istio.io/latest/docs/reference/config/security/conditions/ and istiod's generator
(istio/istio pilot/pkg/security/authz/builder/builder.go, pilot/pkg/security/authz/model/
model.go, permission.go, principal.go):

- Which policies apply to a pod: those of the root namespace (mesh-wide, or every pod in the mesh
  their selector selects), of the pod's namespace without a selector, and of its namespace
  selecting it. A policy with ``targetRef``/``targetRefs`` is for waypoints and gateways, never a
  sidecar's workload: istiod leaves it out of a sidecar's policies (pilot/pkg/model/
  authorization.go, ``ListAuthorizationPolicies`` with a workload selector), and so does the node.
- One RBAC filter per action, in Istio's order: CUSTOM (ext_authz, translate/extauthz.py), DENY,
  then ALLOW, then AUDIT (Envoy action LOG). No ALLOW policy: allowed; ALLOW policies of which
  none matches: denied.
  ``spec: {}`` is an ALLOW without rules (denies everything), ``rules: [{}]`` allows everything.
- A rule is one Envoy policy named ``ns[<ns>]-policy[<name>]-rule[<i>]`` (Istio's name, which
  Envoy reports in the denial's response code details, in the access log).
- ``istio.io/dry-run: "true"``: the policy goes into ``shadow_rules`` (reported in the dynamic
  metadata ``envoy.filters.http.rbac``/``envoy.filters.network.rbac``, never enforced).
- ``requestPrincipals`` and ``request.auth.*``: the JWT payload RequestAuthentication verified
  (translate/jwt.py's metadata); no valid token, no request principal.
- TCP (the network RBAC filter): a rule with HTTP-only fields (requestPrincipals, hosts, methods,
  paths, ``request.*`` keys) never matches for ALLOW (it is left out) and, for DENY, matches
  without them (the HTTP-only parts are dropped: Istio denies more, never less).

The caller's principal: on the mTLS path it is the peer certificate's URI SAN
(``authenticated``); on the same-node fast path there is no TLS and the node stamped the caller's
SPIFFE ID into the filter state ``io.nodeagent.caller`` (translate/internal.py), which only this
Envoy's own listeners can set. Every principal matcher is the OR of both, so one filter judges
both paths the same. A plaintext caller matches neither, whatever headers it sends.

The caller's address (``ipBlocks``/``source.ip``: Envoy ``direct_remote_ip``, the connection's
peer; ``remoteIpBlocks``/``remote.ip``: ``remote_ip``, the client address the HCM derives, which
with the inbound ``use_remote_address`` is the peer too: Istio's conditions page,
istio.io/latest/docs/reference/config/security/conditions/) is not known on the fast path, whose
downstream is an internal connection. So a pod whose policies read it (``reads_caller_ip``) gets
no fast path: its same-node callers take ``originate`` and reach its inbound listener from their
own netns, with their pod IP as the peer, as callers from other nodes do (listeners.fast_ports).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.mesh.model import IstioResource, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import denials, extauthz
from nodeagent.translate.envoy import typed
from nodeagent.translate.internal import CALLER_KEY

KIND = "AuthorizationPolicy"
DRY_RUN = "istio.io/dry-run"
ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ORDER = (DENY, ALLOW, AUDIT)  # after CUSTOM's filters (custom_filters)
_ENVOY_ACTION = {ALLOW: "ALLOW", DENY: "DENY", AUDIT: "LOG"}
HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
DENIED_BODY = "RBAC: access denied"  # Envoy's own 403 body, as Istio's sidecars answer


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    action: str
    rules: tuple[str, ...]  # JSON-encoded rules: hashable, compared to tell a change
    dry_run: bool
    provider: str = ""  # CUSTOM: the extension provider it names

    def rule_list(self) -> list[Mapping[str, Any]]:
        return [json.loads(rule) for rule in self.rules]


@dataclass(frozen=True)
class PodAuthz:
    """The policies that apply to one pod, and the trust domain its principals are in."""

    policies: tuple[Policy, ...]
    trust_domain: str
    custom: extauthz.Custom | None = None  # its CUSTOM policies' provider, when it has some

    def http_filters(self, key: str = "") -> list[dict[str, Any]]:
        rbac = [rbac_filter(self, action, tcp=False, key=key) for action in self._actions()]
        return [*custom_filters(self, tcp=False, key=key), *rbac]

    def network_filters(self, key: str = "") -> list[dict[str, Any]]:
        rbac = [rbac_filter(self, action, tcp=True, key=key) for action in self._actions()]
        return [*custom_filters(self, tcp=True, key=key), *rbac]

    def reads_caller_ip(self) -> bool:
        """Some rule of any policy (any action, dry-run too: its shadow verdict would be wrong
        as well) reads the caller's address: ipBlocks, remoteIpBlocks, their ``not*``, or a
        ``when`` on source.ip or remote.ip."""
        return any(_rules_read_ip(policy.rules) for policy in self.policies)

    def _actions(self) -> list[str]:
        present = {p.action for p in self.policies}
        return [action for action in ORDER if action in present]


NO_POLICY = PodAuthz((), "")

_IP_SOURCE_FIELDS = ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_IP_KEYS = frozenset({"source.ip", "remote.ip"})


@functools.lru_cache(maxsize=4096)
def _rules_read_ip(rules: tuple[str, ...]) -> bool:
    """Asked for every local pod on every translation: decoded once per distinct rule set."""
    return any(_rule_reads_ip(json.loads(rule)) for rule in rules)


def _rule_reads_ip(rule: Mapping[str, Any]) -> bool:
    sources = [f.get("source") or {} for f in rule.get("from") or []]
    if any(source.get(field) for source in sources for field in _IP_SOURCE_FIELDS):
        return True
    return any(str(w.get("key", "")) in _IP_KEYS for w in rule.get("when") or [])


def _selects(res: IstioResource, pod: Pod) -> bool:
    spec = res.spec
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return all(pod.labels.get(k) == v for k, v in labels.items())


def _has_target(res: IstioResource) -> bool:
    return bool(res.spec.get("targetRef") or res.spec.get("targetRefs"))


def policies_for(store: MeshStore, pod: Pod, sidecar: bool = False) -> PodAuthz:
    """The AuthorizationPolicies that apply to POD (see the module docstring); SIDECAR: for the
    sidecar form, whose ext_authz calls the provider's cluster directly (extauthz.py)."""
    root = store.mesh_config.root_namespace
    candidates = store.istio_in(KIND, root)
    if pod.namespace != root:
        candidates += store.istio_in(KIND, pod.namespace)
    chosen = []
    for res in sorted(candidates, key=lambda r: (r.namespace, r.name)):
        if _has_target(res) or not _selects(res, pod):
            continue
        action = res.spec.get("action") or ALLOW
        rules = res.spec.get("rules") or []
        dry_run = res.annotations.get(DRY_RUN, "").lower() == "true"
        if action == CUSTOM and dry_run:
            continue  # istiod builds only enforced CUSTOM policies (builder.go buildHTTP)
        provider = str((res.spec.get("provider") or {}).get("name", "")) if action == CUSTOM else ""
        chosen.append(
            Policy(
                res.namespace,
                res.name,
                action,
                tuple(json.dumps(rule, sort_keys=True) for rule in rules),
                dry_run,
                provider,
            )
        )
    if not chosen:
        return NO_POLICY
    providers = [p.provider for p in chosen if p.action == CUSTOM]
    custom = extauthz.resolve(store, pod, providers, sidecar) if providers else None
    return PodAuthz(tuple(chosen), store.mesh_config.trust_domain, custom)


def rule_name(namespace: str, name: str, index: int) -> str:
    return f"ns[{namespace}]-policy[{name}]-rule[{index}]"


# -- values: Istio's string matching (model/permission.go, principal.go: "*" any, "pre*", "*suf") --


def string_match(value: str, ignore_case: bool = False) -> dict[str, Any]:
    if value == "*":
        match: dict[str, Any] = {"safe_regex": {"regex": ".+"}}
    elif value.startswith("*"):
        match = {"suffix": value[1:]}
    elif value.endswith("*"):
        match = {"prefix": value[:-1]}
    else:
        match = {"exact": value}
    if ignore_case and "safe_regex" not in match:
        match["ignore_case"] = True
    return match


def _any_of(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {key: {"rules" if key == "or_rules" else "ids": items}}


def _permissions_or(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _any_of(items, "or_rules")


def _principals_or(items: list[dict[str, Any]]) -> dict[str, Any]:
    return _any_of(items, "or_ids")


def _cidr(text: str) -> dict[str, Any]:
    address, _, length = text.partition("/")
    prefix = int(length) if length else (128 if ":" in address else 32)
    return {"address_prefix": address, "prefix_len": prefix}


def _principal_names(value: str, trust_domain: str) -> list[str]:
    """A principal as SPIFFE ID patterns: Istio compares principals with the trust domain, and
    ``cluster.local`` stands for the mesh's own (pilot/pkg/security/trustdomain: the local
    trust domain and its alias)."""
    names = [value]
    td, sep, rest = value.partition("/")
    if sep and td == "cluster.local" and trust_domain and trust_domain != td:
        names.append(f"{trust_domain}/{rest}")
    return names


def _spiffe(value: str) -> dict[str, Any]:
    """The URI SAN pattern of a principal pattern VALUE (Istio prefixes spiffe://)."""
    if value == "*":
        return string_match("*")
    if value.startswith("*"):
        return {"suffix": value[1:]}
    if value.endswith("*"):
        return {"prefix": "spiffe://" + value[:-1]}
    return {"exact": "spiffe://" + value}


def _identity(matcher: dict[str, Any]) -> dict[str, Any]:
    """The caller's identity matches MATCHER: from mTLS, or stamped by the node (fast path)."""
    return {
        "or_ids": {
            "ids": [
                {"authenticated": {"principal_name": matcher}},
                {"filter_state": {"key": CALLER_KEY, "string_match": matcher}},
            ]
        }
    }


def _principal(value: str, trust_domain: str) -> dict[str, Any]:
    ids = [_identity(_spiffe(name)) for name in _principal_names(value, trust_domain)]
    return _principals_or(ids)


def _namespace(value: str) -> dict[str, Any]:
    """Istio: a namespace is the principal pattern ``.*/ns/<ns>/.*`` (model/principal.go)."""
    if value == "*":
        regex = r"spiffe://.*/ns/[^/]+/.*"
    elif value.startswith("*"):
        regex = rf"spiffe://.*/ns/[^/]*{_quote(value[1:])}/.*"
    elif value.endswith("*"):
        regex = rf"spiffe://.*/ns/{_quote(value[:-1])}[^/]*/.*"
    else:
        regex = rf"spiffe://.*/ns/{_quote(value)}/.*"
    return _identity({"safe_regex": {"regex": regex}})


def _quote(text: str) -> str:
    return re.escape(text)


# -- fields: (principal or permission, HTTP only), each Istio key's Envoy matcher --------------


def _header(name: str, value: str) -> dict[str, Any]:
    if value == "*":
        return {"name": name, "present_match": True}
    return {"name": name, "string_match": string_match(value, ignore_case=name == ":authority")}


def _path(value: str) -> dict[str, Any]:
    if "{" in value:
        # Istio path templates {*} (one segment) and {**} (the rest) in Envoy's uri_template
        # syntax, * and ** (istio pilot/pkg/security/authz/model/permission.go).
        template = value.replace("{**}", "**").replace("{*}", "*")
        return {
            "uri_template": {
                "name": "uri-template",
                "typed_config": typed(
                    "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                    path_template=template,
                ),
            }
        }
    return {"url_path": {"path": string_match(value)}}


class Unsupported(ValueError):
    """A condition key Istio does not document: its rule is judged without it (below)."""


# The verified JWT payload RequestAuthentication's jwt_authn filter leaves in dynamic metadata
# (translate/jwt.py: namespace envoy.filters.http.jwt_authn, key payload; claims as issued).
# Istio's sidecar reads the request principal from its own istio_authn filter, which upstream
# Envoy lacks: the payload's iss and sub say the same (principal = <iss>/<sub>).
JWT_FILTER, PAYLOAD_KEY = "envoy.filters.http.jwt_authn", "payload"


def _claim(path: Sequence[str], value: str) -> dict[str, Any]:
    """The payload claim at PATH is VALUE (Istio's string forms), or a list holding it."""
    match = string_match(value)
    at = {"filter": JWT_FILTER, "path": [{"key": key} for key in (PAYLOAD_KEY, *path)]}
    return _principals_or(
        [
            {"metadata": {**at, "value": {"string_match": match}}},
            {"metadata": {**at, "value": {"list_match": {"one_of": {"string_match": match}}}}},
        ]
    )


def _request_principal(value: str) -> dict[str, Any]:
    """``<iss>/<sub>`` (Istio: "*" any authenticated request; a wildcard at either end)."""
    if value == "*":
        return {
            "metadata": {
                "filter": JWT_FILTER,
                "path": [{"key": PAYLOAD_KEY}, {"key": "iss"}],
                "value": {"string_match": string_match("*")},
            }
        }
    if value.endswith("*") and "/" not in value[:-1]:  # "iss-prefix*": a prefix of iss
        return _claim(["iss"], value)
    if value.startswith("*") and "/" not in value[1:]:  # "*sub-suffix"
        return _claim(["sub"], value)
    iss, _, sub = value.rpartition("/")
    if value.startswith("*/"):
        return _claim(["sub"], sub)
    return {"and_ids": {"ids": [_claim(["iss"], iss), _claim(["sub"], sub or "*")]}}


def _claim_path(key: str) -> list[str]:
    """request.auth.claims[a][b] -> [a, b] (nested claims, Istio conditions page)."""
    rest = key[len("request.auth.claims") :]
    if not rest.startswith("[") or not rest.endswith("]"):
        raise Unsupported(key)
    return rest[1:-1].split("][")


def _source_field(key: str, value: str, td: str) -> tuple[dict[str, Any], bool]:
    """(principal matcher, HTTP only) of one source field / condition value."""
    if key in ("principals", "source.principal"):
        return _principal(value, td), False
    if key in ("namespaces", "source.namespace"):
        return _namespace(value), False
    if key in ("ipBlocks", "source.ip"):
        return {"direct_remote_ip": _cidr(value)}, False
    if key in ("remoteIpBlocks", "remote.ip"):
        return {"remote_ip": _cidr(value)}, False
    if key.startswith("request.headers[") and key.endswith("]"):
        return {"header": _header(key[len("request.headers[") : -1], value)}, True
    if key in ("requestPrincipals", "request.auth.principal"):
        return _request_principal(value), True
    if key == "request.auth.audiences":
        return _claim(["aud"], value), True
    if key == "request.auth.presenter":
        return _claim(["azp"], value), True
    if key.startswith("request.auth.claims"):
        return _claim(_claim_path(key), value), True
    raise Unsupported(key)


def _operation_field(key: str, value: str) -> tuple[dict[str, Any], bool]:
    """(permission matcher, HTTP only) of one operation field / condition value."""
    if key == "hosts":
        return {"header": _header(":authority", value)}, True
    if key == "methods":
        return {"header": _header(":method", value)}, True
    if key == "paths":
        return _path(value), True
    if key in ("ports", "destination.port"):
        return {"destination_port": int(value)}, False
    if key == "destination.ip":
        return {"destination_ip": _cidr(value)}, False
    if key == "connection.sni":
        return {"requested_server_name": string_match(value)}, False
    raise Unsupported(key)


_SOURCE_FIELDS = {
    "principals": "notPrincipals",
    "namespaces": "notNamespaces",
    "ipBlocks": "notIpBlocks",
    "remoteIpBlocks": "notRemoteIpBlocks",
    "requestPrincipals": "notRequestPrincipals",
}
_OPERATION_FIELDS = {
    "hosts": "notHosts",
    "ports": "notPorts",
    "methods": "notMethods",
    "paths": "notPaths",
}
_PERMISSION_KEYS = frozenset({"destination.ip", "destination.port", "connection.sni"})


class _Rule:
    """One rule's principal and permission parts; DROP_HTTP (DENY on TCP) leaves HTTP-only
    parts out; NEVER is set when an ALLOW on TCP holds one (the rule cannot match)."""

    def __init__(self, td: str, tcp: bool, action: str) -> None:
        self.td, self.tcp, self.action = td, tcp, action
        self.principals: list[dict[str, Any]] = []
        self.permissions: list[dict[str, Any]] = []
        self.never = False

    def _keep(self, http_only: bool) -> bool:
        if http_only and self.tcp:
            if self.action == DENY:
                return False
            self.never = True
            return False
        return True

    def source(self, block: Mapping[str, Any]) -> dict[str, Any] | None:
        parts = []
        for field, negated in _SOURCE_FIELDS.items():
            for values, invert in ((block.get(field), False), (block.get(negated), True)):
                if not values:
                    continue
                made = [_source_field(field, str(v), self.td) for v in values]
                if not self._keep(made[0][1]):
                    continue
                either = _principals_or([m for m, _ in made])
                parts.append({"not_id": either} if invert else either)
        return {"and_ids": {"ids": parts}} if parts else None

    def operation(self, block: Mapping[str, Any]) -> dict[str, Any] | None:
        parts = []
        for field, negated in _OPERATION_FIELDS.items():
            for values, invert in ((block.get(field), False), (block.get(negated), True)):
                if not values:
                    continue
                made = [_operation_field(field, str(v)) for v in values]
                if not self._keep(made[0][1]):
                    continue
                either = _permissions_or([m for m, _ in made])
                parts.append({"not_rule": either} if invert else either)
        return {"and_rules": {"rules": parts}} if parts else None

    def condition(self, when: Mapping[str, Any]) -> None:
        key = str(when.get("key", ""))
        for values, invert in ((when.get("values"), False), (when.get("notValues"), True)):
            if not values:
                continue
            if key in _PERMISSION_KEYS:
                made = [_operation_field(key, str(v)) for v in values]
                if self._keep(made[0][1]):
                    either = _permissions_or([m for m, _ in made])
                    self.permissions.append({"not_rule": either} if invert else either)
            else:
                sources = [_source_field(key, str(v), self.td) for v in values]
                if self._keep(sources[0][1]):
                    ids = _principals_or([m for m, _ in sources])
                    self.principals.append({"not_id": ids} if invert else ids)


def _known(key: str) -> bool:
    try:
        _source_field(key, "x", "") if key not in _PERMISSION_KEYS else None
    except Unsupported:
        return False
    return True


def envoy_policy(rule: Mapping[str, Any], td: str, tcp: bool, action: str) -> dict[str, Any] | None:
    """One rule as an Envoy RBAC policy; None when it can never match (ALLOW, HTTP-only, TCP)."""
    built = _Rule(td, tcp, action)
    froms = [built.source(f.get("source") or {}) for f in rule.get("from") or []]
    tos = [built.operation(t.get("operation") or {}) for t in rule.get("to") or []]
    for when in rule.get("when") or []:
        built.condition(when)
    if built.never:
        return None
    # A from/to list is an OR of its entries; an entry with nothing left matches anything.
    if froms:
        chosen = [f for f in froms if f is not None]
        if len(chosen) == len(froms):
            built.principals.insert(0, _principals_or(chosen))
    if tos:
        chosen_ops = [t for t in tos if t is not None]
        if len(chosen_ops) == len(tos):
            built.permissions.insert(0, _permissions_or(chosen_ops))
    return {
        "permissions": [{"and_rules": {"rules": built.permissions}}]
        if built.permissions
        else [{"any": True}],
        "principals": [{"and_ids": {"ids": built.principals}}]
        if built.principals
        else [{"any": True}],
    }


def _policies(authz: PodAuthz, action: str, tcp: bool, dry_run: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy in authz.policies:
        if policy.action != action or policy.dry_run != dry_run:
            continue
        for index, rule in enumerate(policy.rule_list()):
            try:
                made = envoy_policy(rule, authz.trust_domain, tcp, action)
            except Unsupported:
                # A key Istio does not know: an ALLOW rule never matches, a DENY rule matches
                # on its other parts (fail closed, as Istio on HTTP-only fields).
                made = None if action != DENY else _without_unsupported(rule, authz, tcp)
            if made is not None:
                out[rule_name(policy.namespace, policy.name, index)] = made
    return out


def _without_unsupported(rule: Mapping[str, Any], authz: PodAuthz, tcp: bool) -> dict[str, Any]:
    """A DENY rule with conditions on keys Istio does not know: the rest of it still denies."""
    trimmed = dict(rule)
    trimmed["when"] = [w for w in rule.get("when") or [] if _known(str(w.get("key", "")))]
    made = envoy_policy(trimmed, authz.trust_domain, tcp, DENY)
    assert made is not None
    return made


# A CUSTOM policy without rules: a policy that never matches (builder.go rbacPolicyMatchNever).
_NEVER = {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}


def _custom_policies(authz: PodAuthz, tcp: bool) -> dict[str, Any]:
    """The CUSTOM rules as RBAC policies, built as DENY rules are (a TCP chain drops a rule's
    HTTP-only parts: checked more, never less; builder.go builds CUSTOM with RBAC_DENY)."""
    out: dict[str, Any] = {}
    for policy in authz.policies:
        if policy.action != CUSTOM:
            continue
        rules = policy.rule_list()
        if not rules:
            out[extauthz.rule_name(policy.namespace, policy.name, 0)] = _NEVER
        for index, rule in enumerate(rules):
            try:
                made = envoy_policy(rule, authz.trust_domain, tcp, DENY)
            except Unsupported:
                made = _without_unsupported(rule, authz, tcp)
            assert made is not None  # DENY rules always build
            out[extauthz.rule_name(policy.namespace, policy.name, index)] = made
    return out


def _rbac(tcp: bool, stat_prefix: str, **fields: Any) -> dict[str, Any]:
    if tcp:
        return {
            "name": NETWORK_RBAC,
            "typed_config": typed(
                "envoy.extensions.filters.network.rbac.v3.RBAC", stat_prefix=stat_prefix, **fields
            ),
        }
    return {
        "name": HTTP_RBAC,
        "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", **fields),
    }


def custom_filters(authz: PodAuthz, tcp: bool, key: str = "") -> list[dict[str, Any]]:
    """CUSTOM's filters (translate/extauthz.py): RBAC shadow rules naming what to check, then
    ext_authz; for a provider in error an RBAC filter denying what the CUSTOM rules match. KEY:
    as for ``rbac_filter``; the denying filter (ext_authz, or that RBAC) counts under it with
    action ``custom``."""
    custom = authz.custom
    if custom is None:
        return []
    policies = _custom_policies(authz, tcp)
    if custom.provider is None:
        denied = {name + extauthz.BAD_SUFFIX: rule for name, rule in policies.items()}
        fields: dict[str, Any] = {"rules": {"action": "DENY", "policies": denied}}
        if key and not tcp:
            fields["rules_stat_prefix"] = denials.stat_prefix(key, CUSTOM)
        prefix = denials.network_stat_prefix(key, CUSTOM) if key else "tcp.custom."
        return [_rbac(tcp, prefix, **fields)]
    rbac_name = NETWORK_RBAC if tcp else HTTP_RBAC
    check = (
        extauthz.network_filter(custom, rbac_name, key and denials.network_ext_authz_prefix(key))
        if tcp
        else extauthz.http_filter(custom, rbac_name, key and denials.stat_prefix(key, CUSTOM))
    )
    if check is None:  # an HTTP provider on a TCP chain: CUSTOM does not apply (extauthz.py)
        return []
    shadow = {"action": "DENY", "policies": policies}
    return [
        _rbac(
            tcp, "tcp.custom.", shadow_rules=shadow, shadow_rules_stat_prefix=extauthz.SHADOW_PREFIX
        ),
        check,
    ]


def rbac_filter(authz: PodAuthz, action: str, tcp: bool, key: str = "") -> dict[str, Any]:
    """The HTTP (or, TCP, network) RBAC filter of ACTION for a pod with AUTHZ. KEY: the pod's
    and path's key in the filter's stat names, whose denied counters the node's metrics read
    (translate/denials.py)."""
    envoy_action = _ENVOY_ACTION[action]
    enforced = _policies(authz, action, tcp, dry_run=False)
    shadow = _policies(authz, action, tcp, dry_run=True)
    has_enforced = any(p.action == action and not p.dry_run for p in authz.policies)
    fields: dict[str, Any] = {}
    if has_enforced:
        fields["rules"] = {"action": envoy_action, "policies": enforced}
    if shadow:
        fields["shadow_rules"] = {"action": envoy_action, "policies": shadow}
        fields["shadow_rules_stat_prefix"] = f"istio_dry_run_{action.lower()}_"
    if tcp:
        return {
            "name": NETWORK_RBAC,
            "typed_config": typed(
                "envoy.extensions.filters.network.rbac.v3.RBAC",
                stat_prefix=denials.network_stat_prefix(key, action)
                if key
                else f"tcp.{action.lower()}.",
                **fields,
            ),
        }
    if key and has_enforced:
        fields["rules_stat_prefix"] = denials.stat_prefix(key, action)
    return {
        "name": HTTP_RBAC,
        "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", **fields),
    }


def chain_filters(authz: PodAuthz | None, tcp: bool, key: str = "") -> list[dict[str, Any]]:
    """KEY: as for ``rbac_filter``."""
    if authz is None or not authz.policies:
        return []
    return authz.network_filters(key) if tcp else authz.http_filters(key)


__all__: Sequence[str] = (
    "NO_POLICY",
    "PodAuthz",
    "Policy",
    "chain_filters",
    "custom_filters",
    "policies_for",
    "rbac_filter",
    "rule_name",
)
