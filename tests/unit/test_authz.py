"""AuthorizationPolicy -> Envoy RBAC (translate/authz.py), checked against Istio's reference
(istio.io/latest/docs/reference/config/security/authorization-policy/) and by Envoy itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodeagent.mesh.model import IstioResource, MeshConfig, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import TranslationCache, authz, istio_stats
from nodeagent.translate import envoy as e
from nodeagent.translate.internal import CALLER_KEY
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import as_json, local, store

WEB = Pod("shop", "web", labels={"app": "web"})


def policy(
    spec: dict[str, Any], ns: str = "shop", name: str = "p", **annotations: str
) -> IstioResource:
    return IstioResource(
        "security.istio.io", "v1", "AuthorizationPolicy", ns, name, spec, annotations=annotations
    )


def with_policies(*policies: IstioResource, **mesh: Any) -> MeshStore:
    s = MeshStore()
    s.set_mesh_config(MeshConfig(**mesh))
    for p in policies:
        s.put_istio(p)
    return s


def names(pod_authz: authz.PodAuthz) -> list[str]:
    return [f"{p.namespace}/{p.name}" for p in pod_authz.policies]


def config(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f["typed_config"].items() if k != "@type"}


S6 = {
    "selector": {"matchLabels": {"app": "web"}},
    "action": "ALLOW",
    "rules": [
        {
            "from": [
                {"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                {"source": {"namespaces": ["dev"]}},
            ],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}}],
        }
    ],
}


def test_which_policies_apply_root_namespace_selector_and_target_refs() -> None:
    """Root namespace (mesh-wide, or selected pods anywhere), namespace-wide, workload; a
    targetRef policy is for waypoints/gateways; CUSTOM applies too (its provider resolved in
    ``custom``: here none, so its rules deny, extauthz.py)."""
    s = with_policies(
        policy({}, "istio-system", "mesh"),
        policy({"selector": {"matchLabels": {"app": "web"}}}, "istio-system", "root-web"),
        policy({"selector": {"matchLabels": {"app": "db"}}}, "istio-system", "root-db"),
        policy({"action": "DENY", "rules": [{}]}, "shop", "ns"),
        policy(S6, "shop", "web"),
        policy({"selector": {"matchLabels": {"app": "web"}}}, "other", "elsewhere"),
        policy({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}]}, "shop", "t"),
        policy({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}, "shop", "c"),
    )
    chosen = authz.policies_for(s, WEB)
    assert names(chosen) == [
        "istio-system/mesh",
        "istio-system/root-web",
        "shop/c",
        "shop/ns",
        "shop/web",
    ]
    assert chosen.custom is not None and chosen.custom.provider is None
    assert authz.policies_for(with_policies(), WEB) is authz.NO_POLICY


def test_s6_allow_by_principal_or_namespace_methods_and_path_prefix() -> None:
    """Each source is an identity from mTLS or, on the fast path, from the node's stamp."""
    pod = authz.policies_for(with_policies(policy(S6)), WEB)
    (http,) = pod.http_filters()
    rules = config(http)["rules"]
    assert rules["action"] == "ALLOW"
    (name,) = rules["policies"]
    assert name == "ns[shop]-policy[p]-rule[0]"
    text = str(rules["policies"][name])
    assert "'exact': 'spiffe://cluster.local/ns/default/sa/sleep'" in text
    assert CALLER_KEY in text and "authenticated" in text
    assert r"spiffe://.*/ns/dev/.*" in text
    assert "'prefix': '/info'" in text and "':method'" in text


def test_empty_spec_denies_all_and_an_empty_rule_allows_all() -> None:
    deny_all = config(authz.policies_for(with_policies(policy({})), WEB).http_filters()[0])
    assert deny_all["rules"] == {"action": "ALLOW", "policies": {}}
    allow_all = config(
        authz.policies_for(with_policies(policy({"rules": [{}]})), WEB).http_filters()[0]
    )
    assert allow_all["rules"]["policies"] == {
        "ns[shop]-policy[p]-rule[0]": {
            "permissions": [{"any": True}],
            "principals": [{"any": True}],
        }
    }


