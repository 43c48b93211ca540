"""Envoy SDS secrets for the local identities, and what Envoy reports it holds.

A workload secret is named with its SPIFFE ID (what the translated TLS contexts ask SDS for);
the mesh root is ``ROOTCA``, as in Istio.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from nodeagent.identity.certs import WorkloadCert

ROOTCA = "ROOTCA"  # must equal nodeagent.translate.tls.ROOTCA, which the TLS contexts request
SECRETS_DUMP = "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"


def workload_secret(cert: WorkloadCert) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=cert.spiffe_id,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=cert.key_pem),
        ),
    )


def root_secret(root_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=ROOTCA,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=root_pem)
        ),
    )


def describe_secrets(config_dump: dict[str, Any]) -> list[dict[str, str]]:
    """One row per active SDS secret in Envoy's admin ``/config_dump`` (JSON, as parsed).

    Rows: name, identity (the leaf's URI SAN), serial (hex), not_before, not_after (ISO 8601),
    root_fingerprint (SHA-256 hex of the root; for a workload chain, of the ROOTCA root that
    issued its last certificate, "" when unknown). A secret whose certificates cannot be read
    gets an ``error`` field instead of failing the whole listing. Private keys are never read:
    Envoy redacts them anyway.
    """
    secrets = [
        entry
        for config in config_dump.get("configs", [])
        if config.get("@type") == SECRETS_DUMP
        for entry in config.get("dynamic_active_secrets", [])
    ]
    roots = [root for entry in secrets for root in _trusted_roots(entry)]
    return [_describe(entry, roots) for entry in secrets]


def _trusted_roots(entry: dict[str, Any]) -> list[x509.Certificate]:
    try:
        return _certs(_pem(entry.get("secret", {}).get("validation_context", {}), "trusted_ca"))
    except ValueError:
        return []  # reported on that secret's own row


def _describe(entry: dict[str, Any], roots: list[x509.Certificate]) -> dict[str, str]:
    secret = entry.get("secret", {})
    row = {
        "name": entry.get("name") or secret.get("name", ""),
        "identity": "",
        "serial": "",
        "not_before": "",
        "not_after": "",
        "root_fingerprint": "",
    }
    try:
        if "tls_certificate" in secret:
            chain = _certs(_pem(secret["tls_certificate"], "certificate_chain"))
            if not chain:
                raise ValueError("no certificate in certificate_chain")
            row.update(_validity(chain[0]), identity=_uri_san(chain[0]))
            issuer_root = _issuer_root(chain[-1], roots)
            if issuer_root is not None:
                row["root_fingerprint"] = _fingerprint(issuer_root)
        elif "validation_context" in secret:
            bundle = _certs(_pem(secret["validation_context"], "trusted_ca"))
            if not bundle:
                raise ValueError("no certificate in trusted_ca")
            row.update(_validity(bundle[0]), root_fingerprint=_fingerprint(bundle[0]))
    except ValueError as exc:
        row["error"] = str(exc)
    return row


def _pem(holder: dict[str, Any], field: str) -> bytes:
    source = holder.get(field, {})
    if "inline_bytes" in source:
        try:
            return base64.b64decode(source["inline_bytes"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{field}.inline_bytes is not base64: {exc}") from None
    return str(source.get("inline_string", "")).encode()


def _certs(pem: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        return []
    return x509.load_pem_x509_certificates(pem)


def _validity(cert: x509.Certificate) -> dict[str, str]:
    return {
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _uri_san(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""


def _issuer_root(cert: x509.Certificate, roots: list[x509.Certificate]) -> x509.Certificate | None:
    for root in roots:
        if cert == root:
            return root
        try:
            cert.verify_directly_issued_by(root)
        except Exception:  # wrong issuer, bad signature, unsupported key: not this root
            continue
        return root
    return None


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()
