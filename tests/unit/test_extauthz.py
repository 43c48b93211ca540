"""AuthorizationPolicy CUSTOM -> Envoy ext_authz (translate/extauthz.py, translate/authz.py) and
MeshConfig extensionProviders (mesh/extension_providers.py), checked against Istio's reference
(istio.io/latest/docs/tasks/security/authorization/authz-custom/: its providers and policy;
istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/; istiod's builder.go/extauthz.go)
and by Envoy itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.type.v3 import http_status_pb2

from nodeagent.mesh import extension_providers as ep
from nodeagent.mesh.model import IstioResource, Service, ServicePort
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import ResourceError, parse_mesh_config
from nodeagent.translate import TranslationCache, authz, denials, extauthz
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import CALLER_KEY
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_authz import inbound_hcms
from tests.unit.test_translate import ME, NETNS_KEY, as_json, local, stamps, store

# The authz-custom task's MeshConfig (its "Define the external authorizer" step).
TASK_PROVIDERS = [
    {
        "name": "sample-ext-authz-grpc",
        "envoyExtAuthzGrpc": {"service": "ext-authz.foo.svc.cluster.local", "port": "9000"},
    },
    {
        "name": "sample-ext-authz-http",
        "envoyExtAuthzHttp": {
            "service": "ext-authz.foo.svc.cluster.local",
            "port": "8000",
            "includeRequestHeadersInCheck": ["x-ext-authz"],
        },
    },
]
HOST = "ext-authz.foo.svc.cluster.local"
WEB = local("web", {"app": "web"}).pod


def task_policy(provider: str = "sample-ext-authz-grpc", **annotations: str) -> IstioResource:
    """The task's policy, for the pod app=web of shop (the task's httpbin in foo)."""
    spec = {
        "selector": {"matchLabels": {"app": "web"}},
        "action": "CUSTOM",
        "provider": {"name": provider},
        "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}],
    }
    return IstioResource(
        "security.istio.io", "v1", "AuthorizationPolicy", "shop", "ext-authz", spec,
        annotations=annotations,
    )  # fmt: skip


def mesh_store(providers: list[dict[str, Any]] = TASK_PROVIDERS, *res: IstioResource) -> MeshStore:
    s = store()
    s.set_mesh_config(parse_mesh_config({"extensionProviders": providers}))
    s.put_service(
        Service(
            "foo",
            "ext-authz",
            "10.96.0.20",
            (ServicePort(8000, "http"), ServicePort(9000, "grpc")),
            {"app": "ext-authz"},
        )
    )
    for r in res:
        s.put_istio(r)
    return s


def config(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f["typed_config"].items() if k != "@type"}


# -- MeshConfig extensionProviders ---------------------------------------------------------------


def test_the_task_providers_parse_with_istio_defaults() -> None:
    providers = parse_mesh_config({"extensionProviders": TASK_PROVIDERS}).extension_providers
    grpc, http = providers.ext_authz
    assert (grpc.grpc, grpc.service, grpc.port, grpc.timeout) == (True, HOST, 9000, "600s")
    assert (http.grpc, http.port, http.include_request_headers) == (False, 8000, ("x-ext-authz",))
    assert not grpc.fail_open and grpc.status_on_error == 0
    assert providers.find("sample-ext-authz-http") is http and providers.find("x") is None


def test_deprecated_include_headers_in_check_counts_only_alone() -> None:
    """extauthz.go: includeHeadersInCheck is used only when includeRequestHeadersInCheck is not."""
    old = {"service": HOST, "port": 8000, "includeHeadersInCheck": ["a"]}
    both = {**old, "includeRequestHeadersInCheck": ["b"]}
    for spec, want in ((old, ("a",)), (both, ("b",))):
        parsed = ep.parse([{"name": "p", "envoyExtAuthzHttp": spec}])
        assert parsed.ext_authz[0].include_request_headers == want


def test_other_provider_kinds_are_kept_by_name() -> None:
    parsed = ep.parse([{"name": "otel", "opentelemetry": {"service": "x", "port": 4317}}])
    assert parsed.ext_authz == () and parsed.names() == ["otel"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"envoyExtAuthzHttp": {"service": HOST, "port": 1}}, "[0].name: must be a non-empty"),
        ({"name": "p", "envoyExtAuthzHttp": {"service": HOST}}, "(p).envoyExtAuthzHttp.port"),
        ({"name": "p", "envoyExtAuthzGrpc": {"service": HOST, "port": 70000}}, "port: must be"),
        ({"name": "p", "envoyExtAuthzGrpc": {"port": 1}}, "envoyExtAuthzGrpc.service"),
        (
            {"name": "p", "envoyExtAuthzGrpc": {"service": HOST, "port": 1, "pathPrefix": "/"}},
            'unknown field "pathPrefix"',  # HTTP-only
        ),
        (
            {"name": "p", "envoyExtAuthzHttp": {"service": HOST, "port": 1, "pathPrefix": "x"}},
            "pathPrefix: must begin with /",
        ),
        (
            {"name": "p", "envoyExtAuthzHttp": {"service": HOST, "port": 1, "statusOnError": "7"}},
            "statusOnError: '7' is not an HTTP status code",
        ),
        (
            {"name": "p", "envoyExtAuthzHttp": {"service": HOST, "port": 1, "timeout": "soon"}},
            "timeout: expected a duration",
        ),
        (
            {
                "name": "p",
                "envoyExtAuthzHttp": {
                    "service": HOST,
                    "port": 1,
                    "headersToUpstreamOnAllow": ["*"],
                },
            },
            'headersToUpstreamOnAllow: a single wildcard ("*")',
        ),
        ({"name": "p", "bogus": {}}, 'unknown provider kind "bogus"'),
        ({"name": "p"}, "expected exactly one provider kind"),
    ],
)
def test_bad_entries_are_refused_naming_where(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ResourceError) as caught:
        parse_mesh_config({"extensionProviders": [entry]})
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ep.ProviderError, match=r"\[1\] \(a\).name: must be unique"):
        ep.parse([{"name": "a", "zipkin": {}}, {"name": "a", "zipkin": {}}])


def test_status_codes_are_envoys() -> None:
    assert set(http_status_pb2.StatusCode.values()) - {0} == ep.STATUS_CODES


# -- the filters ---------------------------------------------------------------------------------


def test_task_policy_shadow_rbac_then_ext_authz_grpc() -> None:
    """The task's CUSTOM policy: an RBAC filter with the rule as shadow rules named
    istio-ext-authz-ns[..]-policy[..]-rule[0], then ext_authz enabled by its verdict, calling the
    pod's check cluster; the gRPC authority is the provider cluster's name with | as _."""
    pod_authz = authz.policies_for(mesh_store(TASK_PROVIDERS, task_policy()), WEB)
    rbac, check = pod_authz.http_filters()
    assert rbac["name"] == authz.HTTP_RBAC and check["name"] == extauthz.HTTP_FILTER
    made = config(rbac)
    assert "rules" not in made and made["shadow_rules_stat_prefix"] == "istio_ext_authz_"
    assert list(made["shadow_rules"]["policies"]) == [
        "istio-ext-authz-ns[shop]-policy[ext-authz]-rule[0]"
    ]
    assert "'/headers'" in str(made["shadow_rules"]["policies"])
    ext = config(check)
    assert ext["filter_enabled_metadata"] == {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    }
    assert ext["grpc_service"] == {
        "envoy_grpc": {
            "cluster_name": "extAuthz/shop/web",
            "authority": f"outbound_.9000_._.{HOST}",
        },
        "timeout": "600s",
    }
    assert ext["failure_mode_allow"] is False and "status_on_error" not in ext


def test_http_provider_fields() -> None:
    """Every EnvoyExternalAuthorizationHttpProvider field, as extauthz.go maps it."""
    provider = {
        "name": "h",
        "envoyExtAuthzHttp": {
            "service": f"foo/{HOST}",
            "port": 8000,
            "timeout": "0.5s",
            "pathPrefix": "/check",
            "failOpen": True,
            "clearRouteCache": True,
            "statusOnError": "503",
            "includeRequestHeadersInCheck": ["x-ext-authz", "x-b3-*", "*-id"],
            "includeAdditionalHeadersInCheck": {"x-added": "v"},
            "includeRequestBodyInCheck": {
                "maxRequestBytes": 4096,
                "allowPartialMessage": True,
                "packAsBytes": True,
            },
            "headersToUpstreamOnAllow": ["x-up"],
            "headersToDownstreamOnAllow": ["x-down-ok"],
            "headersToDownstreamOnDeny": ["x-ext-authz-check-result"],
        },
    }
    pod_authz = authz.policies_for(mesh_store([provider], task_policy("h")), WEB)
    ext = config(pod_authz.http_filters()[1])
    assert ext["failure_mode_allow"] is True and ext["clear_route_cache"] is True
    assert ext["status_on_error"] == {"code": 503}
    assert ext["with_request_body"] == {
        "max_request_bytes": 4096,
        "allow_partial_message": True,
        "pack_as_bytes": True,
    }
    service = ext["http_service"]
    assert service["server_uri"] == {
        "uri": f"http://{HOST}",
        "cluster": "extAuthz/shop/web",
        "timeout": "0.5s",
    }
    assert service["path_prefix"] == "/check"
    request, response = service["authorization_request"], service["authorization_response"]
    assert request["allowed_headers"]["patterns"] == [
        {"exact": "x-ext-authz", "ignore_case": True},
        {"prefix": "x-b3-", "ignore_case": True},
        {"suffix": "-id", "ignore_case": True},
    ]
    assert request["headers_to_add"] == [{"key": "x-added", "value": "v"}]
    assert response["allowed_upstream_headers"]["patterns"][0]["exact"] == "x-up"
    assert response["allowed_client_headers"]["patterns"][0]["exact"] == "x-ext-authz-check-result"
    assert response["allowed_client_headers_on_success"]["patterns"][0]["exact"] == "x-down-ok"


def test_tcp_grpc_provider_checks_http_provider_does_not_apply() -> None:
    """On TCP chains: a gRPC provider gets the network ext_authz (the rule's HTTP-only path
    dropped: every connection is checked); istiod leaves an HTTP provider's rules out."""
    grpc = authz.policies_for(mesh_store(TASK_PROVIDERS, task_policy()), WEB)
    rbac, check = grpc.network_filters()
    assert rbac["name"] == authz.NETWORK_RBAC and check["name"] == extauthz.NETWORK_FILTER
    (rule,) = config(rbac)["shadow_rules"]["policies"].values()
    assert rule["permissions"] == [{"any": True}]
    assert config(check)["filter_enabled_metadata"]["filter"] == "envoy.filters.network.rbac"
    http = authz.policies_for(mesh_store(TASK_PROVIDERS, task_policy("sample-ext-authz-http")), WEB)
    assert http.network_filters() == []


