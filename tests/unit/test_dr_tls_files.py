"""DestinationRule tls files (caCertificates, caCrl, clientCertificate, privateKey) served over
SDS and watched, as istio-agent serves a sidecar's (``file-cert:<cert>~<key>``,
``file-root:<ca>``: istio/istio pkg/security/security.go SdsCertificateConfig; the file watch in
security/pkg/nodeagent/cache/secretcache.go): a rotated file is a new SDS secret, and no
cluster changes; a missing or broken file is logged naming the rule and the path, and until
it is valid the last valid secret stays served, or, if it never was valid, a placeholder no
server passes."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format

from nodeagent.identity.tls_files import FileSecrets
from nodeagent.mesh import tls_files
from nodeagent.mesh.model import Pod
from nodeagent.translate import TranslationCache, client_tls
from nodeagent.translate import envoy as e
from tests.tls_certs import write_app_pki
from tests.unit.test_client_tls import rule
from tests.unit.test_translate import HOST, local, store

CLIENT = "client.example"


def _secrets(files: FileSecrets, s: Any) -> dict[str, dict[str, Any]]:
    return {
        x.name: json_format.MessageToDict(x, preserving_proto_field_name=True)
        for x in files.sds_secrets(s)
    }


def _inline(source: dict[str, Any]) -> bytes:
    return base64.b64decode(source["inline_bytes"])


def _mutual(pki: Path, **extra: Any) -> dict[str, Any]:
    return {
        "mode": "MUTUAL",
        "sni": "web.example",
        "caCertificates": str(pki / "ca.pem"),
        "clientCertificate": str(pki / f"{CLIENT}.pem"),
        "privateKey": str(pki / f"{CLIENT}.key"),
    } | extra


def _names(pki: Path, crl: str = "") -> tuple[str, str]:
    cert = tls_files.certificate_name(str(pki / f"{CLIENT}.pem"), str(pki / f"{CLIENT}.key"))
    return cert, tls_files.root_name(str(pki / "ca.pem"), crl)


def _replace(path: Path, content: bytes) -> None:
    """Write PATH atomically, as cert-manager's Secret volume (a new inode)."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(content)
    os.replace(new, path)


@pytest.mark.parametrize(
    "tls",
    [
        {"mode": "SIMPLE"},
        {"mode": "SIMPLE", "caCertificates": "/ca.pem", "caCrl": "/crl.pem"},
        {"mode": "SIMPLE", "insecureSkipVerify": True, "caCertificates": "/ca.pem"},
        {"mode": "SIMPLE", "insecureSkipVerify": {"value": True}},
        {"mode": "MUTUAL", "clientCertificate": "/c.pem", "privateKey": "/k.pem"},
        {"mode": "MUTUAL", "clientCertificate": "/c.pem", "privateKey": "/k.pem", "sni": "x"}
        | {"insecureSkipVerify": True},
        {"mode": "SIMPLE", "clientCertificate": "/c.pem", "privateKey": "/k.pem"},
    ],
)
def test_the_node_serves_exactly_the_secrets_the_sockets_name(tls: dict[str, Any]) -> None:
    """What the agent reads for a rule (mesh/tls_files.py) is what its socket asks SDS for
    (translate/client_tls.py), Istio's defaults included (the OS bundle without
    caCertificates; no CA with insecureSkipVerify; a client certificate only in MUTUAL)."""
    setting = client_tls.resolved(tls, HOST, False, "tls")
    assert setting is not None
    assert set(tls_files.secrets_of_tls(tls)) == client_tls.file_secrets(setting)


def test_secrets_hold_the_files_content(tmp_path: Path) -> None:
    """file-cert: the chain and key as in the files; file-root: the CA bundle, and the CRL."""
    write_app_pki(tmp_path, CLIENT)
    crl = tmp_path / "ca.crl"
    crl.write_bytes(_crl(tmp_path))
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(tmp_path)}}))
    simple = {"mode": "SIMPLE", "caCertificates": str(tmp_path / "ca.pem"), "caCrl": str(crl)}
    subset = {"name": "v1", "labels": {"v": "1"}, "trafficPolicy": {"tls": simple}}
    s.put_istio(rule("other", {"host": HOST, "subsets": [subset]}))
    out = _secrets(FileSecrets(), s)
    cert_name, root_name = _names(tmp_path)
    assert set(out) == {cert_name, root_name, _names(tmp_path, str(crl))[1]}
    chain = out[cert_name]["tls_certificate"]
    assert _inline(chain["certificate_chain"]) == (tmp_path / f"{CLIENT}.pem").read_bytes()
    assert _inline(chain["private_key"]) == (tmp_path / f"{CLIENT}.key").read_bytes()
    assert (
        _inline(out[root_name]["validation_context"]["trusted_ca"])
        == (tmp_path / "ca.pem").read_bytes()
    )
    with_crl = out[_names(tmp_path, str(crl))[1]]["validation_context"]
    assert _inline(with_crl["crl"]) == crl.read_bytes()


