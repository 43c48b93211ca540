"""RemoteCA: certificates from the CA service (``nodeagent ca``) over Istio's certificate API.

The node agent asks for the identities of the pods on its node as a node proxy does (ztunnel,
istio/ztunnel src/identity/caclient.rs; istio-agent's client is istio/istio
security/pkg/nodeagent/caclient/providers/citadel/client.go): one ``CreateCertificate`` call over
gRPC TLS per identity, a CSR whose only SAN is the SPIFFE ID, the Struct metadata
``ImpersonatedIdentity`` naming it, ``validity_duration`` the TTL, and the node agent's own
projected token as ``authorization: Bearer``. The token is read from its file for every call (the
kubelet rotates it) and never logged.

Every answer is checked before it is installed (a bad one is an IssueError, retried): the leaf's
SAN is exactly the SPIFFE ID asked for, its public key is the key made for it, the chain verifies
to the root bundle the CA sent (the last element of ``cert_chain``, as istiod and ztunnel use it).

The trust bundle (ROOTCA, and what the TLS channel to the CA trusts) is the union of the roots in
``--ca-root-file`` (the mounted ConfigMap ``nodeagent-ca-root``) and of the CA's latest answer:
during a root rotation both roots are trusted. The file is polled by content: the kubelet swaps a
ConfigMap volume by renaming a symlink, which a watch on the file itself misses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2

from nodeagent.identity.certs import (
    ChainError,
    KeyType,
    PrivateKey,
    WorkloadCert,
    generate_key,
    verify_chain,
    workload_cert,
    workload_csr,
)
from nodeagent.identity.issuer import BAD_ANSWER, ERROR, REFUSED, UNAVAILABLE, IssueError
from nodeagent.identity.protocol import (
    AUTHORIZATION,
    IMPERSONATED_IDENTITY,
    METHOD,
    IstioCertificateRequest,
    IstioCertificateResponse,
)

log = logging.getLogger("nodeagent.identity.remote")

DEFAULT_SERVER_NAME = "nodeagent-ca.nodeagent-system.svc"  # caservice.config.default_server_names
CALL_TIMEOUT = 10.0
ROOT_POLL = 3.0  # seconds between looks at --ca-root-file
# The CA's answers, not ours to change: a refusal is final for this request (retried later with
# backoff), anything else means the CA could not decide now.
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Reconnect soon after the CA comes back (gRPC's default backoff grows to 2 minutes).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class RootFileError(Exception):
    """--ca-root-file is missing or holds no certificate; the message names the file."""


def read_roots(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    """The file's content and the certificates in it; RootFileError naming PATH."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise RootFileError(f"CA root file {path}: missing") from None
    except OSError as exc:
        raise RootFileError(f"CA root file {path}: cannot read: {exc.strerror}") from None
    try:
        return content, x509.load_pem_x509_certificates(content)
    except ValueError as exc:
        raise RootFileError(f"CA root file {path}: not a PEM certificate bundle ({exc})") from None


def bundle_pem(*sources: Sequence[x509.Certificate]) -> bytes:
    """The roots of all SOURCES, each once, in order of first appearance."""
    seen: list[x509.Certificate] = []
    for roots in sources:
        seen.extend(r for r in roots if r not in seen)
    return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in seen)


