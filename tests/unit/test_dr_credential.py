"""DestinationRule ``tls.credentialName``: the Secret it names, read by both sources (only its
TLS material, only when a node's selector rule names it), served over SDS, and named (never
inlined) by the TLS socket the node Envoy originates with.

Istio's rules: istio.io/latest/docs/reference/config/networking/destination-rule/
#ClientTLSSettings (credentialName: "applicable only on sidecars if the DestinationRule has a
workloadSelector"); istio/istio pilot/pkg/credentials/kube/secrets.go (the keys of a generic and
of a kubernetes.io/tls Secret, the ``<name>-cacert`` companion); pilot/pkg/security/model
ApplyCustomSDSToClientCommonTLSContext (what the socket asks SDS for)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver_standin import APIServerStandIn
from google.protobuf import json_format

from nodeagent.identity.credentials import CredentialSecrets
from nodeagent.mesh import credentials
from nodeagent.mesh.model import Credential, IstioResource, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.sources.directory import DirectorySource
from nodeagent.sources.kubernetes import KubernetesSource
from nodeagent.translate import TranslationCache, client_tls, internal
from nodeagent.translate import envoy as e
from nodeagent.xds import types
from tests.tls_certs import write_app_pki
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_proxy_contained import make_proxy, mesh_store, resources
from tests.unit.test_translate import HOST, local, store

NODE = "node1"
WAIT = 5.0
TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret(name: str, namespace: str = "shop", **data: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": namespace, "name": name},
        "data": {k.replace("_", "."): _b64(v) for k, v in data.items()},
    }


def _rule(
    tls: dict[str, Any], selector: dict[str, str] | None = None, namespace: str = "shop"
) -> IstioResource:
    spec: dict[str, Any] = {"host": HOST, "trafficPolicy": {"tls": tls}}
    if selector is not None:
        spec["workloadSelector"] = {"matchLabels": selector}
    return IstioResource("networking.istio.io", "v1", "DestinationRule", namespace, "web", spec)


# -- the Secret -----------------------------------------------------------------------------------


def test_a_generic_secret_gives_cert_key_and_cacert() -> None:
    doc = _secret("client", cert=b"C", key=b"K", cacert=b"CA", crl=b"R")
    doc["data"]["password"] = _b64(b"not TLS")
    assert credentials.parse_secret(doc) == Credential("shop", "client", b"C", b"K", b"CA", b"R")


def test_a_kubernetes_tls_secret_gives_tls_crt_tls_key_and_ca_crt() -> None:
    doc = _secret("client", tls_crt=b"C", tls_key=b"K", ca_crt=b"CA", ca_crl=b"R")
    assert credentials.parse_secret(doc) == Credential("shop", "client", b"C", b"K", b"CA", b"R")


def test_string_data_counts_and_a_secret_without_tls_material_is_none() -> None:
    doc = {"metadata": {"name": "ca"}, "stringData": {"ca.crt": "CA"}}
    assert credentials.parse_secret(doc) == Credential("default", "ca", cacert=b"CA")
    assert credentials.parse_secret(_secret("db", password=b"hunter2")) is None
    # A certificate without its key is no client certificate (secrets.go requires both).
    assert credentials.parse_secret(_secret("half", cert=b"C")) is None


def test_the_key_is_never_in_a_records_repr() -> None:
    assert "SECRET-KEY" not in repr(Credential("shop", "c", b"C", b"SECRET-KEY"))


def test_the_directory_source_keeps_only_tls_material_and_names_bad_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    docs = [
        _secret("client", cert=b"C", key=b"K", ca_crt=b"CA", token=b"other"),
        _secret("db", password=b"hunter2"),
        {**_secret("broken"), "data": {"tls.crt": "%%%"}},
    ]
    (tmp_path / "secrets.yaml").write_text(yaml.safe_dump_all(docs))
    s = MeshStore()
    with caplog.at_level(logging.ERROR):
        DirectorySource(tmp_path, s).scan()
    assert s.credentials == {"shop/client": Credential("shop", "client", b"C", b"K", b"CA")}
    assert "Secret shop/broken" in caplog.text and "data.tls.crt: not base64" in caplog.text


# -- which Secrets a node needs -------------------------------------------------------------------


def test_only_selector_rules_selecting_a_pod_of_the_node_name_secrets() -> None:
    s = MeshStore()
    mutual = {"mode": "MUTUAL", "credentialName": "client"}
    s.put_istio(_rule(mutual, {"app": "front"}))
    pods = [Pod("shop", "f", labels={"app": "front"})]
    assert credentials.referenced(s, pods) == {("shop", "client")}
    # Another workload, or a namespace-wide rule (Istio ignores credentialName there), or a
    # pod of another namespace: nothing.
    assert credentials.referenced(s, [Pod("shop", "b", labels={"app": "back"})]) == set()
    assert credentials.referenced(s, [Pod("other", "f", labels={"app": "front"})]) == set()
    s.put_istio(_rule(mutual))
    assert credentials.referenced(s, [Pod("shop", "b", labels={"app": "back"})]) == set()
    assert credentials.with_companions({("shop", "client")}) == {
        ("shop", "client"),
        ("shop", "client-cacert"),
    }


def test_subsets_and_ports_name_secrets_too_and_istio_mutual_does_not() -> None:
    s = MeshStore()
    spec = {
        "host": HOST,
        "workloadSelector": {"matchLabels": {"app": "front"}},
        "trafficPolicy": {
            "tls": {"mode": "ISTIO_MUTUAL", "credentialName": "ignored"},
            "portLevelSettings": [
                {"port": {"number": 443}, "tls": {"mode": "SIMPLE", "credentialName": "p"}}
            ],
        },
        "subsets": [
            {
                "name": "v2",
                "labels": {"v": "2"},
                "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "sub"}},
            }
        ],
    }
    s.put_istio(IstioResource("networking.istio.io", "v1", "DestinationRule", "shop", "w", spec))
    pods = [Pod("shop", "f", labels={"app": "front", "x": "y"})]
    assert credentials.referenced(s, pods) == {("shop", "p"), ("shop", "sub")}


# -- SDS -------------------------------------------------------------------------------------------


def _by_name(secrets: list[Any]) -> dict[str, dict[str, Any]]:
    return {x.name: json_format.MessageToDict(x, preserving_proto_field_name=True) for x in secrets}


def _inline(source: dict[str, Any]) -> bytes:
    return base64.b64decode(source["inline_bytes"])


def test_sds_serves_the_certificate_and_the_ca_bundle_under_istios_names() -> None:
    s = MeshStore()
    s.put_credential(Credential("shop", "client", b"CHAIN", b"KEY", b"OWN-CA", b"CRL"))
    out = _by_name(CredentialSecrets().sds_secrets(s, {("shop", "client")}))
    assert set(out) == {"kubernetes://shop/client", "kubernetes://shop/client-cacert"}
    cert = out["kubernetes://shop/client"]["tls_certificate"]
    assert (_inline(cert["certificate_chain"]), _inline(cert["private_key"])) == (b"CHAIN", b"KEY")
    bundle = out["kubernetes://shop/client-cacert"]["validation_context"]
    assert (_inline(bundle["trusted_ca"]), _inline(bundle["crl"])) == (b"OWN-CA", b"CRL")
    # The companion Secret <name>-cacert wins over the Secret's own CA (secrets.go GetCaCert).
    s.put_credential(Credential("shop", "client-cacert", cacert=b"COMPANION-CA"))
    out = _by_name(CredentialSecrets().sds_secrets(s, {("shop", "client")}))
    bundle = out["kubernetes://shop/client-cacert"]["validation_context"]
    assert _inline(bundle["trusted_ca"]) == b"COMPANION-CA" and "crl" not in bundle


def test_a_missing_secret_is_a_placeholder_no_server_passes_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Istio's sidecar fails the handshake; here too, without holding back the shared cluster
    while Envoy waits for an SDS answer: a self-signed stand-in nothing chains to."""
    s = MeshStore()
    sds = CredentialSecrets()
    with caplog.at_level(logging.INFO, logger="nodeagent.identity"):
        first = _by_name(sds.sds_secrets(s, {("shop", "client")}))
        sds.sds_secrets(s, {("shop", "client")})
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # certificate and CA bundle, each once
    assert "shop/client" in errors[0].getMessage()
    placeholder = _inline(
        first["kubernetes://shop/client-cacert"]["validation_context"]["trusted_ca"]
    )
    assert b"BEGIN CERTIFICATE" in placeholder
    caplog.clear()
    s.put_credential(Credential("shop", "client", b"C", b"K", b"CA"))
    with caplog.at_level(logging.INFO, logger="nodeagent.identity"):
        now = _by_name(sds.sds_secrets(s, {("shop", "client")}))
    assert (
        _inline(now["kubernetes://shop/client-cacert"]["validation_context"]["trusted_ca"]) == b"CA"
    )
    assert sds.missing == set() and "no placeholder any more" in caplog.text