def test_a_rotated_file_is_a_new_secret_and_no_cluster_changes(tmp_path: Path) -> None:
    """cert-manager rewrites the mounted files: the watch sees it (stale), the next push
    serves the new content under the same name, and the clusters are the same objects."""
    pki, other = tmp_path / "pki", tmp_path / "other"
    write_app_pki(pki, CLIENT)
    write_app_pki(other, CLIENT)
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(pki)}}))
    files, cache, pods = FileSecrets(), TranslationCache(), [local("a")]
    before = cache.build(s, pods, files.sds_secrets(s)).resources
    assert not files.stale()
    again = files.sds_secrets(s)
    assert all(x is before[e.SECRET][x.name] for x in again)  # unchanged: the same objects
    for suffix in (".pem", ".key"):
        _replace(pki / f"{CLIENT}{suffix}", (other / f"{CLIENT}{suffix}").read_bytes())
    assert files.stale()
    after = cache.build(s, pods, files.sds_secrets(s)).resources
    assert not files.stale()
    for type_url in (e.CLUSTER, e.LISTENER, e.ROUTE, e.ENDPOINT):
        assert after[type_url].keys() == before[type_url].keys()
        assert all(after[type_url][n] is m for n, m in before[type_url].items())
    cert_name, _ = _names(pki)
    chain = json_format.MessageToDict(after[e.SECRET][cert_name], preserving_proto_field_name=True)
    assert (
        _inline(chain["tls_certificate"]["certificate_chain"])
        == (other / f"{CLIENT}.pem").read_bytes()
    )
    assert cache.full_recomputes == 1


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("ca.pem", "caCertificates {path}: no such file on this node"),
        (f"{CLIENT}.pem", "clientCertificate {path}: no such file on this node"),
        (f"{CLIENT}.key", "privateKey {path}: no such file on this node"),
    ],
)
def test_a_missing_file_is_a_placeholder_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str, problem: str
) -> None:
    """Istio's sidecar fails the handshake on a missing file; so does the node, without
    holding back the shared cluster: a placeholder no server passes, logged once naming the
    DestinationRule and the path; the file appearing is seen by the watch and served."""
    pki = tmp_path / "pki"
    write_app_pki(pki, CLIENT)
    kept = (pki / broken).read_bytes()
    (pki / broken).unlink()
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(pki)}}))
    files = FileSecrets()
    with caplog.at_level(logging.INFO, logger="nodeagent.identity"):
        first = _secrets(files, s)
        files.sds_secrets(s)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "DestinationRule shop/web" in error
    assert problem.format(path=pki / broken) in error
    cert_name, root_name = _names(pki)
    placeholder = first[root_name if broken == "ca.pem" else cert_name]
    served = json_format.MessageToDict(
        next(x for x in files.sds_secrets(s) if x.name == placeholder["name"]),
        preserving_proto_field_name=True,
    )
    pem = (
        served["validation_context"]["trusted_ca"]
        if broken == "ca.pem"
        else served["tls_certificate"]["certificate_chain"]
    )
    # The stand-in: a self-signed certificate that is not the file's.
    assert b"BEGIN CERTIFICATE" in _inline(pem) and _inline(pem) != kept
    assert not files.stale()
    caplog.clear()
    (pki / broken).write_bytes(kept)
    assert files.stale()
    with caplog.at_level(logging.INFO, logger="nodeagent.identity"):
        now = _secrets(files, s)
    assert "valid now" in caplog.text
    if broken == "ca.pem":
        assert _inline(now[root_name]["validation_context"]["trusted_ca"]) == kept
    else:
        chain = now[cert_name]["tls_certificate"]
        field = "certificate_chain" if broken.endswith(".pem") else "private_key"
        assert _inline(chain[field]) == kept


