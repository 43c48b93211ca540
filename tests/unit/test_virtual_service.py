"""VirtualService → Envoy routes (nodeagent/translate/virtual_service.py).

The specification is Istio's: https://istio.io/latest/docs/reference/config/networking/virtual-service/
and the sidecar's translation in istio/istio pilot/pkg/networking/core/route/route.go,
route/retry/retry.go and pilot/pkg/model/virtualservice.go (delegates). Examples come from that
page and from the Bookinfo samples (tests/data/istio/bookinfo). Every built route must parse as
an envoy.config.route.v3.Route, and a set of them must pass the real Envoy's config validation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import re2
import yaml

from nodeagent.envoy.bootstrap import STATIC_RUNTIME
from nodeagent.mesh.model import IstioResource
from nodeagent.translate import internal
from nodeagent.translate.envoy import Route, message
from nodeagent.translate.filters import http_connection_manager
from nodeagent.translate.routes import default_retry_policy
from nodeagent.translate.virtual_service import http_routes, tcp_rules
from tests.unit.envoy_validate import assert_envoy_accepts
from tests.unit.istio_data import istio_files

SPIFFE = "spiffe://cluster.local/ns/{ns}/sa/{sa}"


def cluster_of(dest: Mapping[str, Any]) -> str:
    port = dest.get("port", {}).get("number", "")
    return f"outbound|{port}|{dest.get('subset', '')}|{dest['host']}"


def virtual_service(spec: Mapping[str, Any], name: str = "reviews", ns: str = "shop") -> Any:
    return IstioResource("networking.istio.io", "v1", "VirtualService", ns, name, spec)


def routes(spec: Mapping[str, Any], port: int = 9080, **kw: Any) -> list[dict[str, Any]]:
    built = http_routes(virtual_service(spec), port, cluster_of, **kw)
    for route in built:
        message(Route, route)  # every route is a valid Envoy Route
    return built


def only(spec: Mapping[str, Any], **kw: Any) -> dict[str, Any]:
    built = routes(spec, **kw)
    assert len(built) == 1, built
    return built[0]


def to(host: str, subset: str = "", **extra: Any) -> dict[str, Any]:
    dest: dict[str, Any] = {"host": host}
    if subset:
        dest["subset"] = subset
    return {"destination": dest, **extra}


def rule(**fields: Any) -> dict[str, Any]:
    return {"route": [to("reviews", "v1")], **fields}


def re2_full(pattern: str, text: str) -> bool:
    return re2.fullmatch(pattern, text) is not None


# --- Bookinfo samples ---


def _bookinfo() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in istio_files("bookinfo/networking/virtual-service-*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "VirtualService":
                out.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize(("name", "doc"), _bookinfo(), ids=[n for n, _ in _bookinfo()])
def test_every_bookinfo_virtual_service_translates(name: str, doc: dict[str, Any]) -> None:
    built = routes(doc["spec"])
    assert built, name
    # One route per match entry (or one for a rule without match), in rule order.
    expected = sum(len(r.get("match") or [None]) for r in doc["spec"]["http"])
    assert len(built) == expected


def _sample(file: str) -> dict[str, Any]:
    (path,) = istio_files(f"bookinfo/networking/{file}")
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc["spec"]


def test_bookinfo_reviews_80_20_splits_traffic_by_weight() -> None:
    (route,) = routes(_sample("virtual-service-reviews-80-20.yaml"))
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["weighted_clusters"] == {
        "clusters": [
            {"name": "outbound||v1|reviews", "weight": 80},
            {"name": "outbound||v2|reviews", "weight": 20},
        ]
    }


def test_bookinfo_jason_goes_to_v2_and_everyone_else_to_v1() -> None:
    jason, rest = routes(_sample("virtual-service-reviews-test-v2.yaml"))
    assert jason["match"]["headers"] == [{"name": "end-user", "string_match": {"exact": "jason"}}]
    assert jason["route"]["cluster"] == "outbound||v2|reviews"
    assert rest["match"] == {"prefix": "/"}
    assert rest["route"]["cluster"] == "outbound||v1|reviews"


def test_bookinfo_ratings_delay_and_abort_are_per_route_faults() -> None:
    delayed, plain = routes(_sample("virtual-service-ratings-test-delay.yaml"))
    fault = delayed["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["delay"] == {
        "fixed_delay": "7s",
        "percentage": {"numerator": 1000000, "denominator": "MILLION"},
    }
    assert "typed_per_filter_config" not in plain
    aborted, _ = routes(_sample("virtual-service-ratings-test-abort.yaml"))
    abort = aborted["typed_per_filter_config"]["envoy.filters.http.fault"]["abort"]
    assert abort == {
        "http_status": 500,
        "percentage": {"numerator": 1000000, "denominator": "MILLION"},
    }


# --- rule order, match selection ---


def test_one_route_per_match_in_rule_order_and_nothing_after_a_catch_all() -> None:
    spec = {
        "http": [
            rule(
                name="a", match=[{"uri": {"prefix": "/a"}, "name": "x"}, {"uri": {"exact": "/b"}}]
            ),
            rule(name="all"),
            rule(name="never", match=[{"uri": {"prefix": "/c"}}]),
        ]
    }
    built = routes(spec)
    assert [r.get("name") for r in built] == ["a.x", "a", "all"]
    assert built[0]["match"]["prefix"] == "/a"
    assert built[1]["match"]["path"] == "/b"


def test_a_match_for_another_port_or_only_for_gateways_is_skipped() -> None:
    spec = {
        "http": [
            rule(name="other-port", match=[{"port": 8080}]),
            rule(name="gateway", match=[{"gateways": ["shop/ingress"]}]),
            rule(
                name="mesh", match=[{"gateways": ["mesh", "shop/ingress"], "uri": {"prefix": "/m"}}]
            ),
            rule(name="this-port", match=[{"port": 9080, "uri": {"prefix": "/p"}}]),
        ]
    }
    assert [r["name"] for r in routes(spec)] == ["mesh", "this-port"]
    assert [r["name"] for r in routes(spec, port=8080)] == ["other-port"]


def test_jwt_claims_never_match_on_the_outbound_side() -> None:
    """Claim-based routing needs the JWT filter, which only gateways run:
    https://istio.io/latest/docs/tasks/security/authentication/jwt-route/"""
    claim = "@request.auth.claims.groups"
    spec = {
        "http": [
            rule(name="needs-claim", match=[{"headers": {claim: {"exact": "admin"}}}]),
            rule(name="lacks-claim", match=[{"withoutHeaders": {claim: {"exact": "admin"}}}]),
        ]
    }
    (route,) = routes(spec)
    assert route["name"] == "lacks-claim"
    assert route["match"] == {"prefix": "/", "case_sensitive": True}


