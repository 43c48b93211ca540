"""The CA's own TLS certificate: names from --server-name (DNS names or IP addresses), signed by
the current signer, as istiod serves its CA port with a certificate from its own root."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.caservice.keystore import Signer

SERVER_CERT_TTL = timedelta(days=1)  # re-made at half life, and whenever the signer changes
CLOCK_SKEW = timedelta(minutes=1)


@dataclass(frozen=True)
class ServerCert:
    chain_pem: bytes  # leaf, then intermediates
    key_pem: bytes = field(repr=False)  # in memory only
    not_before: datetime
    not_after: datetime
    fingerprint: str  # the signer it is from

    def stale(self, signer: Signer, now: datetime) -> bool:
        half = self.not_before + (self.not_after - self.not_before) / 2
        return signer.fingerprint != self.fingerprint or now >= half


def san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def server_certificate(signer: Signer, names: Sequence[str]) -> ServerCert:
    if not names:
        raise ValueError("the CA's server certificate needs at least one --server-name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_after = min(now + SERVER_CERT_TTL, signer.cert.not_valid_after_utc)
    digest = (
        None
        if isinstance(signer.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Critical because the subject is empty (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([san(n) for n in names]), critical=True)
        .sign(signer.key, digest)
    )
    pem = serialization.Encoding.PEM
    return ServerCert(
        chain_pem=cert.public_bytes(pem) + b"".join(signer.intermediates_pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        not_before=now - CLOCK_SKEW,
        not_after=not_after,
        fingerprint=signer.fingerprint,
    )
