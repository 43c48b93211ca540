"""DestinationRule ``tls`` SIMPLE / MUTUAL: the TLS the node Envoy originates to apps that
terminate TLS themselves.

Field by field as istio.io/latest/docs/reference/config/networking/destination-rule/
#ClientTLSSettings documents them and istio/istio pilot/pkg/networking/core/cluster_tls.go
(buildUpstreamClusterTLSContext, constructUpstreamTLS, setAutoSniAndAutoSanValidation) builds
them; then on the node: one ``originate-tls`` cluster holding one socket per distinct setting,
the service's clusters naming theirs, and Envoy itself accepting the result."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from nodeagent.identity.tls_files import FileSecrets
from nodeagent.mesh.model import IstioResource, Pod
from nodeagent.mesh.store import MeshStore
from nodeagent.translate import LocalPod, TranslationCache, client_tls, internal, translate
from nodeagent.translate import envoy as e
from nodeagent.translate.destination_rule import check
from tests.tls_certs import write_app_pki
from tests.unit.envoy_validate import assert_envoy_accepts_resources
from tests.unit.test_translate import HOST, as_json, local, store

TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def setting(host: str = HOST, http2: bool = False, **tls: Any) -> dict[str, Any]:
    made = client_tls.resolved(tls, host, http2, "trafficPolicy.tls")
    assert made is not None
    return made


def context(**tls: Any) -> dict[str, Any]:
    """The parsed UpstreamTlsContext the node builds for TLS."""
    socket = client_tls.transport_socket(setting(**tls))
    parsed = json_format.MessageToDict(
        e.message(e.Cluster, {"name": "c", "transport_socket": socket}),
        preserving_proto_field_name=True,
    )
    typed: dict[str, Any] = parsed["transport_socket"]["typed_config"]
    assert typed.pop("@type") == TLS_CONTEXT
    return typed


def test_only_simple_and_mutual_are_originated_here() -> None:
    """DISABLE (also a tls block without a mode: the proto's zero value) and ISTIO_MUTUAL stay
    with the originate path (auto mTLS, per caller)."""
    for tls in (None, {}, {"mode": "DISABLE"}, {"mode": "ISTIO_MUTUAL"}):
        assert client_tls.origination(tls, HOST, False, "tls") is None


def sds_names(ctx: dict[str, Any]) -> tuple[list[str], str]:
    """The SDS names of a context: (client certificates, validation context or "")."""
    common = ctx["common_tls_context"]
    certs = [c["name"] for c in common.get("tls_certificate_sds_secret_configs", [])]
    combined = common.get("combined_validation_context", {})
    return certs, combined.get("validation_context_sds_secret_config", {}).get("name", "")


def test_simple_verifies_the_server_against_ca_certificates_and_subject_alt_names() -> None:
    """caCertificates: the CA file, served over SDS as istio-agent does (``file-root:<path>``);
    subjectAltNames: any SAN of the server certificate must equal one of them (Istio's
    StringToExactMatch: every SAN type)."""
    ctx = context(mode="SIMPLE", caCertificates="/etc/app/ca.pem", subjectAltNames=["a.example"])
    assert sds_names(ctx) == ([], "file-root:/etc/app/ca.pem")  # SIMPLE: no client certificate
    combined = ctx["common_tls_context"]["combined_validation_context"]
    matchers = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert {m["matcher"]["exact"] for m in matchers} == {"a.example"}
    assert {m["san_type"] for m in matchers} == {"DNS", "URI", "IP_ADDRESS", "EMAIL"}
    # Envoy is never given a path (it would read it once, and refuse the cluster without it).
    assert "filename" not in json.dumps(ctx)


def test_without_ca_certificates_the_os_roots_verify() -> None:
    """caCertificates unset: Istio verifies with the OS CA certificates ("system")."""
    ctx = context(mode="SIMPLE", sni="x.example")
    assert sds_names(ctx) == ([], f"file-root:{client_tls.SYSTEM_CA}")


def test_sni_defaults_to_the_host_with_auto_san_validation() -> None:
    """sni unset: Istio's auto_sni (the request's host) and, with no subjectAltNames either,
    auto_san_validation: the node uses the service's hostname for both."""
    made = client_tls.origination({"mode": "SIMPLE"}, HOST, False, "tls")
    assert made is not None and made.sni == HOST
    assert made.setting["sans"] == [HOST]
    # An explicit sni is sent as is, and no SAN is then required (Istio sets neither auto_*).
    given = client_tls.origination({"mode": "SIMPLE", "sni": "x.example"}, HOST, False, "tls")
    assert given is not None and given.sni == "x.example" and given.setting["sans"] == []


