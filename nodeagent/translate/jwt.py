"""RequestAuthentication: the jwt_authn HTTP filter of a local pod's inbound side (pure).

Istio is the specification (istio.io/latest/docs/reference/config/security/
request_authentication/; istio/istio pilot/pkg/security/authn/policy_applier.go,
convertToEnvoyJwtConfig):

- Which policies apply to a pod: those of the root namespace and of the pod's namespace whose
  ``selector`` is absent (namespace-wide; mesh-wide from the root namespace) or whose
  ``matchLabels`` are a subset of the pod's labels. A policy with ``targetRef``/``targetRefs``
  applies to Gateway API gateways and waypoints only: a captured pod ignores it (pilot/pkg/model/
  policyattachment.go, WorkloadPolicyMatcher.ShouldAttachPolicy). Every applying policy's
  ``jwtRules`` are combined, sorted by issuer (newPolicyApplier).
- One provider ``origins-<i>`` per rule: issuer, audiences, fromHeaders (name, prefix),
  fromParams, fromCookies, forwardOriginalToken (``forward``), outputPayloadToHeader
  (``forward_payload_header``), outputClaimToHeaders (``claim_to_headers``), keys inline
  (``local_jwks``). Requirement, on every path: each provider OR allow_missing (ANDed over the
  providers), OR'd with each provider alone (providers sharing a token location). So a request
  without a token passes (authorization decides), a token that fails every provider gets 401.
  CORS preflights bypass it (``bypass_cors_preflight``).
- Keys: a rule's inline ``jwks``; else its ``jwksUri`` (or, without one, the ``jwks_uri`` of the
  issuer's OpenID discovery document), fetched by the agent (mesh/jwks.py) and inlined as istiod
  does (pilot/pkg/model/jwks_resolver.go, PILOT_JWT_ENABLE_REMOTE_JWKS=istiod): a JWKS outage
  never lets a bad token in. Keys not fetched yet (or an inline ``jwks`` that is not a JWKS)
  become ``REJECT_ALL_JWKS``, a key nobody holds the private half of, as istiod's fake JWKS:
  every token is then rejected, requests without one still pass.

Metadata layout for AuthorizationPolicy (translate/authz.py, ``request.auth.*``): the verified
payload of a request's token is Envoy dynamic metadata in namespace ``JWT_FILTER``
(``envoy.filters.http.jwt_authn``) under the key ``PAYLOAD_KEY`` (``payload``), a Struct of the
token's claims as issued: ``payload.iss`` and ``payload.sub`` (the request principal is
``<iss>/<sub>``: Istio's RBAC matches both fields), ``payload.aud`` (string or list: audiences),
``payload.azp`` (presenter), any other claim ``payload.<claim>`` and nested ones
``payload.<a>.<b>`` (``request.auth.claims[a][b]``). ``scope``, ``permission`` and a rule's
``spaceDelimitedClaims`` strings that hold spaces are split into lists, as Istio's
``normalize_payload_in_metadata`` does. Absent when no valid token was presented.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from nodeagent.mesh.jwks import REQUEST_AUTHENTICATION, keys_source, valid_jwks
from nodeagent.mesh.model import IstioResource, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate.envoy import typed

log = logging.getLogger("nodeagent.translate.jwt")

JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "payload"  # istio pilot/pkg/xds/filters: EnvoyJwtFilterPayload
SPACE_DELIMITED_CLAIMS = ("permission", "scope")  # policy_applier.go buildSpaceDelimitedClaims

# A JWKS no token verifies against: an RSA public key whose private half was thrown away when it
# was generated (istiod inlines such a fake JWKS when it cannot fetch a jwksUri).
REJECT_ALL_JWKS = json.dumps(
    {
        "keys": [
            {
                "kty": "RSA",
                "alg": "RS256",
                "kid": "nodeagent-reject-all",
                "e": "AQAB",
                "n": (
                    "g4w0X41qtrX5sLxA420YrLJl_M6_D-VKhuExe68DaWtfRvuv-mXXa-vPzZscjFM-199WQFwC"
                    "EVOxNOhWWOCuXi_y25gqxk25bCVlqWWSPi5cR0qk0UVqrwLPtXUwTyAFnUbdGfCM9TtTsqcG"
                    "BErpBx7OVU8FbOuWzKqptO0f2T7_r1Tkj2OJyEjjWprUYz0CbBQ4LfmIBkiKuS0AUaMNgBGi"
                    "NUpZ1xPtLu7Ax1aamrUI7LgoqShInIy4_PU_Ljw3Udp8hFEOe3RLEpip_gyrYLFP93eb4Kw1"
                    "som2Wi3iiKU0EdGt-IsMRehtqpkbocVVQ2MhCRcDq859LIMjPdedLw"
                ),
            }
        ]
    },
    sort_keys=True,
)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def selects(policy: IstioResource, pod: Pod, root: str) -> bool:
    """POLICY applies to POD (see the module docstring)."""
    spec = policy.spec
    if policy.namespace not in (pod.namespace, root):
        return False
    if spec.get("targetRef") or spec.get("targetRefs"):
        return False
    labels = _mapping(_mapping(spec.get("selector")).get("matchLabels"))
    return all(pod.labels.get(key) == value for key, value in labels.items())


def policies_for(store: MeshStore, pod: Pod) -> list[IstioResource]:
    root = store.mesh_config.root_namespace
    candidates = store.istio_in(REQUEST_AUTHENTICATION, pod.namespace)
    if pod.namespace != root:
        candidates += store.istio_in(REQUEST_AUTHENTICATION, root)
    return sorted((p for p in candidates if selects(p, pod, root)), key=lambda p: p.key)


def rules_for(store: MeshStore, pod: Pod) -> list[Mapping[str, Any]]:
    """Every jwtRule of the policies applying to POD, sorted by issuer (stable: by policy)."""
    rules = [
        _mapping(rule)
        for policy in policies_for(store, pod)
        for rule in policy.spec.get("jwtRules") or []
        if isinstance(rule, Mapping)
    ]
    return sorted(rules, key=lambda rule: str(rule.get("issuer", "")))


def rule_keys(rule: Mapping[str, Any], fetched: Mapping[str, str]) -> str:
    """The JWKS inlined for RULE: its own, or the fetched one (FETCHED: source -> JWKS), else the
    reject-all one."""
    inline = rule.get("jwks")
    if isinstance(inline, str) and inline:
        return inline if valid_jwks(inline) else REJECT_ALL_JWKS
    text = fetched.get(keys_source(rule), "")
    return text if valid_jwks(text) else REJECT_ALL_JWKS


def provider(rule: Mapping[str, Any], jwks: str) -> dict[str, Any]:
    """Envoy's JwtProvider for one jwtRule (policy_applier.go convertToEnvoyJwtConfig)."""
    fields: dict[str, Any] = {
        "issuer": str(rule.get("issuer", "")),
        "local_jwks": {"inline_string": jwks},
        "payload_in_metadata": PAYLOAD_KEY,
        "normalize_payload_in_metadata": {
            "space_delimited_claims": sorted(
                {*SPACE_DELIMITED_CLAIMS, *_strings(rule.get("spaceDelimitedClaims"))}
            )
        },
    }
    if audiences := _strings(rule.get("audiences")):
        fields["audiences"] = audiences
    if rule.get("forwardOriginalToken") is True:
        fields["forward"] = True
    if payload_header := rule.get("outputPayloadToHeader"):
        fields["forward_payload_header"] = str(payload_header)
    claims = [
        {"header_name": str(item.get("header", "")), "claim_name": str(item.get("claim", ""))}
        for item in map(_mapping, rule.get("outputClaimToHeaders") or [])
    ]
    if claims:
        fields["claim_to_headers"] = claims
    headers = []
    for item in map(_mapping, rule.get("fromHeaders") or []):
        header = {"name": str(item.get("name", ""))}
        if prefix := item.get("prefix"):
            header["value_prefix"] = str(prefix)
        headers.append(header)
    if headers:
        fields["from_headers"] = headers
    if params := _strings(rule.get("fromParams")):
        fields["from_params"] = params
    if cookies := _strings(rule.get("fromCookies")):
        fields["from_cookies"] = cookies
    return fields


