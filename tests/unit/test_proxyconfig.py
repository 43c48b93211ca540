"""`nodeagent proxy-config routes <pod>`: the route tables a pod's traffic uses, as rows like
istioctl's, read from route configurations Envoy itself rendered (tests/data/envoy/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent import proxyconfig as pc

RECORDED = Path(__file__).resolve().parents[1] / "data" / "envoy" / "route-configs.json"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def recorded() -> dict[str, dict[str, Any]]:
    """The recorded route configurations, by name."""
    dump = json.loads(RECORDED.read_text())
    assert dump["envoy_version"].split("/")[1].startswith("1.40")
    return {c["route_config"]["name"]: c["route_config"] for c in dump["configs"]}


def rows(*names: str) -> list[tuple[str, ...]]:
    configs = recorded()
    return pc.route_rows([configs[name] for name in names])


WEB = "outbound|8080||web.shop.svc.cluster.local"
REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
RATINGS = "outbound|9080||ratings.default.svc.cluster.local"


def cluster(subset: str, host: str = "web.shop.svc.cluster.local", port: int = 8080) -> str:
    return f"outbound|{port}|{subset}|{host}"


def test_columns_are_istioctls_plus_the_destinations() -> None:
    assert rows()[0] == (
        "NAME",
        "VHOST NAME",
        "DOMAINS",
        "MATCH",
        "VIRTUAL SERVICE",
        "DESTINATIONS",
    )


def test_bookinfo_jason_routes_in_envoys_order() -> None:
    """virtual-service-reviews-jason-v2-v3.yaml: jason's requests to v2, the rest to v3."""
    assert rows(REVIEWS)[1:] == [
        (
            REVIEWS,
            "reviews.default.svc.cluster.local:9080",
            "*",
            "/*, end-user=jason",
            "default/reviews",
            cluster("v2", "reviews.default.svc.cluster.local", 9080),
        ),
        (
            REVIEWS,
            "reviews.default.svc.cluster.local:9080",
            "*",
            "/*",
            "default/reviews",
            cluster("v3", "reviews.default.svc.cluster.local", 9080),
        ),
    ]


def test_an_injected_fault_is_shown_with_its_share() -> None:
    """virtual-service-ratings-test-abort.yaml: jason's calls to ratings abort with 500."""
    jason, rest = rows(RATINGS)[1:]
    ratings_v1 = cluster("v1", "ratings.default.svc.cluster.local", 9080)

    assert jason[3:] == (
        "/*, end-user=jason",
        "default/ratings",
        f"{ratings_v1}, fault abort 500 (100%)",
    )
    assert rest[3:] == ("/*", "default/ratings", ratings_v1)


def test_every_kind_of_match_and_destination() -> None:
    canary_labels, canary_namespace, redirect, gone, weighted = rows(WEB)[1:]
    mirror = f"mirror {cluster('v3')} (25%)"

    assert canary_labels[3:] == (
        "/api*, x-canary~yes|true, ?debug=1, from {app=sleep,version=v2}",
        "shop/web",
        f"{cluster('v2')}, {mirror}",
    )
    assert canary_namespace[3:] == (
        "regex:/v[0-9]+/.* (any case), !x-internal, :method=POST, from ns shop",
        "shop/web",
        f"{cluster('v2')}, {mirror}",
    )
    assert redirect[3:] == ("/old", "shop/web", "redirect 308 host=web.example.com path=/new")
    assert gone[3:] == ("/gone*", "shop/web", "direct 410 'gone'")
    assert weighted[3:] == ("/*", "shop/web", f"{cluster('v1')}:90, {cluster('v2')}:10")


def test_the_caller_state_keys_are_the_ones_translation_stamps() -> None:
    from nodeagent.translate import internal

    assert pc.CALLER_STATE == internal.CALLER_KEY
    if not hasattr(internal, "LABELS_KEY"):
        pytest.skip("LABELS_KEY arrives with VirtualService translation (fix/vsroutes)")
    assert internal.LABELS_KEY == pc.LABELS_STATE