def test_insecure_skip_verify_checks_nothing() -> None:
    """insecureSkipVerify: no validation at all (also no auto SAN validation), no CA read."""
    ctx = context(mode="SIMPLE", insecureSkipVerify=True, caCertificates="/ca.pem")
    assert "combined_validation_context" not in ctx["common_tls_context"]
    assert client_tls.file_secrets(setting(mode="SIMPLE", insecureSkipVerify=True)) == set()


def test_ca_crl_is_checked() -> None:
    """caCrl travels with its CA in one validation context secret."""
    ctx = context(mode="SIMPLE", caCertificates="/ca.pem", caCrl="/crl.pem")
    assert sds_names(ctx) == ([], "file-root:/ca.pem~/crl.pem")


def test_mutual_presents_the_client_certificate() -> None:
    """Istio's ``file-cert:<cert>~<key>`` (pkg/security SdsCertificateConfig)."""
    ctx = context(mode="MUTUAL", clientCertificate="/c.pem", privateKey="/k.pem", sni="x")
    assert sds_names(ctx) == (["file-cert:/c.pem~/k.pem"], f"file-root:{client_tls.SYSTEM_CA}")
    assert "tls_certificates" not in ctx["common_tls_context"]


def test_mutual_without_a_client_certificate_is_an_error_naming_the_field() -> None:
    """Istio: "client certificate and private key must not be empty" (no credentialName)."""
    with pytest.raises(ValueError, match=r"subsets\[0\]\.trafficPolicy\.tls: mode MUTUAL needs"):
        check(
            {
                "host": "web",
                "subsets": [
                    {
                        "name": "v1",
                        "trafficPolicy": {"tls": {"mode": "MUTUAL", "privateKey": "/k.pem"}},
                    }
                ],
            }
        )


def test_http2_ports_offer_h2() -> None:
    """Istio advertises ALPN h2 on HTTP/2 clusters (constructUpstreamTLS)."""
    assert setting(http2=True, mode="SIMPLE")["alpn"] == ["h2"]
    assert setting(mode="SIMPLE")["alpn"] == []


