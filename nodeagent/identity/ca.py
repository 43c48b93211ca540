"""Certificate authorities that sign workload certificates: built-in, or Istio's plug-in cacerts.

Both sign the same leaf profile (Istio's): SAN URI = the SPIFFE ID only, empty subject, usable
as TLS client and server. ``sign`` returns the chain leaf-first with intermediates, never the
root: peers already trust the root, which SDS delivers separately as ``ROOTCA``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Tolerate clocks of peers that lag a little behind the issuer (Istio backdates too).
CLOCK_SKEW = timedelta(minutes=1)
ROOT_TTL = timedelta(days=3650)
INTERMEDIATE_TTL = timedelta(days=730)
ROOT_CN = "nodeagent root CA"
INTERMEDIATE_CN = "nodeagent intermediate CA"

# Istio's plug-in CA layout (the `cacerts` secret).
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
PLUGIN_KEYS = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)


class CAError(Exception):
    """A CA that cannot sign: says which file is wrong and how."""


class CertificateAuthority(Protocol):
    @property
    def root_pem(self) -> bytes: ...

    def sign(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta
    ) -> list[bytes]: ...


@dataclass(frozen=True)
class _Signer:
    """An issuing certificate and its key, and what sits between it and the root."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    intermediates_pem: tuple[bytes, ...]  # the issuing cert first, root excluded

    def sign_leaf(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta
    ) -> list[bytes]:
        _check_spiffe_id(spiffe_id)
        if ttl <= timedelta(0):
            raise ValueError(f"certificate TTL must be positive, got {ttl}")
        now = datetime.now(UTC)
        # A leaf never outlives its issuer: verifiers would reject it past that point anyway.
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # Critical because the subject is empty (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(_aki(self.cert), critical=False)
            .sign(self.key, _hash_for(self.key))
        )
        return [leaf.public_bytes(serialization.Encoding.PEM), *self.intermediates_pem]


class BuiltinCA:
    """A self-signed root kept in the agent's state directory, made on first start."""

    def __init__(
        self, root: x509.Certificate, key: CertificateIssuerPrivateKeyTypes, trust_domain: str
    ) -> None:
        self.trust_domain = trust_domain
        self.root_pem = root.public_bytes(serialization.Encoding.PEM)
        self._signer = _Signer(root, key, ())

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> BuiltinCA:
        ca_dir = state_dir / "ca"
        cert_path, key_path = ca_dir / ROOT_CERT, ca_dir / CA_KEY
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)  # mkdir's mode is filtered by umask and ignored if it existed
        if not cert_path.exists() and not key_path.exists():
            new_key = ec.generate_private_key(ec.SECP256R1())
            root = _self_signed_root(new_key, trust_domain)
            _write_private(key_path, _key_pem(new_key))
            _write_private(cert_path, root.public_bytes(serialization.Encoding.PEM))
            return cls(root, new_key, trust_domain)
        # One file without the other is damage: a new root would silently change the mesh's trust.
        root = _load_certs(cert_path)[0]
        key = _load_key(key_path)
        _check_is_ca(root, str(cert_path))
        _check_key_matches(key, str(key_path), root, cert_path.name)
        for path in (cert_path, key_path):
            os.chmod(path, 0o600)
        return cls(root, key, trust_domain)

    def sign(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta
    ) -> list[bytes]:
        if not spiffe_id.startswith(f"spiffe://{self.trust_domain}/"):
            raise ValueError(f"{spiffe_id!r} is outside trust domain {self.trust_domain!r}")
        return self._signer.sign_leaf(public_key, spiffe_id, ttl)


class PluginCA:
    """Istio's plug-in CA: signs with ca-cert/ca-key, which may be an intermediate of the root."""

    def __init__(self, signer: _Signer, root_pem: bytes) -> None:
        self.root_pem = root_pem
        self._signer = signer

    @classmethod
    def load(cls, cacerts_dir: Path) -> PluginCA:
        """From a directory (the mounted ``cacerts`` Secret); errors name the file."""
        files = {name: _read(cacerts_dir / name) for name in PLUGIN_KEYS}
        return cls.from_pem(files, lambda name: str(cacerts_dir / name))

    @classmethod
    def from_pem(cls, files: Mapping[str, bytes], where: Callable[[str], str]) -> PluginCA:
        """From the four PEM files' contents (keys: PLUGIN_KEYS), e.g. a Secret read through the
        API; ``where(key)`` names a file's origin in errors (a path, or a Secret and its key)."""
        missing = [name for name in PLUGIN_KEYS if name not in files]
        if missing:
            raise CAError(f"{where(missing[0])}: missing")
        ca_cert = _parse_certs(files[CA_CERT], where(CA_CERT))[0]
        key = _parse_key(files[CA_KEY], where(CA_KEY))
        roots = _parse_certs(files[ROOT_CERT], where(ROOT_CERT))
        chain = _parse_certs(files[CERT_CHAIN], where(CERT_CHAIN))
        _check_is_ca(ca_cert, where(CA_CERT))
        _check_key_matches(key, where(CA_KEY), ca_cert, CA_CERT)
        if chain[0] != ca_cert:
            raise CAError(f"{where(CERT_CHAIN)}: its first certificate must be {CA_CERT}'s")
        _check_chain_to_roots(chain, where(CERT_CHAIN), roots, ROOT_CERT)
        # Istio's cert-chain.pem usually ends with the root; peers have it already.
        intermediates = tuple(
            c.public_bytes(serialization.Encoding.PEM) for c in chain if c not in roots
        )
        root_pem = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
        return cls(_Signer(ca_cert, key, intermediates), root_pem)

    def sign(
        self, public_key: CertificatePublicKeyTypes, spiffe_id: str, ttl: timedelta
    ) -> list[bytes]:
        return self._signer.sign_leaf(public_key, spiffe_id, ttl)