def test_custom_comes_before_deny_and_allow_on_both_inbound_paths() -> None:
    deny = IstioResource(
        "security.istio.io", "v1", "AuthorizationPolicy", "shop", "deny",
        {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/deny"]}}]}]},
    )  # fmt: skip
    allow = IstioResource(
        "security.istio.io", "v1", "AuthorizationPolicy", "shop", "allow", {"rules": [{}]}
    )
    s = mesh_store(TASK_PROVIDERS, task_policy(), deny, allow)
    for hcm in inbound_hcms(s):
        got = [f["name"] for f in hcm["httpFilters"]]
        assert got == [
            authz.HTTP_RBAC,  # CUSTOM's shadow rules
            extauthz.HTTP_FILTER,
            authz.HTTP_RBAC,  # DENY
            authz.HTTP_RBAC,  # ALLOW
            "envoy.filters.http.router",
        ]
        assert "shadowRules" in hcm["httpFilters"][0]["typedConfig"]
        assert hcm["httpFilters"][2]["typedConfig"]["rules"]["action"] == "DENY"


def test_the_check_goes_out_as_the_pod_itself() -> None:
    """The pod's check cluster reaches its check listener, which stamps the pod's netns and
    SPIFFE ID (as its outbound listener does) and proxies to the provider's service cluster,
    whose endpoints originate with the pod's certificate (extauthz.py docstring)."""
    s = mesh_store(TASK_PROVIDERS, task_policy())
    out = TranslationCache().build(s, [local("web", {"app": "web"})]).resources
    cluster = as_json(out[e.CLUSTER]["extAuthz/shop/web"])
    assert cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"] == {
        "envoyInternalAddress": {"serverListenerName": "extAuthz/shop/web"}
    }
    assert "http2ProtocolOptions" in str(cluster["typedExtensionProtocolOptions"])
    listener = as_json(out[e.LISTENER]["extAuthz/shop/web"])
    stamped = stamps(listener)
    assert stamped[NETNS_KEY]["formatString"]["textFormatSource"]["inlineString"] == (
        "/run/netns/web"
    )
    assert stamped[CALLER_KEY]["formatString"]["textFormatSource"]["inlineString"] == ME
    proxy = listener["filterChains"][0]["filters"][-1]["typedConfig"]
    assert proxy["cluster"] == f"outbound|9000||{HOST}"
    assert f"outbound|9000||{HOST}" in out[e.CLUSTER]  # the pod's own cluster for it
    # A pod without a CUSTOM policy gets none.
    other = TranslationCache().build(s, [local("db", {"app": "db"})]).resources
    assert not [n for n in other[e.LISTENER] if n.startswith("extAuthz/")]


