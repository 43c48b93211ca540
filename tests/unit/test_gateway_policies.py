"""AuthorizationPolicy, RequestAuthentication and numTrustedProxies on the gateway's Envoy
(translate/gateway_policies.py, mesh/gateway_topology.py).

Istio's references: istio.io/latest/docs/tasks/security/authorization/authz-ingress/ (policies
selecting ``istio: ingressgateway`` in istio-system; remoteIpBlocks behind trusted proxies),
istio.io/latest/docs/tasks/security/authentication/authn-policy/#end-user-authentication (JWT
at the ingress gateway), istio/istio pilot/pkg/model/policyattachment.go (a classic gateway
takes policies by selector and ignores targetRef), pilot/pkg/networking/core/gateway.go
(buildGatewayConnectionManager: xff_num_trusted_hops = gatewayTopology.numTrustedProxies) and
listener_builder.go (HTTP filter order: authn, authz, fault, CORS, router).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh.gateway_topology import gateway_trusted_proxies
from nodeagent.mesh.model import IstioResource, MeshConfig, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import ResourceError, parse_mesh_config
from nodeagent.translate import extauthz, gateway, gateway_policies
from nodeagent.translate.authz import HTTP_RBAC, NETWORK_RBAC
from nodeagent.translate.jwt import JWT_FILTER
from tests.unit.istio_data import istio_data
from tests.unit.test_gateway import (
    CLUSTER_YAML,
    GATEWAYS_YAML,
    INGRESS,
    ME,
    PASSTHROUGH_YAML,
    _cluster_of,
    _json,
    _sidecar_clusters,
    _static_listeners,
    _store,
)

JWKS = istio_data("jwt/jwks.json").read_text()
ISSUER = "testing@secure.istio.io"
GATEWAY_POD = Pod(
    "istio-system", "istio-ingressgateway-0", service_account="istio-ingressgateway", labels=INGRESS
)


def _policy(kind: str, name: str, spec: dict[str, Any], namespace: str = "istio-system") -> Any:
    return IstioResource("security.istio.io", "v1", kind, namespace, name, spec)


def _deny_path(name: str, path: str, **extra: Any) -> IstioResource:
    spec = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": [path]}}]}], **extra}
    return _policy("AuthorizationPolicy", name, spec, extra.pop("namespace", "istio-system"))


def _with_policies(*resources: IstioResource, texts: tuple[str, ...] = ()) -> MeshStore:
    store = _store(CLUSTER_YAML, GATEWAYS_YAML, PASSTHROUGH_YAML, *texts)
    for resource in resources:
        store.put_istio(resource)
    return store


def _build(store: MeshStore, pod: Pod = GATEWAY_POD) -> gateway.GatewayConfig:
    workload = gateway.Workload(
        "istio-system", INGRESS, ME, policies=gateway_policies.for_gateway(store, pod)
    )
    return gateway.build(store, workload, _cluster_of(store))


def _http_filters(config: gateway.GatewayConfig, listener: str) -> list[list[dict[str, Any]]]:
    """The HTTP filters of each HCM of LISTENER."""
    found = _json(next(li for li in config.listeners if li.name == listener))
    return [
        f["typed_config"]["http_filters"]
        for chain in found["filter_chains"]
        for f in chain["filters"]
        if "http_filters" in f["typed_config"]
    ]


def _rule_names(filters: list[dict[str, Any]], name: str = HTTP_RBAC) -> set[str]:
    return {
        rule
        for f in filters
        if f["name"] == name
        for rule in f["typed_config"].get("rules", {}).get("policies", {})
    }


def test_policies_apply_to_the_gateway_by_its_namespace_and_labels_not_by_target_ref() -> None:
    """As for a sidecar's pod (authz-ingress task: a policy in istio-system selecting
    ``istio: ingressgateway``): root-namespace and namespace-wide ones, those selecting the
    gateway's labels; not those selecting others, of another namespace, or with targetRef(s)
    (for Gateway API gateways and waypoints: a classic gateway ignores them)."""
    selector = {"selector": {"matchLabels": {"istio": "ingressgateway"}}}
    store = _with_policies(
        _deny_path("selected", "/a", **selector),
        _deny_path("namespace-wide", "/b"),
        _deny_path("other-labels", "/c", selector={"matchLabels": {"istio": "egressgateway"}}),
        _deny_path("other-namespace", "/d", namespace="shop"),
        _deny_path(
            "targeted",
            "/e",
            targetRefs=[{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}],
        ),
    )
    for filters in _http_filters(_build(store), "0.0.0.0_8080"):
        assert _rule_names(filters) == {
            "ns[istio-system]-policy[namespace-wide]-rule[0]",
            "ns[istio-system]-policy[selected]-rule[0]",
        }


def test_jwt_then_rbac_then_the_virtual_service_filters_on_every_http_chain() -> None:
    """Istio's gateway HCM: jwt_authn, RBAC (DENY before ALLOW), then fault, CORS, router; on
    the plain HTTP port and on each TLS-terminating HTTPS server alike."""
    rule = {"issuer": ISSUER, "jwks": JWKS}
    allow = {"action": "ALLOW", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}
    store = _with_policies(
        _policy("RequestAuthentication", "jwt", {"jwtRules": [rule]}),
        _policy("AuthorizationPolicy", "require-jwt", allow),
        _deny_path("deny-admin", "/admin"),
    )
    config = _build(store)
    chains = [*_http_filters(config, "0.0.0.0_8080"), *_http_filters(config, "0.0.0.0_8443")]
    assert len(chains) == 2
    for filters in chains:
        names = [f["name"] for f in filters]
        assert names == [
            JWT_FILTER,
            HTTP_RBAC,
            HTTP_RBAC,
            "envoy.filters.http.fault",
            "envoy.filters.http.cors",
            "envoy.filters.http.router",
        ]
        # ALLOW is the enum's zero value: proto3 JSON leaves it out.
        actions = [f["typed_config"]["rules"].get("action", "ALLOW") for f in filters[1:3]]
        assert actions == ["DENY", "ALLOW"]
        provider = filters[0]["typed_config"]["providers"]["origins-0"]
        assert provider["issuer"] == ISSUER


def test_tcp_and_passthrough_chains_get_network_rbac_before_tcp_proxy() -> None:
    deny = {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.9.0.0/16"]}}]}]}
    config = _build(_with_policies(_policy("AuthorizationPolicy", "deny-net", deny)))
    for name in ("0.0.0.0_5432", "0.0.0.0_443"):
        listener = _json(next(li for li in config.listeners if li.name == name))
        for chain in listener["filter_chains"]:
            names = [f["name"] for f in chain["filters"]]
            assert names == [NETWORK_RBAC, "envoy.filters.network.tcp_proxy"], name
            assert _rule_names(chain["filters"], NETWORK_RBAC) == {
                "ns[istio-system]-policy[deny-net]-rule[0]"
            }


def test_no_policy_leaves_the_gateway_chains_as_they_were() -> None:
    config = _build(_with_policies())
    for filters in _http_filters(config, "0.0.0.0_8080"):
        assert [f["name"] for f in filters][:1] == ["envoy.filters.http.fault"]
    listener = _json(next(li for li in config.listeners if li.name == "0.0.0.0_5432"))
    (chain,) = listener["filter_chains"]
    assert [f["name"] for f in chain["filters"]] == ["envoy.filters.network.tcp_proxy"]
    hcm = _http_filters(config, "0.0.0.0_8080")
    assert hcm  # the HCM is there, with no xff_num_trusted_hops (below)


def _hcm_config(config: gateway.GatewayConfig) -> dict[str, Any]:
    found = _json(next(li for li in config.listeners if li.name == "0.0.0.0_8080"))
    typed: dict[str, Any] = found["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def test_num_trusted_proxies_from_the_mesh_config_and_the_pods_annotation() -> None:
    """gatewayTopology.numTrustedProxies: meshConfig.defaultConfig's for every gateway, the
    pod's proxy.istio.io/config annotation overriding it; Istio's gateways use the remote
    address either way."""
    store = _with_policies()
    hcm = _hcm_config(_build(store))
    assert hcm["use_remote_address"] is True and "xff_num_trusted_hops" not in hcm
    store.set_mesh_config(MeshConfig(gateway_trusted_proxies=2))
    assert _hcm_config(_build(store))["xff_num_trusted_hops"] == 2
    annotated = Pod(
        GATEWAY_POD.namespace,
        GATEWAY_POD.name,
        labels=INGRESS,
        annotations={"proxy.istio.io/config": '{"gatewayTopology": {"numTrustedProxies": 1}}'},
    )
    assert _hcm_config(_build(store, annotated))["xff_num_trusted_hops"] == 1
    # An annotation that sets other ProxyConfig fields keeps the mesh's numTrustedProxies.
    other = {"proxy.istio.io/config": "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'true'}"}
    assert gateway_trusted_proxies(2, other) == 2


@pytest.mark.parametrize(
    ("annotation", "error"),
    [
        ('{"gatewayTopology": {"numTrustedProxies": -1}}', "numTrustedProxies: expected a count"),
        ('{"gatewayTopology": {"numTrustedProxies": "2"}}', "numTrustedProxies: expected a count"),
        ('{"gatewayTopology": {"proxyProtocol": {}}}', "unknown field"),
        ('{"gatewayTopology": 3}', "expected a mapping"),
        ("[1, 2]", "expected a ProxyConfig mapping"),
    ],
)
def test_a_bad_gateway_topology_annotation_is_an_error_naming_it(
    annotation: str, error: str
) -> None:
    with pytest.raises(ValueError, match=r"annotation proxy\.istio\.io/config") as raised:
        gateway_trusted_proxies(0, {"proxy.istio.io/config": annotation})
    assert error in str(raised.value)


def test_the_mesh_config_reads_gateway_topology() -> None:
    config = parse_mesh_config({"defaultConfig": {"gatewayTopology": {"numTrustedProxies": 3}}})
    assert config.gateway_trusted_proxies == 3
    assert parse_mesh_config({}).gateway_trusted_proxies == 0
    bad = {"defaultConfig": {"gatewayTopology": {"forwardClientCertDetails": "SANITIZE"}}}
    with pytest.raises(ResourceError, match=r"defaultConfig\.gatewayTopology: unknown field"):
        parse_mesh_config(bad)


def test_envoy_accepts_a_gateway_with_jwt_rbac_and_trusted_proxies(tmp_path: Path) -> None:
    from nodeagent.identity.credentials import ca_secret, certificate_secret, placeholder
    from tests.unit.envoy_validate import assert_envoy_accepts_resources

    remote = {"source": {"remoteIpBlocks": ["203.0.113.0/24"], "ipBlocks": ["10.0.0.0/8"]}}
    rules = [{"from": [remote]}, {"to": [{"operation": {"paths": ["/admin/{**}"]}}]}]
    store = _with_policies(
        _policy("RequestAuthentication", "jwt", {"jwtRules": [{"issuer": ISSUER, "jwks": JWKS}]}),
        _policy("AuthorizationPolicy", "deny", {"action": "DENY", "rules": rules}),
        _policy(
            "AuthorizationPolicy",
            "allow-jwt",
            {"rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}]}]},
        ),
    )
    store.set_mesh_config(MeshConfig(gateway_trusted_proxies=1))
    listeners = _static_listeners(_build(store))
    assert '"xff_num_trusted_hops": 1' in json.dumps(listeners)
    cert, key = placeholder()
    secrets = [
        certificate_secret(name, cert, key) for name in ("kubernetes://istio-system/shop-cert", ME)
    ]
    secrets.append(ca_secret("ROOTCA", cert))
    assert_envoy_accepts_resources(
        tmp_path, clusters=_sidecar_clusters(store), listeners=listeners, secrets=secrets
    )


def _gateway_proxy(tmp_path: Path, store: MeshStore) -> Any:
    """A GatewayProxy (nodeagent gateway's translation and xDS side) for GATEWAY_POD."""
    from prometheus_client import CollectorRegistry

    from nodeagent.gateway.proxy import GatewayProxy, GatewaySettings
    from nodeagent.identity.ca import PluginCA, plugin_cacerts
    from nodeagent.identity.issuer import LocalIssuer
    from nodeagent.identity.manager import IdentityManager

    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    for name, content in plugin_cacerts("cluster.local").items():
        (cacerts / name).write_bytes(content)
    identities = IdentityManager(LocalIssuer(PluginCA.load(cacerts), "test CA"), "cluster.local")
    settings = GatewaySettings(
        namespace="istio-system",
        pod_name=GATEWAY_POD.name,
        labels=INGRESS,
        service_account="istio-ingressgateway",
        run_dir=tmp_path / "run",
        envoy_binary=tmp_path / "envoy",
        envoy_log=tmp_path / "envoy.log",
    )
    return GatewayProxy(settings, store, identities, CollectorRegistry())


def test_the_gateway_process_takes_its_pods_policies_and_refuses_a_bad_annotation(
    tmp_path: Path,
) -> None:
    """GatewayProxy: the policies of the pod the source knows (its labels and annotations); a
    proxy.istio.io/config it cannot read is an error naming it, and no snapshot is pushed with
    the wrong trusted hops."""
    store = _with_policies(_deny_path("deny-admin", "/admin"))
    proxy = _gateway_proxy(tmp_path, store)
    identities = proxy.identities
    policies = proxy.workload(proxy.pod()).policies  # the source does not know the pod yet
    assert _rule_names(list(policies.http_filters)) == {
        "ns[istio-system]-policy[deny-admin]-rule[0]"
    }
    config = '{"gatewayTopology": {"numTrustedProxies": 2}}'
    store.put_pod(
        Pod(
            "istio-system",
            GATEWAY_POD.name,
            service_account="istio-ingressgateway",
            labels=INGRESS,
            annotations={"proxy.istio.io/config": config},
        )
    )
    assert proxy.workload(proxy.pod()).policies.trusted_proxies == 2
    store.put_pod(
        Pod(
            "istio-system",
            GATEWAY_POD.name,
            labels=INGRESS,
            annotations={"proxy.istio.io/config": "{gatewayTopology: {numTrustedProxies: x}}"},
        )
    )

    async def issue() -> None:
        proxy.push()
        await identities.renew_due()

    asyncio.run(issue())
    proxy.push()
    assert "annotation proxy.istio.io/config" in proxy.last_error
    assert "not pushed" in proxy.last_error


# -- CUSTOM (ext_authz) at the gateway: the authz-custom task's providers and policy, the policy
# selecting the ingress gateway (istio.io/latest/docs/tasks/security/authorization/authz-custom/).

EXT_AUTHZ_YAML = """
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: foo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: ext-authz}
  ports: [{name: http, port: 8000, targetPort: 8000}, {name: grpc, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata:
  name: hidden-authz
  namespace: foo
  annotations: {networking.istio.io/exportTo: "."}
spec:
  clusterIP: 10.96.0.21
  selector: {app: hidden-authz}
  ports: [{name: http, port: 8000, targetPort: 8000}]
"""
EXT_AUTHZ = "ext-authz.foo.svc.cluster.local"
PROVIDERS = {
    "extensionProviders": [
        {"name": "grpc", "envoyExtAuthzGrpc": {"service": EXT_AUTHZ, "port": 9000}},
        {
            "name": "http",
            "envoyExtAuthzHttp": {
                "service": EXT_AUTHZ,
                "port": 8000,
                "includeRequestHeadersInCheck": ["x-ext-authz"],
                "failOpen": True,
            },
        },
        {
            "name": "hidden",
            "envoyExtAuthzHttp": {
                "service": "hidden-authz.foo.svc.cluster.local",
                "port": 8000,
                "failOpen": True,
            },
        },
    ]
}


def _custom_at_gateway(provider: str) -> MeshStore:
    spec = {
        "selector": {"matchLabels": {"istio": "ingressgateway"}},
        "action": "CUSTOM",
        "provider": {"name": provider},
        "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}],
    }
    policy = _policy("AuthorizationPolicy", "ext-authz", spec)
    store = _with_policies(policy, texts=(EXT_AUTHZ_YAML,))
    store.set_mesh_config(parse_mesh_config(PROVIDERS))
    return store


def _clusters(store: MeshStore) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _sidecar_clusters(store)}