def test_tcp_allow_with_http_fields_never_matches_deny_drops_them() -> None:
    """Istio: on TCP an ALLOW rule with HTTP-only fields is left out (so it denies), a DENY
    rule keeps its other fields (denies more)."""
    allow = policy({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}]})
    deny = policy(
        {
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}],
        },
        name="d",
    )
    pod = authz.policies_for(with_policies(allow, deny), WEB)
    deny_tcp, allow_tcp = (config(f) for f in pod.network_filters())
    assert allow_tcp["rules"] == {"action": "ALLOW", "policies": {}}
    (made,) = deny_tcp["rules"]["policies"].values()
    assert made["permissions"] == [
        {"and_rules": {"rules": [{"and_rules": {"rules": [{"destination_port": 9000}]}}]}}
    ]


def test_dry_run_is_shadow_only() -> None:
    p = policy({"action": "DENY", "rules": [{}]}, **{"istio.io/dry-run": "true"})
    (f,) = authz.policies_for(with_policies(p), WEB).http_filters()
    made = config(f)
    assert "rules" not in made
    assert made["shadow_rules"]["action"] == "DENY"
    assert made["shadow_rules_stat_prefix"] == "istio_dry_run_deny_"


def test_trust_domain_cluster_local_stands_for_the_mesh_one() -> None:
    p = policy({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}]}]})
    text = str(
        authz.policies_for(with_policies(p, trust_domain="corp.example"), WEB).http_filters()
    )
    assert "spiffe://cluster.local/ns/a/sa/b" in text and "spiffe://corp.example/ns/a/sa/b" in text


def test_order_deny_then_allow_then_audit_on_both_inbound_paths() -> None:
    s = store()
    for p in (
        policy({"action": "AUDIT", "rules": [{}]}, name="a"),
        policy(S6, name="s6"),
        policy(
            {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]}, name="d"
        ),
    ):
        s.put_istio(p)
    pod = local("web", {"app": "web"})
    out = TranslationCache().build(s, [pod]).resources
    inbound = as_json(out[e.LISTENER]["virtualInbound/shop/web"])
    fast = as_json(out[e.LISTENER]["inboundInternal/shop/web"])
    for listener in (inbound, fast):
        for chain in listener["filterChains"]:
            filters = chain["filters"]
            hcm = [f for f in filters if f["name"].endswith("http_connection_manager")]
            if hcm:
                filters = without_peer_filter(hcm[0]["typedConfig"]["httpFilters"])
                http = [f["name"] for f in filters]
                assert http[-4:] == [authz.HTTP_RBAC] * 3 + ["envoy.filters.http.router"]
                actions = [f["typedConfig"]["rules"].get("action", "ALLOW") for f in filters[:3]]
                assert actions == ["DENY", "ALLOW", "LOG"]
            elif (
                any(f["name"].endswith("tcp_proxy") for f in filters)
                and "blackhole" not in chain["name"]
            ):
                assert authz.NETWORK_RBAC in [f["name"] for f in filters], chain["name"]


