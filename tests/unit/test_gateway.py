"""Istio Gateway -> the gateway Envoy's listeners and routes (translate/gateway.py), and the
``nodeagent gateway`` selector.

Istio's reference: istio.io/latest/docs/reference/config/networking/gateway/ (servers, hosts
``ns/dnsName``, tls modes, httpsRedirect, credentialName); route table names and merging from
istio/istio pilot/pkg/model/gateway.go and pilot/pkg/networking/core/gateway.go.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from nodeagent.cli.gateway import parse_selector
from nodeagent.identity.credentials import ca_secret, certificate_secret, placeholder
from nodeagent.mesh.model import Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.changes import put
from nodeagent.sources.directory import parse_document
from nodeagent.translate import LocalPod, TranslationCache, gateway, service_views
from nodeagent.translate.envoy import CLUSTER
from tests.unit.envoy_validate import assert_envoy_accepts_resources, static_sds
from tests.unit.istio_data import istio_data

INGRESS = {"istio": "ingressgateway"}
ME = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"

CLUSTER_YAML = """
apiVersion: v1
kind: Service
metadata: {name: web-api, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web-api}
  ports: [{name: http, port: 9090, targetPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  selector: {app: payments}
  ports: [{name: http, port: 9091, targetPort: 9091}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: db}
  ports: [{name: tcp, port: 5432, targetPort: 5432}]
"""

GATEWAYS_YAML = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["shop/*.example.com"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["shop/shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 8080, name: http-redirect, protocol: HTTP}
    hosts: ["./secure.example.com"]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: [shop.example.com, secure.example.com]
  gateways: [shop-gateway]
  http:
  - match: [{uri: {prefix: /pay}}]
    route: [{destination: {host: payments}}]
  - route: [{destination: {host: web-api, port: {number: 9090}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: shop}
spec:
  hosts: [shop.example.com]
  http:
  - route: [{destination: {host: payments}}]
"""


def _store(*texts: str) -> MeshStore:
    store = MeshStore()
    for text in texts:
        for i, doc in enumerate(yaml.safe_load_all(text)):
            for parsed in parse_document(doc, "test", i):
                put(store, parsed.record)
    return store


def _workload() -> gateway.Workload:
    return gateway.Workload("istio-system", INGRESS, ME)


def _cluster_of(store: MeshStore) -> gateway.ClusterOf:
    def of(destination: Any, vs: Any, port: int) -> str:
        return service_views.destination_cluster(store, "istio-system", destination, vs, port)

    return of


def _build(store: MeshStore) -> gateway.GatewayConfig:
    return gateway.build(store, _workload(), _cluster_of(store))


def _json(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return out


def _routes(config: gateway.GatewayConfig) -> dict[str, dict[str, Any]]:
    return {r.name: _json(r) for r in config.routes}


def _vhost(table: dict[str, Any], host: str) -> dict[str, Any]:
    return next(v for v in table["virtual_hosts"] if host in v["domains"])


def test_http_servers_of_a_port_share_one_route_table_with_a_virtual_host_per_host() -> None:
    config = _build(_store(CLUSTER_YAML, GATEWAYS_YAML))
    assert [li.name for li in config.listeners] == ["0.0.0.0_8080", "0.0.0.0_8443"]
    routes = _routes(config)
    assert set(routes) == {"http.8080", "https.8443.https.shop-gateway.shop"}
    plain = _vhost(routes["http.8080"], "shop.example.com")
    assert plain["domains"] == ["shop.example.com", "shop.example.com:*"]
    # Rule order: /pay to payments (its only port), everything else to web-api.
    assert [r["route"]["cluster"] for r in plain["routes"]] == [
        "outbound|9091||payments.shop.svc.cluster.local",
        "outbound|9090||web-api.shop.svc.cluster.local",
    ]
    assert "require_tls" not in plain


GATEWAY_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system%s}
spec:
  clusterIP: 10.96.0.100
  selector: {istio: ingressgateway}
  ports: [{name: http2, port: 8080, targetPort: 18080}]
"""


def test_a_server_port_is_the_gateway_services_port_listened_on_at_its_target_port() -> None:
    """istiod's resolvePorts: the Service selecting the gateway maps 8080 to 18080; the
    Service's label networking.istio.io/disable-gateway-port-translation opts out."""
    store = _store(CLUSTER_YAML, GATEWAYS_YAML, GATEWAY_SERVICE % "")
    ports = gateway.listen_ports(store, "istio-system", INGRESS)
    assert ports == {8080: 18080}
    workload = gateway.Workload("istio-system", INGRESS, ME, ports=ports)
    config = gateway.build(store, workload, _cluster_of(store))
    assert [li.name for li in config.listeners] == ["0.0.0.0_8443", "0.0.0.0_18080"]
    assert "http.18080" in _routes(config)
    opted_out = (
        GATEWAY_SERVICE % ", labels: {networking.istio.io/disable-gateway-port-translation: x}"
    )
    assert gateway.listen_ports(_store(opted_out), "istio-system", INGRESS) == {}


def test_https_redirect_server_makes_its_hosts_require_tls() -> None:
    routes = _routes(_build(_store(CLUSTER_YAML, GATEWAYS_YAML)))
    assert _vhost(routes["http.8080"], "secure.example.com")["require_tls"] == "ALL"


def test_simple_tls_server_terminates_with_its_credential_from_the_gateway_namespace() -> None:
    config = _build(_store(CLUSTER_YAML, GATEWAYS_YAML))
    assert config.credentials == {("istio-system", "shop-cert")}
    https = _json(config.listeners[1])
    (chain,) = https["filter_chains"]
    assert chain["filter_chain_match"]["server_names"] == ["shop.example.com"]
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    sds = context["tls_certificate_sds_secret_configs"][0]["name"]
    assert sds == "kubernetes://istio-system/shop-cert"
    hcm = chain["filters"][0]["typed_config"]
    assert hcm["rds"]["route_config_name"] == "https.8443.https.shop-gateway.shop"
    # The HTTPS server admits shop.example.com only: secure.example.com has no virtual host.
    table = _routes(config)["https.8443.https.shop-gateway.shop"]
    assert [v["domains"][0] for v in table["virtual_hosts"]] == ["shop.example.com"]


def test_a_virtual_service_not_bound_to_the_gateway_gives_it_nothing() -> None:
    text = GATEWAYS_YAML.replace("gateways: [shop-gateway]", "gateways: [other-gateway]")
    config = _build(_store(CLUSTER_YAML, text))
    assert all(not _json(r).get("virtual_hosts") for r in config.routes)


def test_short_gateway_name_binds_only_in_the_virtual_service_namespace() -> None:
    text = GATEWAYS_YAML.replace("name: shop, namespace: shop", "name: shop, namespace: other")
    text = text.replace('"shop/', '"*/')  # let the server hosts admit namespace other
    assert all(not _json(r).get("virtual_hosts") for r in _build(_store(text)).routes)
    qualified = text.replace("gateways: [shop-gateway]", "gateways: [shop/shop-gateway]")
    assert any(_json(r).get("virtual_hosts") for r in _build(_store(qualified)).routes)


def test_a_virtual_service_not_exported_to_the_gateway_namespace_is_left_out() -> None:
    """istiod gives a gateway the VirtualServices visible from its own namespace."""
    text = GATEWAYS_YAML.replace(
        "gateways: [shop-gateway]", "gateways: [shop-gateway]\n  exportTo: [.]"
    )
    assert all(not _json(r).get("virtual_hosts") for r in _build(_store(CLUSTER_YAML, text)).routes)
    exported = text.replace("exportTo: [.]", "exportTo: [istio-system]")
    assert any(_json(r).get("virtual_hosts") for r in _build(_store(CLUSTER_YAML, exported)).routes)


def test_a_virtual_service_that_cannot_be_translated_leaves_the_others_served() -> None:
    broken = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: shop}
spec:
  hosts: [secure.example.com]
  gateways: [shop-gateway]
  http:
  - match: [{uri: {regex: "(?<bad"}}]
    route: [{destination: {host: web-api}}]
"""
    config = _build(_store(CLUSTER_YAML, GATEWAYS_YAML, broken))
    (problem,) = config.problems["VirtualService/shop/broken"]
    assert "http[0].match[0].uri" in problem
    plain = _vhost(_routes(config)["http.8080"], "shop.example.com")
    assert [r["route"]["cluster"] for r in plain["routes"]][-1].startswith("outbound|9090||web-api")


def test_server_host_namespace_filters_virtual_services() -> None:
    text = GATEWAYS_YAML.replace('"shop/*.example.com"', '"elsewhere/*.example.com"')
    routes = _routes(_build(_store(CLUSTER_YAML, text)))
    assert [v["domains"][0] for v in routes["http.8080"]["virtual_hosts"]] == ["secure.example.com"]


def test_match_naming_other_gateways_is_left_out() -> None:
    text = GATEWAYS_YAML.replace(
        "- match: [{uri: {prefix: /pay}}]", "- match: [{uri: {prefix: /pay}, gateways: [mesh]}]"
    )
    plain = _vhost(_routes(_build(_store(CLUSTER_YAML, text)))["http.8080"], "shop.example.com")
    assert [r["match"] for r in plain["routes"]] == [{"prefix": "/"}]


def test_gateway_selecting_other_labels_is_not_served() -> None:
    text = GATEWAYS_YAML.replace("selector: {istio: ingressgateway}", "selector: {istio: egress}")
    config = _build(_store(CLUSTER_YAML, text))
    assert config.listeners == [] and config.routes == []


PASSTHROUGH_YAML = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["*/db.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 15443, name: tls-auto, protocol: TLS}
    hosts: ["*"]
    tls: {mode: AUTO_PASSTHROUGH}
  - port: {number: 9443, name: mtls, protocol: HTTPS}
    hosts: ["*/*"]
    tls: {mode: ISTIO_MUTUAL}
  - port: {number: 5432, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  gateways: [istio-system/edge]
  tls:
  - match: [{sniHosts: [db.example.com], port: 443}]
    route: [{destination: {host: web-api, port: {number: 9090}}}]
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: db}}]
"""


def test_passthrough_routes_by_sni_and_auto_passthrough_is_named_not_yet() -> None:
    config = _build(_store(CLUSTER_YAML, PASSTHROUGH_YAML))
    listeners = {li.name: _json(li) for li in config.listeners}
    (chain,) = listeners["0.0.0.0_443"]["filter_chains"]
    assert chain["filter_chain_match"]["server_names"] == ["db.example.com"]
    assert "transport_socket" not in chain  # not terminated: the client's TLS goes through
    proxy = chain["filters"][0]["typed_config"]
    assert proxy["cluster"] == "outbound|9090||web-api.shop.svc.cluster.local"
    assert "0.0.0.0_15443" not in listeners
    (problem,) = config.problems["Gateway/istio-system/edge"]
    assert "servers[1]" in problem and "AUTO_PASSTHROUGH" in problem
    tcp = listeners["0.0.0.0_5432"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp["cluster"] == "outbound|5432||db.shop.svc.cluster.local"


def test_istio_mutual_server_presents_the_gateway_identity_and_requires_a_mesh_client() -> None:
    config = _build(_store(CLUSTER_YAML, PASSTHROUGH_YAML))
    listener = _json(next(li for li in config.listeners if li.name == "0.0.0.0_9443"))
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["name"] == ME


def test_credentials_named_follow_the_gateways_tls_servers() -> None:
    store = _store(CLUSTER_YAML, GATEWAYS_YAML)
    assert gateway.credentials_named(store, _workload()) == {("istio-system", "shop-cert")}


def _inline_routes(listener: dict[str, Any], routes: dict[str, dict[str, Any]]) -> None:
    """Envoy's validate mode has no ADS: the route tables go inline."""
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            config = f["typed_config"]
            if "rds" in config:
                config["route_config"] = routes[config.pop("rds")["route_config_name"]]


def _sidecar_clusters(store: MeshStore) -> list[Any]:
    pod = Pod("istio-system", "ingress", service_account="istio-ingressgateway")
    made = TranslationCache().build(store, [LocalPod(pod, "")], [], ("kube-system",), gateway=True)
    clusters = []
    for cluster in made.resources[CLUSTER].values():
        fields = _json(cluster)
        if fields.get("type") == "EDS":  # validate mode has no ADS: endpoints inline
            del fields["eds_cluster_config"]
            fields |= {"type": "STATIC", "load_assignment": {"cluster_name": fields["name"]}}
        clusters.append(fields)
    return clusters


def _static_listeners(config: Any) -> list[dict[str, Any]]:
    """The gateway's listeners as a static bootstrap holds them: SDS and RDS inlined."""
    routes = _routes(config)
    listeners = []
    for li in config.listeners:
        listener = static_sds(_json(li))
        _inline_routes(listener, copy.deepcopy(routes))
        listeners.append(listener)
    return listeners


def _assert_envoy_accepts(tmp_path: Path, store: MeshStore) -> None:
    listeners = _static_listeners(_build(store))
    cert, key = placeholder()  # a real certificate and key (Envoy parses them)
    secrets = [
        certificate_secret(name, cert, key) for name in ("kubernetes://istio-system/shop-cert", ME)
    ]
    secrets.append(ca_secret("ROOTCA", cert))
    assert_envoy_accepts_resources(
        tmp_path, clusters=_sidecar_clusters(store), listeners=listeners, secrets=secrets
    )


def test_envoy_accepts_the_gateway_config(tmp_path: Path) -> None:
    _assert_envoy_accepts(tmp_path, _store(CLUSTER_YAML, GATEWAYS_YAML, PASSTHROUGH_YAML))


@pytest.mark.parametrize("sample", ["bookinfo-gateway.yaml", "certmanager-gateway.yaml"])
def test_istio_gateway_samples_are_served_and_envoy_accepts_them(
    sample: str, tmp_path: Path
) -> None:
    """Istio's own samples: a Gateway on port 80 for the ingress gateway and its VirtualService
    (bookinfo: /productpage and friends to productpage:9080)."""
    bookinfo = istio_data("bookinfo/platform/bookinfo.yaml").read_text()
    text = istio_data(f"bookinfo/networking/{sample}").read_text()
    store = _store(bookinfo, text)
    config = _build(store)
    assert [li.name for li in config.listeners] == [
        "0.0.0.0_8080" if "bookinfo" in sample else "0.0.0.0_80"
    ]
    (table,) = config.routes
    routes = _json(table)["virtual_hosts"][0]["routes"]
    assert routes, f"{sample}: no routes"
    _assert_envoy_accepts(tmp_path, store)


def test_parse_selector() -> None:
    assert parse_selector("istio=ingressgateway") == INGRESS
    assert parse_selector("istio=egressgateway, app=gw") == {"istio": "egressgateway", "app": "gw"}
    with pytest.raises(ValueError, match="key=value"):
        parse_selector("istio")


def test_the_control_planes_config_maps_are_mirrored_into_files(tmp_path: Path) -> None:
    """A gateway pod cannot mount another namespace's ConfigMaps: it reads the mesh config and
    the CA's root by name into files; one missing is waited for (logged), a change rewritten."""
    from apiserver_standin import APIServerStandIn
    from kubernetes_asyncio import client

    from nodeagent.gateway.mirror import ConfigMapMirror
    from nodeagent.sources.kubernetes import api_client

    def config_map(name: str, key: str, value: str) -> dict[str, Any]:
        meta = {"name": name, "namespace": "nodeagent-system"}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {key: value}}

    async def main() -> None:
        server = APIServerStandIn()
        await server.start()
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        mirror = ConfigMapMirror("nodeagent-system", tmp_path / "run", kubeconfig)
        api = await api_client(kubeconfig)
        core = client.CoreV1Api(api)
        try:
            server.add(config_map("nodeagent-mesh", "mesh.yaml", "trustDomain: example.org\n"))
            await mirror.once(core)
            assert mirror.path("mesh.yaml").read_text() == "trustDomain: example.org\n"
            assert not mirror.path("root-cert.pem").exists()  # not published yet
            server.add(config_map("nodeagent-ca-root", "root-cert.pem", "PEM1"))
            await mirror.once(core)
            assert mirror.path("root-cert.pem").read_text() == "PEM1"
            server.modify(config_map("nodeagent-ca-root", "root-cert.pem", "PEM2"))
            await mirror.once(core)
            assert mirror.path("root-cert.pem").read_text() == "PEM2"
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())