def test_sidecar_form_calls_the_provider_cluster_directly() -> None:
    s = mesh_store(TASK_PROVIDERS, task_policy())
    pod_authz = authz.policies_for(s, WEB, sidecar=True)
    assert pod_authz.custom is not None and pod_authz.custom.via == f"outbound|9000||{HOST}"
    out = TranslationCache().build(s, [local("web", {"app": "web"})], sidecar=True).resources
    assert "extAuthz/shop/web" not in out[e.LISTENER]


@pytest.mark.parametrize(
    ("providers", "policies", "error"),
    [
        (TASK_PROVIDERS, [task_policy("nope")], 'extension provider "nope" is not'),
        (
            [{"name": "gone",
              "envoyExtAuthzGrpc": {"service": "x.bar.svc.cluster.local", "port": 1}}],
            [task_policy("gone")],
            "could not find service x.bar.svc.cluster.local",
        ),
        (
            TASK_PROVIDERS,
            [
                task_policy(),
                IstioResource(
                    "security.istio.io", "v1", "AuthorizationPolicy", "shop", "second",
                    {"action": "CUSTOM", "provider": {"name": "sample-ext-authz-http"},
                     "rules": [{"to": [{"operation": {"paths": ["/ip"]}}]}]},
                ),
            ],
            "only 1 provider can be used per workload",
        ),
    ],
)  # fmt: skip
def test_a_bad_provider_denies_what_the_custom_rules_match(
    providers: list[dict[str, Any]], policies: list[IstioResource], error: str
) -> None:
    """istiod: an unknown provider, one whose service is not in the registry, or two providers
    for one workload: the CUSTOM rules become DENY rules (fail closed), no ext_authz."""
    s = mesh_store(providers, *policies)
    pod_authz = authz.policies_for(s, local("web", {"app": "web"}).pod)
    assert pod_authz.custom is not None and error in pod_authz.custom.error
    for tcp in (False, True):
        (rbac,) = authz.custom_filters(pod_authz, tcp)
        rules = config(rbac)["rules"]
        assert rules["action"] == "DENY" and "shadow_rules" not in config(rbac)
        assert all(name.endswith("-bad-custom-action") for name in rules["policies"])
        assert len(rules["policies"]) == len(policies)
    out = TranslationCache().build(s, [local("web", {"app": "web"})]).resources
    assert "extAuthz/shop/web" not in out[e.LISTENER]


