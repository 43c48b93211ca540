"""A minimal client of the CA service for the tests: a key and CSR, one CreateCertificate call
over TLS (the node agent's real client is nodeagent.identity's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from nodeagent.identity.protocol import (
    AUTHORIZATION,
    IMPERSONATED_IDENTITY,
    METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)


def make_csr(sans: Sequence[str], key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """A PEM CSR for URI SANs (a name with "://" is a URI, anything else a DNS name)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(s) if "://" in s else x509.DNSName(s) for s in sans
    ]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tamper(csr_pem: str) -> str:
    """The CSR with one bit of its signature flipped: still parses, no longer verifies."""
    der = bytearray(
        x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Answer:
    chain: list[str]  # [leaf, intermediates..., root bundle]
    code: grpc.StatusCode
    details: str


async def create_certificate(
    port: int,
    trust_pem: bytes,
    csr: str,
    token: str | None,
    impersonate: str | None = None,
    validity: int = 0,
    server_name: str = "127.0.0.1",
) -> Answer:
    """One CreateCertificate call to 127.0.0.1:PORT, trusting TRUST_PEM for the CA's TLS."""
    metadata = struct_pb2.Struct()
    if impersonate is not None:
        metadata.update({IMPERSONATED_IDENTITY: impersonate})
    request = IstioCertificateRequest(csr=csr, validity_duration=validity, metadata=metadata)
    call_metadata = [(AUTHORIZATION, f"Bearer {token}")] if token is not None else []
    options = [("grpc.ssl_target_name_override", server_name)]
    credentials = grpc.ssl_channel_credentials(trust_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )
        try:
            response = await call(request, metadata=call_metadata, timeout=10)
        except grpc.aio.AioRpcError as e:
            return Answer([], e.code(), e.details() or "")
    return Answer(list(response.cert_chain), grpc.StatusCode.OK, "")