def test_envoy_accepts_every_field(tmp_path: Path) -> None:
    """Every from/to/when key this node judges, in HTTP and network RBAC filters Envoy checks."""
    rule = {
        "from": [
            {
                "source": {
                    "principals": ["cluster.local/ns/a/sa/b", "*", "pre*", "*suf"],
                    "notPrincipals": ["cluster.local/ns/x/sa/y"],
                    "namespaces": ["dev", "pre*"],
                    "notNamespaces": ["prod"],
                    "ipBlocks": ["10.0.0.0/8", "10.1.2.3"],
                    "notIpBlocks": ["10.9.0.0/16"],
                    "remoteIpBlocks": ["192.168.0.0/16"],
                    "notRemoteIpBlocks": ["192.168.9.9"],
                    "requestPrincipals": ["testing@secure.istio.io/testing@secure.istio.io", "*"],
                    "notRequestPrincipals": ["https://idp.example/*", "*/bob"],
                }
            }
        ],
        "to": [
            {
                "operation": {
                    "hosts": ["web.shop", "*.example"],
                    "notHosts": ["bad.example"],
                    "ports": ["80"],
                    "notPorts": ["81"],
                    "methods": ["GET", "HEAD"],
                    "notMethods": ["DELETE"],
                    "paths": ["/a", "/b*", "*.js", "/c/{*}/d/{**}"],
                    "notPaths": ["/admin*"],
                }
            }
        ],
        "when": [
            {"key": "request.headers[x-token]", "values": ["abc", "*"]},
            {"key": "source.ip", "values": ["10.0.0.1"]},
            {"key": "remote.ip", "notValues": ["10.0.0.2"]},
            {"key": "source.namespace", "values": ["dev"]},
            {"key": "source.principal", "values": ["cluster.local/ns/a/sa/b"]},
            {"key": "destination.ip", "values": ["10.244.0.0/16"]},
            {"key": "destination.port", "values": ["80"]},
            {"key": "connection.sni", "values": ["web.shop"]},
            {"key": "request.auth.principal", "values": ["iss/sub"]},
            {"key": "request.auth.audiences", "values": ["web"]},
            {"key": "request.auth.presenter", "notValues": ["cli*"]},
            {"key": "request.auth.claims[groups]", "values": ["group1"]},
            {"key": "request.auth.claims[nested][key]", "values": ["*"]},
        ],
    }
    pols = [
        policy({"action": "DENY", "rules": [rule]}, name="d"),
        policy({"rules": [rule, {}]}, name="a"),
        policy({"action": "AUDIT", "rules": [rule]}, name="l"),
        policy({"action": "DENY", "rules": [rule]}, name="dry", **{"istio.io/dry-run": "true"}),
    ]
    pod = authz.policies_for(with_policies(*pols), WEB)
    http = {
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10080}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": e.typed(
                            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            stat_prefix="t",
                            route_config={"name": "r"},
                            http_filters=[
                                *pod.http_filters(),
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": e.typed(
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    ),
                                },
                            ],
                        ),
                    }
                ]
            }
        ],
    }
    tcp = {
        "name": "tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10081}},
        "filter_chains": [
            {
                "filters": [
                    *pod.network_filters(),
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": e.typed(
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            stat_prefix="t",
                            cluster="c",
                        ),
                    },
                ]
            }
        ],
    }
    cluster = {"name": "c", "type": "STATIC", "connect_timeout": "1s"}
    for listener in (http, tcp):
        e.message(e.Listener, listener)  # the protos parse
    assert_envoy_accepts_resources(tmp_path, clusters=[cluster], listeners=[http, tcp])


def test_request_principal_and_claims_read_the_jwt_payload() -> None:
    """S5: DENY notRequestPrincipals ["*"] (no valid token: denied), claims[groups] as a string
    or a list claim, nested claims by path (COND page)."""
    deny = policy(
        {"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]}
    )
    (f,) = authz.policies_for(with_policies(deny), WEB).http_filters()
    (made,) = config(f)["rules"]["policies"].values()
    text = str(made["principals"])
    assert "not_id" in text and "'key': 'payload'" in text and "'key': 'iss'" in text
    groups = policy(
        {
            "rules": [
                {
                    "when": [
                        {"key": "request.auth.claims[groups]", "values": ["group1"]},
                        {"key": "request.auth.claims[a][b]", "values": ["c"]},
                    ]
                }
            ]
        }
    )
    (f,) = authz.policies_for(with_policies(groups), WEB).http_filters()
    text = str(config(f)["rules"]["policies"])
    assert "[{'key': 'payload'}, {'key': 'groups'}]" in text and "list_match" in text
    assert "[{'key': 'payload'}, {'key': 'a'}, {'key': 'b'}]" in text
    # iss/sub split at the last "/": an issuer URL keeps its slashes.
    principal = authz._request_principal("https://idp.example/x/alice")
    assert "'exact': 'https://idp.example/x'" in str(principal) and "'exact': 'alice'" in str(
        principal
    )
    # On TCP, requestPrincipals is HTTP-only: a DENY denies without it, an ALLOW never matches.
    (tcp,) = authz.policies_for(with_policies(deny), WEB).network_filters()
    assert config(tcp)["rules"]["policies"] == {
        "ns[shop]-policy[p]-rule[0]": {
            "permissions": [{"any": True}],
            "principals": [{"any": True}],
        }
    }


def test_enforcement_names_only_target_refs() -> None:
    from nodeagent.mesh.enforcement import not_enforced

    rule = {
        "from": [{"source": {"requestPrincipals": ["*"], "notIpBlocks": ["10.0.0.0/8"]}}],
        "to": [{"operation": {"paths": ["/a"]}}],
        "when": [
            {"key": "request.auth.claims[groups]", "values": ["g"]},
            {"key": "request.headers[x]", "notValues": ["y"]},
            {"key": "connection.sni", "values": ["a"]},
        ],
    }
    assert not_enforced(policy({"selector": {"matchLabels": {"a": "b"}}, "rules": [rule]})) is None
    custom = policy({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]})
    assert not_enforced(custom) is None
    refs = not_enforced(policy({"targetRefs": [{"kind": "Service", "group": "", "name": "w"}]}))
    assert refs is not None and refs.fields == ("targetRefs",)
    odd = not_enforced(policy({"rules": [{"when": [{"key": "request.size", "values": ["1"]}]}]}))
    assert odd is not None and odd.fields == ("rules[0].when[0].key=request.size",)