def test_invalid_files_are_placeholders_naming_the_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not PEM, a key of another certificate (Envoy would NACK the secret), not a CRL: each a
    placeholder, logged with the field and the path."""
    pki, other = tmp_path / "pki", tmp_path / "other"
    write_app_pki(pki, CLIENT)
    write_app_pki(other, CLIENT)
    crl = pki / "ca.crl"
    crl.write_bytes(b"not a crl")
    cases = [
        (pki / "ca.pem", b"garbage", "caCertificates {path}: not PEM certificates"),
        (pki / f"{CLIENT}.pem", b"", "clientCertificate {path}: empty"),
        (
            pki / f"{CLIENT}.key",
            (other / f"{CLIENT}.key").read_bytes(),
            "privateKey {path}: does not match the certificate",
        ),
        (
            pki / f"{CLIENT}.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n",
            "privateKey {path}: not a PEM private key",
        ),
    ]
    s = store()
    s.put_istio(
        rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(pki, caCrl=str(crl))}})
    )
    files = FileSecrets()
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        files.sds_secrets(s)
    assert f"caCrl {crl}: not a PEM CRL" in caplog.text
    crl.write_bytes(_crl(pki))
    for path, content, problem in cases:
        good = path.read_bytes()
        _replace(path, content)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
            files.sds_secrets(s)
        assert problem.format(path=path) in caplog.text
        _replace(path, good)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        files.sds_secrets(s)
    assert caplog.text == ""


def test_a_broken_rotation_keeps_the_last_valid_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation that leaves a file broken (half written, or a key of another certificate
    while its certificate is still on the way) keeps serving the last valid secret, as Istio's
    sidecar does (a failed read pushes nothing; Envoy keeps its secret), logged naming the
    rule and the path; the completed rotation is then served."""
    pki, other = tmp_path / "pki", tmp_path / "other"
    write_app_pki(pki, CLIENT)
    write_app_pki(other, CLIENT)
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(pki)}}))
    files = FileSecrets()
    cert_name, _ = _names(pki)
    first = _secrets(files, s)[cert_name]
    _replace(pki / f"{CLIENT}.key", (other / f"{CLIENT}.key").read_bytes())
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        during = _secrets(files, s)[cert_name]
    assert during == first
    assert f"privateKey {pki / f'{CLIENT}.key'}: does not match the certificate" in caplog.text
    assert "the last valid files stay served" in caplog.text
    _replace(pki / f"{CLIENT}.pem", (other / f"{CLIENT}.pem").read_bytes())
    after = _secrets(files, s)[cert_name]["tls_certificate"]
    assert _inline(after["certificate_chain"]) == (other / f"{CLIENT}.pem").read_bytes()
    assert _inline(after["private_key"]) == (other / f"{CLIENT}.key").read_bytes()


def test_an_unreadable_file_is_a_placeholder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path that cannot be read (here a directory: the agent runs as root, which a file mode
    would not stop) names the reason."""
    write_app_pki(tmp_path, CLIENT)
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.pem").mkdir()
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(tmp_path)}}))
    with caplog.at_level(logging.ERROR, logger="nodeagent.identity"):
        FileSecrets().sds_secrets(s)
    assert f"caCertificates {tmp_path / 'ca.pem'}: cannot be read (Is a directory)" in caplog.text


def test_only_the_rules_files_are_read_and_a_deleted_rule_stops_its_watch(tmp_path: Path) -> None:
    write_app_pki(tmp_path, CLIENT)
    s = store()
    files = FileSecrets()
    assert files.sds_secrets(s) == [] and files.watched() == 0
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(tmp_path)}}))
    assert len(files.sds_secrets(s)) == 2 and files.watched() == 3
    insecure = {"mode": "SIMPLE", "insecureSkipVerify": True}
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": insecure}}))
    assert files.sds_secrets(s) == [] and files.watched() == 0  # the rule changed: no file
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(tmp_path)}}))
    s.put_pod(Pod("shop", "other"))  # another kind's change reads nothing again
    assert len(files.sds_secrets(s)) == 2
    s.delete_istio(rule("shop", {}).key)
    assert files.sds_secrets(s) == [] and files.watched() == 0
    shutil.rmtree(tmp_path)
    assert not files.stale()


def test_the_watch_calls_back_when_a_file_changes(tmp_path: Path) -> None:
    """Polling (stat per file and period), bounded: the callback comes once the file moved."""
    write_app_pki(tmp_path, CLIENT)
    s = store()
    s.put_istio(rule("shop", {"host": HOST, "trafficPolicy": {"tls": _mutual(tmp_path)}}))
    files = FileSecrets()
    files.sds_secrets(s)

    async def scenario() -> int:
        stop, changed = asyncio.Event(), asyncio.Event()
        calls = 0

        def on_change() -> None:
            nonlocal calls
            calls += 1
            changed.set()

        watch = asyncio.create_task(files.watch(stop, on_change, period=0.01))
        _replace(tmp_path / "ca.pem", (tmp_path / "ca.pem").read_bytes())
        async with asyncio.timeout(5):
            await changed.wait()
        stop.set()
        async with asyncio.timeout(5):
            await watch
        return calls

    assert asyncio.run(scenario()) >= 1


def _crl(pki: Path) -> bytes:
    """An empty CRL, signed by a throwaway key (Envoy and the agent parse it, nothing more)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).subject
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now)
        .next_update(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)