def test_no_route_when_no_match_applies() -> None:
    assert routes({"http": [rule(match=[{"port": 1}])]}) == []


# --- HTTPMatchRequest ---


def test_uri_exact_prefix_regex_and_ignore_case() -> None:
    def match(m: dict[str, Any]) -> dict[str, Any]:
        return only({"http": [rule(match=[m])]})["match"]

    assert match({"uri": {"exact": "/x"}}) == {"path": "/x", "case_sensitive": True}
    assert match({"uri": {"prefix": "/x"}, "ignoreUriCase": True}) == {
        "prefix": "/x",
        "case_sensitive": False,
    }
    assert match({"uri": {"regex": "/x/[0-9]+"}})["safe_regex"] == {"regex": "/x/[0-9]+"}


def test_method_authority_scheme_are_pseudo_header_matchers() -> None:
    m = only(
        {
            "http": [
                rule(
                    match=[
                        {
                            "method": {"exact": "GET"},
                            "authority": {"prefix": "reviews"},
                            "scheme": {"regex": "https?"},
                        }
                    ]
                )
            ]
        }
    )["match"]
    assert m["headers"] == [
        {"name": ":method", "string_match": {"exact": "GET"}},
        {"name": ":authority", "string_match": {"prefix": "reviews"}},
        {"name": ":scheme", "string_match": {"safe_regex": {"regex": "https?"}}},
    ]