# -- the TLS socket --------------------------------------------------------------------------------


def _context(tls: dict[str, Any], selector: bool = True) -> dict[str, Any]:
    setting = client_tls.resolved(tls, HOST, False, "tls", selector, "shop")
    assert setting is not None
    socket = client_tls.transport_socket(setting)
    parsed = json_format.MessageToDict(
        e.message(e.Cluster, {"name": "c", "transport_socket": socket}),
        preserving_proto_field_name=True,
    )
    typed: dict[str, Any] = parsed["transport_socket"]["typed_config"]
    assert typed.pop("@type") == TLS_CONTEXT
    return typed


def test_without_a_workload_selector_a_credential_name_means_plaintext_as_in_istio() -> None:
    made = client_tls.origination(
        {"mode": "MUTUAL", "credentialName": "client"}, HOST, False, "tls"
    )
    assert made is not None and made.socket is None


def test_mutual_presents_the_secrets_certificate_and_checks_its_ca_over_sds() -> None:
    tls = {"mode": "MUTUAL", "credentialName": "client", "subjectAltNames": ["web.example"]}
    common = _context(tls)["common_tls_context"]
    sds = {"ads": {}, "resource_api_version": "V3"}
    assert common["tls_certificate_sds_secret_configs"] == [
        {"name": "kubernetes://shop/client", "sds_config": sds}
    ]
    combined = common["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"] == {
        "name": "kubernetes://shop/client-cacert",
        "sds_config": sds,
    }
    sans = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert {m["matcher"]["exact"] for m in sans} == {"web.example"}
    # Only names: no file, no inline key material.
    assert "tls_certificates" not in common and "validation_context" not in common
    assert "filename" not in json.dumps(common) and "inline" not in json.dumps(common)


