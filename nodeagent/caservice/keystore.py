"""The signing material, read through the API: Istio's plug-in ``cacerts`` Secret when it
exists, else the CA's own self-signed root in Secret ``nodeagent-ca``, created once.

As istiod (https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/; the
self-signed ``istio-ca-secret``, istio security/pkg/pki/ca/ca.go): the plug-in Secret wins; the
self-signed root is created by whichever replica gets there first (create; on 409 AlreadyExists
the winner's is read), so every replica and every restart signs under one root. Both Secrets have
Istio's cacerts keys (``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``, ``cert-chain.pem``)
and pass the same checks as a mounted cacerts directory (nodeagent.identity.ca.PluginCA).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from nodeagent.caservice.kubeapi import ClusterAPI, Conflict, NotFound, Obj
from nodeagent.identity.ca import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    PLUGIN_KEYS,
    ROOT_CERT,
    CAError,
    PluginCA,
    plugin_cacerts,
)

log = logging.getLogger("nodeagent.caservice.keystore")

PLUGIN_SECRET = "cacerts"
SELF_SIGNED_SECRET = "nodeagent-ca"
SELF_SIGNED_TYPE = "istio.io/ca-root"  # the type of Istio's istio-ca-secret


@dataclass(frozen=True)
class Signer:
    """The CA of one version of a signing Secret."""

    ca: PluginCA
    cert: x509.Certificate  # the issuing certificate (ca-cert.pem)
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    intermediates_pem: tuple[bytes, ...]  # ca-cert first, roots excluded
    roots: tuple[x509.Certificate, ...]
    source: str  # "Secret NS/NAME"
    fingerprint: str  # of the Secret's data: a change is a new signer

    @property
    def root_pem(self) -> bytes:
        return self.ca.root_pem

    @property
    def root_expiry(self) -> datetime:
        """When the first root of the bundle expires."""
        return min(root.not_valid_after_utc for root in self.roots)


def signer_from_files(files: dict[str, bytes], source: str) -> Signer:
    """A Signer from cacerts files; CAError names the Secret and key of what is wrong."""
    ca = PluginCA.from_pem(files, lambda key: f"{source} key {key}")
    # PluginCA has checked every file: what follows cannot fail.
    cert = x509.load_pem_x509_certificate(files[CA_CERT])
    key = serialization.load_pem_private_key(files[CA_KEY], password=None)
    roots = tuple(x509.load_pem_x509_certificates(files[ROOT_CERT]))
    chain = x509.load_pem_x509_certificates(files[CERT_CHAIN])
    intermediates = tuple(
        c.public_bytes(serialization.Encoding.PEM) for c in chain if c not in roots
    )
    digest = hashlib.sha256()
    for name in PLUGIN_KEYS:
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return Signer(
        ca=ca,
        cert=cert,
        key=key,  # type: ignore[arg-type]  # PluginCA accepted it as an issuer key
        intermediates_pem=intermediates,
        roots=roots,
        source=source,
        fingerprint=digest.hexdigest(),
    )


def secret_files(secret: Obj, source: str) -> dict[str, bytes]:
    """A Secret's data, decoded; CAError names a key that is not base64."""
    out: dict[str, bytes] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise CAError(f"{source} key {key}: not base64 (a Secret's data must be)") from None
    return out


class KeyStore:
    def __init__(self, api: ClusterAPI, namespace: str, trust_domain: str) -> None:
        self.api = api
        self.namespace = namespace
        self.trust_domain = trust_domain

    async def load(self, current: Signer | None = None) -> Signer:
        """The signer of the Secrets as they are now (CURRENT when they did not change).

        Raises CAError (bad content, naming Secret and key) or APIError.
        """
        try:
            secret = await self.api.read("secrets", self.namespace, PLUGIN_SECRET)
            name = PLUGIN_SECRET
        except NotFound:
            secret = await self._self_signed()
            name = SELF_SIGNED_SECRET
        source = f"Secret {self.namespace}/{name}"
        files = secret_files(secret, source)
        if current is not None and current.source == source:
            probe = hashlib.sha256()
            for key in PLUGIN_KEYS:
                probe.update(key.encode() + b"\0" + files.get(key, b"") + b"\0")
            if probe.hexdigest() == current.fingerprint:
                return current
        return signer_from_files(files, source)

    async def _self_signed(self) -> Obj:
        try:
            return await self.api.read("secrets", self.namespace, SELF_SIGNED_SECRET)
        except NotFound:
            pass
        files = plugin_cacerts(self.trust_domain, intermediate=False)
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SELF_SIGNED_SECRET, "namespace": self.namespace},
            "type": SELF_SIGNED_TYPE,
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
        }
        try:
            created = await self.api.create("secrets", self.namespace, body)
        except Conflict:
            # Another replica created it between our read and our create: its root is the one.
            log.info(
                "Secret %s/%s was created by another CA replica first: using its root",
                self.namespace,
                SELF_SIGNED_SECRET,
            )
            return await self.api.read("secrets", self.namespace, SELF_SIGNED_SECRET)
        log.info(
            "no Secret %s/%s: created Secret %s/%s with a new self-signed root",
            self.namespace,
            PLUGIN_SECRET,
            self.namespace,
            SELF_SIGNED_SECRET,
        )
        return created