def test_credential_name_without_workload_selector_originates_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Istio builds no TLS context at a sidecar for a credentialName in a rule without a
    workloadSelector: the node sends plaintext, and says why."""
    with caplog.at_level(logging.WARNING):
        made = client_tls.origination(
            {"mode": "SIMPLE", "credentialName": "app-ca"}, HOST, False, "trafficPolicy.tls"
        )
    assert made is not None and made.socket is None
    assert "workloadSelector" in caplog.text


def test_sockets_are_named_by_their_setting() -> None:
    """Same setting, same socket (whatever the host, once sni is explicit); any change, another."""
    a = setting("a.svc", mode="SIMPLE", sni="x", caCertificates="/ca.pem")
    b = setting("b.svc", mode="SIMPLE", sni="x", caCertificates="/ca.pem")
    c = setting("a.svc", mode="SIMPLE", sni="x", caCertificates="/other.pem")
    assert client_tls.socket_name(a) == client_tls.socket_name(b) != client_tls.socket_name(c)
    assert client_tls.socket_name(a).startswith(client_tls.SOCKET_PREFIX)


# -- on the node ----------------------------------------------------------------------------------


def rule(namespace: str, spec: dict[str, Any]) -> IstioResource:
    return IstioResource(
        "networking.istio.io", "v1", "DestinationRule", namespace, "web", spec, {}, {}
    )


def meta(out: dict[str, Any], cluster: str) -> dict[str, Any]:
    found: dict[str, Any] = as_json(out[e.CLUSTER][cluster])["metadata"]["filterMetadata"]
    return dict(found["nodeagent.service"])


def test_a_rules_clusters_reach_their_endpoints_through_originate_tls(tmp_path: Path) -> None:
    """The rule's setting applies per subset (a subset's tls replaces the rule's): each cluster
    names its socket and SNI; its endpoints are originate-tls's (never the same-node fast
    path, which would skip the app's TLS). One socket per setting, whatever the callers."""
    ca = str(write_app_pki(tmp_path, "client.example"))
    cert, key = str(tmp_path / "client.example.pem"), str(tmp_path / "client.example.key")
    s = store()
    spec = {
        "host": HOST,
        "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": "web.example", "caCertificates": ca}},
        "subsets": [
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {
                    "tls": {"mode": "MUTUAL", "sni": "v2.example", "caCertificates": ca}
                    | {"clientCertificate": cert, "privateKey": key}
                },
            }
        ],
    }
    s.put_istio(rule("shop", spec))
    caller = LocalPod(Pod("front", "f", service_account="f"), "/run/netns/f")
    out = translate(s, [local("a"), local("b", sa="other"), caller])
    port = meta(out, f"outbound|80||{HOST}")
    v2 = meta(out, f"outbound|80|v2|{HOST}")
    assert (port["tls_sni"], v2["tls_sni"]) == ("web.example", "v2.example")
    assert port["tls_socket"] != v2["tls_socket"]
    originate = as_json(out[e.CLUSTER][internal.ORIGINATE_TLS])
    names = [m["name"] for m in originate["transportSocketMatches"]]
    assert names.count(port["tls_socket"]) == names.count(v2["tls_socket"]) == 1
    tree = originate["transportSocketMatcher"]["matcherTree"]
    assert tree["input"]["typedConfig"]["key"] == internal.TLS_SOCKET_KEY
    cla = as_json(out[e.ENDPOINT][f"outbound|80||{HOST}"])
    listeners = {
        lb["endpoint"]["address"]["envoyInternalAddress"]["serverListenerName"]
        for lb in cla["endpoints"][0]["lbEndpoints"]
    }
    assert listeners == {internal.ORIGINATE_TLS}
    # Envoy itself accepts the cluster with these sockets, and the listener.
    _validate(tmp_path, out, s)