def test_simple_checks_the_server_only_and_insecure_skip_verify_checks_nothing() -> None:
    common = _context({"mode": "SIMPLE", "credentialName": "client"})["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common
    sans = common["combined_validation_context"]["default_validation_context"]
    assert {m["matcher"]["exact"] for m in sans["match_typed_subject_alt_names"]} == {HOST}
    insecure = {"mode": "MUTUAL", "credentialName": "client", "insecureSkipVerify": True}
    common = _context(insecure)["common_tls_context"]
    assert "combined_validation_context" not in common
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "kubernetes://shop/client"


def test_one_socket_per_credential_and_namespace() -> None:
    def name(ns: str, credential: str) -> str:
        tls = {"mode": "SIMPLE", "credentialName": credential}
        setting = client_tls.resolved(tls, HOST, False, "tls", True, ns)
        assert setting is not None
        return client_tls.socket_name(setting)

    assert name("shop", "a") == name("shop", "a")
    assert len({name("shop", "a"), name("shop", "b"), name("other", "a")}) == 3


def test_envoy_accepts_the_socket_and_the_sds_secrets(tmp_path: Path) -> None:
    """The socket in a cluster, and the SDS secrets it names (a real certificate, and a
    missing Secret's placeholders) as the bootstrap's secrets: Envoy's own verdict on both."""
    pki = tmp_path / "pki"
    write_app_pki(pki, "client.example")
    s = MeshStore()
    s.put_credential(
        Credential(
            "shop",
            "client",
            (pki / "client.example.pem").read_bytes(),
            (pki / "client.example.key").read_bytes(),
            (pki / "ca.pem").read_bytes(),
        )
    )
    secrets = CredentialSecrets().sds_secrets(s, {("shop", "client"), ("shop", "absent")})
    clusters = []
    for credential in ("client", "absent"):
        tls = {"mode": "MUTUAL", "credentialName": credential, "subjectAltNames": ["a.example"]}
        setting = client_tls.resolved(tls, HOST, True, "tls", True, "shop")
        assert setting is not None
        cluster = {
            "name": credential,
            "type": "STATIC",
            "connect_timeout": "1s",
            "transport_socket": client_tls.transport_socket(setting, "web.example"),
        }
        clusters.append(e.message(e.Cluster, cluster))
    assert_envoy_accepts_resources(tmp_path, clusters=clusters, secrets=secrets)


def test_a_secret_change_retranslates_no_cluster() -> None:
    """The socket names SDS secrets only: a rotation is a new SDS resource, nothing else."""
    s = store()
    s.put_istio(_rule({"mode": "MUTUAL", "credentialName": "client"}, {"app": "a"}))
    s.put_credential(Credential("shop", "client", b"C1", b"K1", b"CA"))
    pods = [local("a", {"app": "a"})]
    sds = CredentialSecrets()
    cache = TranslationCache()
    wanted = credentials.referenced(s, [p.pod for p in pods])
    before = cache.build(s, pods, sds.sds_secrets(s, wanted)).resources
    s.put_credential(Credential("shop", "client", b"C2", b"K2", b"CA"))
    after = cache.build(s, pods, sds.sds_secrets(s, wanted)).resources
    for type_url in (e.CLUSTER, e.LISTENER, e.ROUTE, e.ENDPOINT):
        assert all(after[type_url][n] is m for n, m in before[type_url].items())
        assert after[type_url].keys() == before[type_url].keys()
    chain = _by_name(list(after[e.SECRET].values()))["kubernetes://shop/client"]
    assert _inline(chain["tls_certificate"]["certificate_chain"]) == b"C2"
    assert cache.full_recomputes == 1


# -- the Kubernetes source -------------------------------------------------------------------------


def _dr(selector: dict[str, str], credential: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"namespace": "shop", "name": "web"},
        "spec": {
            "host": HOST,
            "workloadSelector": {"matchLabels": selector},
            "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": credential}},
        },
    }


