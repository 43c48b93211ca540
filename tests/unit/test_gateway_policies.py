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
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.mesh.gateway_topology import gateway_trusted_proxies
from nodeagent.mesh.model import IstioResource, MeshConfig, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import ResourceError, parse_mesh_config
from nodeagent.translate import gateway, gateway_policies
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
    _inline_routes,
    _json,
    _routes,
    _sidecar_clusters,
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
    from tests.unit.envoy_validate import assert_envoy_accepts_resources, static_sds

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
    config = _build(store)
    routes = _routes(config)
    listeners = []
    for li in config.listeners:
        listener = static_sds(_json(li))
        _inline_routes(listener, copy.deepcopy(routes))
        listeners.append(listener)
    assert '"xff_num_trusted_hops": 1' in json.dumps(listeners)
    cert, key = placeholder()
    secrets = [
        certificate_secret(name, cert, key) for name in ("kubernetes://istio-system/shop-cert", ME)
    ]
    secrets.append(ca_secret("ROOTCA", cert))
    assert_envoy_accepts_resources(
        tmp_path, clusters=_sidecar_clusters(store), listeners=listeners, secrets=secrets
    )


def test_the_gateway_process_takes_its_pods_policies_and_refuses_a_bad_annotation(
    tmp_path: Path,
) -> None:
    """GatewayProxy: the policies of the pod the source knows (its labels and annotations); a
    proxy.istio.io/config it cannot read is an error naming it, and no snapshot is pushed with
    the wrong trusted hops."""
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
    store = _with_policies(_deny_path("deny-admin", "/admin"))
    proxy = GatewayProxy(settings, store, identities, CollectorRegistry())
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
