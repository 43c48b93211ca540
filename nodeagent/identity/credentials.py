"""SDS secrets from the Kubernetes Secrets DestinationRules name in ``tls.credentialName``.

Names as Istio's (pilot/pkg/model/credentials, security/pkg/nodeagent/sds): the certificate is
``kubernetes://<namespace>/<name>``, the CA bundle ``kubernetes://<namespace>/<name>-cacert``
(from the companion Secret ``<name>-cacert`` when it exists, else from the Secret itself). The
namespace is always spelled out: one node Envoy serves every namespace's workloads.

The TLS sockets only name these secrets (translate/client_tls.py), so a Secret's change is a new
SDS resource and nothing else. A Secret that is missing (or lacks what is asked of it) must
fail the handshake, as at Istio's sidecar, but must not hold back the shared originate-tls
cluster while Envoy waits for an SDS answer that never comes: it is served as a PLACEHOLDER
that no server passes (a CA whose key is thrown away, which signed nothing else), and logged.

A Secret that is named but not read yet (the source has not answered: a watch just started) is
PENDING: none of its SDS secrets is served, so Envoy keeps the cluster naming it warming and the
one it replaces serving, as at Istio's sidecar (Envoy docs, cluster warming: a cluster warms
until its SDS secrets arrive; xds_protocol "eventual consistency"). The real secret goes out as
soon as it is read. Pending is bounded (PENDING_LIMIT, below the 15 s default
initial_fetch_timeout of the sockets' SDS configs, translate/tls.py sds()): then the placeholder,
logged, so nothing warms for long on a Secret that never comes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from nodeagent.mesh.credentials import CA_SUFFIX, UNAUTHORIZED_CA, ca_name, certificate_name
from nodeagent.mesh.model import Credential
from nodeagent.mesh.store import MeshStore

log = logging.getLogger("nodeagent.identity")

# Seconds a named Secret may stay unread before its placeholder is served.
PENDING_LIMIT = 5.0


@functools.cache
def placeholder() -> tuple[bytes, bytes]:
    """A self-signed certificate and its key, made once per process; nothing chains to it, and
    its name cannot be any server's (.invalid, RFC 6761)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "credential-missing.invalid")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _bytes(data: bytes) -> base_pb2.DataSource:
    return base_pb2.DataSource(inline_bytes=data)


def certificate_secret(name: str, cert: bytes, key: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=_bytes(cert), private_key=_bytes(key)
        ),
    )


def ca_secret(name: str, cacert: bytes, crl: bytes = b"") -> secret_pb2.Secret:
    context = common_pb2.CertificateValidationContext(trusted_ca=_bytes(cacert))
    if crl:
        context.crl.CopyFrom(_bytes(crl))
    return secret_pb2.Secret(name=name, validation_context=context)