def plugin_cacerts(trust_domain: str, intermediate: bool = True) -> dict[str, bytes]:
    """A fresh root (and intermediate) as Istio's cacerts files: file name -> PEM.

    The root's key is not kept when an intermediate signs: nothing here needs it.
    """
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _self_signed_root(root_key, trust_domain)
    ca_key, ca_cert = root_key, root
    if intermediate:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _intermediate(ca_key, root, root_key, trust_domain)
    pem = serialization.Encoding.PEM
    chain = [ca_cert] if ca_cert == root else [ca_cert, root]
    return {
        CA_KEY: _key_pem(ca_key),
        CA_CERT: ca_cert.public_bytes(pem),
        ROOT_CERT: root.public_bytes(pem),
        CERT_CHAIN: b"".join(c.public_bytes(pem) for c in chain),
    }


def create_plugin_cacerts(dir: Path, trust_domain: str, intermediate: bool = True) -> None:
    """Write a fresh root (and intermediate) in Istio's cacerts layout, every file 0600."""
    dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in plugin_cacerts(trust_domain, intermediate).items():
        _write_private(dir / name, data)


def _check_spiffe_id(spiffe_id: str) -> None:
    trust_domain, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    if not spiffe_id.startswith("spiffe://") or not trust_domain or not path:
        raise ValueError(f"not a SPIFFE ID (spiffe://<trust domain>/<path>): {spiffe_id!r}")


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_builder(
    subject: x509.Name, issuer: x509.Name, public_key: CertificatePublicKeyTypes, ttl: timedelta
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _self_signed_root(key: ec.EllipticCurvePrivateKey, trust_domain: str) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, ROOT_CN),
        ]
    )
    return (
        _ca_builder(name, name, key.public_key(), ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _intermediate(
    key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, INTERMEDIATE_CN),
        ]
    )
    return (
        _ca_builder(name, root.subject, key.public_key(), INTERMEDIATE_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_aki(root), critical=False)
        .sign(root_key, hashes.SHA256())
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # EdDSA signs the message itself; everything else signs a SHA-256 digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write DATA readable by the owner only, atomically: a crash never leaves half a key."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path}: missing") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot read: {exc.strerror}") from None


def _load_certs(path: Path) -> list[x509.Certificate]:
    return _parse_certs(_read(path), str(path))


def _parse_certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAError(f"{where}: not a PEM certificate file ({exc})") from None


def _load_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    return _parse_key(_read(path), str(path))


def _parse_key(data: bytes, where: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{where}: encrypted; nodeagent needs an unencrypted PEM key") from None
    except ValueError:
        # The parser's message may quote the input: keep it out of errors and logs.
        raise CAError(f"{where}: not a PEM private key") from None
    supported = (
        ec.EllipticCurvePrivateKey,
        rsa.RSAPrivateKey,
        ed25519.Ed25519PrivateKey,
        ed448.Ed448PrivateKey,
    )
    if not isinstance(key, supported):
        raise CAError(f"{where}: {type(key).__name__} cannot sign certificates; use EC or RSA")
    return key


def _check_is_ca(cert: x509.Certificate, where: str) -> None:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise CAError(f"{where}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise CAError(f"{where}: expired on {cert.not_valid_after_utc.isoformat()}")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # no keyUsage at all: any use is allowed
    if not usage.key_cert_sign:
        raise CAError(f"{where}: its keyUsage does not allow signing certificates (keyCertSign)")


def _check_key_matches(
    key: CertificateIssuerPrivateKeyTypes, key_where: str, cert: x509.Certificate, cert_name: str
) -> None:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CAError(f"{key_where}: does not match the public key of {cert_name}")


def _check_chain_to_roots(
    chain: Sequence[x509.Certificate],
    chain_where: str,
    roots: Sequence[x509.Certificate],
    roots_name: str,
) -> None:
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        if not _issued_by(cert, issuer):
            raise CAError(
                f"{chain_where}: certificate #{i + 1} ({cert.subject.rfc4514_string()}) is not "
                f"signed by the next one ({issuer.subject.rfc4514_string()})"
            )
    last = chain[-1]
    if last in roots or any(_issued_by(last, root) for root in roots):
        return
    raise CAError(
        f"{chain_where}: does not chain to {roots_name}: its last certificate "
        f"({last.subject.rfc4514_string()}) is not signed by any root there"
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