SECRET_YAML = """
apiVersion: v1
kind: Secret
metadata: {name: shop-cert, namespace: istio-system}
type: kubernetes.io/tls
stringData: {tls.crt: CERT, tls.key: KEY}
"""


def test_the_gateway_snapshot_holds_its_listeners_the_mesh_clusters_and_its_secrets(
    tmp_path: Path,
) -> None:
    """What `nodeagent gateway` hands its Envoy (a consistent snapshot): the Gateways' listeners
    and routes, the sidecar form's clusters and endpoints, its own certificate and the root,
    the credentialName Secret of its namespace; none of a sidecar's capture listeners."""
    from prometheus_client import CollectorRegistry

    from nodeagent.gateway.proxy import GatewayProxy, GatewaySettings
    from nodeagent.identity.ca import PluginCA, plugin_cacerts
    from nodeagent.identity.issuer import LocalIssuer
    from nodeagent.identity.manager import IdentityManager
    from nodeagent.translate.envoy import ENDPOINT, LISTENER, ROUTE, SECRET

    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    for name, content in plugin_cacerts("cluster.local").items():
        (cacerts / name).write_bytes(content)
    identities = IdentityManager(LocalIssuer(PluginCA.load(cacerts), "test CA"), "cluster.local")
    settings = GatewaySettings(
        namespace="istio-system",
        pod_name="ingress",
        labels=INGRESS,
        service_account="istio-ingressgateway",
        run_dir=tmp_path / "run",
        envoy_binary=tmp_path / "envoy",
        envoy_log=tmp_path / "envoy.log",
    )
    store = _store(CLUSTER_YAML, GATEWAYS_YAML, SECRET_YAML)
    proxy = GatewayProxy(settings, store, identities, CollectorRegistry())

    async def issue() -> None:
        proxy.push()  # names the identity: issued by the renewal loop, not the push
        await identities.renew_due()

    asyncio.run(issue())
    proxy.push()
    assert proxy.last_error == ""
    snapshot = proxy.cache.get(settings.node_id)
    assert snapshot is not None
    assert sorted(snapshot.of(LISTENER)) == ["0.0.0.0_8080", "0.0.0.0_8443"]
    assert sorted(snapshot.of(ROUTE)) == ["http.8080", "https.8443.https.shop-gateway.shop"]
    assert "outbound|9090||web-api.shop.svc.cluster.local" in snapshot.of(CLUSTER)
    assert "outbound|9090||web-api.shop.svc.cluster.local" in snapshot.of(ENDPOINT)
    secrets = set(snapshot.of(SECRET))
    assert {ME, "ROOTCA", "kubernetes://istio-system/shop-cert"} <= secrets