def test_headers_and_without_headers() -> None:
    m = only(
        {
            "http": [
                rule(
                    match=[
                        {
                            "headers": {"x-b": {"prefix": "v"}, "x-a": {}, "x-c": {"regex": "*"}},
                            "withoutHeaders": {"x-d": {"exact": "1"}, "x-e": {}},
                        }
                    ]
                )
            ]
        }
    )["match"]
    assert m["headers"] == [
        {"name": "x-a", "present_match": True},
        {"name": "x-b", "string_match": {"prefix": "v"}},
        {"name": "x-c", "present_match": True},  # Istio reads regex "*" as "present"
        {
            "name": "x-d",
            "string_match": {"exact": "1"},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        },
        {"name": "x-e", "present_match": True, "invert_match": True},
    ]


def test_query_params() -> None:
    m = only(
        {
            "http": [
                rule(match=[{"queryParams": {"b": {"exact": "1"}, "a": {}, "c": {"regex": "x+"}}}])
            ]
        }
    )["match"]
    assert m["query_parameters"] == [
        {"name": "a", "present_match": True},
        {"name": "b", "string_match": {"exact": "1"}},
        {"name": "c", "string_match": {"safe_regex": {"regex": "x+"}}},
    ]


def test_source_namespace_matches_the_callers_spiffe_id_namespace() -> None:
    m = only({"http": [rule(match=[{"sourceNamespace": "front-end"}])]})["match"]
    (state,) = m["filter_state"]
    assert state["key"] == internal.CALLER_KEY
    pattern = state["string_match"]["safe_regex"]["regex"]
    assert re2_full(pattern, SPIFFE.format(ns="front-end", sa="web"))
    assert not re2_full(pattern, SPIFFE.format(ns="front", sa="end"))
    assert not re2_full(pattern, SPIFFE.format(ns="front-end-2", sa="web"))
    assert not re2_full(pattern, SPIFFE.format(ns="default", sa="front-end"))


def test_source_labels_match_every_caller_whose_labels_hold_the_selector() -> None:
    selector = {"version": "v2", "app": "reviews"}
    m = only({"http": [rule(match=[{"sourceLabels": selector}])]})["match"]
    (state,) = m["filter_state"]
    assert state["key"] == internal.LABELS_KEY
    pattern = state["string_match"]["safe_regex"]["regex"]

    def caller(labels: dict[str, str]) -> bool:
        return re2_full(pattern, internal.labels_value(labels))

    assert caller({"app": "reviews", "version": "v2"})
    assert caller({"app": "reviews", "pod-template-hash": "abc", "version": "v2", "zone": "a"})
    assert not caller({"app": "reviews", "version": "v1"})
    assert not caller({"app": "reviews"})
    assert not caller({"app": "reviews-x", "version": "v2"})
    assert not caller({"myapp": "reviews", "version": "v2"})
    assert not caller({"app": "reviews", "version": "v2.1"})
    assert not caller({})


def test_a_source_restricted_match_is_not_a_catch_all() -> None:
    built = routes({"http": [rule(name="a", match=[{"sourceNamespace": "x"}]), rule(name="b")]})
    assert [r["name"] for r in built] == ["a", "b"]


def test_labels_value_sorts_keys_between_commas() -> None:
    assert internal.labels_value({"b": "2", "a": "1"}) == ",a=1,b=2,"
    assert internal.labels_value({}) == ",,"


# --- actions ---