def test_a_route_no_virtual_service_made_says_so() -> None:
    (_, inbound) = rows("inbound|9080||")

    assert inbound == ("inbound|9080||", "inbound|http|9080", "*", "/*", "-", "inbound|9080||")


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        ({"name": "x", "string_match": {"suffix": "z"}}, "x=*z"),
        ({"name": "x", "string_match": {"contains": "z", "ignore_case": True}}, "x=*z* (any case)"),
        ({"name": "x", "exact_match": "v"}, "x=v"),
        ({"name": "x", "safe_regex_match": {"regex": "a+"}, "invert_match": True}, "!x~a+"),
        ({"name": "x", "range_match": {"start": "1", "end": "5"}}, "x in [1, 5)"),
    ],
)
def test_header_matchers_envoy_accepts_beyond_what_istio_writes(
    header: dict[str, Any], shown: str
) -> None:
    assert pc.describe_match({"prefix": "/", "headers": [header]}) == f"/*, {shown}"


def test_a_views_caller_guard_names_its_namespaces() -> None:
    """Where namespaces see different routes for one port, each view's routes are guarded by
    the caller's namespace (translate/service_views.py), on top of any sourceNamespace."""
    from nodeagent.translate.service_views import _caller_in

    guard = _caller_in(["bar", "foo"])
    match = {"prefix": "/", "filter_state": [guard]}

    assert pc.describe_match(match) == "/*, from ns bar,foo"
    assert pc.describe_match({**match, "filter_state": [_caller_in(["shop"])]}) == (
        "/*, from ns shop"
    )


def test_domains_are_shortened_as_istioctl_does() -> None:
    config = {
        "name": "8080",
        "virtual_hosts": [
            {
                "name": "web.shop.svc.cluster.local:8080",
                "domains": ["web.shop.svc.cluster.local", "web", "web.shop", "10.96.0.10"],
                "routes": [{"match": {"path": "/"}, "route": {"cluster": "c"}}],
            }
        ],
    }

    assert pc.route_rows([config])[1][2] == "web.shop.svc.cluster.local, web +2 more"


def test_a_pod_uses_the_route_tables_its_listeners_reach() -> None:
    """Through the pod's listener, the node's internal listener and its HTTP chains: the
    service ports' tables (shared by every pod) and the pod's own inbound one."""
    configs = recorded()

    def chain(route_config_name: str) -> dict[str, Any]:
        return {
            "filters": [
                {
                    "name": pc.HCM,
                    "typed_config": {
                        "@type": HCM_TYPE,
                        "rds": {"route_config_name": route_config_name},
                    },
                }
            ]
        }

    listeners = [
        {"name": "inbound/default/reviews-v1", "filter_chains": [chain("inbound|9080||")]},
        {"name": "outbound-internal", "filter_chains": [chain(REVIEWS), chain(RATINGS)]},
    ]
    dump = {
        "configs": [
            {
                "@type": pc.ROUTES,
                "dynamic_route_configs": [{"route_config": c} for c in configs.values()],
            }
        ]
    }

    used = pc.pod_routes(dump, listeners)

    assert [r["name"] for r in used] == ["inbound|9080||", RATINGS, REVIEWS]


def _authz_listeners(*istio: Any) -> list[dict[str, Any]]:
    """web's listeners as the node's translation makes them for ISTIO resources, in the config
    dump's JSON (proto field names, as Envoy's admin writes them)."""
    from google.protobuf import json_format

    from nodeagent.mesh.model import IstioResource
    from nodeagent.translate import TranslationCache
    from nodeagent.translate import envoy as e
    from tests.unit.test_translate import local, store

    s = store()
    for group, kind, name, spec, notes in istio:
        s.put_istio(IstioResource(group, "v1", kind, "shop", name, spec, annotations=notes))
    out = TranslationCache().build(s, [local("web", {"app": "web"})]).resources
    dump = {
        "configs": [
            {
                "@type": pc.LISTENERS,
                "dynamic_listeners": [
                    {
                        "active_state": {
                            "listener": json_format.MessageToDict(
                                listener, preserving_proto_field_name=True
                            )
                        }
                    }
                    for listener in out[e.LISTENER].values()
                ],
            }
        ]
    }
    return pc.pod_listeners(dump, "shop", "web")


SECURITY = "security.istio.io"