def test_mutual_server_requires_a_client_certificate_from_the_credentials_ca() -> None:
    text = GATEWAYS_YAML.replace(
        "tls: {mode: SIMPLE, credentialName: shop-cert}",
        "tls: {mode: MUTUAL, credentialName: shop-cert, subjectAltNames: [client.example]}",
    )
    config = _build(_store(CLUSTER_YAML, text))
    https = _json(next(li for li in config.listeners if li.name == "0.0.0.0_8443"))
    tls = https["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    validation = tls["common_tls_context"]["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == (
        "kubernetes://istio-system/shop-cert-cacert"
    )
    sans = validation["default_validation_context"]["match_typed_subject_alt_names"]
    assert {(s["san_type"], s["matcher"]["exact"]) for s in sans} == {
        ("DNS", "client.example"),
        ("URI", "client.example"),
    }


ENTRY_YAML = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.external.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: %s
"""


def test_a_gateway_reaches_service_entry_hosts_but_not_resolution_none() -> None:
    """The egress gateway's upstream side: a ServiceEntry host's cluster (DNS: Envoy resolves
    it); resolution NONE needs an original destination a gateway's caller never gave."""
    pod = Pod("istio-system", "egress", service_account="istio-egressgateway")
    dns = _store(ENTRY_YAML % "DNS")
    made = TranslationCache().build(dns, [LocalPod(pod, "")], [], ("kube-system",), gateway=True)
    cluster = _json(made.resources[CLUSTER]["outbound|80||api.external.test"])
    assert cluster["type"] == "STRICT_DNS" and "transport_socket" not in cluster  # no mTLS
    none = _store(ENTRY_YAML % "NONE")
    made = TranslationCache().build(none, [LocalPod(pod, "")], [], ("kube-system",), gateway=True)
    assert "outbound|80||api.external.test" not in made.resources[CLUSTER]
    assert any("resolution NONE" in why for why in made.problems.values())
    # The sidecar model's sidecars are not gateways: no ServiceEntry there yet.
    made = TranslationCache().build(dns, [LocalPod(pod, "")], [], ("kube-system",), True)
    assert "outbound|80||api.external.test" not in made.resources[CLUSTER]


def test_on_kubernetes_a_gateway_watches_only_its_servers_secrets_in_its_namespace(
    tmp_path: Path,
) -> None:
    """`nodeagent gateway --in-cluster`'s source: the Secrets its Gateways' TLS servers name,
    one watch each in the gateway's namespace (what its Role allows); a rotation arrives, and
    no other Secret (another namespace's of that name, another name) is ever listed or kept."""
    from apiserver_standin import APIServerStandIn

    from nodeagent.sources.kubernetes import KubernetesSource

    def secret(name: str, namespace: str, cert: bytes) -> dict[str, Any]:
        meta = {"name": name, "namespace": namespace}
        data = {"tls.crt": base64.b64encode(cert).decode(), "tls.key": "S0VZ"}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}

    gateway_docs = list(yaml.safe_load_all(GATEWAYS_YAML))

    async def until(check: Any) -> None:
        async with asyncio.timeout(10):
            while not check():
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        server = APIServerStandIn()
        await server.start()
        for obj in (
            *gateway_docs,
            secret("shop-cert", "istio-system", b"C1"),
            secret("shop-cert", "shop", b"OTHER"),
            secret("unnamed", "istio-system", b"X"),
        ):
            server.add(obj)
        store = MeshStore("n1")
        workload = _workload()
        source = KubernetesSource(
            store,
            "n1",
            kubeconfig=server.write_kubeconfig(tmp_path / "kc"),
            wanted_credentials=lambda s: gateway.credentials_named(s, workload),
            secret_reviews=False,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        try:
            await until(lambda: "istio-system/shop-cert" in store.credentials)
            assert store.credentials["istio-system/shop-cert"].cert == b"C1"
            server.modify(secret("shop-cert", "istio-system", b"C2"))
            await until(lambda: store.credentials["istio-system/shop-cert"].cert == b"C2")
            assert set(store.credentials) == {"istio-system/shop-cert"}
            lists = {r for r in server.requests if r.startswith("LIST") and "secrets" in r}
            assert lists == {"LIST /api/v1/namespaces/istio-system/secrets"}
            assert not any("subjectaccessreviews" in r for r in server.requests)
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await task
            await server.stop()

    asyncio.run(scenario())