def test_redirect() -> None:
    r = only(
        {
            "http": [
                {
                    "redirect": {
                        "uri": "/v1/bookRatings",
                        "authority": "newratings.default.svc.cluster.local",
                        "port": 8080,
                        "scheme": "https",
                        "redirectCode": 302,
                    }
                }
            ]
        }
    )
    assert r["redirect"] == {
        "path_redirect": "/v1/bookRatings",
        "host_redirect": "newratings.default.svc.cluster.local",
        "scheme_redirect": "https",
        "port_redirect": 8080,
        "response_code": "FOUND",
    }
    assert "route" not in r


@pytest.mark.parametrize(
    ("redirect", "port_redirect"),
    [
        ({"derivePort": "FROM_REQUEST_PORT"}, 9080),
        ({"derivePort": "FROM_PROTOCOL_DEFAULT"}, None),
        ({"port": 80}, None),  # no explicit :80 for http
        ({"port": 443, "scheme": "https"}, None),
        ({"port": 443}, 443),
    ],
)
def test_redirect_port(redirect: dict[str, Any], port_redirect: int | None) -> None:
    r = only({"http": [{"redirect": redirect}]})
    assert r["redirect"].get("port_redirect") == port_redirect
    assert r["redirect"]["response_code"] == "MOVED_PERMANENTLY"


def test_redirect_prefix_rewrite() -> None:
    r = only(
        {"http": [rule(match=[{"uri": {"prefix": "/old"}}], redirect={"prefixRewrite": "/new"})]}
    )
    assert r["redirect"]["prefix_rewrite"] == "/new"
    assert "route" not in r


def test_direct_response() -> None:
    r = only({"http": [{"directResponse": {"status": 503, "body": {"string": "unknown"}}}]})
    assert r["direct_response"] == {"status": 503, "body": {"inline_string": "unknown"}}
    r = only({"http": [{"directResponse": {"status": 200, "body": {"bytes": "aGk="}}}]})
    assert message(Route, r).direct_response.body.inline_bytes == b"hi"
    assert only({"http": [{"directResponse": {"status": 204}}]})["direct_response"] == {
        "status": 204
    }


def test_rewrite_uri_authority_and_regex() -> None:
    action = only({"http": [rule(rewrite={"uri": "/v1/bookRatings", "authority": "ratings.svc"})]})[
        "route"
    ]
    assert action["prefix_rewrite"] == "/v1/bookRatings"
    assert action["host_rewrite_literal"] == "ratings.svc"
    action = only(
        {
            "http": [
                rule(
                    rewrite={
                        "uriRegexRewrite": {
                            "match": "^/service/([^/]+)(/.*)$",
                            "rewrite": "\\2/instance/\\1",
                        }
                    }
                )
            ]
        }
    )["route"]
    assert action["regex_rewrite"] == {
        "pattern": {"regex": "^/service/([^/]+)(/.*)$"},
        "substitution": "\\2/instance/\\1",
    }
    assert "prefix_rewrite" not in action


def test_timeout_defaults_to_none() -> None:
    assert only({"http": [rule()]})["route"]["timeout"] == "0s"
    assert only({"http": [rule(timeout="10s")]})["route"]["timeout"] == "10s"
    action = only({"http": [rule(timeout="1.5s")]})["route"]
    assert (
        message(Route, {"match": {"prefix": "/"}, "route": action}).route.timeout.ToMilliseconds()
        == 1500
    )
    assert only({"http": [rule(timeout="100ms")]})["route"]["timeout"] == "0.1s"
    # gRPC: the grpc-timeout header, capped by the route's timeout (0: uncapped), as Istio's
    # setTimeout does with max_grpc_timeout.
    assert only({"http": [rule(timeout="3s")]})["route"]["max_grpc_timeout"] == "3s"
    # Not max_stream_duration: with it Envoy ignores the route timeout for every request.
    assert "max_stream_duration" not in only({"http": [rule(timeout="3s")]})["route"]