def test_jwt_authn_comes_before_rbac_on_both_inbound_paths() -> None:
    """Istio's inbound HTTP filter order: authentication (jwt_authn) first, then RBAC, which
    reads the payload it verified (request.auth.*)."""
    from tests.unit.istio_data import istio_data

    jwks = istio_data("jwt/jwks.json").read_text()
    s = store()
    s.put_istio(
        IstioResource(
            "security.istio.io",
            "v1",
            "RequestAuthentication",
            "shop",
            "jwt",
            {"jwtRules": [{"issuer": "testing@secure.istio.io", "jwks": jwks}]},
        )
    )
    s.put_istio(policy({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}))
    for hcm in inbound_hcms(s):
        assert [f["name"] for f in hcm["httpFilters"]] == [
            "envoy.filters.http.jwt_authn",
            authz.HTTP_RBAC,
            "envoy.filters.http.router",
        ]


def without_peer_filter(filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FILTERS without the one an mTLS chain copies the caller's metrics labels with."""
    return [f for f in filters if f["name"] != istio_stats.PEER_FILTER]


def inbound_hcms(s: MeshStore) -> list[dict[str, Any]]:
    """The HTTP connection managers of the local pod shop/web (app=web) on both inbound paths
    (its inbound listener and its same-node fast path), as JSON."""
    out = TranslationCache().build(s, [local("web", {"app": "web"})]).resources
    found = []
    for name in ("virtualInbound/shop/web", "inboundInternal/shop/web"):
        listener = as_json(out[e.LISTENER][name])
        hcms = [
            f["typedConfig"]
            for chain in listener["filterChains"]
            for f in chain["filters"]
            if f["name"].endswith("http_connection_manager")
        ]
        assert hcms, name
        for hcm in hcms:  # what authorization reads; the metrics' filter is istio_stats'
            hcm["httpFilters"] = without_peer_filter(hcm["httpFilters"])
        found += hcms
    return found


def test_which_policies_read_the_callers_address() -> None:
    """ipBlocks, remoteIpBlocks, their not* (Source) and when source.ip / remote.ip (Istio's
    conditions page) in any rule, any action, dry-run or not: the pod is kept off the same-node
    fast path, which has no caller address (listeners.fast_ports). Other keys are not."""
    reading: list[dict[str, Any]] = [
        {"from": [{"source": {field: ["10.0.0.1"]}}]}
        for field in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
    ]
    reading += [
        {"when": [{"key": k, "values": ["10.0.0.0/8"]}]} for k in ("source.ip", "remote.ip")
    ]
    reading.append({"when": [{"key": "source.ip", "notValues": ["10.0.0.0/8"]}]})
    for rule in reading:
        for action in ("ALLOW", "DENY", "AUDIT"):
            for dry in ("true", "false"):
                spec = {
                    "action": action,
                    "rules": [{"to": [{"operation": {"ports": ["1"]}}]}, rule],
                }
                pod_authz = authz.policies_for(
                    with_policies(policy(spec, **{authz.DRY_RUN: dry})), WEB
                )
                assert pod_authz.reads_caller_ip(), (rule, action, dry)
    others = [
        {"from": [{"source": {"principals": ["*"], "namespaces": ["a"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}]},
        {"when": [{"key": "destination.ip", "values": ["10.0.0.1"]}]},
        {"when": [{"key": "request.headers[x-forwarded-for]", "values": ["10.0.0.1"]}]},
        {},
    ]
    spec = {"action": "DENY", "rules": others}
    assert not authz.policies_for(with_policies(policy(spec)), WEB).reads_caller_ip()
    assert not authz.policies_for(with_policies(policy({})), WEB).reads_caller_ip()
    assert not authz.NO_POLICY.reads_caller_ip()
