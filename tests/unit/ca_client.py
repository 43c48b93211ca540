"""A minimal client of the CA service for the tests: a key and CSR, one CreateCertificate call
over TLS (the node agent's real client is nodeagent.identity's).

The unit tests import it; the integration tests run it as a program inside a testbed node's
network namespace, with that node's real token file (``python ca_client.py --help``), and read
its answer as one JSON object on stdout."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    host: str = "127.0.0.1",
) -> Answer:
    """One CreateCertificate call to HOST:PORT, trusting TRUST_PEM for the CA's TLS."""
    metadata = struct_pb2.Struct()
    if impersonate is not None:
        metadata.update({IMPERSONATED_IDENTITY: impersonate})
    request = IstioCertificateRequest(csr=csr, validity_duration=validity, metadata=metadata)
    call_metadata = [(AUTHORIZATION, f"Bearer {token}")] if token is not None else []
    options = [("grpc.ssl_target_name_override", server_name)]
    credentials = grpc.ssl_channel_credentials(trust_pem)
    async with grpc.aio.secure_channel(f"{host}:{port}", credentials, options) as channel:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One CreateCertificate call; JSON answer.")
    parser.add_argument("--address", required=True, help="the CA's HOST:PORT")
    parser.add_argument("--root-file", required=True, type=Path, help="PEM roots to trust")
    parser.add_argument("--token-file", required=True, type=Path, help="the bearer token")
    parser.add_argument("--server-name", required=True, help="the name the CA must present")
    parser.add_argument("--identity", default=None, help="ImpersonatedIdentity (SPIFFE ID)")
    parser.add_argument("--san", action="append", default=[], help="the CSR's SANs")
    args = parser.parse_args(argv)
    host, _, port = str(args.address).rpartition(":")
    answer = asyncio.run(
        create_certificate(
            int(port),
            args.root_file.read_bytes(),
            make_csr(args.san or ([args.identity] if args.identity else [])),
            args.token_file.read_text().strip(),
            impersonate=args.identity,
            server_name=args.server_name,
            host=host,
        )
    )
    json.dump(
        {"code": answer.code.name, "details": answer.details, "chain": answer.chain}, sys.stdout
    )


if __name__ == "__main__":
    main()