def _ext_authz(filters: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [f["typed_config"] for f in filters if f["name"] == extauthz.HTTP_FILTER]
    return found


def test_custom_at_the_gateway_calls_the_providers_cluster_with_the_gateway_identity() -> None:
    """The gateway's Envoy is a proxy of its own: its ext_authz names the provider's service
    cluster ``outbound|<port>||<host>`` (istiod's LookupCluster), which the gateway's CDS holds,
    mTLS presenting the gateway's own certificate (the provider is in the mesh); never a
    node's per-pod check cluster (``extAuthz/...``), which a gateway has not. Before this the
    filter named ``extAuthz/istio-system/<pod>``: every check failed, and failOpen let all
    through."""
    for provider, port in (("http", 8000), ("grpc", 9000)):
        store = _custom_at_gateway(provider)
        clusters = _clusters(store)
        target = f"outbound|{port}||{EXT_AUTHZ}"
        config = _build_with_clusters(store, clusters)
        chains = [*_http_filters(config, "0.0.0.0_8080"), *_http_filters(config, "0.0.0.0_8443")]
        assert len(chains) == 2
        for filters in chains:
            names = [f["name"] for f in filters]
            assert names[:2] == [HTTP_RBAC, extauthz.HTTP_FILTER], names
            ext = _ext_authz(filters)
            called = (
                ext["http_service"]["server_uri"]["cluster"]
                if provider == "http"
                else ext["grpc_service"]["envoy_grpc"]["cluster_name"]
            )
            assert called == target
            assert "extAuthz/" not in json.dumps(filters)
        cluster = clusters[target]
        tls = json.dumps(cluster["transport_socket_matches"])
        assert ME in tls, "mTLS with the gateway's own certificate"
        if provider == "grpc":  # the check is gRPC: HTTP/2 to the provider
            assert "http2_protocol_options" in json.dumps(cluster)


def _build_with_clusters(
    store: MeshStore, clusters: dict[str, dict[str, Any]] | None
) -> gateway.GatewayConfig:
    policies = gateway_policies.for_gateway(store, GATEWAY_POD, clusters)
    workload = gateway.Workload("istio-system", INGRESS, ME, policies=policies)
    return gateway.build(store, workload, _cluster_of(store))


def test_custom_whose_provider_cluster_the_gateway_lacks_denies_never_fails_open() -> None:
    """A provider the gateway cannot reach (its Service exported to its own namespace only):
    failOpen would let every request through a check that cannot be made. The CUSTOM rules
    deny what they match instead, as for a provider in error (istiod's bad-custom-action)."""
    store = _custom_at_gateway("hidden")
    clusters = _clusters(store)
    assert "outbound|8000||hidden-authz.foo.svc.cluster.local" not in clusters
    policies = gateway_policies.for_gateway(store, GATEWAY_POD, clusters)
    assert "has no cluster outbound|8000||hidden-authz" in policies.custom_error
    for filters in _http_filters(_build_with_clusters(store, clusters), "0.0.0.0_8080"):
        assert extauthz.HTTP_FILTER not in [f["name"] for f in filters]
        rules = filters[0]["typed_config"]["rules"]
        assert rules["action"] == "DENY"
        assert list(rules["policies"]) == [
            "istio-ext-authz-ns[istio-system]-policy[ext-authz]-rule[0]-bad-custom-action"
        ]
    # The same provider, reachable: checked (the test above), no error.
    reachable = gateway_policies.for_gateway(_custom_at_gateway("http"), GATEWAY_POD, clusters)
    assert reachable.custom_error == ""


def test_envoy_accepts_the_gateway_with_custom_and_its_provider_clusters(tmp_path: Path) -> None:
    from nodeagent.identity.credentials import ca_secret, certificate_secret, placeholder
    from tests.unit.envoy_validate import assert_envoy_accepts_resources

    for provider in ("http", "grpc"):
        store = _custom_at_gateway(provider)
        clusters = _clusters(store)
        listeners = _static_listeners(_build_with_clusters(store, clusters))
        assert extauthz.HTTP_FILTER in json.dumps(listeners)
        cert, key = placeholder()
        secrets = [
            certificate_secret(name, cert, key)
            for name in ("kubernetes://istio-system/shop-cert", ME)
        ]
        secrets.append(ca_secret("ROOTCA", cert))
        assert_envoy_accepts_resources(
            tmp_path, clusters=clusters.values(), listeners=listeners, secrets=secrets
        )


def test_the_gateway_process_checks_custom_against_its_own_clusters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GatewayProxy.resources: the provider's cluster is in the gateway's CDS and its ext_authz
    calls it; for a provider the gateway has no cluster for, the listeners deny instead (and the
    gateway says why, once)."""
    from nodeagent.translate.envoy import CLUSTER, LISTENER

    store = _custom_at_gateway("http")
    proxy = _gateway_proxy(tmp_path, store)
    out = proxy.resources()
    assert f"outbound|8000||{EXT_AUTHZ}" in out[CLUSTER]
    listener = _json(out[LISTENER]["0.0.0.0_8080"])
    assert f'"cluster": "outbound|8000||{EXT_AUTHZ}"' in json.dumps(listener)
    hidden = _custom_at_gateway("hidden")
    proxy.store = hidden
    for _ in range(2):
        listener = _json(proxy.resources()[LISTENER]["0.0.0.0_8080"])
    assert extauthz.HTTP_FILTER not in json.dumps(listener)
    assert "-bad-custom-action" in json.dumps(listener)
    said = [r.message for r in caplog.records if "has no cluster" in r.message]
    assert len(said) == 1, said
