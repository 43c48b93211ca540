"""The certificate signing request: well formed, self-signed by its key, and asking for exactly
the identity the caller may have.

istiod checks the CSR's signature and then puts the authorized identity in the certificate,
whatever the CSR asked (istio security/pkg/pki/ca/ca.go); here, as the issue asks, a CSR that
asks for anything else than exactly that identity (one SAN, a URI equal to it) is refused, so a
confused or compromised agent is seen rather than silently corrected.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from nodeagent.caservice.refusal import BAD_CSR, SAN_MISMATCH, Refused

MAX_CSR = 64 * 1024  # a CSR is a few hundred bytes; more is not a CSR


def check_csr(pem: str, spiffe_id: str) -> CertificatePublicKeyTypes:
    """The CSR's public key, once the CSR is found to ask for SPIFFE_ID only."""
    if len(pem) > MAX_CSR:
        raise Refused(BAD_CSR, f"the CSR is {len(pem)} bytes, more than {MAX_CSR}")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError:
        raise Refused(BAD_CSR, "the CSR is not a PEM certificate request") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError) as e:
        raise Refused(BAD_CSR, f"the CSR's key or signature cannot be read: {e}") from None
    if not valid:
        raise Refused(BAD_CSR, "the CSR's signature does not verify with its public key")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise Refused(BAD_CSR, f"the CSR's key type {type(key).__name__} is not EC, RSA or Ed25519")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    except (ValueError, x509.DuplicateExtension) as e:
        raise Refused(BAD_CSR, f"the CSR's extensions cannot be read: {e}") from None
    wanted = f"exactly one SAN, URI {spiffe_id}"
    if len(sans) != 1:
        shown = ", ".join(_show(s) for s in sans) or "none"
        raise Refused(SAN_MISMATCH, f"the CSR has {len(sans)} SANs ({shown}); want {wanted}")
    san = sans[0]
    if not isinstance(san, x509.UniformResourceIdentifier) or san.value != spiffe_id:
        raise Refused(SAN_MISMATCH, f"the CSR asks for {_show(san)}; want {wanted}")
    return key


def _show(san: x509.GeneralName) -> str:
    kind = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }.get(type(san), type(san).__name__)
    return f"{kind} {getattr(san, 'value', '?')}"