def jwt_authn(rules: Sequence[Mapping[str, Any]], fetched: Mapping[str, str]) -> dict[str, Any]:
    """The jwt_authn filter for RULES (non-empty), keys from FETCHED."""
    names = [f"origins-{i}" for i in range(len(rules))]
    providers = {
        name: provider(rule, rule_keys(rule, fetched))
        for name, rule in zip(names, rules, strict=True)
    }
    each = [
        {"requires_any": {"requirements": [{"provider_name": name}, {"allow_missing": {}}]}}
        for name in names
    ]
    if len(each) == 1:
        requires = each[0]
    else:
        alone = [{"provider_name": name} for name in names]
        both = [*alone, {"requires_all": {"requirements": each}}]
        requires = {"requires_any": {"requirements": both}}
    return {
        "name": JWT_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers=providers,
            rules=[{"match": {"prefix": "/"}, "requires": requires}],
            bypass_cors_preflight=True,
        ),
    }


def inbound_filters(store: MeshStore, pod: Pod) -> list[dict[str, Any]]:
    """The HTTP filters RequestAuthentication puts on POD's inbound HTTP chains (every path into
    it): jwt_authn, or nothing when no policy with jwtRules applies."""
    rules = rules_for(store, pod)
    if not rules:
        return []
    return [jwt_authn(rules, store.jwks)]