def test_a_bare_host_in_two_namespaces_is_ambiguous() -> None:
    s = mesh_store(TASK_PROVIDERS, task_policy())
    s.put_service(
        Service("bar", "x", "10.96.0.30", (ServicePort(9000, "grpc"),), {}, host="shared.example")
    )
    s.put_service(
        Service("baz", "x", "10.96.0.31", (ServicePort(9000, "grpc"),), {}, host="shared.example")
    )
    pod = local("web", {"app": "web"}).pod
    s.set_mesh_config(
        parse_mesh_config(
            {
                "extensionProviders": [
                    {"name": "p",
                     "envoyExtAuthzGrpc": {"service": "shared.example", "port": 9000}},
                    {"name": "q",
                     "envoyExtAuthzGrpc": {"service": "bar/shared.example", "port": 9000}},
                ]
            }
        )
    )  # fmt: skip
    assert "multiple namespaces ['bar', 'baz']" in extauthz.resolve(s, pod, ["p"], False).error
    assert extauthz.resolve(s, pod, ["q"], False).target == "outbound|9000||shared.example"


def test_dry_run_and_rule_less_custom_policies_never_check() -> None:
    """istiod builds only enforced CUSTOM policies; one without rules never matches."""
    s = mesh_store(TASK_PROVIDERS, task_policy(**{"istio.io/dry-run": "true"}))
    assert authz.policies_for(s, local("web", {"app": "web"}).pod) is authz.NO_POLICY
    empty = IstioResource(
        "security.istio.io", "v1", "AuthorizationPolicy", "shop", "e",
        {"action": "CUSTOM", "provider": {"name": "sample-ext-authz-grpc"}},
    )  # fmt: skip
    pod_authz = authz.policies_for(mesh_store(TASK_PROVIDERS, empty), WEB)
    (rule,) = config(pod_authz.http_filters()[0])["shadow_rules"]["policies"].values()
    assert rule["permissions"] == [{"not_rule": {"any": True}}]
    assert rule["principals"] == [{"not_id": {"any": True}}]