def test_retries_default_and_off() -> None:
    assert only({"http": [rule()]})["route"]["retry_policy"] == default_retry_policy()
    assert "retry_policy" not in only({"http": [rule(retries={"attempts": 0})]})["route"]


def test_retries_override_the_default() -> None:
    policy = only(
        {
            "http": [
                rule(
                    retries={
                        "attempts": 3,
                        "perTryTimeout": "2s",
                        "retryOn": "gateway-error,connect-failure,503,429",
                        "retryRemoteLocalities": True,
                    }
                )
            ]
        }
    )["route"]["retry_policy"]
    assert policy["num_retries"] == 3
    assert policy["per_try_timeout"] == "2s"
    assert policy["retry_on"] == "gateway-error,connect-failure,retriable-status-codes"
    assert policy["retriable_status_codes"] == [503, 429]
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert policy["retry_host_predicate"] == default_retry_policy()["retry_host_predicate"]
    plain = only({"http": [rule(retries={"attempts": 5, "retryOn": "reset"})]})["route"]
    assert plain["retry_policy"]["retry_on"] == "reset"
    assert "retriable_status_codes" not in plain["retry_policy"]
    # Only attempts: Istio's default retryOn stays.
    kept = only({"http": [rule(retries={"attempts": 4})]})["route"]["retry_policy"]
    assert kept == {**default_retry_policy(), "num_retries": 4}