def test_a_rule_in_the_callers_namespace_binds_its_callers_only() -> None:
    """Istio looks a rule up in the caller's namespace first: front's rule makes front's own
    copy of the cluster originate TLS; shop's callers keep the plain one (auto mTLS)."""
    s = store()
    s.put_istio(rule("front", {"host": HOST, "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}))
    caller = LocalPod(Pod("front", "f", service_account="f"), "/run/netns/f")
    out = translate(s, [local("a"), caller])
    assert "tls_socket" not in meta(out, f"outbound|80||{HOST}")
    assert meta(out, f"outbound|80||{HOST}~front/web")["tls_sni"] == HOST


def test_a_rules_socket_does_not_depend_on_its_files(tmp_path: Path) -> None:
    """The files come over SDS (identity/tls_files.py): translation reads no file, so a missing
    one gives the same cluster and socket as a present one (its secret is then a placeholder
    that fails only its calls), and a file appearing later changes no cluster."""
    tls = {"mode": "SIMPLE", "sni": "x", "caCertificates": str(tmp_path / "ca.pem")}
    outs = []
    for _ in range(2):
        s = store()
        s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": tls}}))
        outs.append(translate(s, [local("a")]))
        write_app_pki(tmp_path)  # ca.pem exists from the second translation on
    for name in (f"outbound|80||{HOST}", internal.ORIGINATE_TLS):
        assert as_json(outs[0][e.CLUSTER][name]) == as_json(outs[1][e.CLUSTER][name])
    socket = meta(outs[0], f"outbound|80||{HOST}")["tls_socket"]
    assert socket.startswith(client_tls.SOCKET_PREFIX)


def _socket_names(out: dict[str, Any]) -> set[str]:
    originate = as_json(out[e.CLUSTER][internal.ORIGINATE_TLS])
    return {m["name"] for m in originate["transportSocketMatches"]} - {
        internal.PLAINTEXT,
        internal.NO_IDENTITY,
    }


def test_a_changed_setting_keeps_the_old_socket_until_envoy_holds_the_new_clusters() -> None:
    """Make before break: the rule's setting changes, so the service cluster names another
    socket. Envoy keeps the old cluster (naming the old socket) until the new one has warmed,
    while originate-tls needs no warming: originate-tls holds both sockets until Envoy ACKed
    clusters that no longer name the old one; then the next build drops it."""
    s = store()
    first = {"mode": "SIMPLE", "sni": "a.example", "insecureSkipVerify": True}
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": first}}))
    cache = TranslationCache()
    before = cache.build(s, [local("a")])
    old = meta(before.resources, f"outbound|80||{HOST}")["tls_socket"]
    assert before.tls_sockets == {old} == _socket_names(before.resources)
    second = {"mode": "SIMPLE", "sni": "b.example", "insecureSkipVerify": False}
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": second}}))
    after = cache.build(s, [local("a")])
    new = meta(after.resources, f"outbound|80||{HOST}")["tls_socket"]
    assert new != old and after.tls_sockets == {new}
    assert _socket_names(after.resources) == {old, new}
    # Envoy ACKed the clusters of the build before: they still name the old socket.
    assert not cache.release_sockets(before.tls_sockets)
    assert _socket_names(cache.build(s, [local("a")]).resources) == {old, new}
    # ... then those of the new build: the old socket goes, the new one stays.
    assert cache.release_sockets(after.tls_sockets)
    assert _socket_names(cache.build(s, [local("a")]).resources) == {new}
    assert not cache.release_sockets(after.tls_sockets)


def _validate(tmp_path: Path, out: dict[str, Any], s: MeshStore) -> None:
    """originate-tls (cluster and listener) in a static bootstrap that Envoy validates, with
    the file secrets its sockets name (read by the agent) as static secrets."""
    assert_envoy_accepts_resources(
        tmp_path,
        clusters=[out[e.CLUSTER][internal.ORIGINATE_TLS]],
        listeners=[out[e.LISTENER][internal.ORIGINATE_TLS]],
        secrets=FileSecrets().sds_secrets(s),
    )


def test_the_sidecar_form_sets_the_socket_on_its_own_cluster() -> None:
    """The sidecar model (bench's baseline) originates the same TLS from the pod's own Envoy:
    the socket on the service's cluster, with the rule's SNI, as Istio's sidecar has it."""
    s = store()
    tls = {"mode": "SIMPLE", "sni": "web.example", "insecureSkipVerify": True}
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": tls}}))
    out = translate(s, [local("a")], sidecar=True)
    socket = as_json(out[e.CLUSTER][f"outbound|80||{HOST}"])["transportSocket"]
    assert socket["typedConfig"]["@type"] == TLS_CONTEXT
    assert socket["typedConfig"]["sni"] == "web.example"
    assert "validationContext" not in socket["typedConfig"]["commonTlsContext"]


def test_port_level_settings_choose_per_port() -> None:
    """A portLevelSettings entry's tls applies to its port only (the reference page: port-level
    settings override the rule's for that port); the other port keeps auto mTLS."""
    s = store()
    level = {"port": {"number": 5432}, "tls": {"mode": "SIMPLE", "insecureSkipVerify": True}}
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"portLevelSettings": [level]}}))
    out = translate(s, [local("a")])
    assert "tls_socket" in meta(out, f"outbound|5432||{HOST}")
    assert "tls_socket" not in meta(out, f"outbound|80||{HOST}")