def test_envoy_accepts_the_filters_and_the_check_path(tmp_path: Path) -> None:
    """Envoy validates both providers' HTTP filters, the network filter, the bad-provider RBAC
    (keyed stat prefixes) and a pod's check listener and cluster (the provider cluster a static
    stand-in)."""
    full = {
        "name": "h",
        "envoyExtAuthzHttp": {
            "service": HOST,
            "port": 8000,
            "timeout": "0.5s",
            "pathPrefix": "/check",
            "failOpen": True,
            "clearRouteCache": True,
            "statusOnError": "503",
            "includeRequestHeadersInCheck": ["x-ext-authz", "x-b3-*"],
            "includeAdditionalHeadersInCheck": {"x-added": "v"},
            "includeRequestBodyInCheck": {"maxRequestBytes": 4096, "packAsBytes": True},
            "headersToUpstreamOnAllow": ["x-up"],
            "headersToDownstreamOnAllow": ["x-down-ok"],
            "headersToDownstreamOnDeny": ["x-ext-authz-check-result"],
        },
    }
    pod = local("web", {"app": "web"})
    key = denials.stat_key("shop", "web", denials.MTLS)
    http_filters: list[dict[str, Any]] = []
    network: list[dict[str, Any]] = []
    for providers, name in (
        ([full], "h"),
        (TASK_PROVIDERS, "sample-ext-authz-grpc"),
        (TASK_PROVIDERS, "missing"),
    ):
        pod_authz = authz.policies_for(mesh_store(providers, task_policy(name)), pod.pod)
        # Keyed, as on the node's chains: the denials counted per pod (translate/denials.py).
        http_filters += pod_authz.http_filters(key)
        network += pod_authz.network_filters(key)
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": e.typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix="h",
            route_config={
                "name": "r",
                "virtual_hosts": [
                    {
                        "name": "v",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                    }
                ],
            },
            http_filters=[
                *http_filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": e.typed("envoy.extensions.filters.http.router.v3.Router"),
                },
            ],
        ),
    }
    proxy = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": e.typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix="t", cluster="c"
        ),
    }
    listeners: list[Any] = [
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": filters}],
        }
        for name, port, filters in (("http", 10080, [hcm]), ("tcp", 10081, [*network, proxy]))
    ]
    out = TranslationCache().build(mesh_store(TASK_PROVIDERS, task_policy()), [pod]).resources
    listeners.append(out[e.LISTENER]["extAuthz/shop/web"])
    stand_ins = [
        {"name": name, "type": "STATIC", "connect_timeout": "1s"}
        for name in ("c", f"outbound|9000||{HOST}")
    ]
    # The pod's check cluster serves the HTTP provider's filter too (same name).
    clusters: list[Any] = [*stand_ins, out[e.CLUSTER]["extAuthz/shop/web"]]
    assert_envoy_accepts_resources(tmp_path, clusters=clusters, listeners=listeners)