def test_fault_percentages_and_grpc_abort() -> None:
    fault = only(
        {
            "http": [
                rule(
                    fault={
                        "delay": {"percentage": {"value": 0.1}, "fixedDelay": "5s"},
                        "abort": {"percentage": {"value": 12.5}, "grpcStatus": "UNAVAILABLE"},
                    }
                )
            ]
        }
    )["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["delay"]["percentage"] == {"numerator": 1000, "denominator": "MILLION"}
    assert fault["abort"] == {
        "grpc_status": 14,
        "percentage": {"numerator": 125000, "denominator": "MILLION"},
    }
    # Exponential delays are not supported by Istio either: no fault at all.
    r = only({"http": [rule(fault={"delay": {"exponentialDelay": "1s"}})]})
    assert "typed_per_filter_config" not in r


def test_mirror_and_mirrors() -> None:
    action = only({"http": [rule(mirror={"host": "reviews", "subset": "v2"})]})["route"]
    assert action["request_mirror_policies"] == [
        {
            "cluster": "outbound||v2|reviews",
            "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "trace_sampled": False,
        }
    ]
    action = only({"http": [rule(mirror={"host": "reviews"}, mirrorPercentage={"value": 50.0})]})[
        "route"
    ]
    fraction = action["request_mirror_policies"][0]["runtime_fraction"]["default_value"]
    assert fraction == {"numerator": 500000, "denominator": "MILLION"}
    action = only({"http": [rule(mirror={"host": "reviews"}, mirrorPercentage={"value": 0})]})[
        "route"
    ]
    assert "request_mirror_policies" not in action
    action = only(
        {
            "http": [
                rule(
                    mirrors=[
                        {"destination": {"host": "a"}},
                        {"destination": {"host": "b"}, "percentage": {"value": 25}},
                    ]
                )
            ]
        }
    )["route"]
    assert [m["cluster"] for m in action["request_mirror_policies"]] == [
        "outbound|||a",
        "outbound|||b",
    ]


def test_header_operations() -> None:
    r = only(
        {
            "http": [
                rule(
                    headers={
                        "request": {
                            "set": {"x-b": "2", "x-a": "1"},
                            "add": {"x-c": "3"},
                            "remove": ["x-d", ":path"],
                        },
                        "response": {"set": {"x-e": "5"}, "remove": ["x-f"]},
                    }
                )
            ]
        }
    )
    assert r["request_headers_to_add"] == [
        {"header": {"key": "x-a", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-b", "value": "2"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-c", "value": "3"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
    ]
    assert r["request_headers_to_remove"] == ["x-d"]
    assert r["response_headers_to_add"] == [
        {"header": {"key": "x-e", "value": "5"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    ]
    assert r["response_headers_to_remove"] == ["x-f"]


def test_setting_host_rewrites_the_authority() -> None:
    r = only({"http": [rule(headers={"request": {"set": {"Host": "other"}}})]})
    assert r["route"]["host_rewrite_literal"] == "other"
    assert "request_headers_to_add" not in r


def test_destination_headers_single_and_weighted() -> None:
    hdr = {"response": {"set": {"x-v": "1"}}, "request": {"set": {":authority": "v1.host"}}}
    r = only({"http": [{"route": [to("reviews", "v1", headers=hdr)]}]})
    assert r["response_headers_to_add"][0]["header"] == {"key": "x-v", "value": "1"}
    assert r["route"]["host_rewrite_literal"] == "v1.host"
    r = only(
        {
            "http": [
                {
                    "route": [
                        to("reviews", "v1", weight=75, headers=hdr),
                        to("reviews", "v2", weight=25),
                        to("reviews", "v3", weight=0),
                    ]
                }
            ]
        }
    )
    v1, v2 = r["route"]["weighted_clusters"]["clusters"]
    assert v1["host_rewrite_literal"] == "v1.host"
    assert v1["response_headers_to_add"][0]["header"]["key"] == "x-v"
    assert v2 == {"name": "outbound||v2|reviews", "weight": 25}


def test_cors_policy() -> None:
    r = only(
        {
            "http": [
                rule(
                    corsPolicy={
                        "allowOrigins": [{"exact": "https://example.com"}, {"regex": ".*\\.org"}],
                        "allowMethods": ["POST", "GET"],
                        "allowCredentials": False,
                        "allowHeaders": ["X-Foo-Bar"],
                        "exposeHeaders": ["X-Baz"],
                        "maxAge": "24h",
                    }
                )
            ]
        }
    )
    cors = r["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == [
        {"exact": "https://example.com"},
        {"safe_regex": {"regex": ".*\\.org"}},
    ]
    assert cors["allow_methods"] == "POST,GET"
    assert cors["allow_headers"] == "X-Foo-Bar"
    assert cors["expose_headers"] == "X-Baz"
    assert cors["max_age"] == "86400"
    assert cors["allow_credentials"] is False
    assert cors["forward_not_matching_preflights"] is True
    ignore = only({"http": [rule(corsPolicy={"unmatchedPreflights": "IGNORE"})]})
    assert (
        ignore["typed_per_filter_config"]["envoy.filters.http.cors"][
            "forward_not_matching_preflights"
        ]
        is False
    )


def test_consistent_hash_of_the_destination() -> None:
    header = [{"header": {"header_name": "x-user"}}]

    def hash_of(cluster: str) -> list[dict[str, Any]]:
        return header if "v1" in cluster else []

    action = only({"http": [rule()]}, hash_policy_of=hash_of)["route"]
    assert action["hash_policy"] == header
    # Retries stay on the hashed host (Istio's DefaultConsistentHashPolicy).
    assert "retry_host_predicate" not in action["retry_policy"]
    weighted = {"route": [to("reviews", "v1", weight=50), to("reviews", "v2", weight=50)]}
    action = only({"http": [weighted]}, hash_policy_of=hash_of)["route"]
    assert action["hash_policy"] == header
    assert "retry_host_predicate" in action["retry_policy"]


# --- delegation ---


def _delegate(name: str, http: list[dict[str, Any]], hosts: list[str] | None = None) -> Any:
    spec: dict[str, Any] = {"http": http}
    if hosts:
        spec["hosts"] = hosts
    return virtual_service(spec, name=name, ns="shop")


def test_delegate_rules_replace_the_root_rule_with_merged_matches() -> None:
    delegates = {
        ("productpage", "shop"): _delegate(
            "productpage",
            [
                {
                    "name": "v2",
                    "match": [{"uri": {"exact": "/productpage/v2"}, "headers": {"x": {}}}],
                    "route": [to("productpage", "v2")],
                },
                {"match": [{"uri": {"prefix": "/elsewhere"}}], "route": [to("productpage", "v9")]},
                {"route": [to("productpage", "v1")], "timeout": "3s"},
            ],
        )
    }
    spec = {
        "http": [
            {
                "name": "pp",
                "match": [{"uri": {"prefix": "/productpage"}, "headers": {"y": {"exact": "1"}}}],
                "delegate": {"name": "productpage"},
                "timeout": "1s",
            },
            rule(name="rest"),
        ]
    }
    built = routes(spec, delegate_of=lambda name, ns: delegates.get((name, ns)))
    assert [r["name"] for r in built] == ["pp-v2", "pp", "rest"]
    v2, v1, _ = built
    assert v2["match"]["path"] == "/productpage/v2"
    assert [h["name"] for h in v2["match"]["headers"]] == ["x", "y"]
    assert v2["route"]["timeout"] == "1s"  # from the root
    # The conflicting delegate rule (/elsewhere is not under /productpage) is dropped.
    assert v1["match"]["prefix"] == "/productpage"
    assert v1["route"]["cluster"] == "outbound||v1|productpage"
    assert v1["route"]["timeout"] == "3s"  # the delegate's own


def test_a_missing_delegate_or_one_with_hosts_drops_only_that_rule() -> None:
    spec = {"http": [{"delegate": {"name": "gone", "namespace": "x"}}, rule(name="rest")]}
    assert [r["name"] for r in routes(spec, delegate_of=lambda n, ns: None)] == ["rest"]
    with_hosts = _delegate("d", [rule(name="inner")], hosts=["reviews"])
    spec = {"http": [{"delegate": {"name": "d"}}, rule(name="rest")]}
    assert [r["name"] for r in routes(spec, delegate_of=lambda n, ns: with_hosts)] == ["rest"]
    plain = _delegate("d", [rule(name="inner")])
    assert [r["name"] for r in routes(spec, delegate_of=lambda n, ns: plain)] == ["inner"]


# --- errors ---


def test_an_re2_invalid_regex_names_the_virtual_service_and_the_field() -> None:
    before = rule(match=[{"uri": {"prefix": "/a"}}])
    spec = {"http": [before, before, rule(match=[{"uri": {"regex": "(?<=a)b"}}])]}
    with pytest.raises(ValueError, match=r"VirtualService/shop/reviews http\[2\]\.match\[0\]\.uri"):
        http_routes(virtual_service(spec), 9080, cluster_of)
    bad_header = {"http": [rule(match=[{"headers": {"x": {"regex": "a("}}}])]}
    with pytest.raises(ValueError, match=r"http\[0\]\.match\[0\]\.headers\.x"):
        http_routes(virtual_service(bad_header), 9080, cluster_of)


def test_bad_duration_and_all_zero_weights_are_errors() -> None:
    with pytest.raises(ValueError, match=r"http\[0\]\.timeout"):
        http_routes(virtual_service({"http": [rule(timeout="soon")]}), 9080, cluster_of)
    zero = {"route": [to("a", weight=0), to("b", weight=0)]}
    with pytest.raises(ValueError, match=r"http\[0\]\.route"):
        http_routes(virtual_service({"http": [zero]}), 9080, cluster_of)


# --- tcp ---


def test_tcp_rules_first_rule_that_applies() -> None:
    spec = {
        "tcp": [
            {"match": [{"port": 3306}], "route": [to("mysql", "v1")]},
            {"match": [{"sourceLabels": {"app": "x"}}], "route": [to("by-caller")]},
            {
                "match": [{"destinationSubnets": ["10.96.0.0/16"]}],
                "route": [to("db", "a", weight=80), to("db", "b", weight=20)],
            },
            {"route": [to("fallback")]},
        ]
    }
    vs = virtual_service(spec)

    def routes(port: int, vip: str = "") -> list[Any]:
        return [(bool(r.when), r.route) for r in tcp_rules(vs, port, cluster_of, vip=vip)]

    by_caller = (True, {"cluster": "outbound|||by-caller"})
    assert routes(3306) == [(False, {"cluster": "outbound||v1|mysql"})]
    assert routes(27017, "10.96.1.2") == [
        by_caller,
        (
            False,
            {
                "weighted_clusters": {
                    "clusters": [
                        {"name": "outbound||a|db", "weight": 80},
                        {"name": "outbound||b|db", "weight": 20},
                    ]
                }
            },
        ),
    ]
    assert routes(27017, "10.97.0.1") == [by_caller, (False, {"cluster": "outbound|||fallback"})]
    assert tcp_rules(virtual_service({"http": [rule()]}), 80, cluster_of) == []


# --- the real Envoy accepts them ---


def test_real_envoy_accepts_the_routes_behind_the_outbound_http_connection_manager(
    tmp_path: Path,
) -> None:
    spec = {
        "http": [
            rule(
                match=[
                    {
                        "uri": {"regex": "/api/v[0-9]+/.*"},
                        "ignoreUriCase": True,
                        "headers": {"x-a": {"prefix": "p"}, "x-b": {}},
                        "withoutHeaders": {"x-c": {"exact": "1"}},
                        "queryParams": {"q": {"regex": "[a-z]+"}},
                        "sourceLabels": {"app": "web", "version": "v1"},
                        "sourceNamespace": "front",
                    }
                ],
                fault={
                    "delay": {"percentage": {"value": 10}, "fixedDelay": "1s"},
                    "abort": {"percentage": {"value": 1}, "httpStatus": 503},
                },
                corsPolicy={"allowOrigins": [{"exact": "https://a"}], "maxAge": "1h"},
                retries={"attempts": 3, "retryOn": "5xx,429", "retryRemoteLocalities": True},
                mirrors=[{"destination": {"host": "shadow"}, "percentage": {"value": 5}}],
                headers={"request": {"set": {"x-v": "1"}}},
                rewrite={"uriRegexRewrite": {"match": "^/api/(.*)", "rewrite": "/\\1"}},
            ),
            {
                "route": [
                    to("a", weight=1, headers={"request": {"add": {"host": "h"}}}),
                    to("b", weight=2),
                ]
            },
            {"redirect": {"uri": "/x", "derivePort": "FROM_REQUEST_PORT"}},
            {"directResponse": {"status": 418, "body": {"bytes": "aGk="}}},
        ]
    }
    built = routes(spec, hash_policy_of=lambda c: [{"cookie": {"name": "u", "ttl": "0s"}}])
    hcm = http_connection_manager("reviews", "reviews", "outbound", "pod")
    del hcm["typed_config"]["rds"]
    hcm["typed_config"]["route_config"] = {
        "name": "reviews",
        "validate_clusters": False,
        "virtual_hosts": [{"name": "reviews", "domains": ["*"], "routes": built}],
    }
    config = {
        "admin": {},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": STATIC_RUNTIME}]},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [hcm]}],
                }
            ]
        },
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert_envoy_accepts(path)


def test_only_the_outbound_connection_manager_runs_fault_and_cors_before_the_router() -> None:
    def names(direction: str, **kw: Any) -> list[str]:
        hcm = http_connection_manager("x", "x", direction, "pod", **kw)
        return [f["name"] for f in hcm["typed_config"]["http_filters"]]

    # Istio's sidecar order (pilot/pkg/networking/core/listener_builder.go): fault, cors, router.
    assert names("outbound") == [
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "envoy.filters.http.router",
    ]
    assert names("inbound") == ["envoy.filters.http.router"]
    assert names("inbound", fast=True) == ["envoy.filters.http.router"]