class RemoteCA:
    def __init__(
        self,
        address: str,
        root_file: Path,
        token_file: Path,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = CALL_TIMEOUT,
        refresh_interval: float = ROOT_POLL,
    ) -> None:
        self.address = address
        self.root_file = root_file
        self.token_file = token_file
        self.server_name = server_name
        self.timeout = timeout
        self.refresh_interval: float | None = refresh_interval
        self.name = f"the CA service at {address}"
        self.on_bundle_change: Callable[[], None] | None = None
        self._file_content = b""
        self._file_roots: list[x509.Certificate] = []
        self._ca_roots: list[x509.Certificate] = []  # the root bundle of the latest answer
        self._bundle = b""
        self._root_error = ""
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def root_pem(self) -> bytes:
        return self._bundle

    @property
    def root_error(self) -> str:
        """Why the root file could not be used the last time it was read ("" when it could)."""
        return self._root_error

    def load_roots(self) -> None:
        """Read --ca-root-file; raises RootFileError (the last good bundle stays)."""
        content, roots = read_roots(self.root_file)
        if content == self._file_content:
            return
        self._file_content, self._file_roots = content, roots
        log.info("CA root file %s: %d root certificate(s)", self.root_file, len(roots))
        self._set_bundle()

    async def refresh(self) -> None:
        try:
            self.load_roots()
        except RootFileError as exc:
            if str(exc) != self._root_error:  # once per distinct problem
                log.error("%s; keeping the last good trust bundle", exc)
            self._root_error = str(exc)
            return
        self._root_error = ""

    async def issue(self, spiffe_id: str, ttl: timedelta, key_type: KeyType) -> WorkloadCert:
        # Key generation (RSA 2048: ~50 ms) and the CSR's signature run off the event loop.
        key, csr = await asyncio.to_thread(_key_and_csr, key_type, spiffe_id)
        metadata = struct_pb2.Struct()
        metadata.update({IMPERSONATED_IDENTITY: spiffe_id})
        request = IstioCertificateRequest(
            csr=csr,
            validity_duration=max(1, int(ttl.total_seconds())),
            metadata=metadata,
        )
        token = self._token()
        call = self._channel_now().unary_unary(
            METHOD,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )
        try:
            response = await call(
                request, metadata=[(AUTHORIZATION, f"Bearer {token}")], timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            result = REFUSED if code in _REFUSALS else UNAVAILABLE
            raise IssueError(result, f"{self.name}: {code.name}: {exc.details()}") from None
        return self._checked(response, spiffe_id, key)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        for task in list(self._closing):
            await task

    # -- internals ----------------------------------------------------------------------------

    def _token(self) -> str:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise IssueError(ERROR, f"token file {self.token_file}: {exc.strerror}") from None
        if not token:
            raise IssueError(ERROR, f"token file {self.token_file}: empty")
        return token

    def _channel_now(self) -> grpc.aio.Channel:
        if self._channel is None:
            if not self._bundle:
                raise IssueError(ERROR, f"no trust bundle for {self.name}: {self._root_error}")
            credentials = grpc.ssl_channel_credentials(self._bundle)
            options = [("grpc.ssl_target_name_override", self.server_name), *_CHANNEL_OPTIONS]
            self._channel = grpc.aio.secure_channel(self.address, credentials, options)
        return self._channel

    def _checked(self, response: Any, spiffe_id: str, key: PrivateKey) -> WorkloadCert:
        """The answer as a WorkloadCert once it is what we asked for; IssueError otherwise."""
        chain = [pem.encode() for pem in response.cert_chain]
        bad = f"{self.name} answered a certificate for {spiffe_id} that is not installed"
        if len(chain) < 2:
            raise IssueError(BAD_ANSWER, f"{bad}: {len(chain)} PEM(s), expected leaf and root")
        try:
            leaf = x509.load_pem_x509_certificate(chain[0])
            roots = x509.load_pem_x509_certificates(chain[-1])
        except ValueError as exc:
            raise IssueError(BAD_ANSWER, f"{bad}: unreadable PEM ({exc})") from None
        sans = _uri_sans(leaf)
        if sans != [spiffe_id]:
            raise IssueError(BAD_ANSWER, f"{bad}: its URI SANs are {sans}")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise IssueError(BAD_ANSWER, f"{bad}: its public key is not the one we sent")
        intermediates = chain[1:-1]
        try:
            verify_chain(b"".join([chain[0], *intermediates]), chain[-1])
        except ChainError as exc:
            raise IssueError(BAD_ANSWER, f"{bad}: {exc}") from None
        if roots != self._ca_roots:
            self._ca_roots = roots
            self._set_bundle()
        return workload_cert(spiffe_id, key, [chain[0], *intermediates], chain[-1])

    def _set_bundle(self) -> None:
        bundle = bundle_pem(self._file_roots, self._ca_roots)
        if bundle == self._bundle:
            return
        first = not self._bundle
        self._bundle = bundle
        if first:
            return
        log.warning(
            "trust bundle changed (%d root(s) from %s and the CA's answers): new ROOTCA, new TLS"
            " channel to %s, every identity re-issued",
            bundle.count(b"-----BEGIN CERTIFICATE-----"),
            self.root_file,
            self.address,
        )
        old, self._channel = self._channel, None
        if old is not None:  # calls in flight finish on it
            task = asyncio.get_running_loop().create_task(old.close(grace=self.timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self.on_bundle_change is not None:
            self.on_bundle_change()


def _key_and_csr(key_type: KeyType, spiffe_id: str) -> tuple[PrivateKey, str]:
    key = generate_key(key_type)
    return key, workload_csr(key, spiffe_id)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))
