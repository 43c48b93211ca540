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
