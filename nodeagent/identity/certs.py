"""Workload certificates: a fresh key in memory, signed by the CA for one SPIFFE ID.

The key never leaves the process except over SDS to Envoy: it is not written to disk, logged, or
shown in a repr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from nodeagent.identity.ca import CertificateAuthority

KeyType = Literal["EC", "RSA"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
RSA_BITS = 2048


class ChainError(Exception):
    """A certificate chain that does not verify; the message says why."""


@dataclass(frozen=True)
class WorkloadCert:
    spiffe_id: str
    chain_pem: bytes  # leaf first, then intermediates; never the root
    key_pem: bytes = field(repr=False)  # PKCS8, in memory only
    serial: int
    not_before: datetime
    not_after: datetime
    root_pem: bytes


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    for what, part in (
        ("trust domain", trust_domain),
        ("namespace", namespace),
        ("service account", service_account),
    ):
        if not part or "/" in part:
            raise ValueError(f"invalid {what} for a SPIFFE ID: {part!r}")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def issue(
    ca: CertificateAuthority, spiffe_id: str, ttl: timedelta, key_type: KeyType = "EC"
) -> WorkloadCert:
    key = generate_key(key_type)
    return workload_cert(spiffe_id, key, ca.sign(key.public_key(), spiffe_id, ttl), ca.root_pem)


def workload_cert(
    spiffe_id: str, key: PrivateKey, chain: Sequence[bytes], root_pem: bytes
) -> WorkloadCert:
    """KEY with its CHAIN (PEM, leaf first, no root), kept as SDS serves them."""
    leaf = x509.load_pem_x509_certificate(chain[0])
    return WorkloadCert(
        spiffe_id=spiffe_id,
        chain_pem=b"".join(chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        root_pem=root_pem,
    )


def verify_chain(chain_pem: bytes, root_pem: bytes) -> None:
    """Raise ChainError unless CHAIN_PEM's leaf verifies, now, as a TLS client to ROOT_PEM.

    The client profile fits mesh certificates: it checks clientAuth and needs no DNS name.
    """
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ChainError(f"no certificate in the chain: {exc}") from None
    try:
        roots = x509.load_pem_x509_certificates(root_pem)
    except ValueError as exc:
        raise ChainError(f"no certificate in the root bundle: {exc}") from None
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(UTC)).build_client_verifier()
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        raise ChainError(f"chain does not verify to the root: {exc}") from None


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"unknown key type {key_type!r}: use 'EC' or 'RSA'")


def workload_csr(key: PrivateKey, spiffe_id: str) -> str:
    """A CSR naming exactly SPIFFE_ID (URI SAN, empty subject), as Istio's clients send."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()
