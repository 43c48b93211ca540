"""Where workload certificates come from: an issuer, local (a CA in this process) or remote.

The IdentityManager only asks an issuer for a certificate and for the trust bundle (``ROOTCA``):
``LocalIssuer`` signs with the built-in or plug-in CA (``--ca-dir``, standalone nodes);
``nodeagent.identity.remote.RemoteCA`` asks the CA service over Istio's certificate API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol, cast

from nodeagent.identity.ca import CertificateAuthority
from nodeagent.identity.certs import KeyType, WorkloadCert, issue

# Results of a certificate request (the label of nodeagent_cert_requests_total).
OK = "ok"
REFUSED = "refused"  # the CA answered no (authentication, authorization, CSR)
UNAVAILABLE = "unavailable"  # the CA could not be reached or could not decide now
BAD_ANSWER = "bad_answer"  # the CA answered a certificate we must not install
ERROR = "error"  # anything else (our token file, a local CA's failure)
RESULTS = (OK, REFUSED, UNAVAILABLE, BAD_ANSWER, ERROR)


class IssueError(Exception):
    """A certificate request that failed; ``result`` is one of RESULTS, ``str()`` says why
    (never a token or a key)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class Issuer(Protocol):
    name: str  # for logs and status: which CA
    # Called when the trust bundle changed (the manager pushes ROOTCA and re-issues everything).
    on_bundle_change: Callable[[], None] | None
    # How often refresh() should run; None when the trust bundle never changes by itself.
    refresh_interval: float | None

    @property
    def root_pem(self) -> bytes:
        """The trust bundle: every root a peer's certificate may chain to (ROOTCA)."""
        ...

    async def issue(self, spiffe_id: str, ttl: timedelta, key_type: KeyType) -> WorkloadCert:
        """A fresh key and its certificate for SPIFFE_ID, checked; raises on failure."""
        ...

    async def refresh(self) -> None:
        """Look at the trust sources again (calls on_bundle_change when the bundle changed)."""
        ...

    async def close(self) -> None: ...


class LocalIssuer:
    """A CA in this process: keys are made and signed off the event loop (RSA keys are slow)."""

    refresh_interval: float | None = None

    def __init__(self, ca: CertificateAuthority, name: str = "the local CA") -> None:
        self.ca = ca
        self.name = name
        self.on_bundle_change: Callable[[], None] | None = None

    @property
    def root_pem(self) -> bytes:
        return self.ca.root_pem

    async def issue(self, spiffe_id: str, ttl: timedelta, key_type: KeyType) -> WorkloadCert:
        return await asyncio.to_thread(issue, self.ca, spiffe_id, ttl, key_type)

    async def refresh(self) -> None:
        return None

    async def close(self) -> None:
        return None


def as_issuer(source: Issuer | CertificateAuthority) -> Issuer:
    """An issuer as is; a CA (anything with ``sign``) wrapped as a LocalIssuer."""
    if isinstance(source, LocalIssuer) or hasattr(source, "refresh"):
        return cast(Issuer, source)
    return LocalIssuer(source)