def _ap(name: str, spec: dict[str, Any], dry_run: bool = False) -> tuple[Any, ...]:
    annotations = {"istio.io/dry-run": "true"} if dry_run else {}
    return (SECURITY, "AuthorizationPolicy", name, spec, annotations)


def test_authz_shows_each_inbound_paths_chain_in_evaluation_order() -> None:
    """`proxy-config authz`: RequestAuthentication's issuers first, then DENY (enforced and
    dry-run), ALLOW, AUDIT (Istio's order: AP reference page, "evaluated in order"), rule names
    as Envoy reports them; every path into the pod (mTLS, plaintext, fast); a TCP port has no
    JWT step; a STRICT port's plaintext chain delivers nothing and is not shown."""
    jwt = {"jwtRules": [{"issuer": "testing@secure.istio.io", "jwks": '{"keys": []}'}]}
    strict = {
        "portLevelMtls": {"5432": {"mode": "STRICT"}},
        "selector": {"matchLabels": {"app": "web"}},
    }
    listeners = _authz_listeners(
        (SECURITY, "RequestAuthentication", "jwt", jwt, {}),
        (SECURITY, "PeerAuthentication", "db-strict", strict, {}),
        _ap("deny-port", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
        _ap("dry", {"action": "DENY", "rules": [{}]}, dry_run=True),
        _ap("allow", {"rules": [{}, {"from": [{"source": {"namespaces": ["dev"]}}]}]}),
        _ap("audit", {"action": "AUDIT", "rules": [{}]}),
    )
    rows = pc.authz_rows(pc.authz_chains(listeners))
    assert rows[0] == ("PATH", "PORT", "PROTOCOL", "STEP", "ACTION", "NAME", "MODE")
    mtls_http = [r[3:] for r in rows if r[:3] == ("mtls", "8080", "http")]
    assert mtls_http == [
        ("1", "JWT", "issuer testing@secure.istio.io", "enforced"),
        ("2", "DENY", "ns[shop]-policy[deny-port]-rule[0]", "enforced"),
        ("2", "DENY", "ns[shop]-policy[dry]-rule[0]", "dry-run"),
        ("3", "ALLOW", "ns[shop]-policy[allow]-rule[0]", "enforced"),
        ("3", "ALLOW", "ns[shop]-policy[allow]-rule[1]", "enforced"),
        ("4", "AUDIT", "ns[shop]-policy[audit]-rule[0]", "enforced"),
    ]
    # The same chain on the fast path and for plaintext (PERMISSIVE) callers.
    assert [r[3:] for r in rows if r[:3] == ("fast", "8080", "http")] == mtls_http
    assert [r[3:] for r in rows if r[:3] == ("plaintext", "8080", "http")] == mtls_http
    # TCP: no JWT; STRICT 5432 only over mTLS (and the fast path).
    assert [r[3:5] for r in rows if r[:3] == ("mtls", "5432", "tcp")] == [
        ("1", "DENY"),
        ("1", "DENY"),
        ("2", "ALLOW"),
        ("2", "ALLOW"),
        ("3", "AUDIT"),
    ]
    paths = {(r[0], r[1]) for r in rows[1:]}
    assert ("plaintext", "5432") not in paths
    assert {("fast", "5432"), ("mtls", "ALL"), ("plaintext", "ALL")} <= paths
    chains = pc.authz_chains(listeners)
    assert {c["listener"] for c in chains} == {
        "virtualInbound/shop/web",
        "inboundInternal/shop/web",
    }


def test_authz_without_policies_allows_and_an_empty_allow_denies_all() -> None:
    """No policy: each chain says it allows; ``spec: {}`` (an ALLOW without rules) denies all
    (AP reference page)."""
    open_rows = pc.authz_rows(pc.authz_chains(_authz_listeners()))
    assert open_rows[1][3:] == ("-", "-", "no policy: allowed", "-")
    assert all(r[5] == "no policy: allowed" for r in open_rows[1:])
    closed = pc.authz_rows(pc.authz_chains(_authz_listeners(_ap("deny-all", {}))))
    assert {r[3:] for r in closed[1:]} == {("1", "ALLOW", "no rule: denies all", "enforced")}