def _pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": "default"},
        "status": {"podIP": "10.244.1.7"},
    }


async def _until(check: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def test_the_kubernetes_source_watches_only_the_named_secrets(tmp_path: Path) -> None:
    """One watch per Secret a selector rule of a pod on this node names (field selector
    metadata.name, in the rule's namespace); a rotation arrives; the rule gone, the record goes."""

    async def scenario() -> None:
        server = APIServerStandIn()
        await server.start()
        for obj in (
            _pod("front", NODE),
            _pod("elsewhere", "node2"),
            _dr({"app": "front"}, "client"),
            _secret("client", cert=b"C1", key=b"K1", ca_crt=b"CA"),
            _secret("client-cacert", cacert=b"COMPANION"),
            _secret("unnamed", cert=b"X", key=b"Y"),
            _secret("client", namespace="other", cert=b"X", key=b"Y"),
        ):
            server.add(obj)
        s = MeshStore(node_name=NODE)
        source = KubernetesSource(s, NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kc"))
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        try:
            await _until(lambda: len(s.credentials) == 2, "named Secrets read")
            assert set(s.credentials) == {"shop/client", "shop/client-cacert"}
            # Namespaced, and (shop/unnamed absent) by name: never the cluster's Secrets.
            lists = [r for r in server.requests if r.startswith("LIST") and "secrets" in r]
            assert set(lists) == {"LIST /api/v1/namespaces/shop/secrets"}, lists
            server.modify(_secret("client", cert=b"C2", key=b"K2", ca_crt=b"CA"))
            await _until(lambda: s.credentials["shop/client"].cert == b"C2", "rotation seen")
            # The rule now selects a pod of another node only: nothing of it is kept.
            server.modify(_dr({"app": "elsewhere"}, "client"))
            await _until(lambda: not s.credentials, "Secrets forgotten")
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await task
            await server.stop()

    asyncio.run(scenario())


# -- the node proxy ------------------------------------------------------------------------------


def test_the_node_serves_a_credential_while_a_rule_of_a_captured_pod_names_it(
    tmp_path: Path,
) -> None:
    """What the agent pushes: the two SDS secrets appear with the selector rule and the Secret,
    follow a rotation, and leave with the rule (nothing else of the snapshot moves with them)."""
    s = mesh_store()  # pod shop/web-1, labels app=web
    proxy, _ = make_proxy(tmp_path, s, "web-1")
    proxy.push()
    assert not [n for n in resources(proxy, types.SECRET) if n.startswith("kubernetes://")]
    s.put_credential(Credential("shop", "client", b"C1", b"K1", b"CA"))
    s.put_istio(_rule({"mode": "MUTUAL", "credentialName": "client"}, {"app": "web"}))
    proxy.push()
    served = resources(proxy, types.SECRET)
    assert {"kubernetes://shop/client", "kubernetes://shop/client-cacert"} <= served.keys()
    clusters = resources(proxy, types.CLUSTER)
    s.put_credential(Credential("shop", "client", b"C2", b"K2", b"CA"))
    proxy.push()
    rotated = _by_name([resources(proxy, types.SECRET)["kubernetes://shop/client"]])
    chain = rotated["kubernetes://shop/client"]["tls_certificate"]["certificate_chain"]
    assert _inline(chain) == b"C2"
    assert resources(proxy, types.CLUSTER) == clusters
    s.delete_istio("DestinationRule/shop/web")
    proxy.push()
    assert not [n for n in resources(proxy, types.SECRET) if n.startswith("kubernetes://")]


def test_a_selector_rules_credential_is_the_selected_pods_socket_over_sds() -> None:
    """A rule with a workloadSelector is where a sidecar reads tls.credentialName
    (istio.io/latest/docs/reference/config/networking/destination-rule/#ClientTLSSettings):
    the node's originate-tls cluster then holds a socket that names the Secret's SDS resources,
    and the selected pod's cluster sends its connections there. A rule without a selector, for
    the same host, originates nothing (plaintext, as Istio)."""
    s = store()
    s.put_istio(_rule({"mode": "MUTUAL", "credentialName": "client"}, {"app": "a"}))
    s.put_credential(Credential("shop", "client", b"C1", b"K1", b"CA"))
    pods = [local("a", {"app": "a"}), local("b", {"app": "b"})]
    wanted = credentials.referenced(s, [p.pod for p in pods])
    resources = TranslationCache().build(s, pods, CredentialSecrets().sds_secrets(s, wanted))
    clusters = resources.resources[e.CLUSTER]
    originate = json_format.MessageToDict(
        clusters[internal.ORIGINATE_TLS], preserving_proto_field_name=True
    )
    contexts = [
        m["transport_socket"]["typed_config"]
        for m in originate["transport_socket_matches"]
        if m["name"].startswith(client_tls.SOCKET_PREFIX)
    ]
    assert len(contexts) == 1
    common = contexts[0]["common_tls_context"]
    assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == [
        "kubernetes://shop/client"
    ]
    validation = common["combined_validation_context"]["validation_context_sds_secret_config"]
    assert validation["name"] == "kubernetes://shop/client-cacert"
    assert "tls_certificates" not in common  # named, never inlined