class CredentialSecrets:
    """The SDS secrets of the credentials a node needs; logs each missing one once (until it
    comes, or stops being needed)."""

    def __init__(
        self,
        pending_limit: float = PENDING_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        owner: str = "DestinationRule",
    ) -> None:
        self.owner = owner  # the kind whose credentialName the log lines name (a gateway's)
        self.missing: set[str] = set()  # SDS names served as placeholders
        self.pending: set[str] = set()  # SDS names withheld: their Secret is not read yet
        self.pending_limit = pending_limit
        self.clock = clock
        self._pending_since: dict[str, float] = {}  # namespace/name -> first seen pending
        self._given_up: set[str] = set()  # namespace/name pending past the limit
        self._next_since: dict[str, float] = {}  # the same two, being made by sds_secrets
        self._next_given_up: set[str] = set()
        self._wake: asyncio.TimerHandle | None = None

    def deadline(self) -> float | None:
        """When (self.clock) the first pending Secret gives way to its placeholder."""
        if not self._pending_since:
            return None
        return min(self._pending_since.values()) + self.pending_limit

    def wake_at_deadline(self, wake: Callable[[], None]) -> None:
        """Call WAKE when the first pending Secret gives way to its placeholder (the proxy
        pushes again though nothing else may change by then); replaces the wake set before.
        Outside an event loop (tests pushing by hand) there is no one to wake."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        deadline = self.deadline()
        if deadline is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wake = loop.call_later(max(0.0, deadline - self.clock()) + 0.01, wake)  # past it

    def _waits(self, store: MeshStore, key: str, now: float) -> bool:
        """Secret KEY is pending, for less than pending_limit (then it is given up: logged)."""
        if not store.credential_pending(key):
            return False
        if key not in self._given_up:
            since = self._pending_since.get(key, now)
            if now - since < self.pending_limit:
                self._next_since[key] = since
                return True
            log.error(
                "%s credentialName: Secret %s not read within %.0fs; its TLS fails until it is",
                self.owner,
                key,
                self.pending_limit,
            )
        self._next_given_up.add(key)
        return False

    def sds_secrets(
        self,
        store: MeshStore,
        wanted: Iterable[tuple[str, str]],
        presented: Iterable[tuple[str, str]] | None = None,
        refused: bool = False,
    ) -> list[secret_pb2.Secret]:
        """Two secrets per (namespace, credentialName) of WANTED: certificate and CA bundle;
        the certificate only for those of PRESENTED (None: all), the credentials some local
        caller may have (mesh/secret_access.py: istiod sends a refused proxy no certificate,
        only the public CA bundle). REFUSED: a local caller is refused one; its socket's CA."""
        out: list[secret_pb2.Secret] = []
        missing: dict[str, str] = {}
        withheld: set[str] = set()
        now = self.clock()
        self._next_since, self._next_given_up = {}, set()
        wanted = set(wanted)
        keyed = wanted if presented is None else wanted & set(presented)
        if refused:
            out.append(ca_secret(UNAUTHORIZED_CA, placeholder()[0]))
        for namespace, name in sorted(wanted):
            own = store.credentials.get(f"{namespace}/{name}")
            companion = store.credentials.get(f"{namespace}/{name}{CA_SUFFIX}")
            cert_name, bundle_name = certificate_name(namespace, name), ca_name(namespace, name)
            own_waits = self._waits(store, f"{namespace}/{name}", now)
            companion_waits = self._waits(store, f"{namespace}/{name}{CA_SUFFIX}", now)
            if (namespace, name) not in keyed:
                pass  # no local caller may have it: the key stays out of the node's Envoy
            elif own_waits:
                withheld.add(cert_name)
            elif own is not None and own.cert and own.key:
                out.append(certificate_secret(cert_name, own.cert, own.key))
            else:
                out.append(certificate_secret(cert_name, *placeholder()))
                missing[cert_name] = f"Secret {namespace}/{name} with cert/key or tls.crt/tls.key"
            bundle = _bundle(companion) or _bundle(own)
            if companion_waits or (own_waits and bundle is None):
                withheld.add(bundle_name)  # the companion, when it comes, is the one to use
            elif bundle is not None:
                out.append(ca_secret(bundle_name, bundle.cacert, bundle.crl))
            else:
                out.append(ca_secret(bundle_name, placeholder()[0]))
                missing[bundle_name] = (
                    f"Secret {namespace}/{name}{CA_SUFFIX} or {namespace}/{name} "
                    "with cacert or ca.crt"
                )
        for sds_name in sorted(missing.keys() - self.missing):
            log.error(
                "%s credentialName: no %s; TLS through %s fails until it exists",
                self.owner,
                missing[sds_name],
                sds_name,
            )
        for sds_name in sorted(self.missing - missing.keys()):
            log.info("%s credentialName: %s is no placeholder any more", self.owner, sds_name)
        self.missing = set(missing)
        self.pending = withheld
        self._pending_since, self._given_up = self._next_since, self._next_given_up
        return out


def _bundle(credential: Credential | None) -> Credential | None:
    return credential if credential is not None and credential.cacert else None
